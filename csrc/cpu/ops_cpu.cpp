// CPU bodies of the step ops: checks, AMP skip, the mask, then one call into
// the kernel built for the best capability this CPU (or ATEN_CPU_CAPABILITY)
// allows (launch.h picks it, for the step plan too).
#include "ops_cpu.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../layout.h"
#include "../op_entry.h"

namespace frozenopt {
namespace cpu {
namespace {

// Per-param frozen flags, read on the host (the mask is a CPU tensor here).
std::vector<uint8_t> frozen_flags(const OptTensor& mask, size_t n) {
  std::vector<uint8_t> flags(n, 0);
  if (!mask.has_value()) return flags;
  const at::Tensor m = mask->to(at::kByte).contiguous();
  const uint8_t* data = m.data_ptr<uint8_t>();
  std::copy(data, data + n, flags.begin());
  return flags;
}

// The kernels step a slot in place when layout.h allows it; other tensors
// are stepped through contiguous copies that are written back afterwards.
// Complex tensors are stepped as their real and imaginary parts, as
// torch.optim does through view_as_real.
class SlotBuilder {
 public:
  Slot add(const at::Tensor& p, const at::Tensor& g, std::initializer_list<at::Tensor> states) {
    const c10::TensorImpl& pi = *p.unsafeGetTensorImpl();
    bool in_place = walkable(pi) && same_layout(*g.unsafeGetTensorImpl(), pi);
    for (const auto& s : states) in_place = in_place && (!s.defined() || same_layout(*s.unsafeGetTensorImpl(), pi));
    void* ptrs[3] = {nullptr, nullptr, nullptr};
    int k = 0;
    for (const auto& s : states) ptrs[k++] = !s.defined() ? nullptr : in_place ? s.data_ptr() : keep(s).data_ptr();
    const void* grad = in_place ? g.data_ptr() : grads_.emplace_back(g.contiguous()).data_ptr();
    void* param = in_place ? p.data_ptr() : keep(p).data_ptr();
    const int64_t lanes = p.is_complex() ? 2 : 1;
    return {param, grad, ptrs[0], ptrs[1], ptrs[2], p.numel() * lanes, c10::toRealValueType(p.scalar_type()), 0};
  }

  void write_back() {
    for (auto& [original, copy] : copies_) original.copy_(copy);
    copies_.clear();
    grads_.clear();
  }

 private:
  at::Tensor keep(const at::Tensor& t) {
    copies_.emplace_back(t, t.contiguous());
    return copies_.back().second;
  }

  std::vector<std::pair<at::Tensor, at::Tensor>> copies_;
  std::vector<at::Tensor> grads_;
};

// The body of a CPU op: prepare(launch) reads the scalars and checks the
// hyper-parameters into the launch, and when it does not skip the step
// (found_inf), calls unfrozen(i) for every unfrozen param, then steps the
// non-empty ones wave by wave (layout.h's wave_ends): add(launch, builder, i)
// appends param i's slot (and what else the launch holds per slot),
// run(launch) runs the kernels. Copies are made just before their wave runs
// and written back right after it, so a param that shares memory with an
// earlier one sees its update.
template <typename Launch, typename Prepare, typename Unfrozen, typename Add, typename Run>
void step(at::TensorList params, const OptionalTensors& opt, const Prepare& prepare, const Unfrozen& unfrozen,
          const Add& add, const Run& run) {
  Launch launch;
  if (!prepare(launch)) return;
  const auto frozen = frozen_flags(opt.mask, params.size());
  std::vector<Span> spans;
  std::vector<size_t> active;
  for (size_t i = 0; i < params.size(); ++i) {
    if (frozen[i]) continue;
    unfrozen(i);
    if (params[i].numel() == 0) continue;
    active.push_back(i);
    spans.push_back(span_of(*params[i].unsafeGetTensorImpl(), params[i].data_ptr()));
  }
  SlotBuilder builder;
  size_t first = 0;
  for (const size_t end : wave_ends(spans)) {
    launch.slots.clear();
    for (size_t k = first; k < end; ++k) launch.slots.push_back(add(launch, builder, active[k]));
    run(launch);
    builder.write_back();
    first = end;
  }
}

// The launch's groups of a *_groups_ op, one per table row (read on the host
// and checked), and each param's group, checked to name a row.
template <typename Launch, typename Hyper>
std::vector<int32_t> read_group_rows(const char* op, Launch& launch, const GroupRows& g, const Hyper& layout) {
  const at::Tensor table = g.table.contiguous();
  const double* values = table.data_ptr<double>();
  const int64_t width = table.size(1);
  launch.groups.clear();
  for (int64_t r = 0; r < table.size(0); ++r) {
    launch.groups.push_back({checked_row(op, r, values + r * width, layout), values[r * width]});
  }
  const at::Tensor index = g.tensor_group.contiguous();
  std::vector<int32_t> group_of(index.data_ptr<int32_t>(), index.data_ptr<int32_t>() + index.numel());
  for (size_t i = 0; i < group_of.size(); ++i) {
    TORCH_CHECK(group_of[i] >= 0 && group_of[i] < table.size(0), op, ": tensor_group[", i, "] is ", group_of[i],
                " but group_table has ", table.size(0), " rows");
  }
  return group_of;
}

// One op's step, SGD or Adam: `prepare` fills the launch's groups, group(i)
// is param i's.
template <typename Prepare, typename Group>
void sgd_step(const SGDTensors& t, const OptionalTensors& opt, const Prepare& prepare, const Group& group) {
  step<SGDLaunch>(
      t.params, opt, prepare, [](size_t) {},
      [&](SGDLaunch&, SlotBuilder& b, size_t i) {
        Slot slot = b.add(t.params[i], t.grads[i], {t.momentum_buffer(i)});
        slot.group = group(i);
        return slot;
      },
      run_sgd_best);
}

template <typename Prepare, typename Group>
void adam_step(const AdamTensors& t, const OptionalTensors& opt, const Prepare& prepare, const Group& group) {
  StepScalarCache step_scalars;
  step<AdamLaunch>(
      t.params, opt, prepare,
      // The step counter advances even for an empty tensor, as in torch.optim.
      [&](size_t i) { *t.state_steps[i].data_ptr<float>() += 1.0f; },
      [&](AdamLaunch& launch, SlotBuilder& b, size_t i) {
        if (launch.slots.empty()) launch.steps.clear();  // a new wave
        launch.steps.push_back(step_scalars.get(launch, *t.state_steps[i].data_ptr<float>(), group(i)));
        Slot slot = b.add(t.params[i], t.grads[i], {t.exp_avgs[i], t.exp_avg_sqs[i], t.max_exp_avg_sq(i)});
        slot.group = group(i);
        return slot;
      },
      run_adam_best);
}

constexpr auto kOneGroup = [](size_t) { return int32_t{0}; };

}  // namespace

void sgd(const SGDTensors& t, const OptionalTensors& opt, double lr, const math::SGDHyper& hyper) {
  sgd_step(t, opt, [&](SGDLaunch& launch) { return prepare_step(launch, lr, hyper, opt); }, kOneGroup);
}

void adam(const AdamTensors& t, const OptionalTensors& opt, double lr, const math::AdamHyper& hyper) {
  adam_step(t, opt, [&](AdamLaunch& launch) { return prepare_step(launch, lr, hyper, opt); }, kOneGroup);
}

void sgd_groups(const SGDTensors& t, const OptionalTensors& opt, const GroupRows& g, const math::SGDHyper& layout) {
  std::vector<int32_t> group_of;
  sgd_step(
      t, opt,
      [&](SGDLaunch& launch) {
        group_of = read_group_rows(kSGDGroupsOp, launch, g, layout);
        return prepare_scale(launch, opt.grad_scale, opt.found_inf);
      },
      [&](size_t i) { return group_of[i]; });
}

void adam_groups(const AdamTensors& t, const OptionalTensors& opt, const GroupRows& g, const math::AdamHyper& layout) {
  std::vector<int32_t> group_of;
  adam_step(
      t, opt,
      [&](AdamLaunch& launch) {
        group_of = read_group_rows(kAdamGroupsOp, launch, g, layout);
        return prepare_scale(launch, opt.grad_scale, opt.found_inf);
      },
      [&](size_t i) { return group_of[i]; });
}

}  // namespace cpu
}  // namespace frozenopt

TORCH_LIBRARY_IMPL(frozenopt, CPU, m) {
  m.impl("sgd_", &frozenopt::sgd_op<frozenopt::cpu::sgd>);
  m.impl("adam_", &frozenopt::adam_op<frozenopt::cpu::adam>);
  m.impl("sgd_groups_", &frozenopt::sgd_groups_op<frozenopt::cpu::sgd_groups>);
  m.impl("adam_groups_", &frozenopt::adam_groups_op<frozenopt::cpu::adam_groups>);
}
