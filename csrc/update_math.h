// The update rules of SGD and Adam/AdamW, written once for every backend, and
// the coefficients they take.
//
// Each rule is a template over the value type V of one lane of work: float or
// double on a CUDA thread or in the scalar tail of a CPU loop, and
// at::vec::Vectorized<float|double> in the vectorised CPU loop. The few
// operations that are not plain arithmetic go through Arith<V>, which each
// backend specialises for its own vector types before it instantiates a rule.
//
// Coefficients come from the hyper-parameters (SGDHyper, AdamHyper) through
// sgd_coef and adam_coef, which narrow them to the math type of the tensor
// (MathType): every backend builds them the same way, so they give the same
// bits. lr and grad_scale are passed apart because on a GPU they may be read
// from device memory; Adam's step-dependent scalars are worked out in double,
// once per tensor and step, by adam_step_scalars.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FROZENOPT_HD __host__ __device__ __forceinline__
#else
#define FROZENOPT_HD inline
#endif

namespace frozenopt {
namespace math {

template <typename V>
struct Arith;

template <>
struct Arith<float> {
  static FROZENOPT_HD float sqrt(float x) { return ::sqrtf(x); }
  static FROZENOPT_HD float max(float a, float b) { return (a != a || a > b) ? a : b; }  // NaN wins, like torch.maximum
};

template <>
struct Arith<double> {
  static FROZENOPT_HD double sqrt(double x) { return ::sqrt(x); }
  static FROZENOPT_HD double max(double a, double b) {
    return (a != a || a > b) ? a : b;
  }  // NaN wins, like torch.maximum
};

// The type the update of a stored type S is computed in: float for the half
// types, as torch computes them.
template <typename S>
using MathType = std::conditional_t<std::is_same_v<S, c10::Half> || std::is_same_v<S, c10::BFloat16>, float, S>;

// ---------------------------------------------------------------- SGD

// SGD's hyper-parameters, as the op takes them (lr and grad_scale apart).
struct SGDHyper {
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  bool first_step;  // the momentum buffer is filled with the grad, not blended

  bool operator==(const SGDHyper&) const = default;
};

// Hyper-parameters of one SGD step, already in the math type T.
template <typename T>
struct SGDCoef {
  T lr;
  T momentum;
  T one_minus_dampening;
  T weight_decay;
  T inv_grad_scale;  // 1 when there is no AMP scale
  bool has_weight_decay;
  bool has_momentum;
  bool nesterov;
  bool maximize;
  bool first_step;
};

// The coefficients of one SGD step in the math type T.
template <typename T>
FROZENOPT_HD SGDCoef<T> sgd_coef(const SGDHyper& h, double lr, double grad_scale) {
  SGDCoef<T> c;
  c.lr = T(lr);
  c.momentum = T(h.momentum);
  c.one_minus_dampening = T(1.0 - h.dampening);
  c.weight_decay = T(h.weight_decay);
  c.inv_grad_scale = T(1.0 / grad_scale);
  c.has_weight_decay = h.weight_decay != 0.0;
  c.has_momentum = h.momentum != 0.0;
  c.nesterov = h.nesterov;
  c.maximize = h.maximize;
  c.first_step = h.first_step;
  return c;
}

// One element (or one vector of elements) of torch.optim.SGD's rule:
//   g = ±grad/scale + wd*p;  buf = first ? g : momentum*buf + (1-dampening)*g
//   p -= lr * (nesterov ? g + momentum*buf : buf)
template <typename V, typename T>
FROZENOPT_HD void sgd_update(V& param, V grad, V* momentum_buffer, const SGDCoef<T>& c) {
  V g = grad * V(c.inv_grad_scale);
  if (c.maximize) g = V(T(0)) - g;
  if (c.has_weight_decay) g = g + V(c.weight_decay) * param;
  if (c.has_momentum) {
    V buf = c.first_step ? g : V(c.momentum) * (*momentum_buffer) + V(c.one_minus_dampening) * g;
    *momentum_buffer = buf;
    g = c.nesterov ? g + V(c.momentum) * buf : buf;
  }
  param = param - V(c.lr) * g;
}

// ---------------------------------------------------------------- Adam / AdamW

// Adam's hyper-parameters, as the op takes them (lr and grad_scale apart).
struct AdamHyper {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;  // AdamW

  bool operator==(const AdamHyper&) const = default;
};

// What depends on the step count: worked out in double once per tensor and
// step (two pow()), narrowed by adam_coef.
struct AdamStepScalars {
  double step_size;              // lr / (1 - beta1^step)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};

// The scalars for the step about to be taken, the step-th.
FROZENOPT_HD AdamStepScalars adam_step_scalars(double lr, const AdamHyper& h, double step) {
  return {lr / (1.0 - ::pow(h.beta1, step)), ::sqrt(1.0 - ::pow(h.beta2, step))};
}

// Hyper-parameters of one Adam step of one tensor, already in the math type T.
template <typename T>
struct AdamCoef {
  T lr;
  T beta1;
  T beta2;
  T eps;
  T weight_decay;
  T step_size;
  T bias_correction2_sqrt;
  T inv_grad_scale;  // 1 when there is no AMP scale
  bool has_weight_decay;
  bool decoupled_weight_decay;
  bool amsgrad;
  bool maximize;
  // 1 - beta1 and 1 - beta2, computed in double: in float, 1 - float(0.999)
  // is off by 1.3e-5 relative (torch computes them in double).
  T one_minus_beta1;
  T one_minus_beta2;
};

// The coefficients of one Adam step of one tensor in the math type T.
template <typename T>
FROZENOPT_HD AdamCoef<T> adam_coef(const AdamHyper& h, double lr, double grad_scale, const AdamStepScalars& s) {
  AdamCoef<T> c;
  c.lr = T(lr);
  c.beta1 = T(h.beta1);
  c.beta2 = T(h.beta2);
  c.eps = T(h.eps);
  c.weight_decay = T(h.weight_decay);
  c.step_size = T(s.step_size);
  c.bias_correction2_sqrt = T(s.bias_correction2_sqrt);
  c.inv_grad_scale = T(1.0 / grad_scale);
  c.has_weight_decay = h.weight_decay != 0.0;
  c.decoupled_weight_decay = h.decoupled_weight_decay;
  c.amsgrad = h.amsgrad;
  c.maximize = h.maximize;
  c.one_minus_beta1 = T(1.0 - h.beta1);
  c.one_minus_beta2 = T(1.0 - h.beta2);
  return c;
}

// One element (or vector) of torch.optim.Adam's rule (AdamW when decoupled):
//   g = ±grad/scale (+ wd*p for Adam);  p *= 1 - lr*wd (AdamW)
//   m = m + (1-beta1)(g-m);  v = beta2*v + (1-beta2)*g*g;  vmax = max(vmax, v)
//   p -= step_size * m / (sqrt(v or vmax)/sqrt(1-beta2^t) + eps)
template <typename V, typename T>
FROZENOPT_HD void adam_update(V& param, V grad, V& exp_avg, V& exp_avg_sq, V* max_exp_avg_sq, const AdamCoef<T>& c) {
  V g = grad * V(c.inv_grad_scale);
  if (c.maximize) g = V(T(0)) - g;
  if (c.has_weight_decay) {
    if (c.decoupled_weight_decay) {
      param = param * V(T(1) - c.lr * c.weight_decay);
    } else {
      g = g + V(c.weight_decay) * param;
    }
  }
  // torch's lerp: the second form keeps exp_avg == g exactly when beta1 == 0.
  if (c.one_minus_beta1 < T(0.5)) {
    exp_avg = exp_avg + V(c.one_minus_beta1) * (g - exp_avg);
  } else {
    exp_avg = g - (g - exp_avg) * V(c.beta1);
  }
  exp_avg_sq = V(c.beta2) * exp_avg_sq + V(c.one_minus_beta2) * g * g;
  V second = exp_avg_sq;
  if (c.amsgrad) {
    second = Arith<V>::max(*max_exp_avg_sq, exp_avg_sq);
    *max_exp_avg_sq = second;
  }
  const V denom = Arith<V>::sqrt(second) / V(c.bias_correction2_sqrt) + V(c.eps);
  param = param - V(c.step_size) * exp_avg / denom;
}

// ---------------------------------------------------------------- group rows

// A param group's values as one row of the float64 table the *_groups_ ops
// take (schemas.cpp), in the order of the op's own arguments: lr first, then
// SGD (momentum, dampening, weight_decay, nesterov, maximize) or Adam (beta1,
// beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay); flags
// are 0 or 1. What decides the state layout (momentum on or off, amsgrad) and
// SGD's first step come from the op's arguments, `layout`, never from a row:
// a row cannot make the kernels touch state the op was not given.
template <typename Hyper>
inline constexpr int kRowWidth = 0;
template <>
inline constexpr int kRowWidth<SGDHyper> = 6;
template <>
inline constexpr int kRowWidth<AdamHyper> = 8;

FROZENOPT_HD SGDHyper hyper_of_row(const double* row, const SGDHyper& layout) {
  return {layout.momentum != 0.0 ? row[1] : 0.0, row[2], row[3], row[4] != 0.0, row[5] != 0.0, layout.first_step};
}

FROZENOPT_HD AdamHyper hyper_of_row(const double* row, const AdamHyper& layout) {
  return {row[1], row[2], row[4], row[3], layout.amsgrad, row[6] != 0.0, row[7] != 0.0};
}

}  // namespace math
}  // namespace frozenopt
