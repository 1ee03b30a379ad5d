// What the CUDA op bodies and the eager step plan share: the launch arguments
// built from an op's scalars (read where they lie: a CUDA lr, grad_scale or
// found_inf is read by the kernels, never synchronised to the host), and one
// launch of ready rows on the device's current stream. Plain C++ (ATen and
// the launchers' structs), built only in CUDA builds.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "../checks.h"
#include "../multi_tensor/kernel_args.h"

namespace frozenopt {
namespace cuda {

// The kernels' element type of a param (complex: its real type, two per element).
DType dtype_of(at::ScalarType t);

// Checks the hyper-parameters (a CUDA lr is not read) and builds the
// arguments; `keep` holds what the arguments point into until the launch.
SGDArgs launch_args(const char* op, double lr, const math::SGDHyper& hyper, const OptionalTensors& opt,
                    std::vector<at::Tensor>& keep);
AdamArgs launch_args(const char* op, double lr, const math::AdamHyper& hyper, const OptionalTensors& opt,
                     std::vector<at::Tensor>& keep);

// A step plan's param group, checked, as the kernels read it: a CUDA lr
// tensor by its address (it must stay alive until the launch has run).
GroupEntry<math::SGDHyper> group_entry(const char* op, double lr, const OptTensor& lr_tensor,
                                       const math::SGDHyper& hyper);
GroupEntry<math::AdamHyper> group_entry(const char* op, double lr, const OptTensor& lr_tensor,
                                        const math::AdamHyper& hyper);

// A step plan's group table in device memory: the group of each row (by
// tensor id) and each group's entry. upload() sends them on `device`'s
// current stream, asynchronously, only when they differ from what it sent
// last or the stream changed (LR schedulers change an entry; a param group
// whose values stay costs nothing per step).
template <typename Hyper>
class DeviceGroupTable {
 public:
  GroupTable<Hyper> upload(const std::vector<int32_t>& tensor_group, const std::vector<GroupEntry<Hyper>>& groups,
                           const at::Device& device);

 private:
  std::vector<int32_t> tensor_group_;
  std::vector<GroupEntry<Hyper>> groups_;
  at::Tensor tensor_group_on_device_, groups_on_device_;
  void* stream_ = nullptr;
};

// One step over `rows` (tensor id = index) on `device`'s current stream, with
// the kernel-argument budget the driver and device allow. Adam's rows carry
// their step counters (row::kStep), which the launch advances on the device.
void launch_rows(const std::vector<OpTensor>& rows, const SGDArgs& args, const at::Device& device);
void launch_rows(const std::vector<OpTensor>& rows, AdamArgs args, const at::Device& device);

}  // namespace cuda
}  // namespace frozenopt
