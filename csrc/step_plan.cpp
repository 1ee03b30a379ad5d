#include "step_plan.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <algorithm>
#include <utility>

#include "cpu/ops_cpu.h"
#include "op_entry.h"

namespace frozenopt {
namespace {

// Where a tensor's elements start, for noticing a changed storage (set_,
// .data =, a resize): TensorImpl::data() without its checks, which is all
// the per-step test of an unchanged param needs. Only for tensors that
// passed the checks (they have storage).
const void* raw_data(const c10::TensorImpl* t) {
  const c10::Storage& storage = t->unsafe_storage();
  if (!storage) return nullptr;
  return static_cast<const char*>(storage.unsafeGetStorageImpl()->data_ptr().get()) +
         t->storage_offset() * static_cast<int64_t>(t->dtype().itemsize());
}

// A tensor the kernels may not read through a raw pointer whatever its
// device and layout: a tensor subclass, a functional wrapper, or a conjugate
// or negative view (its bit would need applying; complex tensors are read as
// their real and imaginary parts).
bool wrapped(const c10::DispatchKeySet& keys) {
  return keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Conjugate) ||
         keys.has(c10::DispatchKey::Negative) || keys.has(c10::DispatchKey::Functionalize);
}

// What the op's checks ask of a grad given its (checked) param, as a yes/no
// without messages, plus the kernels' wish for the param's layout
// (`contiguous`: the param and its state are). A "no" goes through
// validate(), which gives the op's error or sends the param to the op path.
bool grad_fits(bool contiguous, const c10::TensorImpl& p, const c10::TensorImpl& g) {
  // (the device check below also keeps a grad on another device type out)
  return !wrapped(g.key_set()) && g.layout() == c10::kStrided && g.has_storage() && g.dtype() == p.dtype() &&
         g.device() == p.device() && g.sizes() == p.sizes() && (contiguous ? g.is_contiguous() : same_layout(g, p));
}

// The op through the dispatcher; Signature is its kernels' (op_entry.h).
template <typename Signature, typename... Args>
void call_op(const char* name, const Args&... args) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  op.call(args...);
}

constexpr int64_t kCheckGrain = 2048;  // entries per thread at least, in refresh's parallel check

// Asks for the cache lines of an object whose fields a check reads (a
// prefetch never faults: a null object costs nothing).
template <size_t Lines>
void prefetch_lines(const void* object) {
  const char* at = static_cast<const char*>(object);
  for (size_t k = 0; k < Lines; ++k) __builtin_prefetch(at + 64 * k);
}
constexpr size_t kTensorImplLines = (sizeof(c10::TensorImpl) + 63) / 64;

}  // namespace

StepPlan::StepPlan(const std::string& kind, std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states,
                   std::vector<int32_t> groups)
    : params_(std::move(params)), states_(std::move(states)), group_of_(std::move(groups)) {
  const size_t lists = kind == "sgd" ? 1 : kind == "adam" ? 4 : 0;
  TORCH_CHECK(lists > 0, "StepPlan: unknown optimizer kind '", kind, "'");
  TORCH_CHECK(states_.size() == lists, "StepPlan: ", kind, " takes ", lists, " state lists, got ", states_.size());
  for (const auto& list : states_) {
    TORCH_CHECK(list.empty() || list.size() == params_.size(), "StepPlan: a state list has ", list.size(),
                " entries for ", params_.size(), " params");
  }
  if (group_of_.empty()) group_of_.assign(params_.size(), 0);
  TORCH_CHECK(group_of_.size() == params_.size(), "StepPlan: ", group_of_.size(), " group indices for ", params_.size(),
              " params");
  for (const int32_t g : group_of_) {
    TORCH_CHECK(g >= 0, "StepPlan: a negative group index");
    group_count_ = std::max(group_count_, static_cast<size_t>(g) + 1);
  }
  adam_ = lists == 4;
  op_name_ = adam_ ? kAdamOp : kSGDOp;
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

void StepPlan::check_grads() {
  if (use_direct()) {
    refresh(/*from_check_grads=*/true);
    return;
  }
  const Gathered g = gather();
  frozenopt::check_grads(kStepCheck, g.params, g.grads);
}

// One entry per group, and the groups agree on what decides the state
// layout (layout(hyper)): the kernels step every tensor of a launch with it.
template <typename Group, typename Layout>
void StepPlan::check_groups(const std::vector<Group>& groups, const Layout& layout) const {
  TORCH_CHECK(!groups.empty() && groups.size() >= group_count_, "StepPlan: the plan's params name ", group_count_,
              " param groups, the step got ", groups.size(), " entries");
  for (const Group& g : groups) {
    TORCH_CHECK(layout(g.hyper) == layout(groups.front().hyper),
                "StepPlan: the param groups of one plan must agree on ", adam_ ? "amsgrad" : "momentum on or off");
  }
}

// The op's checks of a direct launch's scalar tensors: AMP's grad_scale and
// found_inf, and each group's tensor lr.
template <typename Group>
void StepPlan::check_launch_scalars(const std::vector<Group>& groups, const OptTensor& grad_scale,
                                    const OptTensor& found_inf) const {
  const at::Tensor* first = &params_[active_.front()];
  check_scalars(op_name_, first, {.grad_scale = grad_scale, .found_inf = found_inf});
  for (const Group& g : groups) {
    if (g.lr_tensor.has_value()) check_scalars(op_name_, first, {.lr = g.lr_tensor});
  }
}

void StepPlan::sgd(const std::vector<SGDGroup>& groups, const OptTensor& grad_scale, const OptTensor& found_inf) {
  check_groups(groups, [](const math::SGDHyper& h) { return h.momentum != 0.0; });
  const bool momentum = groups.front().hyper.momentum != 0.0;
  // momentum without buffers is the op's error to give.
  if (use_direct() && !(momentum && states_[0].empty()) && refresh(false)) {
    if (active_.empty()) return;
    RECORD_FUNCTION("frozenopt::sgd_ (step plan)", std::vector<c10::IValue>());
    check_launch_scalars(groups, grad_scale, found_inf);
#ifdef FROZENOPT_WITH_CUDA
    if (device_ == c10::DeviceType::CUDA) {
      launch_on_gpu(groups, sgd_table_, grad_scale, found_inf);
      return;
    }
#endif
    sgd_launch_.groups.clear();
    for (const SGDGroup& g : groups) cpu::add_group(sgd_launch_, g.lr, g.lr_tensor, g.hyper);
    if (cpu::prepare_scale(sgd_launch_, grad_scale, found_inf)) run_on_cpu(sgd_launch_, cpu::run_sgd_best);
    return;
  }
  run_ops(groups, [&](const Gathered& g, const SGDGroup& group) {
    const math::SGDHyper& h = group.hyper;
    call_op<decltype(sgd_op<cpu::sgd>)>(kSGDOp, g.params, g.grads, g.states[0], /*mask=*/kNoTensor, group.lr,
                                        group.lr_tensor, h.momentum, h.dampening, h.weight_decay, h.nesterov,
                                        h.maximize, /*is_first_step=*/false, grad_scale, found_inf);
  });
}

void StepPlan::adam(const std::vector<AdamGroup>& groups, const OptTensor& grad_scale, const OptTensor& found_inf) {
  check_groups(groups, [](const math::AdamHyper& h) { return h.amsgrad; });
  // amsgrad without max_exp_avg_sqs is the op's error to give.
  if (use_direct() && !(groups.front().hyper.amsgrad && states_[2].empty()) && refresh(false)) {
    if (active_.empty()) return;
    RECORD_FUNCTION("frozenopt::adam_ (step plan)", std::vector<c10::IValue>());
    check_launch_scalars(groups, grad_scale, found_inf);
#ifdef FROZENOPT_WITH_CUDA
    if (device_ == c10::DeviceType::CUDA) {  // the launch advances the step counters on the device
      launch_on_gpu(groups, adam_table_, grad_scale, found_inf);
      return;
    }
#endif
    adam_launch_.groups.clear();
    for (const AdamGroup& g : groups) cpu::add_group(adam_launch_, g.lr, g.lr_tensor, g.hyper);
    if (!cpu::prepare_scale(adam_launch_, grad_scale, found_inf)) return;
    // The step counter advances for every param with a grad, empty ones too,
    // as in torch.optim.
    for (const int32_t i : active_) *entries_[i].step += 1.0f;
    cpu::StepScalarCache step_scalars;
    adam_launch_.steps.resize(slots_.size());
    for (size_t k = 0; k < slots_.size(); ++k) {
      adam_launch_.steps[k] = step_scalars.get(adam_launch_, *entries_[slot_entry_[k]].step, slots_[k].group);
    }
    run_on_cpu(adam_launch_, cpu::run_adam_best);
    return;
  }
  run_ops(groups, [&](const Gathered& g, const AdamGroup& group) {
    const math::AdamHyper& h = group.hyper;
    call_op<decltype(adam_op<cpu::adam>)>(kAdamOp, g.params, g.grads, g.states[0], g.states[1], g.states[2],
                                          g.states[3], /*mask=*/kNoTensor, group.lr, group.lr_tensor, h.beta1, h.beta2,
                                          h.weight_decay, h.eps, h.amsgrad, h.maximize, h.decoupled_weight_decay,
                                          grad_scale, found_inf);
  });
}

// The op path: one op call per group, call(gathered, group), for the groups
// with a grad. With several groups, what the ops would refuse (a group's
// hyper-parameters, any grad) is checked first, so nothing moves then.
template <typename Group, typename Call>
void StepPlan::run_ops(const std::vector<Group>& groups, const Call& call) const {
  if (groups.size() > 1) {
    for (const Group& g : groups) {
      const bool host_lr = !g.lr_tensor.has_value() || g.lr_tensor->is_cpu();
      if (host_lr) check_hyper(g.lr_tensor.has_value() ? g.lr_tensor->template item<double>() : g.lr, g.hyper);
    }
    const Gathered all = gather();
    frozenopt::check_grads(kStepCheck, all.params, all.grads);
  }
  for (size_t k = 0; k < groups.size(); ++k) {
    const Gathered g = gather(static_cast<int32_t>(k));
    if (!g.params.empty()) call(g, groups[k]);
  }
}

#ifdef FROZENOPT_WITH_CUDA
// The rows in one launch on the current stream. With several groups, each
// tensor reads its group's entry from the plan's table on the device (sent
// again only when an entry changed); one group is the op's own arguments.
template <typename Group, typename Hyper>
void StepPlan::launch_on_gpu(const std::vector<Group>& groups, cuda::DeviceGroupTable<Hyper>& table,
                             const OptTensor& grad_scale, const OptTensor& found_inf) {
  std::vector<cuda::GroupEntry<Hyper>> entries;
  entries.reserve(groups.size());
  for (const Group& g : groups) entries.push_back(cuda::group_entry(op_name_, g.lr, g.lr_tensor, g.hyper));
  const Group& first = groups.front();
  const at::Device device = params_[active_.front()].device();
  std::vector<at::Tensor> keep;
  auto args = cuda::launch_args(op_name_, first.lr, first.hyper,
                                {.lr = first.lr_tensor, .grad_scale = grad_scale, .found_inf = found_inf}, keep);
  if (groups.size() > 1) args.table = table.upload(row_group_, entries, device);
  cuda::launch_rows(rows_, args, device);
}
#endif

// Runs the cached slots through the CPU kernels: they are lent to the launch
// (a swap, no copy) and taken back, also when the kernels throw.
template <typename Launch, typename Run>
void StepPlan::run_on_cpu(Launch& launch, const Run& run) {
  launch.slots.swap(slots_);
  launch.wave_ends = wave_ends_;
  try {
    run(launch);
  } catch (...) {
    launch.slots.swap(slots_);
    throw;
  }
  launch.slots.swap(slots_);
}

// A tensor on the plan's device that the kernels may read through a raw pointer.
bool StepPlan::plain(const at::Tensor& t) const {
  if (!t.defined()) return false;
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return impl->device_type() == device_ && impl->layout() == c10::kStrided && impl->has_storage() &&
         !wrapped(impl->key_set());
}

// The direct path is for plans of plain CPU (or, in CUDA builds, CUDA)
// tensors, and not while a Python dispatch mode (which must see the op) is
// active.
bool StepPlan::use_direct() const { return direct_ && c10::impl::TorchDispatchModeTLS::stack_len() == 0; }

// Param i and its state tensors still have the storages, sizes and layout
// their entry was checked with. Cheap when everything is contiguous: a few
// pointer and flag compares per tensor.
bool StepPlan::param_part_unchanged(size_t i, const c10::TensorImpl& p) const {
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

// Entry i is as it was checked: no grad then and now, or the same grad and
// the same param part. TensorImpl::grad, not Tensor::grad: the latter asks
// is_leaf() each time.
bool StepPlan::entry_unchanged(size_t i) const {
  const Entry& e = entries_[i];
  const c10::TensorImpl* p = params_[i].unsafeGetTensorImpl();
  const at::Tensor& grad = p->grad();
  if (!grad.defined()) return e.grad == nullptr;
  return param_part_unchanged(i, *p) && grad_unchanged(e, *p, *grad.unsafeGetTensorImpl());
}

// The grad the entry holds, unchanged since it was checked.
bool StepPlan::grad_unchanged(const Entry& e, const c10::TensorImpl& p, const c10::TensorImpl& g) const {
  return &g == e.grad && g.numel() == e.numel && raw_data(&g) == e.grad_data &&
         (!e.direct || (e.contiguous ? g.is_contiguous() : same_layout(g, p)));
}

void StepPlan::prefetch_tensors(size_t i) const {
  prefetch_lines<kTensorImplLines>(params_[i].unsafeGetTensorImpl());
  for (const auto& list : states_) {
    if (!list.empty()) prefetch_lines<kTensorImplLines>(list[i].unsafeGetTensorImpl());
  }
}

void StepPlan::prefetch_storages(size_t i) const {
  const c10::TensorImpl* p = params_[i].unsafeGetTensorImpl();
  prefetch_lines<2>(p->autograd_meta());
  prefetch_lines<2>(p->unsafe_storage().unsafeGetStorageImpl());  // a null one is not read
  for (const auto& list : states_) {
    if (list.empty()) continue;
    prefetch_lines<2>(list[i].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
  }
}

void StepPlan::prefetch_grad(size_t i) const {
  const at::Tensor& grad = params_[i].unsafeGetTensorImpl()->grad();
  if (grad.defined()) prefetch_lines<kTensorImplLines>(grad.unsafeGetTensorImpl());
}

void StepPlan::prefetch_grad_storage(size_t i) const {
  const at::Tensor& grad = params_[i].unsafeGetTensorImpl()->grad();
  if (grad.defined()) prefetch_lines<2>(grad.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
}

// Brings the cached slots in line with the params' current grads and
// storages. Returns false when some param needs the op path (a layout the
// kernels cannot walk). Raises the op's error, changing nothing, when a
// grad or a state tensor is bad.
bool StepPlan::refresh(bool from_check_grads) {
  const size_t n = params_.size();
  // Which entries changed: read-only, and split across threads, because for
  // thousands of small params it is a walk over as many scattered
  // TensorImpls and StorageImpls, each a cache (and TLB) miss.
  unchanged_.resize(n);
  at::parallel_for(0, static_cast<int64_t>(n), kCheckGrain, [&](int64_t begin, int64_t end) {
    // Each entry's check follows chains of pointers (param -> autograd meta ->
    // grad -> storage); their objects are asked for in stages some entries
    // ahead, each stage reading only what an earlier one brought in, so the
    // misses of many entries overlap instead of following one another.
    for (int64_t i = begin; i < end; ++i) {
      if (i + 4 * kAhead < end) prefetch_tensors(static_cast<size_t>(i + 4 * kAhead));
      if (i + 3 * kAhead < end) prefetch_storages(static_cast<size_t>(i + 3 * kAhead));
      if (i + 2 * kAhead < end) prefetch_grad(static_cast<size_t>(i + 2 * kAhead));
      if (i + kAhead < end) prefetch_grad_storage(static_cast<size_t>(i + kAhead));
      unchanged_[i] = entry_unchanged(static_cast<size_t>(i));
    }
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
    if (param_part_unchanged(i, *p) && e.param_direct && grad_fits(e.contiguous, *p, *g)) {
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

void StepPlan::drop_grad(Entry& e) {
  if (e.grad != nullptr && !e.direct) --indirect_;
  e.grad = nullptr;
  e.grad_data = nullptr;
  e.direct = false;
}

// The op's checks for param i alone; fills its entry. On an error the
// whole list is checked again so the message names the same index the op's
// would.
void StepPlan::validate(size_t i, const at::Tensor& grad, bool from_check_grads) {
  const at::Tensor& p = params_[i];
  Entry& e = entries_[i];
  e = Entry{};
  try {
    check_op_args(at::TensorList(&p, 1), at::TensorList(&grad, 1),
                  [&](size_t k) { return states_[k].empty() ? at::TensorList() : at::TensorList(&states_[k][i], 1); });
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
    e.slot = {p.data_ptr(), nullptr, ptr(0), ptr(1), ptr(2), p.numel() * lanes, c10::toRealValueType(p.scalar_type()),
              group_of_[i]};
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

// The op's checks of these params and grads with the plan's state lists:
// state(k) is list k for the same params (empty where the plan holds none).
template <typename StateList>
void StepPlan::check_op_args(at::TensorList params, at::TensorList grads, const StateList& state) const {
  if (adam_) {
    check_adam_args(op_name_, {params, grads, state(0), state(1), state(2), state(3), !states_[2].empty()});
  } else {
    check_sgd_args(op_name_, {params, grads, state(0), !states_[0].empty()});
  }
}

// Re-runs the checks over the whole gathered list (the op's view), which
// raises the error with the op's index; returns if they pass.
void StepPlan::fail_with_op_message(bool from_check_grads) const {
  const Gathered g = gather();
  if (from_check_grads) frozenopt::check_grads(kStepCheck, g.params, g.grads);
  check_op_args(g.params, g.grads, [&](size_t k) { return at::TensorList(g.states[k]); });
}

// The launch's slot list from the entries: params with a grad, in order;
// empty tensors take no slot (the kernels skip them) but do count a step.
// Params that share memory (layout.h's waves) are rare: whether any do is
// found again only after some param's storage changed.
void StepPlan::rebuild_slots() {
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
void StepPlan::rebuild_rows() {
  rows_.clear();
  row_group_.clear();
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
    row_group_.push_back(group_of_[i]);
  }
}
#endif

// The params of `group` (every group: -1) that have a grad, and theirs.
StepPlan::Gathered StepPlan::gather(int32_t group) const {
  Gathered g;
  g.states.resize(states_.size());
  const size_t n = params_.size();
  g.params.reserve(n);
  g.grads.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (group >= 0 && group_of_[i] != group) continue;
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

}  // namespace frozenopt
