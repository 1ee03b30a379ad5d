// CPU bodies of the step ops: checks, AMP skip, the mask, then one call into
// the kernel built for the best capability this CPU (or ATEN_CPU_CAPABILITY)
// allows (launch.h picks it, for the step plan too).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../ops.h"
#include "launch.h"

namespace frozenopt {
namespace cpu {
namespace {

// Per-param frozen flags, read on the host (the mask is a CPU tensor here).
std::vector<uint8_t> frozen_flags(const std::optional<at::Tensor>& mask, size_t n) {
  std::vector<uint8_t> flags(n, 0);
  if (!mask.has_value()) return flags;
  const at::Tensor m = mask->to(at::kByte).contiguous();
  const uint8_t* data = m.data_ptr<uint8_t>();
  std::copy(data, data + n, flags.begin());
  return flags;
}

// The kernels walk memory in storage order, which is only right when every
// tensor of a slot has the same dense layout. Tensors that don't are stepped
// through contiguous copies that are written back afterwards.
class SlotBuilder {
 public:
  Slot add(const at::Tensor& p, const at::Tensor& g, std::initializer_list<at::Tensor> states) {
    bool dense = p.is_contiguous() && g.is_contiguous();
    for (const auto& s : states) dense = dense && (!s.defined() || s.is_contiguous());
    void* ptrs[3] = {nullptr, nullptr, nullptr};
    if (dense) {
      int k = 0;
      for (const auto& s : states) ptrs[k++] = s.defined() ? s.data_ptr() : nullptr;
      return {p.data_ptr(), g.data_ptr(), ptrs[0], ptrs[1], ptrs[2], p.numel(), p.scalar_type()};
    }
    at::Tensor pc = keep(p), gc = g.contiguous();
    grads_.push_back(gc);
    int k = 0;
    for (const auto& s : states) ptrs[k++] = s.defined() ? keep(s).data_ptr() : nullptr;
    return {pc.data_ptr(), gc.data_ptr(), ptrs[0], ptrs[1], ptrs[2], p.numel(), p.scalar_type()};
  }

  void write_back() {
    for (auto& [original, copy] : copies_) original.copy_(copy);
  }

 private:
  at::Tensor keep(const at::Tensor& t) {
    if (t.is_contiguous()) return t;
    copies_.emplace_back(t, t.contiguous());
    return copies_.back().second;
  }

  std::vector<std::pair<at::Tensor, at::Tensor>> copies_;
  std::vector<at::Tensor> grads_;
};

}  // namespace

void sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
          const std::optional<at::Tensor>& mask, double lr, const std::optional<at::Tensor>& lr_tensor,
          double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
          bool is_first_step, const std::optional<at::Tensor>& grad_scale,
          const std::optional<at::Tensor>& found_inf) {
  const bool has_momentum = momentum != 0.0;
  check_step_args("frozenopt::sgd_", params, grads,
                  has_momentum ? std::initializer_list<NamedList>{{"momentum_buffers", momentum_buffers}}
                               : std::initializer_list<NamedList>{},
                  mask, lr_tensor, grad_scale, found_inf);
  lr = value_of(lr_tensor, lr);
  check_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov);
  if (skipped_for_overflow(found_inf)) return;

  SGDLaunch launch;
  launch.coef = {lr, momentum, 1.0 - dampening, weight_decay, 1.0 / value_of(grad_scale, 1.0),
                 weight_decay != 0.0, has_momentum, nesterov, maximize, is_first_step};
  const auto frozen = frozen_flags(mask, params.size());
  SlotBuilder builder;
  for (size_t i = 0; i < params.size(); ++i) {
    if (frozen[i] || params[i].numel() == 0) continue;
    launch.slots.push_back(builder.add(params[i], grads[i], {has_momentum ? momentum_buffers[i] : at::Tensor()}));
  }
  run_sgd_best(launch);
  builder.write_back();
}

void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList max_exp_avg_sqs, at::TensorList state_steps, const std::optional<at::Tensor>& mask,
           double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
           double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (amsgrad) {
    check_step_args("frozenopt::adam_", params, grads,
                    {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", max_exp_avg_sqs}},
                    mask, lr_tensor, grad_scale, found_inf);
  } else {
    check_step_args("frozenopt::adam_", params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                    mask, lr_tensor, grad_scale, found_inf);
  }
  check_steps("frozenopt::adam_", params, state_steps);
  lr = value_of(lr_tensor, lr);
  check_adam_hyper(lr, beta1, beta2, weight_decay, eps);
  if (skipped_for_overflow(found_inf)) return;

  math::AdamCoef<double> base{};
  base.lr = lr;
  base.beta1 = beta1;
  base.beta2 = beta2;
  base.eps = eps;
  base.weight_decay = weight_decay;
  base.inv_grad_scale = 1.0 / value_of(grad_scale, 1.0);
  base.has_weight_decay = weight_decay != 0.0;
  base.decoupled_weight_decay = decoupled_weight_decay;
  base.amsgrad = amsgrad;
  base.maximize = maximize;

  AdamLaunch launch;
  const auto frozen = frozen_flags(mask, params.size());
  SlotBuilder builder;
  for (size_t i = 0; i < params.size(); ++i) {
    if (frozen[i]) continue;
    // The step counter advances even for an empty tensor, as in torch.optim.
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.0f;
    if (params[i].numel() == 0) continue;
    math::AdamCoef<double> coef = base;
    math::adam_step_scalars(coef, lr, beta1, beta2, double(*step));
    launch.coefs.push_back(coef);
    launch.slots.push_back(builder.add(params[i], grads[i],
                                       {exp_avgs[i], exp_avg_sqs[i], amsgrad ? max_exp_avg_sqs[i] : at::Tensor()}));
  }
  run_adam_best(launch);
  builder.write_back();
}

}  // namespace cpu
}  // namespace frozenopt

TORCH_LIBRARY_IMPL(frozenopt, CPU, m) {
  m.impl("sgd_", &frozenopt::cpu::sgd_);
  m.impl("adam_", &frozenopt::cpu::adam_);
}
