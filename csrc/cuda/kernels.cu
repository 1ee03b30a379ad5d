// nvcc's instantiation of kernels.cuh: a launcher that issues the kernels on
// the given stream (the caller's current stream) and checks the launch, with
// no synchronisation.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels.cuh"
#include "launch.h"

#if !defined(FROZENOPT_SMALL_KERNEL_ARGS) && CUDART_VERSION < 12010
#error "32 KB kernel arguments need CUDA >= 12.1: define FROZENOPT_SMALL_KERNEL_ARGS (setup.py does)"
#endif

namespace frozenopt {
namespace cuda {
namespace {

struct StreamLauncher {
  cudaStream_t stream;

  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, int grid, int block, const Args&... args) {
    kernel<<<grid, block, 0, stream>>>(args...);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string("frozenopt: CUDA kernel launch failed: ") + cudaGetErrorString(err));
    }
  }
};

}  // namespace

int launch_sgd(const std::vector<OpTensor>& tensors, const SGDArgs& args, bool has_momentum, void* stream) {
  StreamLauncher launcher{static_cast<cudaStream_t>(stream)};
  return run_sgd<kArgBudget>(tensors, args, has_momentum, launcher);
}

int launch_adam(const std::vector<OpTensor>& tensors, const AdamArgs& args, void* stream) {
  StreamLauncher launcher{static_cast<cudaStream_t>(stream)};
  return run_adam<kArgBudget>(tensors, args, launcher);
}

}  // namespace cuda
}  // namespace frozenopt
