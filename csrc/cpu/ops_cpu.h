// What the CPU op bodies (ops_cpu.cpp) and the step plan share: the host part
// of a step before the kernels run.
#pragma once

#include <ATen/core/Tensor.h>

#include "../checks.h"
#include "launch.h"

namespace frozenopt {
namespace cpu {

// The ops' bodies (op_entry.h registers them), once the arguments are checked.
void sgd(const SGDTensors& t, const OptionalTensors& opt, double lr, const math::SGDHyper& hyper);
void adam(const AdamTensors& t, const OptionalTensors& opt, double lr, const math::AdamHyper& hyper);

// Reads the step's scalar tensors (a CPU step reads them on the host), checks
// the hyper-parameters and puts them in the launch. Returns false when
// found_inf says the step is skipped (AMP overflow).
template <typename Launch, typename Hyper>
bool prepare_step(Launch& launch, double lr, const Hyper& hyper, const OptionalTensors& opt) {
  lr = opt.lr.has_value() ? opt.lr->template item<double>() : lr;
  check_hyper(lr, hyper);
  if (opt.found_inf.has_value() && opt.found_inf->template item<double>() != 0.0) return false;
  launch.hyper = hyper;
  launch.lr = lr;
  launch.grad_scale = opt.grad_scale.has_value() ? opt.grad_scale->template item<double>() : 1.0;
  return true;
}

// Adam's step scalars for a param that has taken `step` steps, worked out
// (two pow()) only when the count differs from the previous call's: a group
// whose params share their count, the usual case, computes them once.
class StepScalarCache {
 public:
  const math::AdamStepScalars& get(const AdamLaunch& launch, float step) {
    if (step != step_) {
      scalars_ = math::adam_step_scalars(launch.lr, launch.hyper, double(step));
      step_ = step;
    }
    return scalars_;
  }

 private:
  float step_ = -1.0f;  // no count yet (counts are >= 1)
  math::AdamStepScalars scalars_{};
};

}  // namespace cpu
}  // namespace frozenopt
