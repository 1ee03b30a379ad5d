// The SGD/Adam multi-tensor kernels and their launchers, written once.
//
// nvcc compiles this file in launch_sgd.cu / launch_adam.cu with a launcher
// that issues real launches on the current stream; the CPU test suite compiles
// the very same file under tests/cuda_shim/host_shim.h, which defines
// __global__, threadIdx/blockIdx/blockDim, __shared__ and __syncthreads and
// runs the blocks of a launch one by one (their threads as fibers, or as real
// threads under ThreadSanitizer). Keep the device code within what that shim
// provides: no warp intrinsics, no atomics, and every thread of a block
// reaches each __syncthreads.
//
// A block: thread 0 reads what decides the block (frozen? overflow?) and the
// scalars of the update with independent loads (one memory round trip, no
// chain of dependent reads), builds the update coefficients into shared
// memory, and the block returns before any element load when the tensor is
// frozen or the step is skipped for overflow. Adam's per-tensor scalars (the
// bias corrections, two pow() in double) are worked out once per tensor by
// the step launch that precedes the element launches, not by every block.
// Otherwise each thread updates kILP elements per iteration: loads them all,
// computes, stores them all; as aligned vector loads (at most 16 bytes each)
// when every pointer of the chunk allows, element by element otherwise, and a
// chunk's ragged tail (fewer than kILP elements) element by element. Element
// offsets are 64-bit (chunk * 65536 can pass 2^31).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <map>
#include <type_traits>
#include <vector>

#include "../multi_tensor/kernel_args.h"
#include "../multi_tensor/launch_plan.h"
#include "../update_math.h"

#define FROZENOPT_DEVICE __device__ __forceinline__

namespace frozenopt {
namespace cuda {

FROZENOPT_DEVICE double read_scalar(const ScalarArg& s) {
  if (s.ptr == nullptr) return s.value;
  return s.is_double ? *static_cast<const double*>(s.ptr) : double(*static_cast<const float*>(s.ptr));
}

// Frozen, or the step skipped for overflow. Both reads are issued together
// (no short-circuit): mask and found_inf are always readable.
FROZENOPT_DEVICE bool skip_tensor(const StepArgs& a, int32_t tensor_id) {
  const bool frozen = a.mask != nullptr && a.mask[tensor_id] != 0;
  const bool overflow = read_scalar(a.found_inf) != 0.0;
  return frozen | overflow;
}

// The hyper-parameters and lr tensor `tensor_id` steps with (kernel_args.h's
// GroupTable): the op's own, or its group's entry of a step plan's table or
// row of an op's table (two dependent loads, the group id then the entry).
// A row's group must be checked first (row_group_missing).
template <typename Hyper>
FROZENOPT_DEVICE GroupEntry<Hyper> tensor_hyper(const Hyper& hyper, const ScalarArg& lr, const GroupTable<Hyper>& table,
                                                int32_t tensor_id) {
  if (table.groups != nullptr) return table.groups[table.tensor_group[tensor_id]];
  if (table.rows == nullptr) return {hyper, lr};
  const double* row = table.rows + static_cast<int64_t>(table.tensor_group[tensor_id]) * math::kRowWidth<Hyper>;
  return {math::hyper_of_row(row, hyper), ScalarArg{nullptr, 0, row[0]}};
}

// A tensor of an op's row table whose group has no row: it is skipped.
template <typename Hyper>
FROZENOPT_DEVICE bool row_group_missing(const GroupTable<Hyper>& table, int32_t tensor_id) {
  if (table.rows == nullptr) return false;
  const int32_t g = table.tensor_group[tensor_id];
  return g < 0 || g >= table.row_count;
}

// ---------------------------------------------------------------- element access

// kILP consecutive elements as one aligned access: 16 bytes at most (float32
// x4, float64 x4 as two 16-byte halves, half types x4 in 8 bytes), so float64
// needs 16-byte alignment, not 32.
template <typename S>
struct alignas(sizeof(S) * mt::kILP < 16 ? sizeof(S) * mt::kILP : 16) Pack {
  S v[mt::kILP];
};

template <typename S>
FROZENOPT_DEVICE bool aligned_for_pack(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Pack<S>) == 0;
}

// The two ways a thread reaches its kILP elements: kVector, the kILP
// consecutive elements from i as one pack; else elements i, i + blockDim,
// i + 2 * blockDim... below n. Elements past n load as 0 and are not stored.
template <bool kVector, typename S>
FROZENOPT_DEVICE void load(S (&dst)[mt::kILP], const S* __restrict__ src, int i, int n) {
  if constexpr (kVector) {
    const Pack<S> pack = *reinterpret_cast<const Pack<S>*>(src + i);
#pragma unroll
    for (int k = 0; k < mt::kILP; ++k) dst[k] = pack.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < mt::kILP; ++k) {
      const int j = i + k * static_cast<int>(blockDim.x);
      dst[k] = j < n ? src[j] : S(0);
    }
  }
}

template <bool kVector, typename S>
FROZENOPT_DEVICE void store(S* __restrict__ dst, const S (&src)[mt::kILP], int i, int n) {
  if constexpr (kVector) {
    Pack<S> pack;
#pragma unroll
    for (int k = 0; k < mt::kILP; ++k) pack.v[k] = src[k];
    *reinterpret_cast<Pack<S>*>(dst + i) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < mt::kILP; ++k) {
      const int j = i + k * static_cast<int>(blockDim.x);
      if (j < n) dst[j] = src[k];
    }
  }
}

// Calls update(std::bool_constant<kVector>, i, n) over a chunk of n elements:
// packs over its aligned body when `aligned`, then its ragged tail (fewer than
// kILP elements, one per thread) element-wise; element-wise throughout
// otherwise. Both ways run the same math per element, so they give the same
// bits.
template <typename Update>
FROZENOPT_DEVICE void for_each_group(int n, bool aligned, Update&& update) {
  const int tid = static_cast<int>(threadIdx.x);
  const int stride = static_cast<int>(blockDim.x) * mt::kILP;
  if (aligned) {
    const int body = n - n % mt::kILP;
    for (int i = tid * mt::kILP; i < body; i += stride) update(std::true_type{}, i, body);
    if (body + tid < n) update(std::false_type{}, body + tid, n);  // blockDim >= kILP: one element each
    return;
  }
  for (int base = 0; base < n; base += stride) update(std::false_type{}, base + tid, n);
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

// This thread's kILP elements of a chunk from element i (see load/store) in
// every row of a step (param, grad, states): loads row r where loaded[r] (a
// row not loaded reads as 0), calls update(v) element by element with v[r]
// the value of row r in the math type M, stores row r where stored[r].
template <bool kVector, typename M, int N, typename S, typename Update>
FROZENOPT_DEVICE void step_group(S* const (&rows)[N], const bool (&loaded)[N], const bool (&stored)[N], int i, int n,
                                 const Update& update) {
  S values[N][mt::kILP] = {};
#pragma unroll
  for (int r = 0; r < N; ++r) {
    if (loaded[r]) load<kVector>(values[r], rows[r], i, n);
  }
#pragma unroll
  for (int k = 0; k < mt::kILP; ++k) {
    M v[N];
#pragma unroll
    for (int r = 0; r < N; ++r) v[r] = M(values[r][k]);
    update(v);
#pragma unroll
    for (int r = 0; r < N; ++r) values[r][k] = S(v[r]);
  }
#pragma unroll
  for (int r = 0; r < N; ++r) {
    if (stored[r]) store<kVector>(rows[r], values[r], i, n);
  }
}

// The block's work on its chunk: rows[r] from the metadata's address row
// row_ids[r], packs when every row used is aligned for them.
template <typename M, int N, typename S, typename MetaT, typename Update>
FROZENOPT_DEVICE void step_chunk(const MetaT& meta, const BlockSpan& span, const int (&row_ids)[N],
                                 const bool (&loaded)[N], const bool (&stored)[N], const Update& update) {
  S* rows[N];
  bool aligned = true;
#pragma unroll
  for (int r = 0; r < N; ++r) {
    const bool used = loaded[r] || stored[r];
    rows[r] = used ? row_ptr<S>(meta, row_ids[r], span) : nullptr;
    aligned = aligned && (!used || aligned_for_pack<S>(rows[r]));
  }
  for_each_group(span.n, aligned, [&](auto vector, int i, int n) {
    step_group<decltype(vector)::value, M>(rows, loaded, stored, i, n, update);
  });
}

// Thread 0 reads what decides the block, decide() returning {skip, coef};
// the block shares it through shared memory. Returns whether the block steps
// (false: frozen or overflow, and nothing of its tensor is loaded).
template <typename Coef, typename Decide>
FROZENOPT_DEVICE bool block_coef(Coef& out, const Decide& decide) {
  __shared__ Coef coef;
  __shared__ int skip;
  if (threadIdx.x == 0) {
    const auto decided = decide();
    skip = decided.skip;
    coef = decided.coef;
  }
  __syncthreads();
  out = coef;
  return !skip;
}

template <typename Coef>
struct Decided {
  int skip;
  Coef coef;
};

// ---------------------------------------------------------------- SGD

template <typename S, bool kMomentum, typename MetaT>
__global__ void __launch_bounds__(mt::kBlockThreads) sgd_kernel(MetaT meta, SGDArgs args) {
  using M = math::MathType<S>;
  const BlockSpan span = block_span(meta);
  math::SGDCoef<M> c;
  // Mask, found_inf, lr and grad_scale are independent loads of memory that
  // is always readable: one round trip (after the group's entry, when the
  // hyper-parameters come from a table), then the block's decision.
  const bool steps = block_coef(c, [&] {
    const int32_t id = meta.tensor_id[span.slot];
    if (row_group_missing(args.table, id)) return Decided<math::SGDCoef<M>>{1, {}};
    const auto h = tensor_hyper(args.hyper, args.common.lr, args.table, id);
    return Decided<math::SGDCoef<M>>{
        skip_tensor(args.common, id),
        math::sgd_coef<M>(h.hyper, read_scalar(h.lr), read_scalar(args.common.grad_scale))};
  });
  if (!steps) return;
  const int rows[] = {row::kParam, row::kGrad, row::kMomentum};
  const bool loaded[] = {true, true, kMomentum && !c.first_step};
  const bool stored[] = {true, false, kMomentum};
  step_chunk<M, 3, S>(meta, span, rows, loaded, stored, [&](M(&v)[3]) { math::sgd_update(v[0], v[1], &v[2], c); });
}

// ---------------------------------------------------------------- Adam / AdamW

// Reads what step_kernel (an earlier launch on the same stream) wrote for
// this tensor: skip, and the step's scalars; every block of a tensor reads
// the same.
template <typename S, bool kAmsgrad, typename MetaT>
__global__ void __launch_bounds__(mt::kBlockThreads) adam_kernel(MetaT meta, AdamArgs args) {
  using M = math::MathType<S>;
  const BlockSpan span = block_span(meta);
  math::AdamCoef<M> c;
  // The tensor's scalars, lr and grad_scale: independent loads, one round trip.
  const bool steps = block_coef(c, [&] {
    const int32_t id = meta.tensor_id[span.slot];
    const AdamTensorScalars s = args.tensor_scalars[id];
    const auto h = tensor_hyper(args.hyper, args.common.lr, args.table, id);
    const double lr = read_scalar(h.lr), grad_scale = read_scalar(args.common.grad_scale);
    return Decided<math::AdamCoef<M>>{s.skip, math::adam_coef<M>(h.hyper, lr, grad_scale, s.step)};
  });
  if (!steps) return;
  const int rows[] = {row::kParam, row::kGrad, row::kExpAvg, row::kExpAvgSq, row::kMaxExpAvgSq};
  const bool loaded[] = {true, true, true, true, kAmsgrad};
  const bool stored[] = {true, false, true, true, kAmsgrad};
  step_chunk<M, 5, S>(meta, span, rows, loaded, stored,
                      [&](M(&v)[5]) { math::adam_update(v[0], v[1], v[2], v[3], &v[4], c); });
}

// One thread per tensor of the op, a launch of its own before the Adam
// launches: decides whether the tensor is skipped (frozen, or found_inf) and,
// if not, advances its step counter and works out the step's scalars in
// double (two pow()), for every block of the tensor to read.
constexpr int kStepThreads = 256;

template <typename StepMetaT>
__global__ void __launch_bounds__(kStepThreads) step_kernel(StepMetaT meta, AdamArgs args) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= meta.count) return;
  const int32_t id = meta.tensor_id[i];
  AdamTensorScalars& out = args.tensor_scalars[id];
  out.skip = skip_tensor(args.common, id) || row_group_missing(args.table, id);
  if (out.skip) return;  // a frozen tensor's step counter is not touched
  const float step = *meta.step[i] + 1.0f;
  *meta.step[i] = step;
  const auto h = tensor_hyper(args.hyper, args.common.lr, args.table, id);
  out.step = math::adam_step_scalars(read_scalar(h.lr), h.hyper, double(step));
}

// ---------------------------------------------------------------- launchers

// Launcher: an object with
//   template <class Kernel, class... Args> void operator()(Kernel k, int grid, int block, const Args&...);
// stream_launcher.cuh issues `k<<<grid, block, 0, stream>>>(args...)`; the shim runs it on the CPU.
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
int launch_sgd_typed(const std::vector<mt::TensorRef>& refs, const SGDArgs& args, Launcher& launch,
                     const LimitOverride& lim = {}) {
  using Meta3 = mt::MetaFor<3, Budget>;
  using Meta2 = mt::MetaFor<2, Budget>;
  static_assert(sizeof(Meta3) + mt::kReservedArgBytes <= Budget, "kernel arguments over budget");
  if (args.hyper.momentum != 0.0) {
    return launch_elementwise<Meta3>(refs, &sgd_kernel<S, true, Meta3>, args, launch, lim);
  }
  return launch_elementwise<Meta2>(refs, &sgd_kernel<S, false, Meta2>, args, launch, lim);
}

template <typename S, size_t Budget, typename Launcher>
int launch_adam_typed(const std::vector<mt::TensorRef>& refs, const AdamArgs& args, Launcher& launch,
                      const LimitOverride& lim = {}) {
  using Meta6 = mt::MetaFor<6, Budget>;
  using Meta5 = mt::MetaFor<5, Budget>;
  static_assert(sizeof(Meta6) + mt::kReservedArgBytes <= Budget, "kernel arguments over budget");
  if (args.hyper.amsgrad) return launch_elementwise<Meta6>(refs, &adam_kernel<S, true, Meta6>, args, launch, lim);
  return launch_elementwise<Meta5>(refs, &adam_kernel<S, false, Meta5>, args, launch, lim);
}

template <size_t Budget, typename Launcher>
int launch_steps_typed(const std::vector<float*>& steps, const std::vector<int32_t>& ids, const AdamArgs& args,
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

// run(std::integral_constant<size_t, Budget>) with the kernels of `budget`;
// 4 KB where the 32 KB kernels are not built.
template <typename Run>
int with_budget(size_t budget, Run&& run) {
#if !defined(FROZENOPT_SMALL_KERNEL_ARGS)
  if (budget == mt::kLargeArgBytes) return run(std::integral_constant<size_t, mt::kLargeArgBytes>{});
#endif
  return run(std::integral_constant<size_t, mt::kSmallArgBytes>{});
}

// A whole SGD op: one launch group per dtype. Returns the launch count.
template <size_t Budget, typename Launcher>
int run_sgd(const std::vector<OpTensor>& tensors, const SGDArgs& args, Launcher& launch,
            const LimitOverride& lim = {}) {
  int launches = 0;
  for (const auto& [dtype, refs] : group_by_dtype(tensors, args.hyper.momentum != 0.0 ? 3 : 2)) {
    dispatch_dtype(dtype, [&](auto tag) {
      using S = decltype(tag);
      launches += launch_sgd_typed<S, Budget>(refs, args, launch, lim);
    });
  }
  return launches;
}

// A whole Adam op: first the step launch over every tensor of the list
// (empty ones included, as torch.optim advances their step too; frozen ones
// skipped), which fills args.tensor_scalars (one entry per tensor, device
// memory the caller provides), then one launch group per dtype, which read
// them (stream order).
template <size_t Budget, typename Launcher>
int run_adam(const std::vector<OpTensor>& tensors, const AdamArgs& args, Launcher& launch,
             const LimitOverride& lim = {}) {
  std::vector<float*> steps(tensors.size());
  std::vector<int32_t> ids(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    steps[i] = static_cast<float*>(tensors[i].rows[row::kStep]);
    ids[i] = static_cast<int32_t>(i);
  }
  int launches = launch_steps_typed<Budget>(steps, ids, args, launch, lim);
  for (const auto& [dtype, refs] : group_by_dtype(tensors, args.hyper.amsgrad ? 6 : 5)) {
    dispatch_dtype(dtype, [&](auto tag) {
      using S = decltype(tag);
      launches += launch_adam_typed<S, Budget>(refs, args, launch, lim);
    });
  }
  return launches;
}

}  // namespace cuda
}  // namespace frozenopt
