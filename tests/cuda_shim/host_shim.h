// A host shim for CUDA kernel source: enough of CUDA's C++ dialect that
// csrc/cuda/kernels.cuh compiles with g++, and a launcher that runs the blocks
// of a launch one by one, each block's threads in one of two ways:
//
// - fibers (the default, used by the Python test module): the threads of a
//   block are ucontext fibers run in turn on one OS thread; each runs until it
//   reaches __syncthreads (or returns), then the next one runs; once all have
//   arrived, they all resume. Fast and deterministic.
// - real threads (FROZENOPT_SHIM_THREADS, used by race_check.cpp under
//   ThreadSanitizer): the threads of a block are OS threads of a pool and
//   __syncthreads is a real barrier (a mutex and condition variables, which
//   ThreadSanitizer understands), so a missing barrier or a cross-thread race
//   on shared memory or on the tensors shows up as a data race report.
//
// In both, a barrier that some threads of a block reach while others have
// returned is reported as an error (it is undefined behaviour on a GPU).
// __shared__ variables become function-local statics, which is exactly
// block-shared storage when blocks run one by one.
//
// What this does NOT model: concurrency between blocks, warp intrinsics,
// atomics, the GPU memory model, the real kernel-argument limits and launch
// failures.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(FROZENOPT_SHIM_THREADS)
#include <condition_variable>
#include <mutex>
#include <thread>
#else
#include <sys/mman.h>
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct ShimDim3 {
  unsigned int x = 0, y = 0, z = 0;
};
inline thread_local ShimDim3 threadIdx;
inline ShimDim3 blockIdx, blockDim{1, 1, 1}, gridDim{1, 1, 1};

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

inline std::string partial_barrier(int arrived, int returned) {
  return "shim: __syncthreads reached by " + std::to_string(arrived) + " threads of block " +
         std::to_string(blockIdx.x) + " while " + std::to_string(returned) + " returned";
}

#if defined(FROZENOPT_SHIM_THREADS)

// Set by a test that wants to see a missing barrier caught: __syncthreads
// then does nothing.
inline bool drop_barriers = false;

class Block {
 public:
  ~Block() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& w : workers_) w.join();
  }

  void run_block(int nthreads, const std::function<void()>& body) {
    std::unique_lock<std::mutex> lock(mu_);
    while (static_cast<int>(workers_.size()) < nthreads) {
      const int t = static_cast<int>(workers_.size());
      workers_.emplace_back([this, t] { work(t); });
    }
    body_ = &body;
    nthreads_ = nthreads;
    arrived_ = 0;
    returned_ = 0;
    error_.clear();
    ++block_;
    start_.notify_all();
    done_.wait(lock, [&] { return returned_ == nthreads_; });
    if (!error_.empty()) throw std::logic_error(error_);
  }

  void barrier() {
    if (drop_barriers) return;
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t generation = barrier_generation_;
    ++arrived_;
    if (arrived_ + returned_ == nthreads_) {
      release();
      return;
    }
    released_.wait(lock, [&] { return barrier_generation_ != generation; });
  }

 private:
  void work(int t) {
    int64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || (block_ != seen && t < nthreads_); });
      if (stop_) return;
      seen = block_;
      lock.unlock();
      threadIdx = {unsigned(t), 0, 0};
      (*body_)();
      lock.lock();
      ++returned_;
      if (arrived_ > 0 && arrived_ + returned_ == nthreads_) release();
      if (returned_ == nthreads_) done_.notify_all();
    }
  }

  // Called with mu_ held once every thread has arrived or returned.
  void release() {
    if (returned_ > 0 && error_.empty()) error_ = partial_barrier(arrived_, returned_);
    ++stats.barriers;
    arrived_ = 0;
    ++barrier_generation_;
    released_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable start_, done_, released_;
  std::vector<std::thread> workers_;
  const std::function<void()>* body_ = nullptr;
  int nthreads_ = 0;
  int arrived_ = 0;
  int returned_ = 0;
  int64_t block_ = 0;
  int64_t barrier_generation_ = 0;
  bool stop_ = false;
  std::string error_;
};

#else  // fibers

class Block {
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
      makecontext(&ctx_[t], &Block::entry, 0);
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
      if (arrived > 0 && returned > 0) throw std::logic_error(partial_barrier(arrived, returned));
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
    void* mem =
        mmap(nullptr, size_t(n) * kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
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

  friend Block& block();
};

#endif

inline Block& block() {
  static Block b;
  return b;
}

#if !defined(FROZENOPT_SHIM_THREADS)
inline void Block::entry() {
  Block& b = block();
  (*b.body_)();
  b.state_[b.current_] = kDone;
}  // returns to uc_link: the scheduler
#endif

// The launcher kernels.cuh's run_* functions take: runs kernel<<<grid, block>>>(args...).
struct Launcher {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, int grid, int nthreads, const Args&... args) {
    if (grid <= 0 || nthreads <= 0 || nthreads > 1024) throw std::invalid_argument("shim: bad launch configuration");
    ++stats.launches;
    stats.grid_of_launch.push_back(grid);
    gridDim = {unsigned(grid), 1, 1};
    blockDim = {unsigned(nthreads), 1, 1};
    const std::function<void()> body = [&] { kernel(args...); };
    const int launch_no = block_filter.next_launch++;
    for (int b = 0; b < grid; ++b) {
      if (!block_filter.runs(launch_no, b)) continue;
      blockIdx = {unsigned(b), 0, 0};
      ++stats.blocks;
      stats.threads += nthreads;
      block().run_block(nthreads, body);
    }
  }
};

}  // namespace shim

inline void __syncthreads() { shim::block().barrier(); }
