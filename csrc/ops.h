// The step ops as C++ functions, and the argument checks every backend shares.
// Schemas are in frozenopt.cpp; CPU bodies in cpu/ops_cpu.cpp, CUDA in cuda/.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <utility>
#include <vector>

namespace frozenopt {

// (name, list) of a state-tensor argument, for error messages.
using NamedList = std::pair<const char*, at::TensorList>;

// Checks lengths, dtypes, shapes, devices and layouts of a step op's lists and
// of its mask, raising an error that names the op, the argument and the index.
// Runs before anything is written, so a bad call changes nothing.
void check_step_args(const char* op, at::TensorList params, at::TensorList grads,
                     std::initializer_list<NamedList> states, const std::optional<at::Tensor>& mask,
                     const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf);

// Checks the per-parameter step counters: one float32 element each, on the
// device of their parameter (CPU steps for CPU params).
void check_steps(const char* op, at::TensorList params, at::TensorList steps);

// Hyper-parameter checks, the same rules as torch.optim's constructors.
void check_sgd_hyper(double lr, double momentum, double dampening, double weight_decay, bool nesterov);
void check_adam_hyper(double lr, double beta1, double beta2, double weight_decay, double eps);

// Host values of a CPU step's optional scalar tensors (lr, grad_scale, found_inf).
inline double value_of(const std::optional<at::Tensor>& t, double otherwise) {
  return t.has_value() ? t->item<double>() : otherwise;
}

inline bool skipped_for_overflow(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<double>() != 0.0;
}

}  // namespace frozenopt
