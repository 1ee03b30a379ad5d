// What the CPU op bodies and the step plan hand to the vectorised kernels: raw
// pointers of the unfrozen, non-empty tensors only (frozen ones never get
// here, so none of their memory is read), plus what the update coefficients
// are built from (update_math.h): one entry per param group, which each slot
// names, so the step plan steps many groups in one launch.
//
// kernels.cpp is compiled once per CPU capability (DEFAULT, AVX2, AVX512),
// each copy in its own namespace; run_*_best below picks one at run time.
#pragma once

#include <ATen/Version.h>
#include <ATen/core/ScalarType.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "../update_math.h"

namespace frozenopt {
namespace cpu {

struct Slot {
  void* param;
  const void* grad;
  void* state0;  // momentum_buffer | exp_avg
  void* state1;  // exp_avg_sq
  void* state2;  // max_exp_avg_sq (amsgrad)
  int64_t numel;
  at::ScalarType dtype;
  int32_t group;  // the launch's entry in `groups` this tensor steps with
};

// One param group's hyper-parameters and lr (a tensor lr already read).
template <typename Hyper>
struct GroupHyper {
  Hyper hyper;
  double lr;
};

// One step's work for the kernels: the slots, run in consecutive waves ending
// at wave_ends (see layout.h's wave_ends; empty: one wave of all slots), and
// what the coefficients are built from: each slot's group entry, and the AMP
// scale all of them share.
template <typename Hyper>
struct Launch {
  std::vector<Slot> slots;
  std::vector<size_t> wave_ends;
  std::vector<GroupHyper<Hyper>> groups;
  double grad_scale;
};

using SGDLaunch = Launch<math::SGDHyper>;

struct AdamLaunch : Launch<math::AdamHyper> {
  std::vector<math::AdamStepScalars> steps;  // one per slot: the step count may differ per tensor
};

#define FROZENOPT_DECLARE_KERNELS(cap)     \
  namespace cap {                          \
  void run_sgd(const SGDLaunch& launch);   \
  void run_adam(const AdamLaunch& launch); \
  }

FROZENOPT_DECLARE_KERNELS(DEFAULT)
FROZENOPT_DECLARE_KERNELS(AVX2)
FROZENOPT_DECLARE_KERNELS(AVX512)
#undef FROZENOPT_DECLARE_KERNELS

// Which kernel build runs: 0 DEFAULT, 1 AVX2, 2 AVX512. Used by the ops and
// the step plan alike, so both give the same bits.
//
// at::get_cpu_capability() gives what the CPU allows, capped by
// ATEN_CPU_CAPABILITY. On an AVX512 CPU the AVX2 build runs unless
// ATEN_CPU_CAPABILITY=avx512 asks for the AVX512 one: the step is memory
// bound, and 512-bit vectors do not make it faster; measured on AMD EPYC
// (Zen 4), one thread, 50M float32 params: SGD with momentum 27.0 ms with
// the AVX2 build against 30.5 ms with the AVX512 one, AdamW 39.0 against
// 39.4 ms. PyTorch does the same for its own kernels (AVX2 code on AVX512
// CPUs unless a kernel opts in), its fused optimizers included.
inline int best_kernel_build() {
  static const int build = [] {
#if defined(__x86_64__) || defined(_M_X64)
    // ATEN_CPU_CAPABILITY is trusted by torch even beyond what the CPU can
    // run; a build is only picked when the CPU has every extension it uses.
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    const std::string name = at::get_cpu_capability();
    if (name == "AVX512" && avx512) {
      const char* asked = std::getenv("ATEN_CPU_CAPABILITY");
      const bool wants_avx512 = asked != nullptr && (std::string(asked) == "avx512" || std::string(asked) == "AVX512");
      return wants_avx512 ? 2 : 1;
    }
    return (name == "AVX2" || name == "AVX512") && avx2 ? 1 : 0;
#else
    return 0;
#endif
  }();
  return build;
}

inline void run_sgd_best(const SGDLaunch& launch) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (best_kernel_build()) {
    case 2: return AVX512::run_sgd(launch);
    case 1: return AVX2::run_sgd(launch);
  }
#endif
  DEFAULT::run_sgd(launch);
}

inline void run_adam_best(const AdamLaunch& launch) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (best_kernel_build()) {
    case 2: return AVX512::run_adam(launch);
    case 1: return AVX2::run_adam(launch);
  }
#endif
  DEFAULT::run_adam(launch);
}

}  // namespace cpu
}  // namespace frozenopt
