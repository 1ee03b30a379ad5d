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

// The body of a CPU op: reads the scalars and checks the hyper-parameters
// into the launch, and when found_inf does not skip the step, calls
// unfrozen(i) for every unfrozen param, then steps the non-empty ones wave by
// wave (layout.h's wave_ends): add(launch, builder, i) appends param i's slot
// (and what else the launch holds per slot), run(launch) runs the kernels.
// Copies are made just before their wave runs and written back right after
// it, so a param that shares memory with an earlier one sees its update.
template <typename Launch, typename Hyper, typename Unfrozen, typename Add, typename Run>
void step(at::TensorList params, const OptionalTensors& opt, double lr, const Hyper& hyper, const Unfrozen& unfrozen,
          const Add& add, const Run& run) {
  Launch launch;
  if (!prepare_step(launch, lr, hyper, opt)) return;
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

}  // namespace

void sgd(const SGDTensors& t, const OptionalTensors& opt, double lr, const math::SGDHyper& hyper) {
  step<SGDLaunch>(
      t.params, opt, lr, hyper, [](size_t) {},
      [&](SGDLaunch&, SlotBuilder& b, size_t i) { return b.add(t.params[i], t.grads[i], {t.momentum_buffer(i)}); },
      run_sgd_best);
}

void adam(const AdamTensors& t, const OptionalTensors& opt, double lr, const math::AdamHyper& hyper) {
  StepScalarCache step_scalars;
  step<AdamLaunch>(
      t.params, opt, lr, hyper,
      // The step counter advances even for an empty tensor, as in torch.optim.
      [&](size_t i) { *t.state_steps[i].data_ptr<float>() += 1.0f; },
      [&](AdamLaunch& launch, SlotBuilder& b, size_t i) {
        if (launch.slots.empty()) launch.steps.clear();  // a new wave
        launch.steps.push_back(step_scalars.get(launch, *t.state_steps[i].data_ptr<float>(), 0));
        return b.add(t.params[i], t.grads[i], {t.exp_avgs[i], t.exp_avg_sqs[i], t.max_exp_avg_sq(i)});
      },
      run_adam_best);
}

}  // namespace cpu
}  // namespace frozenopt

TORCH_LIBRARY_IMPL(frozenopt, CPU, m) {
  m.impl("sgd_", &frozenopt::sgd_op<frozenopt::cpu::sgd>);
  m.impl("adam_", &frozenopt::adam_op<frozenopt::cpu::adam>);
}
