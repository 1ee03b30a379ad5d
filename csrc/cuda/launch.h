// Entry points of launch_sgd.cu / launch_adam.cu and the run-time choice of
// kernel-argument budget, callable from plain C++ (ops_cuda.cpp): no CUDA
// types here; the stream is a cudaStream_t passed as void*.
#pragma once

#include <cstddef>
#include <vector>

#include "../multi_tensor/kernel_args.h"

namespace frozenopt {
namespace cuda {

// The kernel-argument budget launches on `device` may use: choose_budget of
// the driver's version and the device's compute capability (both read once
// per process; ops_cuda.cpp).
size_t kernel_arg_budget(int device);

// A whole op on `stream` with metadata of `budget` bytes (see run_sgd/run_adam
// in kernels.cuh); each returns the number of kernel launches it issued.
// launch_adam needs args.tensor_scalars: tensors.size() entries of device
// memory (adam_scratch_bytes), free to reuse once the launches have run.
int launch_sgd(const std::vector<OpTensor>& tensors, const SGDArgs& args, size_t budget, void* stream);
int launch_adam(const std::vector<OpTensor>& tensors, const AdamArgs& args, size_t budget, void* stream);

inline size_t adam_scratch_bytes(size_t tensors) { return tensors * sizeof(AdamTensorScalars); }

}  // namespace cuda
}  // namespace frozenopt
