// Op schemas (the one place they are declared) and the step plan.
//
// The ops take every param of a group plus one mask entry per param, so a
// compiled graph or a captured CUDA graph stays valid when the mask flips.
// The plan is the eager fast path: it holds only the unfrozen params and their
// state, reads param.grad() itself and runs the kernels on a cached launch
// (see StepPlan), so per-step host work is a short C++ loop over the
// unfrozen params.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/stl.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/launch.h"
#ifdef FROZENOPT_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif
#include "layout.h"
#include "ops.h"

TORCH_LIBRARY(frozenopt, m) {
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor? mask, *, "
      "float lr, Tensor? lr_tensor=None, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool is_first_step, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor? mask, *, float lr, "
      "Tensor? lr_tensor=None, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
}

namespace frozenopt {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The unfrozen params of one param group whose state exists, in group order.
// Python rebuilds a plan when the frozen set, the state or the group changes
// (its watch notices edits made by user code).
//
// On the CPU, and on a GPU in CUDA builds, a step does not go through the
// dispatcher: the plan keeps, per param, the raw pointers the kernels need (a
// cpu::Slot; on a GPU also the launchers' rows) together with what they were
// taken from (the grad's TensorImpl, the storages, sizes and layouts). Each
// step compares those with param.grad() and the tensors, and re-validates only
// the params whose grad or storage changed, with the op's own checks; when
// nothing changed (grads kept between steps) the cached launch runs as it is.
// The op path (dispatcher) remains for layouts the kernels cannot walk,
// tensor subclasses, active dispatch modes and, on a GPU, params that share
// memory; it gives the op's error messages.
class StepPlan {
 public:
  // states: the op's state lists in its order (sgd: momentum_buffers; adam:
  // exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps), each parallel to
  // params, or empty where the op takes none (no momentum, no amsgrad).
  StepPlan(std::string kind, std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states)
      : params_(std::move(params)), states_(std::move(states)) {
    const size_t lists = kind == "sgd" ? 1 : kind == "adam" ? 4 : 0;
    TORCH_CHECK(lists > 0, "StepPlan: unknown optimizer kind '", kind, "'");
    TORCH_CHECK(states_.size() == lists, "StepPlan: ", kind, " takes ", lists, " state lists, got ", states_.size());
    for (const auto& list : states_) {
      TORCH_CHECK(list.empty() || list.size() == params_.size(), "StepPlan: a state list has ",
                  list.size(), " entries for ", params_.size(), " params");
    }
    adam_ = lists == 4;
    op_name_ = adam_ ? "frozenopt::adam_" : "frozenopt::sgd_";
    device_ = params_.empty() ? c10::DeviceType::CPU : params_[0].device().type();
#ifdef FROZENOPT_WITH_CUDA
    direct_ = device_ == c10::DeviceType::CPU || device_ == c10::DeviceType::CUDA;
#else
    direct_ = device_ == c10::DeviceType::CPU;
#endif
    for (const auto& p : params_) direct_ = direct_ && plain(p);
    for (const auto& list : states_) {
      for (const auto& t : list) direct_ = direct_ && plain(t);
    }
    entries_.resize(params_.size());
  }

  int64_t size() const { return static_cast<int64_t>(params_.size()); }

  // The op's checks, without stepping: lets a step over several groups fail
  // before any of them has moved.
  void check_grads() {
    if (use_direct()) {
      refresh(/*from_check_grads=*/true);
      return;
    }
    const Gathered g = gather();
    check_step_args("frozenopt step", g.params, g.grads, {}, std::nullopt, std::nullopt, std::nullopt,
                    std::nullopt);
  }

  void sgd(double lr, const OptTensor& lr_tensor, double momentum, double dampening, double weight_decay,
           bool nesterov, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf) {
    const bool has_momentum = momentum != 0.0;
    // momentum without buffers is the op's error to give.
    if (use_direct() && !(has_momentum && states_[0].empty()) && refresh(false)) {
      if (active_.empty()) return;
      RECORD_FUNCTION("frozenopt::sgd_ (step plan)", std::vector<c10::IValue>());
      check_scalars(lr_tensor, grad_scale, found_inf);
#ifdef FROZENOPT_WITH_CUDA
      if (device_ == c10::DeviceType::CUDA) {
        std::vector<at::Tensor> keep;
        const cuda::SGDArgs args = cuda::sgd_args(op_name_, std::nullopt, lr, lr_tensor, momentum, dampening,
                                                  weight_decay, nesterov, maximize, /*first_step=*/false,
                                                  grad_scale, found_inf, keep);
        cuda::launch_sgd_rows(rows_, args, has_momentum, params_[active_.front()].device());
        return;
      }
#endif
      lr = value_of(lr_tensor, lr);
      check_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov);
      if (skipped_for_overflow(found_inf)) return;
      sgd_launch_.coef = {lr,           momentum,   1.0 - dampening, weight_decay,
                          1.0 / value_of(grad_scale, 1.0),          weight_decay != 0.0,
                          has_momentum, nesterov,   maximize,        /*first_step=*/false};
      sgd_launch_.slots.swap(slots_);
      sgd_launch_.wave_ends = wave_ends_;
      try {
        cpu::run_sgd_best(sgd_launch_);
      } catch (...) {
        sgd_launch_.slots.swap(slots_);
        throw;
      }
      sgd_launch_.slots.swap(slots_);
      return;
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("frozenopt::sgd_", "")
                         .typed<void(at::TensorList, at::TensorList, at::TensorList, const OptTensor&, double,
                                     const OptTensor&, double, double, double, bool, bool, bool,
                                     const OptTensor&, const OptTensor&)>();
    const Gathered g = gather();
    if (g.params.empty()) return;
    op.call(g.params, g.grads, g.states[0], std::nullopt, lr, lr_tensor, momentum, dampening, weight_decay,
            nesterov, maximize, /*is_first_step=*/false, grad_scale, found_inf);
  }

  void adam(double lr, const OptTensor& lr_tensor, double beta1, double beta2, double weight_decay, double eps,
            bool amsgrad, bool maximize, bool decoupled_weight_decay, const OptTensor& grad_scale,
            const OptTensor& found_inf) {
    // amsgrad without max_exp_avg_sqs is the op's error to give.
    if (use_direct() && !(amsgrad && states_[2].empty()) && refresh(false)) {
      if (active_.empty()) return;
      RECORD_FUNCTION("frozenopt::adam_ (step plan)", std::vector<c10::IValue>());
      check_scalars(lr_tensor, grad_scale, found_inf);
#ifdef FROZENOPT_WITH_CUDA
      if (device_ == c10::DeviceType::CUDA) {  // the launch advances the step counters on the device
        std::vector<at::Tensor> keep;
        const cuda::AdamArgs args = cuda::adam_args(op_name_, std::nullopt, lr, lr_tensor, beta1, beta2,
                                                    weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
                                                    grad_scale, found_inf, keep);
        cuda::launch_adam_rows(rows_, args, params_[active_.front()].device());
        return;
      }
#endif
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
      // The step counter advances for every param with a grad, empty ones too,
      // as in torch.optim; the bias corrections are computed once per distinct
      // step count (usually one for the whole group).
      for (const int32_t i : active_) *entries_[i].step += 1.0f;
      auto& coefs = adam_launch_.coefs;
      coefs.resize(slots_.size());
      float last_step = -1.0f;
      math::AdamCoef<double> coef = base;
      for (size_t k = 0; k < slots_.size(); ++k) {
        const float step = *entries_[slot_entry_[k]].step;
        if (step != last_step) {
          coef = base;
          math::adam_step_scalars(coef, lr, beta1, beta2, double(step));
          last_step = step;
        }
        coefs[k] = coef;
      }
      adam_launch_.slots.swap(slots_);
      adam_launch_.wave_ends = wave_ends_;
      try {
        cpu::run_adam_best(adam_launch_);
      } catch (...) {
        adam_launch_.slots.swap(slots_);
        throw;
      }
      adam_launch_.slots.swap(slots_);
      return;
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("frozenopt::adam_", "")
                         .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                     at::TensorList, at::TensorList, const OptTensor&, double, const OptTensor&,
                                     double, double, double, double, bool, bool, bool, const OptTensor&,
                                     const OptTensor&)>();
    const Gathered g = gather();
    if (g.params.empty()) return;
    op.call(g.params, g.grads, g.states[0], g.states[1], g.states[2], g.states[3], std::nullopt, lr, lr_tensor,
            beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf);
  }

 private:
  struct Gathered {
    std::vector<at::Tensor> params, grads;
    std::vector<std::vector<at::Tensor>> states;
  };

  // What the cached slot of one param was built from, and the slot itself.
  // The param part (param and state checked, their pointers) stays valid while
  // the storages, sizes and layouts of the param and its state tensors do
  // (`t.data = ...` on any of them, a resize or a restride invalidates it);
  // the grad part is checked again whenever the grad object or its storage
  // changes.
  struct Entry {
    const void* param_data = nullptr;   // the param's storage when its part was checked
    const void* state_data[4] = {};     // each state tensor's, where the op takes that list
    int64_t numel = -1;                 // -1: the param part is not checked
    bool param_direct = false;          // the kernels can step param and state in place
    bool contiguous = false;            // ... and all of them are contiguous (the fast check)
    c10::TensorImpl* grad = nullptr;    // the grad checked last; nullptr: no grad then
    const void* grad_data = nullptr;
    bool direct = false;                // param_direct, and the grad too
    Span span{};                        // the param's memory, for finding params that share it
    cpu::Slot slot{};
    float* step = nullptr;  // adam's step counter
  };

  // A tensor on the plan's device that the kernels may read through a raw
  // pointer. Complex tensors are read as their real and imaginary parts; a
  // conjugate or negative view would need its bit applied, so it is not.
  bool plain(const at::Tensor& t) const {
    if (!t.defined()) return false;
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    const c10::DispatchKeySet keys = impl->key_set();
    return impl->device_type() == device_ && impl->layout() == c10::kStrided && impl->has_storage() &&
           !keys.has(c10::DispatchKey::Python) && !keys.has(c10::DispatchKey::Conjugate) &&
           !keys.has(c10::DispatchKey::Negative) && !keys.has(c10::DispatchKey::Functionalize);
  }

  // Where a tensor's elements start, for noticing a changed storage (set_,
  // .data =, a resize): TensorImpl::data() without its checks, which is all
  // the per-step test of an unchanged param needs. Only for tensors that
  // passed the checks (they have storage).
  static const void* raw_data(const c10::TensorImpl* t) {
    const c10::Storage& storage = t->unsafe_storage();
    if (!storage) return nullptr;
    return static_cast<const char*>(storage.unsafeGetStorageImpl()->data_ptr().get()) +
           t->storage_offset() * static_cast<int64_t>(t->dtype().itemsize());
  }

  // The direct path is for plans of plain CPU (or, in CUDA builds, CUDA)
  // tensors, and not while a Python dispatch mode (which must see the op) is
  // active.
  bool use_direct() const { return direct_ && c10::impl::TorchDispatchModeTLS::stack_len() == 0; }

  bool is_step_list(size_t k) const { return adam_ && k == 3; }

  // The op's checks of its scalar-tensor arguments (against the first param).
  void check_scalars(const OptTensor& lr_tensor, const OptTensor& grad_scale, const OptTensor& found_inf) const {
    const at::Tensor& p = params_[active_.front()];
    const at::Tensor& g = p.grad();
    check_step_args(op_name_, at::TensorList(&p, 1), at::TensorList(&g, 1), {}, std::nullopt, lr_tensor,
                    grad_scale, found_inf);
  }

  // Param i and its state tensors still have the storages, sizes and layout
  // their entry was checked with. Cheap when everything is contiguous: a few
  // pointer and flag compares per tensor.
  bool param_part_unchanged(size_t i, const c10::TensorImpl& p) const {
    const Entry& e = entries_[i];
    if (e.numel < 0 || p.numel() != e.numel || raw_data(&p) != e.param_data) return false;
    for (size_t k = 0; k < states_.size(); ++k) {
      if (states_[k].empty()) continue;
      const c10::TensorImpl& s = *states_[k][i].unsafeGetTensorImpl();
      if (raw_data(&s) != e.state_data[k] || s.numel() != (is_step_list(k) ? 1 : e.numel)) return false;
      if (e.param_direct && !is_step_list(k) && !(e.contiguous ? s.is_contiguous() : same_layout(s, p))) {
        return false;
      }
    }
    return !e.param_direct || (e.contiguous ? p.is_contiguous() : walkable(p));
  }

  static constexpr int64_t kCheckGrain = 2048;  // entries per thread at least

  // Entry i is as it was checked: no grad then and now, or the same grad and
  // the same param part. TensorImpl::grad, not Tensor::grad: the latter asks
  // is_leaf() each time.
  bool entry_unchanged(size_t i) const {
    const Entry& e = entries_[i];
    const c10::TensorImpl* p = params_[i].unsafeGetTensorImpl();
    const at::Tensor& grad = p->grad();
    if (!grad.defined()) return e.grad == nullptr;
    return param_part_unchanged(i, *p) && grad_unchanged(e, *p, *grad.unsafeGetTensorImpl());
  }

  // The grad the entry holds, unchanged since it was checked.
  bool grad_unchanged(const Entry& e, const c10::TensorImpl& p, const c10::TensorImpl& g) const {
    return &g == e.grad && g.numel() == e.numel && raw_data(&g) == e.grad_data &&
           (!e.direct || (e.contiguous ? g.is_contiguous() : same_layout(g, p)));
  }

  // Brings the cached slots in line with the params' current grads and
  // storages. Returns false when some param needs the op path (a layout the
  // kernels cannot walk). Raises the op's error, changing nothing, when a
  // grad or a state tensor is bad.
  bool refresh(bool from_check_grads) {
    const size_t n = params_.size();
    // Which entries changed: read-only, and split across threads, because for
    // thousands of small params it is a walk over as many scattered
    // TensorImpls and StorageImpls, each a cache (and TLB) miss.
    unchanged_.resize(n);
    at::parallel_for(0, static_cast<int64_t>(n), kCheckGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) unchanged_[i] = entry_unchanged(static_cast<size_t>(i));
    });
    bool changed = false;
    for (size_t i = 0; i < n; ++i) {
      if (unchanged_[i]) continue;
      changed = true;
      Entry& e = entries_[i];
      const c10::TensorImpl* p = params_[i].unsafeGetTensorImpl();
      const at::Tensor& grad = p->grad();
      drop_grad(e);
      if (!grad.defined()) continue;
      c10::TensorImpl* g = grad.unsafeGetTensorImpl();
      if (param_part_unchanged(i, *p) && e.param_direct && grad_fits(e, *p, *g)) {
        // Only the grad is new (zero_grad(set_to_none=True) makes this every
        // step), and it passes the op's grad checks: the param part stands.
        e.grad = g;
        e.grad_data = raw_data(g);
        e.slot.grad = e.grad_data;
        e.direct = true;
        continue;
      }
      validate(i, grad, from_check_grads);
      if (!e.direct) ++indirect_;
    }
    if (changed) rebuild_slots();
    // On a GPU, params that share memory take the op path, which launches them in waves.
    return indirect_ == 0 && !(device_ != c10::DeviceType::CPU && memory_shared_);
  }

  void drop_grad(Entry& e) {
    if (e.grad != nullptr && !e.direct) --indirect_;
    e.grad = nullptr;
    e.grad_data = nullptr;
    e.direct = false;
  }

  // What check_step_args asks of a grad given its (checked) param, as a
  // yes/no without messages, plus the kernels' wish for the param's layout.
  // A "no" goes through validate(), which gives the op's error or sends the
  // param to the op path.
  static bool grad_fits(const Entry& e, const c10::TensorImpl& p, const c10::TensorImpl& g) {
    // (the device check below also keeps a grad on another device type out)
    const c10::DispatchKeySet keys = g.key_set();
    if (keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Conjugate) ||
        keys.has(c10::DispatchKey::Negative) || keys.has(c10::DispatchKey::Functionalize)) {
      return false;
    }
    return g.layout() == c10::kStrided && g.has_storage() &&
           g.dtype() == p.dtype() && g.device() == p.device() && g.sizes() == p.sizes() &&
           (e.contiguous ? g.is_contiguous() : same_layout(g, p));
  }

  // The op's checks for param i alone; fills its entry. On an error the
  // whole list is checked again so the message names the same index the op's
  // would.
  void validate(size_t i, const at::Tensor& grad, bool from_check_grads) {
    const at::Tensor& p = params_[i];
    Entry& e = entries_[i];
    e = Entry{};
    try {
      check_one(i, grad);
    } catch (const c10::Error&) {
      rebuild_slots();
      fail_with_op_message(from_check_grads);
      throw;
    }
    const c10::TensorImpl& pi = *p.unsafeGetTensorImpl();
    bool param_direct = plain(p) && walkable(pi);
    bool contiguous = pi.is_contiguous();
    for (size_t k = 0; k < states_.size(); ++k) {
      if (states_[k].empty()) continue;
      const at::Tensor& s = states_[k][i];
      e.state_data[k] = raw_data(s.unsafeGetTensorImpl());
      if (is_step_list(k)) continue;
      param_direct = param_direct && plain(s) && same_layout(*s.unsafeGetTensorImpl(), pi);
      contiguous = contiguous && s.is_contiguous();
    }
    if (param_direct) {
      auto ptr = [&](size_t k) -> void* {
        return k < states_.size() && !is_step_list(k) && !states_[k].empty() ? states_[k][i].data_ptr() : nullptr;
      };
      const int64_t lanes = p.is_complex() ? 2 : 1;
      e.slot = {p.data_ptr(), nullptr, ptr(0), ptr(1), ptr(2), p.numel() * lanes,
                c10::toRealValueType(p.scalar_type())};
      if (adam_) e.step = states_[3][i].data_ptr<float>();
    }
    e.param_data = raw_data(&pi);
    e.numel = p.numel();
    e.param_direct = param_direct;
    e.contiguous = contiguous;
    e.span = span_of(pi, e.param_data);
    spans_checked_ = false;
    e.grad = grad.unsafeGetTensorImpl();
    e.grad_data = raw_data(e.grad);
    e.slot.grad = e.grad_data;
    e.direct = param_direct && plain(grad) && same_layout(*e.grad, pi) && (!contiguous || grad.is_contiguous());
  }

  void check_one(size_t i, const at::Tensor& grad) const {
    const at::TensorList p(&params_[i], 1), g(&grad, 1);
    auto one = [&](size_t k) { return at::TensorList(&states_[k][i], 1); };
    if (!adam_) {
      if (states_[0].empty()) {
        check_step_args(op_name_, p, g, {}, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
      } else {
        check_step_args(op_name_, p, g, {{"momentum_buffers", one(0)}}, std::nullopt, std::nullopt,
                        std::nullopt, std::nullopt);
      }
      return;
    }
    if (states_[2].empty()) {
      check_step_args(op_name_, p, g, {{"exp_avgs", one(0)}, {"exp_avg_sqs", one(1)}}, std::nullopt,
                      std::nullopt, std::nullopt, std::nullopt);
    } else {
      check_step_args(op_name_, p, g,
                      {{"exp_avgs", one(0)}, {"exp_avg_sqs", one(1)}, {"max_exp_avg_sqs", one(2)}},
                      std::nullopt, std::nullopt, std::nullopt, std::nullopt);
    }
    check_steps(op_name_, p, one(3));
  }

  // Re-runs the checks over the whole gathered list (the op's view), which
  // raises the error with the op's index; returns if they pass.
  void fail_with_op_message(bool from_check_grads) const {
    const Gathered g = gather();
    if (from_check_grads) {
      check_step_args("frozenopt step", g.params, g.grads, {}, std::nullopt, std::nullopt, std::nullopt,
                      std::nullopt);
    }
    if (!adam_) {
      if (g.states[0].empty()) {
        check_step_args(op_name_, g.params, g.grads, {}, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
      } else {
        check_step_args(op_name_, g.params, g.grads, {{"momentum_buffers", g.states[0]}}, std::nullopt,
                        std::nullopt, std::nullopt, std::nullopt);
      }
      return;
    }
    if (g.states[2].empty()) {
      check_step_args(op_name_, g.params, g.grads, {{"exp_avgs", g.states[0]}, {"exp_avg_sqs", g.states[1]}},
                      std::nullopt, std::nullopt, std::nullopt, std::nullopt);
    } else {
      check_step_args(op_name_, g.params, g.grads,
                      {{"exp_avgs", g.states[0]}, {"exp_avg_sqs", g.states[1]}, {"max_exp_avg_sqs", g.states[2]}},
                      std::nullopt, std::nullopt, std::nullopt, std::nullopt);
    }
    check_steps(op_name_, g.params, g.states[3]);
  }

  // The launch's slot list from the entries: params with a grad, in order;
  // empty tensors take no slot (the kernels skip them) but do count a step.
  // Params that share memory (layout.h's waves) are rare: whether any do is
  // found again only after some param's storage changed.
  void rebuild_slots() {
    active_.clear();
    slots_.clear();
    slot_entry_.clear();
    for (size_t i = 0; i < entries_.size(); ++i) {
      const Entry& e = entries_[i];
      if (e.grad == nullptr) continue;
      active_.push_back(static_cast<int32_t>(i));
      if (e.direct && e.numel > 0) {
        slots_.push_back(e.slot);
        slot_entry_.push_back(static_cast<int32_t>(i));
      }
    }
    if (!spans_checked_) {
      std::vector<Span> spans;
      for (const Entry& e : entries_) {
        if (e.numel >= 0) spans.push_back(e.span);
      }
      memory_shared_ = wave_ends(spans).size() > 1;
      spans_checked_ = true;
    }
#ifdef FROZENOPT_WITH_CUDA
    if (device_ == c10::DeviceType::CUDA) rebuild_rows();
#endif
    wave_ends_.clear();
    if (memory_shared_) {
      std::vector<Span> spans;
      for (const int32_t i : slot_entry_) spans.push_back(entries_[i].span);
      wave_ends_ = wave_ends(spans);
    }
  }

#ifdef FROZENOPT_WITH_CUDA
  // The CUDA launchers' rows: every param with a grad, empty ones too (Adam's
  // launch advances their step counters), in order.
  void rebuild_rows() {
    rows_.clear();
    for (const int32_t i : active_) {
      const Entry& e = entries_[i];
      if (!e.direct) continue;  // refresh() sends the plan to the op path then
      cuda::OpTensor t{};
      t.dtype = cuda::dtype_of(e.slot.dtype);
      t.numel = e.slot.numel;
      if (t.numel > 0) {
        t.rows[cuda::row::kParam] = e.slot.param;
        t.rows[cuda::row::kGrad] = const_cast<void*>(e.slot.grad);
        if (adam_) {
          t.rows[cuda::row::kExpAvg] = e.slot.state0;
          t.rows[cuda::row::kExpAvgSq] = e.slot.state1;
          t.rows[cuda::row::kMaxExpAvgSq] = e.slot.state2;
        } else {
          t.rows[cuda::row::kMomentum] = e.slot.state0;
        }
      }
      if (adam_) t.rows[cuda::row::kStep] = e.step;
      rows_.push_back(t);
    }
  }
#endif

  // The params that have a grad this step, like torch.optim's grad-is-None skip.
  Gathered gather() const {
    Gathered g;
    g.states.resize(states_.size());
    const size_t n = params_.size();
    g.params.reserve(n);
    g.grads.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& grad = params_[i].grad();
      if (!grad.defined()) continue;
      g.params.push_back(params_[i]);
      g.grads.push_back(grad);
      for (size_t k = 0; k < states_.size(); ++k) {
        if (!states_[k].empty()) g.states[k].push_back(states_[k][i]);
      }
    }
    return g;
  }

  std::vector<at::Tensor> params_;
  std::vector<std::vector<at::Tensor>> states_;
  bool adam_ = false;
  const char* op_name_ = "";
  c10::DeviceType device_;           // the params' device type
  bool direct_ = false;              // a plan of plain tensors on a device with direct launches
  std::vector<Entry> entries_;       // parallel to params_
  int64_t indirect_ = 0;             // entries with a grad that need the op path
  std::vector<int32_t> active_;      // entries with a grad
  std::vector<cpu::Slot> slots_;     // their non-empty ones, for the kernels
  std::vector<int32_t> slot_entry_;  // entry of each slot
  std::vector<size_t> wave_ends_;    // the slots' waves; empty: one wave
  bool spans_checked_ = false;       // memory_shared_ is up to date with the entries
  bool memory_shared_ = false;       // some params share memory: slots run in waves
  std::vector<uint8_t> unchanged_;   // refresh's scratch: entry i needs no new check
#ifdef FROZENOPT_WITH_CUDA
  std::vector<cuda::OpTensor> rows_;  // on a GPU: what the launchers take, from the entries
#endif
  cpu::SGDLaunch sgd_launch_;
  cpu::AdamLaunch adam_launch_;
};

}  // namespace

// csrc/cuda/plan_py.cpp: the CUDA launch planner, exposed as _C.cuda_plan.
void bind_launch_plan(pybind11::module_& m);
// csrc/watch.cpp: the per-step check of what the Python side holds.
void bind_watch(pybind11::module_& m);

}  // namespace frozenopt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using frozenopt::StepPlan;
  m.doc() = "frozenopt's compiled ops (torch.ops.frozenopt.*) and the eager step plan";
  frozenopt::bind_launch_plan(m);
  frozenopt::bind_watch(m);
  m.def(
      "check_grads",
      [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
        frozenopt::check_step_args("frozenopt step", params, grads, {}, std::nullopt, std::nullopt, std::nullopt,
                                   std::nullopt);
      },
      py::arg("params"), py::arg("grads"), "Raises the step ops' error for a bad grad, changing nothing.");
  py::class_<StepPlan>(m, "StepPlan")
      .def(py::init<std::string, std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>>(), py::arg("kind"),
           py::arg("params"), py::arg("states"))
      .def("__len__", &StepPlan::size)
      .def("check_grads", &StepPlan::check_grads)
      .def("sgd", &StepPlan::sgd, py::arg("lr"), py::arg("lr_tensor"), py::arg("momentum"), py::arg("dampening"),
           py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"), py::arg("grad_scale"),
           py::arg("found_inf"))
      .def("adam", &StepPlan::adam, py::arg("lr"), py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"),
           py::arg("weight_decay"), py::arg("eps"), py::arg("amsgrad"), py::arg("maximize"),
           py::arg("decoupled_weight_decay"), py::arg("grad_scale"), py::arg("found_inf"));
}
