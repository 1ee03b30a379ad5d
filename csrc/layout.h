// When a param, its grad and its state can be stepped in place as flat arrays.
//
// The kernels walk each tensor of a slot from its first element for numel
// elements in memory order. That is right for any layout whose elements fill
// one block of memory without gaps or overlap (contiguous, channels_last, a
// transposed weight), provided every tensor of the slot lays its elements out
// the same way: then the k-th element in memory is the same logical element
// in each. Anything else is stepped through contiguous copies.
#pragma once

#include <c10/core/TensorImpl.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <vector>

namespace frozenopt {

// The param's elements fill [data, data + numel) with no gaps and no overlap.
inline bool walkable(const c10::TensorImpl& param) { return param.is_non_overlapping_and_dense(); }

// t lays its elements out as param does (strides of size-1 dims do not matter).
inline bool same_layout(const c10::TensorImpl& t, const c10::TensorImpl& param) {
  if (t.sizes() != param.sizes()) return false;
  if (t.is_contiguous() && param.is_contiguous()) return true;
  const auto sizes = param.sizes();
  const auto a = t.strides(), b = param.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] > 1 && a[d] != b[d]) return false;
  }
  return true;
}

// The bytes a tensor's elements may touch, for finding params that share memory.
struct Span {
  uintptr_t begin = 0, end = 0;
};

inline Span span_of(const c10::TensorImpl& t, const void* data) {
  int64_t last = 0;  // offset of the last element
  for (size_t d = 0; d < t.sizes().size(); ++d) last += (t.sizes()[d] - 1) * t.strides()[d];
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const auto itemsize = static_cast<int64_t>(t.dtype().itemsize());
  return {begin, t.numel() == 0 ? begin : begin + static_cast<uintptr_t>((last + 1) * itemsize)};
}

// Splits params [0, n) into consecutive waves in which no two params' spans
// overlap, returning the end of each wave. A wave runs as one parallel
// region; a param that shares memory with an earlier one (two Parameters
// viewing one storage in different layouts) starts a new wave, so it sees the
// earlier one's update, as it would in torch.optim's loop over params.
inline std::vector<size_t> wave_ends(const std::vector<Span>& spans) {
  std::vector<Span> sorted;
  for (const Span& s : spans) {
    if (s.begin != s.end) sorted.push_back(s);
  }
  std::sort(sorted.begin(), sorted.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  bool any_overlap = false;
  for (size_t i = 1; i < sorted.size() && !any_overlap; ++i) any_overlap = sorted[i].begin < sorted[i - 1].end;
  if (!any_overlap) return {spans.size()};  // the usual case: one wave
  std::vector<size_t> ends;
  std::map<uintptr_t, uintptr_t> wave;  // begin -> end of the current wave's spans
  for (size_t i = 0; i < spans.size(); ++i) {
    const Span s = spans[i];
    if (s.begin == s.end) continue;
    auto next = wave.lower_bound(s.begin);
    const bool overlaps =
        (next != wave.end() && next->first < s.end) || (next != wave.begin() && std::prev(next)->second > s.begin);
    if (overlaps) {
      ends.push_back(i);
      wave.clear();
    }
    wave.emplace(s.begin, s.end);
  }
  ends.push_back(spans.size());
  return ends;
}

}  // namespace frozenopt
