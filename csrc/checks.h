// The argument checks of the step ops, shared by every backend and the step
// plan. Each raises an error that names the op, the argument and the index,
// and runs before anything is written, so a bad call changes nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

#include "update_math.h"

namespace frozenopt {

using OptTensor = std::optional<at::Tensor>;
inline const OptTensor kNoTensor;

// The ops' names, as their errors give them.
inline constexpr const char* kSGDOp = "frozenopt::sgd_";
inline constexpr const char* kAdamOp = "frozenopt::adam_";
inline constexpr const char* kSGDGroupsOp = "frozenopt::sgd_groups_";
inline constexpr const char* kAdamGroupsOp = "frozenopt::adam_groups_";
// ... and of the check of a whole step's grads before any group moves.
inline constexpr const char* kStepCheck = "frozenopt step";

// The optional tensors of a step op; unset fields are absent.
struct OptionalTensors {
  const OptTensor& mask = kNoTensor;  // one entry per param, non-zero: frozen
  const OptTensor& lr = kNoTensor;    // one element: the learning rate, in place of the float
  const OptTensor& grad_scale = kNoTensor;
  const OptTensor& found_inf = kNoTensor;
};

// sgd_'s lists, parallel to params. momentum_buffers is taken only with
// momentum (a step without it neither checks nor touches them).
struct SGDTensors {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList momentum_buffers;
  bool momentum = false;

  // Param i's momentum buffer, undefined without momentum.
  at::Tensor momentum_buffer(size_t i) const { return momentum ? momentum_buffers[i] : at::Tensor(); }
};

// adam_'s lists, parallel to params. max_exp_avg_sqs is taken only with
// amsgrad; state_steps are one-element float32 tensors on their param's device.
struct AdamTensors {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList exp_avgs;
  at::TensorList exp_avg_sqs;
  at::TensorList max_exp_avg_sqs;
  at::TensorList state_steps;
  bool amsgrad = false;

  // Param i's max_exp_avg_sq, undefined without amsgrad.
  at::Tensor max_exp_avg_sq(size_t i) const { return amsgrad ? max_exp_avg_sqs[i] : at::Tensor(); }
};

// The group table of a *_groups_ op: `table`, float64 of shape [groups, row
// width] (update_math.h's rows), and `tensor_group`, int32, each param's row.
struct GroupRows {
  const at::Tensor& table;
  const at::Tensor& tensor_group;
};

// Lengths, dtypes, shapes, devices and layouts of the lists and of the
// optional tensors.
void check_sgd_args(const char* op, const SGDTensors& t, const OptionalTensors& opt = {});
void check_adam_args(const char* op, const AdamTensors& t, const OptionalTensors& opt = {});

// The params and grads alone (what every op asks of them).
void check_grads(const char* op, at::TensorList params, at::TensorList grads);

// The scalar tensors (lr, grad_scale, found_inf) alone, for params on
// first_param's device (nullptr: no params).
void check_scalars(const char* op, const at::Tensor* first_param, const OptionalTensors& opt);

// The table's dtype, shape (`width` columns, at least one row), device (the
// params') and one group index per param (their values are the backend's to
// check: a CPU op reads them, a CUDA op skips a tensor whose row is missing).
void check_group_rows(const char* op, at::TensorList params, const GroupRows& g, int width);

// A group table row read on the host: its values (lr first) checked as the
// op's own, and its layout flag (SGD: momentum non-zero; Adam: amsgrad) equal
// to the op's (`layout`). Returns the row's hyper-parameters.
math::SGDHyper checked_row(const char* op, int64_t row, const double* values, const math::SGDHyper& layout);
math::AdamHyper checked_row(const char* op, int64_t row, const double* values, const math::AdamHyper& layout);

// Hyper-parameter checks, the same rules as torch.optim's constructors.
void check_hyper(double lr, const math::SGDHyper& h);
void check_hyper(double lr, const math::AdamHyper& h);

}  // namespace frozenopt
