// Entry points of kernels.cu, callable from plain C++ (ops_cuda.cpp): no CUDA
// types here; the stream is a cudaStream_t passed as void*.
#pragma once

#include <vector>

#include "kernel_args.h"

namespace frozenopt {
namespace cuda {

// A whole op on `stream` (see run_sgd/run_adam in kernels.cuh); each returns
// the number of kernel launches it issued.
int launch_sgd(const std::vector<OpTensor>& tensors, const SGDArgs& args, bool has_momentum, void* stream);
int launch_adam(const std::vector<OpTensor>& tensors, const AdamArgs& args, void* stream);

}  // namespace cuda
}  // namespace frozenopt
