// CUDA bodies of the step ops (TORCH_LIBRARY_IMPL(frozenopt, CUDA, m)).
//
// Host work only: the shared argument checks, grouping by dtype, the launch
// metadata, and the launches on the current stream (launch_sgd.cu,
// launch_adam.cu) with the kernel-argument budget that the driver and the
// device allow. Nothing here reads device memory: found_inf, grad_scale, a CUDA lr tensor, the mask and
// the step counters are read by the kernels, so step() never synchronises
// and can be captured in a CUDA graph. A frozen tensor (mask entry non-zero)
// still gets its metadata slot (the captured graph must cover it when it is
// unfrozen), and its blocks return before loading anything.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "ops_cuda.h"

#include "../layout.h"
#include "../op_entry.h"
#include "launch.h"

namespace frozenopt {
namespace cuda {

size_t kernel_arg_budget(int device) {
  static const int driver = [] {
    int version = 0;
    return cudaDriverGetVersion(&version) == cudaSuccess ? version : 0;
  }();
  return choose_budget(driver, at::cuda::getDeviceProperties(device)->major);
}

// Complex tensors are stepped as their real and imaginary parts (torch.optim's view_as_real).
DType dtype_of(at::ScalarType t) {
  switch (c10::toRealValueType(t)) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "frozenopt: unsupported dtype ", t);
  }
}

namespace {

// A CUDA tensor is read by the kernel where it lies; a CPU one (or none) is a
// host value (reading a CPU tensor is no device synchronisation).
ScalarArg scalar_arg(const char* op, const char* what, const OptTensor& t, double otherwise) {
  if (!t.has_value()) return host_scalar(otherwise);
  if (t->is_cpu()) return host_scalar(t->item<double>());
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": ", what,
              " must be float32 or float64 on CUDA, got ", t->scalar_type());
  return {t->data_ptr(), t->scalar_type() == at::kDouble ? 1 : 0, 0.0};
}

// A CPU lr tensor is a host value; a CUDA one is read by the kernels, and
// the hyper-parameter checks do not see it.
double host_lr(const OptTensor& lr_tensor, double lr) {
  if (!lr_tensor.has_value()) return lr;
  return lr_tensor->is_cpu() ? lr_tensor->item<double>() : 0.0;
}

StepArgs step_args(const char* op, double lr, const OptionalTensors& opt, std::vector<at::Tensor>& keep) {
  StepArgs a{};
  if (opt.mask.has_value()) {
    at::Tensor m = opt.mask->contiguous();  // bool and uint8 are both one byte per entry
    keep.push_back(m);
    a.mask = static_cast<const uint8_t*>(m.data_ptr());
  }
  a.found_inf = scalar_arg(op, "found_inf", opt.found_inf, 0.0);
  a.grad_scale = scalar_arg(op, "grad_scale", opt.grad_scale, 1.0);
  a.lr = scalar_arg(op, "lr", opt.lr, lr);
  return a;
}

// The tensors of one op as launcher rows. The kernels step a row in place
// when layout.h allows it; other tensors are stepped through contiguous
// copies written back afterwards (extra copy kernels, only for such layouts).
class Rows {
 public:
  void add(const at::Tensor& p, const at::Tensor& g, std::initializer_list<at::Tensor> states) {
    OpTensor t{};
    t.dtype = dtype_of(p.scalar_type());
    t.numel = p.numel() * (p.is_complex() ? 2 : 1);
    if (t.numel > 0) {
      const c10::TensorImpl& pi = *p.unsafeGetTensorImpl();
      bool direct = walkable(pi) && same_layout(*g.unsafeGetTensorImpl(), pi);
      for (const auto& s : states) direct = direct && (!s.defined() || same_layout(*s.unsafeGetTensorImpl(), pi));
      t.rows[row::kParam] = direct ? p.data_ptr() : copy(p, true);
      t.rows[row::kGrad] = direct ? g.data_ptr() : copy(g, false);
      int r = row::kGrad + 1;
      for (const auto& s : states) t.rows[r++] = s.defined() ? (direct ? s.data_ptr() : copy(s, true)) : nullptr;
    }
    tensors_.push_back(t);
  }

  std::vector<OpTensor>& tensors() { return tensors_; }

  void write_back() {
    for (auto& [original, copy] : copies_) original.copy_(copy);
  }

 private:
  void* copy(const at::Tensor& t, bool write_back) {
    at::Tensor c = t.contiguous();
    if (write_back) copies_.emplace_back(t, c);
    keep_.push_back(c);
    return c.data_ptr();
  }

  std::vector<OpTensor> tensors_;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies_;
  std::vector<at::Tensor> keep_;
};

// Runs launch(rows, first) over consecutive waves of params (layout.h's
// wave_ends), each wave's rows built by add(rows, i) just before it: a param
// that shares memory with an earlier one is stepped after it, in a later
// launch on the same stream, and sees its update.
template <typename Add, typename Launch>
void in_waves(at::TensorList params, const Add& add, const Launch& launch) {
  std::vector<Span> spans;
  spans.reserve(params.size());
  for (const auto& p : params) spans.push_back(span_of(*p.unsafeGetTensorImpl(), p.data_ptr()));
  size_t first = 0;
  for (const size_t end : wave_ends(spans)) {
    Rows rows;
    for (size_t i = first; i < end; ++i) add(rows, i);
    launch(rows, first);
    rows.write_back();
    first = end;
  }
}

void* stream_of(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()).stream(); }

}  // namespace

SGDArgs launch_args(const char* op, double lr, const math::SGDHyper& hyper, const OptionalTensors& opt,
                    std::vector<at::Tensor>& keep) {
  check_hyper(host_lr(opt.lr, lr), hyper);
  return {step_args(op, lr, opt, keep), hyper};
}

AdamArgs launch_args(const char* op, double lr, const math::AdamHyper& hyper, const OptionalTensors& opt,
                     std::vector<at::Tensor>& keep) {
  check_hyper(host_lr(opt.lr, lr), hyper);
  return {step_args(op, lr, opt, keep), /*tensor_scalars=*/nullptr, hyper};
}

GroupEntry<math::SGDHyper> group_entry(const char* op, double lr, const OptTensor& lr_tensor,
                                       const math::SGDHyper& hyper) {
  check_hyper(host_lr(lr_tensor, lr), hyper);
  return {hyper, scalar_arg(op, "lr", lr_tensor, lr)};
}

GroupEntry<math::AdamHyper> group_entry(const char* op, double lr, const OptTensor& lr_tensor,
                                        const math::AdamHyper& hyper) {
  check_hyper(host_lr(lr_tensor, lr), hyper);
  return {hyper, scalar_arg(op, "lr", lr_tensor, lr)};
}

namespace {

// A copy of host memory in a new device buffer, sent on the current stream
// without waiting: from pinned memory, which the host allocator keeps until
// the copy has run. Kernels queued earlier keep reading the old buffer, which
// the caching allocator reuses only for work queued after them.
at::Tensor to_device(const void* data, size_t bytes, const at::Device& device) {
  const at::Tensor host =
      at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), data, bytes);
  at::Tensor out = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
  out.copy_(host, /*non_blocking=*/true);
  return out;
}

}  // namespace

template <typename Hyper>
GroupTable<Hyper> DeviceGroupTable<Hyper>::upload(const std::vector<int32_t>& tensor_group,
                                                  const std::vector<GroupEntry<Hyper>>& groups,
                                                  const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);
  void* stream = stream_of(device);
  const bool new_stream = stream != stream_ || !groups_on_device_.defined();
  if (new_stream || tensor_group != tensor_group_) {
    tensor_group_on_device_ = to_device(tensor_group.data(), tensor_group.size() * sizeof(int32_t), device);
    tensor_group_ = tensor_group;
  }
  if (new_stream || groups != groups_) {
    groups_on_device_ = to_device(groups.data(), groups.size() * sizeof(GroupEntry<Hyper>), device);
    groups_ = groups;
  }
  stream_ = stream;
  return {static_cast<const GroupEntry<Hyper>*>(groups_on_device_.data_ptr()),
          static_cast<const int32_t*>(tensor_group_on_device_.data_ptr())};
}

template class DeviceGroupTable<math::SGDHyper>;
template class DeviceGroupTable<math::AdamHyper>;

void launch_rows(const std::vector<OpTensor>& rows, const SGDArgs& args, const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);
  launch_sgd(rows, args, kernel_arg_budget(device.index()), stream_of(device));
}

void launch_rows(const std::vector<OpTensor>& rows, AdamArgs args, const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);
  // Filled by the step launch, read by the element launches; the caching
  // allocator reuses it only for work queued after them on this stream.
  const at::Tensor scratch = at::empty({static_cast<int64_t>(adam_scratch_bytes(rows.size()))},
                                       at::TensorOptions().device(device).dtype(at::kByte));
  args.tensor_scalars = static_cast<AdamTensorScalars*>(scratch.data_ptr());
  launch_adam(rows, args, kernel_arg_budget(device.index()), stream_of(device));
}

namespace {

// The mask entries of the params a wave steps (tensor ids restart in each wave).
OptTensor wave_mask(const OptTensor& mask, size_t first, size_t count) {
  if (!mask.has_value() || (first == 0 && count == static_cast<size_t>(mask->numel()))) return mask;
  return mask->narrow(0, static_cast<int64_t>(first), static_cast<int64_t>(count));
}

// The body of a CUDA op: the hyper-parameter checks before anything moves,
// then the params wave by wave (add(rows, i) adds param i's row), each wave
// launched with its part of the mask. With `groups` (a *_groups_ op), each
// tensor reads its group's row of the table on the device (its values are
// not read here: that would synchronise), and `hyper` is the layout.
template <typename Tensors, typename Hyper, typename Add>
void step(const char* op, const Tensors& t, const OptionalTensors& opt, double lr, const Hyper& hyper,
          const GroupRows* groups, const Add& add) {
  std::vector<at::Tensor> keep;
  launch_args(op, lr, hyper, opt, keep);
  if (t.params.empty()) return;
  const at::Device device = t.params[0].device();
  c10::cuda::CUDAGuard guard(device);
  const double* table = nullptr;
  const int32_t* tensor_group = nullptr;
  if (groups != nullptr) {
    table = keep.emplace_back(groups->table.contiguous()).data_ptr<double>();
    tensor_group = keep.emplace_back(groups->tensor_group.contiguous()).data_ptr<int32_t>();
  }
  in_waves(t.params, add, [&](Rows& rows, size_t first) {
    const OptTensor wave = wave_mask(opt.mask, first, rows.tensors().size());
    auto args = launch_args(op, lr, hyper, {wave, opt.lr, opt.grad_scale, opt.found_inf}, keep);
    if (groups != nullptr) {
      // tensor ids restart in each wave
      args.table = {nullptr, tensor_group + first, table, static_cast<int32_t>(groups->table.size(0))};
    }
    launch_rows(rows.tensors(), args, device);
  });
}

void sgd_step(const SGDTensors& t, const OptionalTensors& opt, double lr, const math::SGDHyper& hyper,
              const GroupRows* groups) {
  step(groups != nullptr ? kSGDGroupsOp : kSGDOp, t, opt, lr, hyper, groups,
       [&](Rows& rows, size_t i) { rows.add(t.params[i], t.grads[i], {t.momentum_buffer(i)}); });
}

// The launchers advance every unfrozen tensor's step (empty tensors' too, as
// torch.optim) in a launch of their own, on the device, before the Adam
// launches read it.
void adam_step(const AdamTensors& t, const OptionalTensors& opt, double lr, const math::AdamHyper& hyper,
               const GroupRows* groups) {
  step(groups != nullptr ? kAdamGroupsOp : kAdamOp, t, opt, lr, hyper, groups, [&](Rows& rows, size_t i) {
    rows.add(t.params[i], t.grads[i], {t.exp_avgs[i], t.exp_avg_sqs[i], at::Tensor(), t.max_exp_avg_sq(i)});
    rows.tensors().back().rows[row::kStep] = t.state_steps[i].data_ptr<float>();
  });
}

void sgd(const SGDTensors& t, const OptionalTensors& opt, double lr, const math::SGDHyper& hyper) {
  sgd_step(t, opt, lr, hyper, nullptr);
}

void adam(const AdamTensors& t, const OptionalTensors& opt, double lr, const math::AdamHyper& hyper) {
  adam_step(t, opt, lr, hyper, nullptr);
}

void sgd_groups(const SGDTensors& t, const OptionalTensors& opt, const GroupRows& g, const math::SGDHyper& layout) {
  sgd_step(t, opt, 0.0, layout, &g);
}

void adam_groups(const AdamTensors& t, const OptionalTensors& opt, const GroupRows& g, const math::AdamHyper& layout) {
  adam_step(t, opt, 0.0, layout, &g);
}

}  // namespace
}  // namespace cuda
}  // namespace frozenopt

TORCH_LIBRARY_IMPL(frozenopt, CUDA, m) {
  m.impl("sgd_", &frozenopt::sgd_op<frozenopt::cuda::sgd>);
  m.impl("adam_", &frozenopt::adam_op<frozenopt::cuda::adam>);
  m.impl("sgd_groups_", &frozenopt::sgd_groups_op<frozenopt::cuda::sgd_groups>);
  m.impl("adam_groups_", &frozenopt::adam_groups_op<frozenopt::cuda::adam_groups>);
}
