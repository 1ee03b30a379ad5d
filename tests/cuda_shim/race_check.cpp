// csrc/cuda/kernels.cuh with each block's threads as real threads
// (host_shim.h's FROZENOPT_SHIM_THREADS), built with -fsanitize=thread by
// tests/test_cuda_kernels_cpu.py: ThreadSanitizer then reports any missing
// __syncthreads or cross-thread race within a block. Small cases: every
// dtype, SGD (with and without momentum) and Adam (with and without amsgrad),
// a frozen tensor among unfrozen ones, aligned and misaligned rows, ragged
// chunk tails, and launch limits low enough for several launches per op.
// Each result is compared bit for bit with a plain loop over the same update
// math. Exit status 0: all equal; 1: a mismatch (printed). ThreadSanitizer
// exits with its own status (TSAN_OPTIONS exitcode) on a race.
//
//   race_check                  every case
//   race_check --drop-barriers  one case with __syncthreads a no-op: the
//                               race the barrier prevents must be reported
#include "host_shim.h"

// The shim's macros must come before the kernel source.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>

#include "cuda/kernels.cuh"

using namespace frozenopt;
using namespace frozenopt::cuda;

namespace {

constexpr size_t kAlign = 64;
const std::vector<int64_t> kSizes = {5, 0, 1030, 64, 2051};  // ragged tails; the empty one takes no slot
constexpr int kFrozen = 3;
constexpr int kSteps = 2;
const LimitOverride kLimits{2, 2, 2};  // several launches per op

// One row of a tensor: its own allocation, its data `offset` elements in (1:
// misaligned for every vector width).
template <typename S>
struct Row {
  S* base = nullptr;
  S* data = nullptr;
  Row(int64_t n, int offset) {
    const size_t bytes = ((size_t(n + offset) * sizeof(S) + kAlign - 1) / kAlign + 1) * kAlign;
    base = static_cast<S*>(std::aligned_alloc(kAlign, bytes));
    data = base + offset;
  }
  Row(const Row&) = delete;
  ~Row() { std::free(base); }
};

uint64_t next_random(uint64_t& state) {
  state = state * 6364136223846793005ULL + 1442695040888963407ULL;
  return state >> 11;
}

template <typename S>
void fill(S* dst, int64_t n, uint64_t seed, bool positive) {
  for (int64_t i = 0; i < n; ++i) {
    double u = double(next_random(seed)) / double(1ULL << 53) * 2.0 - 1.0;
    dst[i] = S(positive ? u * u : u);
  }
}

template <typename S>
bool same_bits(const S* a, const S* b, int64_t n) {
  return n == 0 || std::memcmp(a, b, size_t(n) * sizeof(S)) == 0;
}

template <typename S>
DType dtype_of() {
  if constexpr (std::is_same_v<S, float>) return DType::kFloat;
  if constexpr (std::is_same_v<S, double>) return DType::kDouble;
  if constexpr (std::is_same_v<S, c10::Half>) return DType::kHalf;
  return DType::kBFloat16;
}

constexpr double kLr = 0.05, kGradScale = 2.0;

StepArgs step_args(const uint8_t* mask) { return {mask, host_scalar(0.0), host_scalar(kGradScale), host_scalar(kLr)}; }

enum class Op { kSgd, kSgdMomentum, kAdam, kAdamAmsgrad };

const char* name_of(Op op) {
  switch (op) {
    case Op::kSgd: return "sgd";
    case Op::kSgdMomentum: return "sgd+momentum";
    case Op::kAdam: return "adam";
    default: return "adam+amsgrad";
  }
}

// Runs kSteps steps of `op` through the kernels and through the reference
// loop; returns false (after printing why) when any bit differs.
template <typename S>
bool check(Op op, int offset) {
  using M = math::MathType<S>;
  const bool adam = op == Op::kAdam || op == Op::kAdamAmsgrad;
  const int rows = adam ? (op == Op::kAdamAmsgrad ? 5 : 4) : (op == Op::kSgdMomentum ? 3 : 2);  // element rows
  const size_t n = kSizes.size();
  // [version: 0 kernels, 1 reference][tensor][row]
  std::vector<std::vector<std::vector<std::unique_ptr<Row<S>>>>> data(2);
  std::vector<std::vector<float>> steps(2, std::vector<float>(n, 0.0f));
  for (auto& version : data) {
    version.resize(n);
    for (size_t t = 0; t < n; ++t) {
      for (int r = 0; r < rows; ++r) {
        version[t].push_back(std::make_unique<Row<S>>(kSizes[t], offset));
        // param, grad, then states (Adam's exp_avg_sq and max must be >= 0)
        fill(version[t][r]->data, kSizes[t], 1000 * t + r, adam && r >= 3);
      }
    }
  }
  std::vector<uint8_t> mask(n, 0);
  mask[kFrozen] = 1;

  SGDArgs sgd{};
  sgd.common = step_args(mask.data());
  sgd.hyper = {.momentum = op == Op::kSgdMomentum ? 0.9 : 0.0, .dampening = 0.1, .weight_decay = 0.01};
  AdamArgs adam_args{};
  adam_args.common = step_args(mask.data());
  adam_args.hyper = {.beta1 = 0.9,
                     .beta2 = 0.999,
                     .eps = 1e-8,
                     .weight_decay = 0.1,
                     .amsgrad = op == Op::kAdamAmsgrad,
                     .decoupled_weight_decay = true};
  std::vector<AdamTensorScalars> scratch(n);
  adam_args.tensor_scalars = scratch.data();

  for (int step = 0; step < kSteps; ++step) {
    // The kernels.
    std::vector<OpTensor> tensors(n);
    for (size_t t = 0; t < n; ++t) {
      tensors[t].dtype = dtype_of<S>();
      tensors[t].numel = kSizes[t];
      // Rows in the launchers' order: param, grad, states (Adam's step in row::kStep).
      int r = 0;
      for (int d = 0; d < rows; ++d, ++r) {
        if (adam && r == row::kStep) ++r;
        tensors[t].rows[r] = data[0][t][d]->data;
      }
      if (adam) tensors[t].rows[row::kStep] = &steps[0][t];
    }
    shim::Launcher launcher;
    if (adam) {
      run_adam<mt::kSmallArgBytes>(tensors, adam_args, launcher, kLimits);
    } else {
      sgd.hyper.first_step = step == 0;
      run_sgd<mt::kSmallArgBytes>(tensors, sgd, launcher, kLimits);
    }
    // The reference: the same math, one element at a time.
    for (size_t t = 0; t < n; ++t) {
      if (mask[t]) continue;
      auto& d = data[1][t];
      S* p = d[0]->data;
      const S* g = d[1]->data;
      if (!adam) {
        const math::SGDCoef<M> c = math::sgd_coef<M>(sgd.hyper, kLr, kGradScale);
        for (int64_t e = 0; e < kSizes[t]; ++e) {
          M vp = M(p[e]);
          M vb = op == Op::kSgdMomentum && step > 0 ? M(d[2]->data[e]) : M(0);
          math::sgd_update(vp, M(g[e]), &vb, c);
          p[e] = S(vp);
          if (op == Op::kSgdMomentum) d[2]->data[e] = S(vb);
        }
        continue;
      }
      steps[1][t] += 1.0f;
      const math::AdamHyper& h = adam_args.hyper;
      const math::AdamCoef<M> c =
          math::adam_coef<M>(h, kLr, kGradScale, math::adam_step_scalars(kLr, h, double(steps[1][t])));
      for (int64_t e = 0; e < kSizes[t]; ++e) {
        M vp = M(p[e]), vm = M(d[2]->data[e]), vv = M(d[3]->data[e]);
        M vx = adam_args.hyper.amsgrad ? M(d[4]->data[e]) : M(0);
        math::adam_update(vp, M(g[e]), vm, vv, &vx, c);
        p[e] = S(vp);
        d[2]->data[e] = S(vm);
        d[3]->data[e] = S(vv);
        if (adam_args.hyper.amsgrad) d[4]->data[e] = S(vx);
      }
    }
  }
  for (size_t t = 0; t < n; ++t) {
    for (int r = 0; r < rows; ++r) {
      if (!same_bits(data[0][t][r]->data, data[1][t][r]->data, kSizes[t])) {
        std::printf("MISMATCH %s sizeof %zu offset %d: tensor %zu row %d\n", name_of(op), sizeof(S), offset, t, r);
        return false;
      }
    }
    if (steps[0][t] != steps[1][t]) {
      std::printf("MISMATCH %s sizeof %zu: step of tensor %zu: %g vs %g\n", name_of(op), sizeof(S), t,
                  double(steps[0][t]), double(steps[1][t]));
      return false;
    }
  }
  return true;
}

template <typename S>
int check_all(int& cases) {
  int failures = 0;
  for (Op op : {Op::kSgd, Op::kSgdMomentum, Op::kAdam, Op::kAdamAmsgrad}) {
    for (int offset : {0, 1}) {
      failures += !check<S>(op, offset);
      ++cases;
    }
  }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--drop-barriers") {
    shim::drop_barriers = true;
    check<float>(Op::kSgd, 0);  // its result does not matter: ThreadSanitizer must report the race
    std::printf("race_check: ran with barriers dropped\n");
    return 0;
  }
  int cases = 0;
  const int failures = check_all<float>(cases) + check_all<double>(cases) + check_all<c10::Half>(cases) +
                       check_all<c10::BFloat16>(cases);
  std::printf("race_check: %d cases, %d failed; %lld launches, %lld blocks, %lld barriers\n", cases, failures,
              static_cast<long long>(shim::stats.launches), static_cast<long long>(shim::stats.blocks),
              static_cast<long long>(shim::stats.barriers));
  return failures ? 1 : 0;
}
