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
void sgd_groups(const SGDTensors& t, const OptionalTensors& opt, const GroupRows& g, const math::SGDHyper& layout);
void adam_groups(const AdamTensors& t, const OptionalTensors& opt, const GroupRows& g, const math::AdamHyper& layout);

// Appends a param group to the launch: reads its lr (a CPU step reads a
// tensor lr on the host) and checks its hyper-parameters.
template <typename Launch, typename Hyper>
void add_group(Launch& launch, double lr, const OptTensor& lr_tensor, const Hyper& hyper) {
  lr = lr_tensor.has_value() ? lr_tensor->template item<double>() : lr;
  check_hyper(lr, hyper);
  launch.groups.push_back({hyper, lr});
}

// Reads the AMP scalars into the launch. Returns false when found_inf says
// the step is skipped (overflow).
template <typename Launch>
bool prepare_scale(Launch& launch, const OptTensor& grad_scale, const OptTensor& found_inf) {
  if (found_inf.has_value() && found_inf->template item<double>() != 0.0) return false;
  launch.grad_scale = grad_scale.has_value() ? grad_scale->template item<double>() : 1.0;
  return true;
}

// An op's step: one group (slots name group 0), then the AMP scalars.
template <typename Launch, typename Hyper>
bool prepare_step(Launch& launch, double lr, const Hyper& hyper, const OptionalTensors& opt) {
  launch.groups.clear();
  add_group(launch, lr, opt.lr, hyper);
  return prepare_scale(launch, opt.grad_scale, opt.found_inf);
}

// Adam's step scalars for a param of the launch's `group` that has taken
// `step` steps, worked out (two pow()) only when the count or the group
// differs from the previous call's: a group whose params share their count,
// the usual case, computes them once.
class StepScalarCache {
 public:
  const math::AdamStepScalars& get(const AdamLaunch& launch, float step, int32_t group) {
    if (step != step_ || group != group_) {
      const auto& g = launch.groups[group];
      scalars_ = math::adam_step_scalars(g.lr, g.hyper, double(step));
      step_ = step;
      group_ = group;
    }
    return scalars_;
  }

 private:
  float step_ = -1.0f;  // no count yet (counts are >= 1)
  int32_t group_ = -1;
  math::AdamStepScalars scalars_{};
};

}  // namespace cpu
}  // namespace frozenopt
