#include <c10/util/Exception.h>

#include <cmath>
#include <utility>

#include "checks.h"

namespace frozenopt {

namespace {

// Complex params are stepped as their real and imaginary parts (torch.optim's view_as_real).
bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16 || t == at::kComplexFloat ||
         t == at::kComplexDouble;
}

void check_scalar_tensor(const char* op, const char* what, const OptTensor& t, const at::Tensor* first_param) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, op, ": ", what, " must have exactly one element, got shape ", t->sizes());
  if (first_param != nullptr && !t->is_cpu()) {
    TORCH_CHECK(t->device() == first_param->device(), op, ": ", what, " is on ", t->device(), " but the params are on ",
                first_param->device());
  }
}

// (name, list) of a state-tensor argument, for error messages.
using NamedList = std::pair<const char*, at::TensorList>;

// What every op asks of its params, grads, state lists (each the param's
// dtype, shape and device) and optional tensors.
void check_lists(const char* op, at::TensorList params, at::TensorList grads, std::initializer_list<NamedList> states,
                 const OptionalTensors& opt) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  for (const auto& [name, list] : states) {
    TORCH_CHECK(list.size() == n, op, ": got ", n, " params but ", list.size(), " ", name);
  }
  const at::Tensor* first = n > 0 ? &params[0] : nullptr;
  if (const OptTensor& mask = opt.mask; mask.has_value()) {
    TORCH_CHECK(mask->dim() == 1 && static_cast<size_t>(mask->numel()) == n, op,
                ": the mask needs one entry per param (", n, "), got shape ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte, op,
                ": the mask must be bool or uint8, got ", mask->scalar_type());
    TORCH_CHECK(first == nullptr || mask->device() == first->device(), op, ": the mask is on ", mask->device(),
                " but the params are on ", first->device());
  }
  check_scalars(op, first, opt);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(p.defined(), op, ": param ", i, " is undefined");
    TORCH_CHECK(is_supported_dtype(p.scalar_type()), op, ": param ", i, " has dtype ", p.scalar_type(),
                "; frozenopt steps float32, float64, float16, bfloat16, complex64 and complex128 params");
    TORCH_CHECK(p.layout() == at::kStrided, op, ": param ", i, " is not a dense (strided) tensor");
    TORCH_CHECK(p.device() == first->device(), op, ": params are on more than one device (", first->device(), " and ",
                p.device(), " at index ", i, ")");
    TORCH_CHECK(g.defined(), op, ": grad ", i, " is undefined");
    TORCH_CHECK(!g.is_sparse(), op, ": grad ", i,
                " is sparse; frozenopt does not support sparse gradients (use torch.optim.SparseAdam)");
    TORCH_CHECK(g.sizes() == p.sizes(), op, ": grad ", i, " has shape ", g.sizes(), " but its param has shape ",
                p.sizes());
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), op, ": grad ", i, " has dtype ", g.scalar_type(),
                " but its param has dtype ", p.scalar_type());
    TORCH_CHECK(g.device() == p.device(), op, ": grad ", i, " is on ", g.device(), " but its param is on ", p.device());
    TORCH_CHECK(!p.is_conj() && !p.is_neg() && !g.is_conj() && !g.is_neg(), op, ": param ", i,
                " or its grad is a lazily conjugated or negated view; call resolve_conj()/resolve_neg() first");
    for (const auto& [name, list] : states) {
      const at::Tensor& s = list[i];
      TORCH_CHECK(s.defined(), op, ": ", name, "[", i, "] is undefined");
      TORCH_CHECK(s.sizes() == p.sizes() && s.scalar_type() == p.scalar_type() && s.device() == p.device(), op, ": ",
                  name, "[", i, "] (", s.scalar_type(), " ", s.sizes(), " on ", s.device(),
                  ") does not match its param (", p.scalar_type(), " ", p.sizes(), " on ", p.device(), ")");
    }
  }
}

void check_steps(const char* op, at::TensorList params, at::TensorList steps) {
  TORCH_CHECK(steps.size() == params.size(), op, ": got ", params.size(), " params but ", steps.size(), " state_steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined() && s.numel() == 1 && s.scalar_type() == at::kFloat, op, ": state_steps[", i,
                "] must be a one-element float32 tensor");
    TORCH_CHECK(s.device() == params[i].device(), op, ": state_steps[", i, "] is on ", s.device(),
                " but its param is on ", params[i].device());
  }
}

}  // namespace

void check_sgd_args(const char* op, const SGDTensors& t, const OptionalTensors& opt) {
  if (t.momentum) {
    check_lists(op, t.params, t.grads, {{"momentum_buffers", t.momentum_buffers}}, opt);
  } else {
    check_lists(op, t.params, t.grads, {}, opt);
  }
}

void check_adam_args(const char* op, const AdamTensors& t, const OptionalTensors& opt) {
  if (t.amsgrad) {
    check_lists(op, t.params, t.grads,
                {{"exp_avgs", t.exp_avgs}, {"exp_avg_sqs", t.exp_avg_sqs}, {"max_exp_avg_sqs", t.max_exp_avg_sqs}},
                opt);
  } else {
    check_lists(op, t.params, t.grads, {{"exp_avgs", t.exp_avgs}, {"exp_avg_sqs", t.exp_avg_sqs}}, opt);
  }
  check_steps(op, t.params, t.state_steps);
}

void check_grads(const char* op, at::TensorList params, at::TensorList grads) {
  check_lists(op, params, grads, {}, {});
}

void check_scalars(const char* op, const at::Tensor* first_param, const OptionalTensors& opt) {
  check_scalar_tensor(op, "lr", opt.lr, first_param);
  check_scalar_tensor(op, "grad_scale", opt.grad_scale, first_param);
  check_scalar_tensor(op, "found_inf", opt.found_inf, first_param);
}

void check_group_rows(const char* op, at::TensorList params, const GroupRows& g, int width) {
  TORCH_CHECK(
      g.table.scalar_type() == at::kDouble && g.table.dim() == 2 && g.table.size(1) == width && g.table.size(0) > 0, op,
      ": group_table must be float64 of shape [groups, ", width, "] with at least one group, got ",
      g.table.scalar_type(), " of shape ", g.table.sizes());
  TORCH_CHECK(g.tensor_group.scalar_type() == at::kInt && g.tensor_group.dim() == 1 &&
                  static_cast<size_t>(g.tensor_group.numel()) == params.size(),
              op, ": tensor_group must be int32 with one entry per param (", params.size(), "), got ",
              g.tensor_group.scalar_type(), " of shape ", g.tensor_group.sizes());
  if (params.empty()) return;
  for (const auto& [what, t] : {std::pair<const char*, const at::Tensor&>{"group_table", g.table},
                                std::pair<const char*, const at::Tensor&>{"tensor_group", g.tensor_group}}) {
    TORCH_CHECK(t.device() == params[0].device(), op, ": ", what, " is on ", t.device(), " but the params are on ",
                params[0].device());
  }
}

math::SGDHyper checked_row(const char* op, int64_t row, const double* values, const math::SGDHyper& layout) {
  TORCH_CHECK((values[1] != 0.0) == (layout.momentum != 0.0), op, ": group_table row ", row, " has momentum ",
              values[1], " but the op was called with momentum=", layout.momentum != 0.0 ? "True" : "False");
  const math::SGDHyper h = math::hyper_of_row(values, layout);
  check_hyper(values[0], h);
  return h;
}

math::AdamHyper checked_row(const char* op, int64_t row, const double* values, const math::AdamHyper& layout) {
  TORCH_CHECK((values[5] != 0.0) == layout.amsgrad, op, ": group_table row ", row, " has amsgrad ", values[5],
              " but the op was called with amsgrad=", layout.amsgrad ? "True" : "False");
  const math::AdamHyper h = math::hyper_of_row(values, layout);
  check_hyper(values[0], h);
  return h;
}

void check_hyper(double lr, const math::SGDHyper& h) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "Invalid learning rate: ", lr);
  TORCH_CHECK(h.momentum >= 0.0, "Invalid momentum value: ", h.momentum);
  TORCH_CHECK(h.weight_decay >= 0.0, "Invalid weight_decay value: ", h.weight_decay);
  TORCH_CHECK(std::isfinite(h.dampening), "Invalid dampening value: ", h.dampening);
  TORCH_CHECK(!h.nesterov || (h.momentum > 0.0 && h.dampening == 0.0),
              "Nesterov momentum requires a momentum and zero dampening");
}

void check_hyper(double lr, const math::AdamHyper& h) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "Invalid learning rate: ", lr);
  TORCH_CHECK(h.eps >= 0.0, "Invalid epsilon value: ", h.eps);
  TORCH_CHECK(h.beta1 >= 0.0 && h.beta1 < 1.0, "Invalid beta parameter at index 0: ", h.beta1);
  TORCH_CHECK(h.beta2 >= 0.0 && h.beta2 < 1.0, "Invalid beta parameter at index 1: ", h.beta2);
  TORCH_CHECK(h.weight_decay >= 0.0, "Invalid weight_decay value: ", h.weight_decay);
}

}  // namespace frozenopt
