// Plain argument structs shared by the CUDA kernels, their host launchers and
// the CPU shim that runs the kernel bodies in tests. No CUDA, no ATen.
#pragma once

#include <cstdint>
#include <vector>

#include "launch_plan.h"

namespace frozenopt {
namespace cuda {

// Element types of a launch (one launch group per dtype).
enum class DType : int32_t { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// A scalar the kernel reads when it runs: from device memory when `ptr` is
// set (a CUDA tensor: lr, grad_scale, found_inf; read on the device, never
// synchronised to the host), else `value` (a float argument or a CPU tensor).
struct ScalarArg {
  const void* ptr;
  int32_t is_double;  // the pointee is double (else float)
  double value;
};

inline ScalarArg host_scalar(double v) { return {nullptr, 0, v}; }

// What every step launch needs besides the tensor addresses.
struct StepArgs {
  const uint8_t* mask;  // one byte per tensor id, non-zero = frozen; nullptr = none frozen
  ScalarArg found_inf;  // non-zero: skip everything (AMP overflow)
  ScalarArg grad_scale;  // the grads are divided by it
  ScalarArg lr;
};

struct SGDArgs {
  StepArgs common;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  bool first_step;
};

struct AdamArgs {
  StepArgs common;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;
};

// Address rows of the metadata, per op.
namespace row {
constexpr int kParam = 0, kGrad = 1;
constexpr int kMomentum = 2;                                  // sgd with momentum: depth 3, else 2
constexpr int kExpAvg = 2, kExpAvgSq = 3, kStep = 4, kMaxExpAvgSq = 5;  // adam: depth 5, 6 with amsgrad
}  // namespace row

// One tensor of an op's lists as the launchers take it: its element type, its
// size and the address of each row (param, grad, states; the Adam step
// counter in row::kStep). Its tensor id is its index in the list.
struct OpTensor {
  DType dtype;
  int64_t numel;
  void* rows[mt::kMaxDepth];
};

// Launch limits a test may lower to force many launches; 0 = the struct's capacity.
struct LimitOverride {
  int max_tensors = 0;
  int max_blocks = 0;
  int max_steps = 0;
};

// Kernel-argument budget of this build: 32 KB needs CUDA >= 12.1 and sm_70+
// for every architecture compiled; setup.py defines FROZENOPT_SMALL_KERNEL_ARGS
// otherwise.
#if defined(FROZENOPT_SMALL_KERNEL_ARGS)
constexpr size_t kArgBudget = mt::kSmallArgBytes;
#else
constexpr size_t kArgBudget = mt::kLargeArgBytes;
#endif

}  // namespace cuda
}  // namespace frozenopt
