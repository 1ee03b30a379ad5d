// A host shim for CUDA kernel source: enough of CUDA's C++ dialect that
// csrc/cuda/kernels.cuh compiles with g++, and a launcher that runs every
// block of a launch in turn and, within a block, every thread in turn.
//
// Threads are ucontext fibers so that __syncthreads is a real barrier: each
// thread runs until it reaches the barrier (or returns), then the next one
// runs; once all have arrived, they all resume. A barrier that some threads of
// a block reach while others have returned is reported as an error (it is
// undefined behaviour on a GPU). __shared__ variables become function-local
// statics, which is exactly block-shared storage when blocks run one by one.
//
// What this does NOT model: concurrency between blocks or between threads
// (no data race can show up here), warp intrinsics, atomics, the memory
// model, the real kernel-argument limits and launch failures.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct ShimDim3 {
  unsigned int x = 0, y = 0, z = 0;
};
inline ShimDim3 threadIdx, blockIdx, blockDim{1, 1, 1}, gridDim{1, 1, 1};

namespace shim {

struct Stats {
  int64_t launches = 0;
  int64_t blocks = 0;
  int64_t threads = 0;
  int64_t barriers = 0;
  std::vector<int> grid_of_launch;  // grid size of each launch, in order
};
inline Stats stats;

// When set, only these (launch number, block index) pairs run; launch numbers
// count from the moment the filter was set. Lets a test run the last chunk of
// a tensor of 2^31+ elements whose other chunks have no memory behind them.
struct BlockFilter {
  bool on = false;
  int next_launch = 0;
  std::vector<std::pair<int, int>> allowed;
  bool runs(int launch, int block) const {
    if (!on) return true;
    for (const auto& [l, b] : allowed) {
      if (l == launch && b == block) return true;
    }
    return false;
  }
};
inline BlockFilter block_filter;

class Fibers {
 public:
  static constexpr size_t kStack = 256 * 1024;  // a thread's locals hold a copy of the 32 KB metadata

  void run_block(int nthreads, const std::function<void()>& body) {
    reserve(nthreads);
    body_ = &body;
    for (int t = 0; t < nthreads; ++t) {
      getcontext(&ctx_[t]);
      ctx_[t].uc_stack.ss_sp = stacks_ + size_t(t) * kStack;
      ctx_[t].uc_stack.ss_size = kStack;
      ctx_[t].uc_link = &scheduler_;
      makecontext(&ctx_[t], &Fibers::entry, 0);
      state_[t] = kReady;
    }
    int alive = nthreads;
    while (alive > 0) {
      int arrived = 0, returned = 0;
      for (int t = 0; t < nthreads; ++t) {
        if (state_[t] == kDone) continue;
        state_[t] = kReady;
        current_ = t;
        threadIdx = {unsigned(t), 0, 0};
        swapcontext(&scheduler_, &ctx_[t]);
        if (state_[t] == kDone) {
          ++returned;
        } else {
          ++arrived;
        }
      }
      if (arrived > 0 && returned > 0) {
        throw std::logic_error("shim: __syncthreads reached by " + std::to_string(arrived) + " threads of block " +
                               std::to_string(blockIdx.x) + " while " + std::to_string(returned) + " returned");
      }
      if (arrived > 0) ++stats.barriers;
      alive -= returned;
    }
  }

  void barrier() {
    state_[current_] = kAtBarrier;
    swapcontext(&ctx_[current_], &scheduler_);
  }

 private:
  enum State { kReady, kAtBarrier, kDone };

  static void entry();

  void reserve(int n) {
    if (n <= capacity_) return;
    if (stacks_ != nullptr) munmap(stacks_, size_t(capacity_) * kStack);
    void* mem = mmap(nullptr, size_t(n) * kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("shim: cannot map fiber stacks");
    stacks_ = static_cast<char*>(mem);
    capacity_ = n;
    ctx_.resize(n);
    state_.resize(n);
  }

  char* stacks_ = nullptr;
  int capacity_ = 0;
  std::vector<ucontext_t> ctx_;
  std::vector<State> state_;
  ucontext_t scheduler_;
  int current_ = 0;
  const std::function<void()>* body_ = nullptr;

  friend Fibers& fibers();
};

inline Fibers& fibers() {
  static Fibers f;
  return f;
}

inline void Fibers::entry() {
  Fibers& f = fibers();
  (*f.body_)();
  f.state_[f.current_] = kDone;
}  // returns to uc_link: the scheduler

// The launcher kernels.cuh's run_* functions take: runs kernel<<<grid, block>>>(args...).
struct Launcher {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, int grid, int block, const Args&... args) {
    if (grid <= 0 || block <= 0 || block > 1024) throw std::invalid_argument("shim: bad launch configuration");
    ++stats.launches;
    stats.grid_of_launch.push_back(grid);
    gridDim = {unsigned(grid), 1, 1};
    blockDim = {unsigned(block), 1, 1};
    const std::function<void()> body = [&] { kernel(args...); };
    const int launch_no = block_filter.next_launch++;
    for (int b = 0; b < grid; ++b) {
      if (!block_filter.runs(launch_no, b)) continue;
      blockIdx = {unsigned(b), 0, 0};
      ++stats.blocks;
      stats.threads += block;
      fibers().run_block(block, body);
    }
  }
};

}  // namespace shim

inline void __syncthreads() { shim::fibers().barrier(); }
