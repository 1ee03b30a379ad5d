// nvcc's instantiation of the SGD kernels of kernels.cuh, for both
// kernel-argument budgets (one translation unit per op, so they compile side by side).
#include "launch.h"
#include "stream_launcher.cuh"

namespace frozenopt {
namespace cuda {

int launch_sgd(const std::vector<OpTensor>& tensors, const SGDArgs& args, size_t budget, void* stream) {
  StreamLauncher launcher{static_cast<cudaStream_t>(stream)};
  return with_budget(budget, [&](auto b) { return run_sgd<decltype(b)::value>(tensors, args, launcher); });
}

}  // namespace cuda
}  // namespace frozenopt
