// Vectorised CPU kernels. setup.py compiles this file three times, with
// FROZENOPT_CAP set to DEFAULT, AVX2 or AVX512 and the matching
// CPU_CAPABILITY_* define and -m flags, so at::vec really vectorises.
//
// A step is one parallel region over the concatenation of all unfrozen
// tensors, cut into chunks that may start and end inside a tensor (see
// for_each_piece), so thousands of small tensors cost one region and large
// tensors are split evenly.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <numeric>

#include "launch.h"

#ifndef FROZENOPT_CAP
#error "compile kernels.cpp with -DFROZENOPT_CAP=<DEFAULT|AVX2|AVX512>"
#endif

namespace frozenopt {
namespace math {

template <typename S>
struct Arith<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V sqrt(const V& x) { return x.sqrt(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
};

}  // namespace math

namespace cpu {
namespace FROZENOPT_CAP {
namespace {

using at::vec::Vectorized;

// Loads and stores of N math-type vectors from a stored-type pointer. For
// float/double N = 1; for the half types one stored vector widens to two.
template <typename S>
struct Lanes {
  using M = S;
  static constexpr int kVecs = 1;
  static constexpr int64_t kWidth = Vectorized<S>::size();
  static void load(const S* p, Vectorized<M>* out) { out[0] = Vectorized<S>::loadu(p); }
  static void store(S* p, const Vectorized<M>* in) { in[0].store(p); }
};

template <typename H>
struct HalfLanes {
  using M = float;
  static constexpr int kVecs = 2;
  static constexpr int64_t kWidth = Vectorized<H>::size();
  static void load(const H* p, Vectorized<float>* out) {
    auto wide = at::vec::convert_to_float<H>(Vectorized<H>::loadu(p));
    out[0] = std::get<0>(wide);
    out[1] = std::get<1>(wide);
  }
  static void store(H* p, const Vectorized<float>* in) { at::vec::convert_from_float<H>(in[0], in[1]).store(p); }
};
template <>
struct Lanes<c10::Half> : HalfLanes<c10::Half> {};
template <>
struct Lanes<c10::BFloat16> : HalfLanes<c10::BFloat16> {};

// The coefficients are taken by value: through a reference, every store to
// the float rows could alias them and force the loop to reload them.
template <typename S>
void sgd_range(const Slot& s, int64_t lo, int64_t hi, const math::SGDCoef<math::MathType<S>> c) {
  using M = math::MathType<S>;
  using L = Lanes<S>;
  auto* p = static_cast<S*>(s.param);
  const auto* g = static_cast<const S*>(s.grad);
  auto* buf = static_cast<S*>(s.state0);
  int64_t i = lo;
  for (; i + L::kWidth <= hi; i += L::kWidth) {
    Vectorized<M> vp[L::kVecs], vg[L::kVecs], vb[L::kVecs];
    L::load(p + i, vp);
    L::load(g + i, vg);
    if (c.has_momentum && !c.first_step) L::load(buf + i, vb);
    for (int k = 0; k < L::kVecs; ++k) math::sgd_update(vp[k], vg[k], &vb[k], c);
    L::store(p + i, vp);
    if (c.has_momentum) L::store(buf + i, vb);
  }
  for (; i < hi; ++i) {
    M vp = M(p[i]), vb = c.has_momentum && !c.first_step ? M(buf[i]) : M(0);
    math::sgd_update(vp, M(g[i]), &vb, c);
    p[i] = S(vp);
    if (c.has_momentum) buf[i] = S(vb);
  }
}

template <typename S>
void adam_range(const Slot& s, int64_t lo, int64_t hi, const math::AdamCoef<math::MathType<S>> c) {
  using M = math::MathType<S>;
  using L = Lanes<S>;
  auto* p = static_cast<S*>(s.param);
  const auto* g = static_cast<const S*>(s.grad);
  auto* m = static_cast<S*>(s.state0);
  auto* v = static_cast<S*>(s.state1);
  auto* vmax = static_cast<S*>(s.state2);
  int64_t i = lo;
  for (; i + L::kWidth <= hi; i += L::kWidth) {
    Vectorized<M> vp[L::kVecs], vg[L::kVecs], vm[L::kVecs], vv[L::kVecs], vx[L::kVecs];
    L::load(p + i, vp);
    L::load(g + i, vg);
    L::load(m + i, vm);
    L::load(v + i, vv);
    if (c.amsgrad) L::load(vmax + i, vx);
    for (int k = 0; k < L::kVecs; ++k) math::adam_update(vp[k], vg[k], vm[k], vv[k], &vx[k], c);
    L::store(p + i, vp);
    L::store(m + i, vm);
    L::store(v + i, vv);
    if (c.amsgrad) L::store(vmax + i, vx);
  }
  for (; i < hi; ++i) {
    M vp = M(p[i]), vm = M(m[i]), vv = M(v[i]), vx = c.amsgrad ? M(vmax[i]) : M(0);
    math::adam_update(vp, M(g[i]), vm, vv, &vx, c);
    p[i] = S(vp);
    m[i] = S(vm);
    v[i] = S(vv);
    if (c.amsgrad) vmax[i] = S(vx);
  }
}

// Calls body(slot_index, lo, hi) for every piece of the concatenated element
// range of slots [first, last), so thousands of small tensors cost one
// parallel region and large ones are split.
//
// The range is cut into a few chunks per thread, and the threads take chunks
// from a shared counter. On an idle machine that is the even split; when a
// thread gets descheduled (other work on the machine), the others take its
// chunks instead of waiting for it at the end of the region. A cut inside a
// tensor falls on a multiple of kAlign elements from that tensor's start, so
// which elements take the vector body and which the scalar tail depends only
// on the tensor itself, never on the thread count or the other tensors: the
// result is bitwise the same whatever they are. Small steps stay on the
// calling thread: a parallel region costs more than a few thousand elements.
template <typename Body>
void for_each_piece(const std::vector<Slot>& slots, size_t first, size_t last, const Body& body) {
  constexpr int64_t kMinElementsPerThread = 1 << 15;
  constexpr int64_t kChunksPerThread = 8;
  constexpr int64_t kAlign = 64;  // a multiple of every vector width, in elements
  std::vector<int64_t> ends(last - first);
  int64_t total = 0;
  for (size_t i = first; i < last; ++i) ends[i - first] = (total += slots[i].numel);
  if (total == 0) return;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / kMinElementsPerThread));
  const int64_t chunks = threads == 1 ? 1 : std::min(threads * kChunksPerThread, total / kAlign);
  // Where chunk c starts: an even share of the total, moved back to the
  // nearest multiple of kAlign within the tensor it falls in.
  auto boundary = [&](int64_t c) -> int64_t {
    if (c >= chunks) return total;
    const int64_t pos = total / chunks * c + std::min(c, total % chunks);
    const size_t t = std::upper_bound(ends.begin(), ends.end(), pos) - ends.begin();
    const int64_t start = ends[t] - slots[first + t].numel;
    return start + (pos - start) / kAlign * kAlign;
  };
  auto run_chunk = [&](int64_t c) {
    const int64_t lo = boundary(c), hi = boundary(c + 1);
    size_t t = std::upper_bound(ends.begin(), ends.end(), lo) - ends.begin();
    for (int64_t pos = lo; pos < hi && t < ends.size(); ++t) {
      const int64_t start = ends[t] - slots[first + t].numel;
      const int64_t stop = std::min(ends[t], hi);
      body(first + t, pos - start, stop - start);
      pos = stop;
    }
  };
  if (chunks == 1) {
    run_chunk(0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      run_chunk(c);
    }
  });
}

// Runs the launch's waves one after another (a param that shares memory with
// an earlier one sees its update), each as one for_each_piece.
template <typename Launch, typename Body>
void for_each_wave(const Launch& launch, const Body& body) {
  size_t first = 0;
  for (const size_t end : launch.wave_ends) {
    for_each_piece(launch.slots, first, end, body);
    first = end;
  }
  if (first < launch.slots.size()) for_each_piece(launch.slots, first, launch.slots.size(), body);
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "frozenopt: unsupported dtype ", dtype);
  }
}

// Calls body(S{}, slot, lo, hi) for every piece of the launch (for_each_wave),
// S the slot's stored type.
template <typename Launch, typename Body>
void for_each_typed_piece(const Launch& launch, const Body& body) {
  for_each_wave(launch, [&](size_t t, int64_t lo, int64_t hi) {
    dispatch_dtype(launch.slots[t].dtype, [&](auto tag) { body(tag, t, lo, hi); });
  });
}

}  // namespace

void run_sgd(const SGDLaunch& launch) {
  for_each_typed_piece(launch, [&](auto tag, size_t t, int64_t lo, int64_t hi) {
    using S = decltype(tag);
    const auto& group = launch.groups[launch.slots[t].group];
    sgd_range<S>(launch.slots[t], lo, hi, math::sgd_coef<math::MathType<S>>(group.hyper, group.lr, launch.grad_scale));
  });
}

void run_adam(const AdamLaunch& launch) {
  for_each_typed_piece(launch, [&](auto tag, size_t t, int64_t lo, int64_t hi) {
    using S = decltype(tag);
    const auto& group = launch.groups[launch.slots[t].group];
    const auto c = math::adam_coef<math::MathType<S>>(group.hyper, group.lr, launch.grad_scale, launch.steps[t]);
    adam_range<S>(launch.slots[t], lo, hi, c);
  });
}

}  // namespace FROZENOPT_CAP
}  // namespace cpu
}  // namespace frozenopt
