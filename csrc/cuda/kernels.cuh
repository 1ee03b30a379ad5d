// The SGD/Adam multi-tensor kernels and their launchers, written once.
//
// nvcc compiles this file in kernels.cu with a launcher that issues real
// launches on the current stream; the CPU test suite compiles the very same
// file under tests/cuda_shim/host_shim.h, which defines __global__,
// threadIdx/blockIdx/blockDim, __shared__ and __syncthreads and runs every
// block and thread of a launch in turn. Keep the device code within what that
// shim provides: no warp intrinsics, no atomics, and every thread of a block
// reaches each __syncthreads.
//
// A block: thread 0 reads the mask entry of its tensor (by the tensor id in
// the metadata), found_inf, and the scalars it needs (lr, grad_scale, the step
// counter), builds the update coefficients into shared memory, and the block
// returns before any element load when the tensor is frozen or the step is
// skipped for overflow. Otherwise each thread updates kILP elements per
// iteration, with 16-byte-or-narrower aligned vector loads when every pointer
// of the chunk allows, and element-wise loads otherwise. Element offsets are
// 64-bit (chunk * 65536 can pass 2^31).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <map>
#include <vector>

#include "../update_math.h"
#include "kernel_args.h"
#include "launch_plan.h"

#define FROZENOPT_DEVICE __device__ __forceinline__

namespace frozenopt {
namespace cuda {

template <typename S>
struct MathOf {
  using type = S;
};
template <>
struct MathOf<c10::Half> {
  using type = float;
};
template <>
struct MathOf<c10::BFloat16> {
  using type = float;
};

FROZENOPT_DEVICE double read_scalar(const ScalarArg& s) {
  if (s.ptr == nullptr) return s.value;
  return s.is_double ? *static_cast<const double*>(s.ptr) : double(*static_cast<const float*>(s.ptr));
}

// The block-uniform decision: is this tensor frozen, or is the step skipped?
FROZENOPT_DEVICE bool skip_tensor(const StepArgs& a, int32_t tensor_id) {
  if (a.mask != nullptr && a.mask[tensor_id] != 0) return true;
  return read_scalar(a.found_inf) != 0.0;
}

// kILP consecutive elements as one aligned load/store.
template <typename S>
struct alignas(sizeof(S) * mt::kILP) Pack {
  S v[mt::kILP];
};

template <typename S>
FROZENOPT_DEVICE bool aligned_for_pack(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<S>) == 0;
}

template <typename S>
FROZENOPT_DEVICE void load_pack(S (&dst)[mt::kILP], const S* src) {
  const Pack<S> pack = *reinterpret_cast<const Pack<S>*>(src);
#pragma unroll
  for (int k = 0; k < mt::kILP; ++k) dst[k] = pack.v[k];
}

template <typename S>
FROZENOPT_DEVICE void store_pack(S* dst, const S (&src)[mt::kILP]) {
  Pack<S> pack;
#pragma unroll
  for (int k = 0; k < mt::kILP; ++k) pack.v[k] = src[k];
  *reinterpret_cast<Pack<S>*>(dst) = pack;
}

// Where this block works: its slot, its chunk and the chunk's length.
struct BlockSpan {
  int slot;
  int64_t offset;  // first element of the chunk, 64-bit
  int n;           // elements in the chunk (<= kChunkSize)
};

template <typename MetaT>
FROZENOPT_DEVICE BlockSpan block_span(const MetaT& meta) {
  BlockSpan s;
  s.slot = meta.block_slot[blockIdx.x];
  s.offset = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * mt::kChunkSize;
  const int64_t left = meta.numel[s.slot] - s.offset;
  s.n = static_cast<int>(left < mt::kChunkSize ? left : mt::kChunkSize);
  return s;
}

template <typename S, typename MetaT>
FROZENOPT_DEVICE S* row_ptr(const MetaT& meta, int row, const BlockSpan& s) {
  return static_cast<S*>(meta.addresses[row][s.slot]) + s.offset;
}

// ---------------------------------------------------------------- SGD

template <typename M>
FROZENOPT_DEVICE math::SGDCoef<M> sgd_coef(const SGDArgs& a, bool has_momentum) {
  math::SGDCoef<M> c;
  c.lr = M(read_scalar(a.common.lr));
  c.momentum = M(a.momentum);
  c.one_minus_dampening = M(1.0 - a.dampening);
  c.weight_decay = M(a.weight_decay);
  c.inv_grad_scale = M(1.0 / read_scalar(a.common.grad_scale));
  c.has_weight_decay = a.weight_decay != 0.0;
  c.has_momentum = has_momentum;
  c.nesterov = a.nesterov;
  c.maximize = a.maximize;
  c.first_step = a.first_step;
  return c;
}

template <typename S, bool kMomentum, typename MetaT>
__global__ void __launch_bounds__(mt::kBlockThreads) sgd_kernel(MetaT meta, SGDArgs args) {
  using M = typename MathOf<S>::type;
  __shared__ math::SGDCoef<M> coef;
  __shared__ int skip;
  const BlockSpan span = block_span(meta);
  if (threadIdx.x == 0) {
    skip = skip_tensor(args.common, meta.tensor_id[span.slot]);
    if (!skip) coef = sgd_coef<M>(args, kMomentum);
  }
  __syncthreads();
  if (skip) return;  // frozen or overflow: nothing of this tensor is loaded
  const math::SGDCoef<M> c = coef;
  S* p = row_ptr<S>(meta, row::kParam, span);
  const S* g = row_ptr<S>(meta, row::kGrad, span);
  S* buf = kMomentum ? row_ptr<S>(meta, row::kMomentum, span) : nullptr;
  const bool load_buf = kMomentum && !c.first_step;
  const int n = span.n;
  const int stride = static_cast<int>(blockDim.x) * mt::kILP;

  if (n % mt::kILP == 0 && aligned_for_pack<S>(p) && aligned_for_pack<S>(g) &&
      (!kMomentum || aligned_for_pack<S>(buf))) {
    for (int i = static_cast<int>(threadIdx.x) * mt::kILP; i < n; i += stride) {
      S rp[mt::kILP], rg[mt::kILP], rb[mt::kILP];
      load_pack(rp, p + i);
      load_pack(rg, g + i);
      if (load_buf) load_pack(rb, buf + i);
#pragma unroll
      for (int k = 0; k < mt::kILP; ++k) {
        M vp = M(rp[k]);
        M vb = load_buf ? M(rb[k]) : M(0);
        math::sgd_update(vp, M(rg[k]), &vb, c);
        rp[k] = S(vp);
        rb[k] = S(vb);
      }
      store_pack(p + i, rp);
      if (kMomentum) store_pack(buf + i, rb);
    }
    return;
  }
  for (int base = 0; base < n; base += stride) {
#pragma unroll
    for (int k = 0; k < mt::kILP; ++k) {
      const int i = base + static_cast<int>(threadIdx.x) + k * static_cast<int>(blockDim.x);
      if (i >= n) continue;
      M vp = M(p[i]);
      M vb = load_buf ? M(buf[i]) : M(0);
      math::sgd_update(vp, M(g[i]), &vb, c);
      p[i] = S(vp);
      if (kMomentum) buf[i] = S(vb);
    }
  }
}

// ---------------------------------------------------------------- Adam / AdamW

template <typename M>
FROZENOPT_DEVICE math::AdamCoef<M> adam_coef(const AdamArgs& a, double step) {
  math::AdamCoef<M> c;
  const double lr = read_scalar(a.common.lr);
  c.lr = M(lr);
  c.beta1 = M(a.beta1);
  c.beta2 = M(a.beta2);
  c.eps = M(a.eps);
  c.weight_decay = M(a.weight_decay);
  c.inv_grad_scale = M(1.0 / read_scalar(a.common.grad_scale));
  c.has_weight_decay = a.weight_decay != 0.0;
  c.decoupled_weight_decay = a.decoupled_weight_decay;
  c.amsgrad = a.amsgrad;
  c.maximize = a.maximize;
  math::adam_step_scalars(c, lr, a.beta1, a.beta2, step);
  return c;
}

// The step counters were advanced by step_kernel before this launch (stream
// order), so every block of a tensor reads the same, already advanced, step.
template <typename S, bool kAmsgrad, typename MetaT>
__global__ void __launch_bounds__(mt::kBlockThreads) adam_kernel(MetaT meta, AdamArgs args) {
  using M = typename MathOf<S>::type;
  __shared__ math::AdamCoef<M> coef;
  __shared__ int skip;
  const BlockSpan span = block_span(meta);
  if (threadIdx.x == 0) {
    skip = skip_tensor(args.common, meta.tensor_id[span.slot]);
    if (!skip) {
      const float step = *static_cast<const float*>(meta.addresses[row::kStep][span.slot]);
      coef = adam_coef<M>(args, double(step));
    }
  }
  __syncthreads();
  if (skip) return;  // frozen or overflow: nothing of this tensor is loaded
  const math::AdamCoef<M> c = coef;
  S* p = row_ptr<S>(meta, row::kParam, span);
  const S* g = row_ptr<S>(meta, row::kGrad, span);
  S* m = row_ptr<S>(meta, row::kExpAvg, span);
  S* v = row_ptr<S>(meta, row::kExpAvgSq, span);
  S* vmax = kAmsgrad ? row_ptr<S>(meta, row::kMaxExpAvgSq, span) : nullptr;
  const int n = span.n;
  const int stride = static_cast<int>(blockDim.x) * mt::kILP;

  if (n % mt::kILP == 0 && aligned_for_pack<S>(p) && aligned_for_pack<S>(g) && aligned_for_pack<S>(m) &&
      aligned_for_pack<S>(v) && (!kAmsgrad || aligned_for_pack<S>(vmax))) {
    for (int i = static_cast<int>(threadIdx.x) * mt::kILP; i < n; i += stride) {
      S rp[mt::kILP], rg[mt::kILP], rm[mt::kILP], rv[mt::kILP], rx[mt::kILP];
      load_pack(rp, p + i);
      load_pack(rg, g + i);
      load_pack(rm, m + i);
      load_pack(rv, v + i);
      if (kAmsgrad) load_pack(rx, vmax + i);
#pragma unroll
      for (int k = 0; k < mt::kILP; ++k) {
        M vp = M(rp[k]), vm = M(rm[k]), vv = M(rv[k]);
        M vx = kAmsgrad ? M(rx[k]) : M(0);
        math::adam_update(vp, M(rg[k]), vm, vv, &vx, c);
        rp[k] = S(vp);
        rm[k] = S(vm);
        rv[k] = S(vv);
        rx[k] = S(vx);
      }
      store_pack(p + i, rp);
      store_pack(m + i, rm);
      store_pack(v + i, rv);
      if (kAmsgrad) store_pack(vmax + i, rx);
    }
    return;
  }
  for (int base = 0; base < n; base += stride) {
#pragma unroll
    for (int k = 0; k < mt::kILP; ++k) {
      const int i = base + static_cast<int>(threadIdx.x) + k * static_cast<int>(blockDim.x);
      if (i >= n) continue;
      M vp = M(p[i]), vm = M(m[i]), vv = M(v[i]);
      M vx = kAmsgrad ? M(vmax[i]) : M(0);
      math::adam_update(vp, M(g[i]), vm, vv, &vx, c);
      p[i] = S(vp);
      m[i] = S(vm);
      v[i] = S(vv);
      if (kAmsgrad) vmax[i] = S(vx);
    }
  }
}

// Advances the step counter of every unfrozen tensor by one, unless found_inf.
// A launch of its own, before the Adam launches of the same op.
constexpr int kStepThreads = 256;

template <typename StepMetaT>
__global__ void __launch_bounds__(kStepThreads) step_kernel(StepMetaT meta, StepArgs args) {
  if (read_scalar(args.found_inf) != 0.0) return;
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= meta.count) return;
  if (args.mask != nullptr && args.mask[meta.tensor_id[i]] != 0) return;
  *meta.step[i] += 1.0f;
}

// ---------------------------------------------------------------- launchers

// Launcher: an object with
//   template <class Kernel, class... Args> void operator()(Kernel k, int grid, int block, const Args&...);
// kernels.cu issues `k<<<grid, block, 0, stream>>>(args...)`; the shim runs it on the CPU.
// Each function returns the number of launches it issued.

template <typename MetaT, typename Kernel, typename Args, typename Launcher>
int launch_elementwise(const std::vector<mt::TensorRef>& refs, Kernel kernel, const Args& args, Launcher& launch,
                       const LimitOverride& lim) {
  static_assert(sizeof(Args) <= mt::kReservedArgBytes, "step arguments over their reserve");
  int launches = 0;
  mt::for_each_launch<MetaT>(
      refs,
      [&](const MetaT& meta) {
        launch(kernel, meta.num_blocks, mt::kBlockThreads, meta, args);
        ++launches;
      },
      lim.max_tensors ? lim.max_tensors : MetaT::kMaxTensors, lim.max_blocks ? lim.max_blocks : MetaT::kMaxBlocks);
  return launches;
}

template <typename S, size_t Budget, typename Launcher>
int launch_sgd_typed(const std::vector<mt::TensorRef>& refs, const SGDArgs& args, bool has_momentum,
                     Launcher& launch, const LimitOverride& lim = {}) {
  using Meta3 = mt::MetaFor<3, Budget>;
  using Meta2 = mt::MetaFor<2, Budget>;
  static_assert(sizeof(Meta3) + mt::kReservedArgBytes <= Budget, "kernel arguments over budget");
  if (has_momentum) return launch_elementwise<Meta3>(refs, &sgd_kernel<S, true, Meta3>, args, launch, lim);
  return launch_elementwise<Meta2>(refs, &sgd_kernel<S, false, Meta2>, args, launch, lim);
}

template <typename S, size_t Budget, typename Launcher>
int launch_adam_typed(const std::vector<mt::TensorRef>& refs, const AdamArgs& args, Launcher& launch,
                      const LimitOverride& lim = {}) {
  using Meta6 = mt::MetaFor<6, Budget>;
  using Meta5 = mt::MetaFor<5, Budget>;
  static_assert(sizeof(Meta6) + mt::kReservedArgBytes <= Budget, "kernel arguments over budget");
  if (args.amsgrad) return launch_elementwise<Meta6>(refs, &adam_kernel<S, true, Meta6>, args, launch, lim);
  return launch_elementwise<Meta5>(refs, &adam_kernel<S, false, Meta5>, args, launch, lim);
}

template <size_t Budget, typename Launcher>
int launch_steps_typed(const std::vector<float*>& steps, const std::vector<int32_t>& ids, const StepArgs& args,
                       Launcher& launch, const LimitOverride& lim = {}) {
  using MetaT = mt::StepMetaFor<Budget>;
  static_assert(sizeof(MetaT) + mt::kReservedArgBytes <= Budget, "kernel arguments over budget");
  int launches = 0;
  mt::for_each_step_launch<MetaT>(
      steps, ids,
      [&](const MetaT& meta) {
        launch(&step_kernel<MetaT>, (meta.count + kStepThreads - 1) / kStepThreads, kStepThreads, meta, args);
        ++launches;
      },
      lim.max_steps ? lim.max_steps : MetaT::kMaxSteps);
  return launches;
}

// Dtype dispatch of the element kernels.
template <typename Fn>
void dispatch_dtype(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kFloat: fn(float{}); break;
    case DType::kDouble: fn(double{}); break;
    case DType::kHalf: fn(c10::Half{}); break;
    case DType::kBFloat16: fn(c10::BFloat16{}); break;
  }
}

// The element tensors of an op grouped by dtype, in list order within each
// group, each ref carrying its list index as tensor id. Empty tensors are left
// out here (the planner would skip them too).
inline std::map<DType, std::vector<mt::TensorRef>> group_by_dtype(const std::vector<OpTensor>& tensors, int depth) {
  std::map<DType, std::vector<mt::TensorRef>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const OpTensor& t = tensors[i];
    if (t.numel == 0) continue;
    mt::TensorRef ref{};
    ref.numel = t.numel;
    ref.tensor_id = static_cast<int32_t>(i);
    for (int d = 0; d < depth; ++d) ref.addresses[d] = t.rows[d];
    groups[t.dtype].push_back(ref);
  }
  return groups;
}

// A whole SGD op: one launch group per dtype. Returns the launch count.
template <size_t Budget, typename Launcher>
int run_sgd(const std::vector<OpTensor>& tensors, const SGDArgs& args, bool has_momentum, Launcher& launch,
            const LimitOverride& lim = {}) {
  int launches = 0;
  for (const auto& [dtype, refs] : group_by_dtype(tensors, has_momentum ? 3 : 2)) {
    dispatch_dtype(dtype, [&](auto tag) {
      launches += launch_sgd_typed<decltype(tag), Budget>(refs, args, has_momentum, launch, lim);
    });
  }
  return launches;
}

// A whole Adam op: first the step launch over every tensor of the list
// (empty ones included, as torch.optim advances their step too; frozen ones
// skipped by the kernel), then one launch group per dtype, which read the
// advanced steps (stream order).
template <size_t Budget, typename Launcher>
int run_adam(const std::vector<OpTensor>& tensors, const AdamArgs& args, Launcher& launch,
             const LimitOverride& lim = {}) {
  std::vector<float*> steps(tensors.size());
  std::vector<int32_t> ids(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    steps[i] = static_cast<float*>(tensors[i].rows[row::kStep]);
    ids[i] = static_cast<int32_t>(i);
  }
  int launches = launch_steps_typed<Budget>(steps, ids, args.common, launch, lim);
  for (const auto& [dtype, refs] : group_by_dtype(tensors, args.amsgrad ? 6 : 5)) {
    dispatch_dtype(dtype, [&](auto tag) { launches += launch_adam_typed<decltype(tag), Budget>(refs, args, launch, lim); });
  }
  return launches;
}

}  // namespace cuda
}  // namespace frozenopt
