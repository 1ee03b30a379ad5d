// What launch_sgd.cu and launch_adam.cu share: the launcher that issues
// kernels.cuh's kernels on a stream and checks each launch (no
// synchronisation).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels.cuh"

#if !defined(FROZENOPT_SMALL_KERNEL_ARGS) && CUDART_VERSION < 12010
#error "32 KB kernel arguments need CUDA >= 12.1: define FROZENOPT_SMALL_KERNEL_ARGS (setup.py does)"
#endif

namespace frozenopt {
namespace cuda {

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

}  // namespace cuda
}  // namespace frozenopt
