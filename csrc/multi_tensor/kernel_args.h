// Plain argument structs shared by the CUDA kernels, their host launchers and
// the CPU shim that runs the kernel bodies in tests. No CUDA, no ATen.
#pragma once

#include <cstdint>
#include <vector>

#include "../update_math.h"
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

  bool operator==(const ScalarArg&) const = default;
};

inline ScalarArg host_scalar(double v) { return {nullptr, 0, v}; }

// What every step launch needs besides the tensor addresses.
struct StepArgs {
  const uint8_t* mask;   // one byte per tensor id, non-zero = frozen; nullptr = none frozen
  ScalarArg found_inf;   // non-zero: skip everything (AMP overflow)
  ScalarArg grad_scale;  // the grads are divided by it
  ScalarArg lr;
};

// One param group's hyper-parameters and lr, as a step plan's group table
// holds them on the device.
template <typename Hyper>
struct GroupEntry {
  Hyper hyper;
  ScalarArg lr;

  bool operator==(const GroupEntry&) const = default;
};

// Where each tensor's hyper-parameters come from, in device memory, by the
// tensor's group g = tensor_group[tensor id]:
// - `groups` set: the entry groups[g] (a step plan's table);
// - `rows` set: row g of a *_groups_ op's float64 table (update_math.h's
//   hyper_of_row, lr from the row's value); a tensor whose g is not below
//   row_count is skipped (the op cannot report it without a synchronisation);
// - neither: the op's own (`hyper` and common.lr).
// Either way, `hyper` decides the kernels' layout (momentum on or off,
// amsgrad), which every group of a table shares.
template <typename Hyper>
struct GroupTable {
  const GroupEntry<Hyper>* groups;
  const int32_t* tensor_group;
  const double* rows;
  int32_t row_count;
};

struct SGDArgs {
  StepArgs common;
  math::SGDHyper hyper;
  GroupTable<math::SGDHyper> table;
};

// What Adam's step launch works out once per tensor for the element launches
// that follow it: whether the tensor is skipped (frozen, or found_inf), and the
// step-dependent scalars, in double (each element kernel narrows them to its
// math type through math::adam_coef).
struct AdamTensorScalars {
  math::AdamStepScalars step;
  int32_t skip;
};

struct AdamArgs {
  StepArgs common;
  AdamTensorScalars* tensor_scalars;  // one per tensor of the op: device memory the caller provides
  math::AdamHyper hyper;
  GroupTable<math::AdamHyper> table;
};

// Address rows of the metadata, per op.
namespace row {
constexpr int kParam = 0, kGrad = 1;
constexpr int kMomentum = 2;                                            // sgd with momentum: depth 3, else 2
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

// 32 KB kernel arguments are compiled only with CUDA >= 12.1 and sm_70+ for
// every architecture built (setup.py defines FROZENOPT_SMALL_KERNEL_ARGS
// otherwise); the 4 KB kernels are always there.
#if defined(FROZENOPT_SMALL_KERNEL_ARGS)
constexpr bool kLargeArgsBuilt = false;
#else
constexpr bool kLargeArgsBuilt = true;
#endif

// The kernel-argument budget a launch may use, decided at run time: 32 KB
// also needs a driver of CUDA >= 12.1 (a newer runtime runs on an older driver
// under CUDA's minor-version compatibility) and a device of compute capability
// 7.0 or newer. Otherwise 4 KB.
constexpr size_t choose_budget(int driver_version, int compute_major) {
  return kLargeArgsBuilt && driver_version >= 12010 && compute_major >= 7 ? mt::kLargeArgBytes : mt::kSmallArgBytes;
}

}  // namespace cuda
}  // namespace frozenopt
