// nvcc's instantiation of the Adam kernels (and the step-counter kernel) of
// kernels.cuh, for both kernel-argument budgets.
#include "launch.h"
#include "stream_launcher.cuh"

namespace frozenopt {
namespace cuda {

int launch_adam(const std::vector<OpTensor>& tensors, const AdamArgs& args, size_t budget, void* stream) {
  StreamLauncher launcher{static_cast<cudaStream_t>(stream)};
  return with_budget(budget, [&](auto b) { return run_adam<decltype(b)::value>(tensors, args, launcher); });
}

}  // namespace cuda
}  // namespace frozenopt
