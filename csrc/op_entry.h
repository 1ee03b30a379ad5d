// The step ops' kernels as every backend registers them: the schema's
// positional arguments (schemas.cpp) gathered into the structs of checks.h
// and checked, then handed to the backend's body, which takes
//   (const SGDTensors&, const OptionalTensors&, double lr, const math::SGDHyper&)
// for sgd_ and the same with AdamTensors and math::AdamHyper for adam_:
//   m.impl("sgd_", &sgd_op<cpu::sgd>);
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace frozenopt {

template <auto Body>
void sgd_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, const OptTensor& mask,
            double lr, const OptTensor& lr_tensor, double momentum, double dampening, double weight_decay,
            bool nesterov, bool maximize, bool is_first_step, const OptTensor& grad_scale, const OptTensor& found_inf) {
  const SGDTensors t{params, grads, momentum_buffers, momentum != 0.0};
  const OptionalTensors opt{mask, lr_tensor, grad_scale, found_inf};
  check_sgd_args(kSGDOp, t, opt);
  Body(t, opt, lr, math::SGDHyper{momentum, dampening, weight_decay, nesterov, maximize, is_first_step});
}

template <auto Body>
void adam_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
             at::TensorList max_exp_avg_sqs, at::TensorList state_steps, const OptTensor& mask, double lr,
             const OptTensor& lr_tensor, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
             bool maximize, bool decoupled_weight_decay, const OptTensor& grad_scale, const OptTensor& found_inf) {
  const AdamTensors t{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad};
  const OptionalTensors opt{mask, lr_tensor, grad_scale, found_inf};
  check_adam_args(kAdamOp, t, opt);
  Body(t, opt, lr, math::AdamHyper{beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay});
}

// The *_groups_ ops: every param reads its group's row of group_table
// (tensor_group[i]); the op's flags give the state layout. The body takes
//   (const SGDTensors&, const OptionalTensors&, const GroupRows&, const math::SGDHyper& layout)
// where `layout` holds only what decides the layout (momentum 1 or 0) and
// first_step; Adam's the same with AdamTensors and math::AdamHyper (amsgrad).
template <auto Body>
void sgd_groups_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, const OptTensor& mask,
                   const at::Tensor& group_table, const at::Tensor& tensor_group, bool momentum, bool is_first_step,
                   const OptTensor& grad_scale, const OptTensor& found_inf) {
  const SGDTensors t{params, grads, momentum_buffers, momentum};
  const OptionalTensors opt{mask, kNoTensor, grad_scale, found_inf};
  const GroupRows rows{group_table, tensor_group};
  check_sgd_args(kSGDGroupsOp, t, opt);
  check_group_rows(kSGDGroupsOp, params, rows, math::kRowWidth<math::SGDHyper>);
  Body(t, opt, rows, math::SGDHyper{momentum ? 1.0 : 0.0, 0.0, 0.0, false, false, is_first_step});
}

template <auto Body>
void adam_groups_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps, const OptTensor& mask,
                    const at::Tensor& group_table, const at::Tensor& tensor_group, bool amsgrad,
                    const OptTensor& grad_scale, const OptTensor& found_inf) {
  const AdamTensors t{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad};
  const OptionalTensors opt{mask, kNoTensor, grad_scale, found_inf};
  const GroupRows rows{group_table, tensor_group};
  check_adam_args(kAdamGroupsOp, t, opt);
  check_group_rows(kAdamGroupsOp, params, rows, math::kRowWidth<math::AdamHyper>);
  Body(t, opt, rows, math::AdamHyper{0.0, 0.0, 0.0, 0.0, amsgrad, false, false});
}

}  // namespace frozenopt
