#include <c10/util/Exception.h>

#include <cmath>

#include "ops.h"

namespace frozenopt {

namespace {

// Complex params are stepped as their real and imaginary parts (torch.optim's view_as_real).
bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16 || t == at::kComplexFloat ||
         t == at::kComplexDouble;
}

void check_scalar_tensor(const char* op, const char* what, const std::optional<at::Tensor>& t,
                         const at::Tensor* first_param) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, op, ": ", what, " must have exactly one element, got shape ", t->sizes());
  if (first_param != nullptr && !t->is_cpu()) {
    TORCH_CHECK(t->device() == first_param->device(), op, ": ", what, " is on ", t->device(),
                " but the params are on ", first_param->device());
  }
}

}  // namespace

void check_step_args(const char* op, at::TensorList params, at::TensorList grads,
                     std::initializer_list<NamedList> states, const std::optional<at::Tensor>& mask,
                     const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  for (const auto& [name, list] : states) {
    TORCH_CHECK(list.size() == n, op, ": got ", n, " params but ", list.size(), " ", name);
  }
  const at::Tensor* first = n > 0 ? &params[0] : nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 1 && static_cast<size_t>(mask->numel()) == n, op,
                ": the mask needs one entry per param (", n, "), got shape ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte, op,
                ": the mask must be bool or uint8, got ", mask->scalar_type());
    TORCH_CHECK(first == nullptr || mask->device() == first->device(), op, ": the mask is on ",
                mask->device(), " but the params are on ", first->device());
  }
  check_scalar_tensor(op, "lr", lr_tensor, first);
  check_scalar_tensor(op, "grad_scale", grad_scale, first);
  check_scalar_tensor(op, "found_inf", found_inf, first);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(p.defined(), op, ": param ", i, " is undefined");
    TORCH_CHECK(is_supported_dtype(p.scalar_type()), op, ": param ", i, " has dtype ",
                p.scalar_type(), "; frozenopt steps float32, float64, float16, bfloat16, complex64 and complex128 params");
    TORCH_CHECK(p.layout() == at::kStrided, op, ": param ", i, " is not a dense (strided) tensor");
    TORCH_CHECK(p.device() == first->device(), op, ": params are on more than one device (",
                first->device(), " and ", p.device(), " at index ", i, ")");
    TORCH_CHECK(g.defined(), op, ": grad ", i, " is undefined");
    TORCH_CHECK(!g.is_sparse(), op, ": grad ", i,
                " is sparse; frozenopt does not support sparse gradients (use torch.optim.SparseAdam)");
    TORCH_CHECK(g.sizes() == p.sizes(), op, ": grad ", i, " has shape ", g.sizes(),
                " but its param has shape ", p.sizes());
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), op, ": grad ", i, " has dtype ", g.scalar_type(),
                " but its param has dtype ", p.scalar_type());
    TORCH_CHECK(g.device() == p.device(), op, ": grad ", i, " is on ", g.device(),
                " but its param is on ", p.device());
    TORCH_CHECK(!p.is_conj() && !p.is_neg() && !g.is_conj() && !g.is_neg(), op, ": param ", i,
                " or its grad is a lazily conjugated or negated view; call resolve_conj()/resolve_neg() first");
    for (const auto& [name, list] : states) {
      const at::Tensor& s = list[i];
      TORCH_CHECK(s.defined(), op, ": ", name, "[", i, "] is undefined");
      TORCH_CHECK(s.sizes() == p.sizes() && s.scalar_type() == p.scalar_type() && s.device() == p.device(),
                  op, ": ", name, "[", i, "] (", s.scalar_type(), " ", s.sizes(), " on ", s.device(),
                  ") does not match its param (", p.scalar_type(), " ", p.sizes(), " on ", p.device(), ")");
    }
  }
}

void check_steps(const char* op, at::TensorList params, at::TensorList steps) {
  TORCH_CHECK(steps.size() == params.size(), op, ": got ", params.size(), " params but ", steps.size(),
              " state_steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined() && s.numel() == 1 && s.scalar_type() == at::kFloat, op, ": state_steps[", i,
                "] must be a one-element float32 tensor");
    TORCH_CHECK(s.device() == params[i].device(), op, ": state_steps[", i, "] is on ", s.device(),
                " but its param is on ", params[i].device());
  }
}

void check_sgd_hyper(double lr, double momentum, double dampening, double weight_decay, bool nesterov) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "Invalid learning rate: ", lr);
  TORCH_CHECK(momentum >= 0.0, "Invalid momentum value: ", momentum);
  TORCH_CHECK(weight_decay >= 0.0, "Invalid weight_decay value: ", weight_decay);
  TORCH_CHECK(std::isfinite(dampening), "Invalid dampening value: ", dampening);
  TORCH_CHECK(!nesterov || (momentum > 0.0 && dampening == 0.0),
              "Nesterov momentum requires a momentum and zero dampening");
}

void check_adam_hyper(double lr, double beta1, double beta2, double weight_decay, double eps) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "Invalid learning rate: ", lr);
  TORCH_CHECK(eps >= 0.0, "Invalid epsilon value: ", eps);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "Invalid beta parameter at index 0: ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "Invalid beta parameter at index 1: ", beta2);
  TORCH_CHECK(weight_decay >= 0.0, "Invalid weight_decay value: ", weight_decay);
}

}  // namespace frozenopt
