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

}  // namespace frozenopt
