// The multi-tensor launch planner: plain host C++, no CUDA dependency, so the
// CPU test suite exercises exactly the code the CUDA ops run.
//
// A launch covers up to kMaxBlocks chunks of up to kMaxTensors tensors. Its
// metadata travels by value as a kernel argument: each slot holds the
// addresses of one tensor's lists (param, grad, states...), its element count
// and its tensor id (its index in the op's lists, which is what the mask and
// the step counters are indexed by: slot position is NOT list position,
// because empty tensors take no slot and a launch starts mid-list). Each block
// gets (slot, chunk); a block of a frozen tensor reads mask[tensor_id] and
// returns before loading anything.
//
// The limits come from the kernel-argument budget: 4 KB classically, 32 KB
// (32,764 bytes) with CUDA >= 12.1 on sm_70 and newer. Launches per step are
// bounded below by tensors / kMaxTensors and chunks / kMaxBlocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace frozenopt {
namespace mt {

constexpr int64_t kChunkSize = 65536;  // elements per block
constexpr int kBlockThreads = 512;
constexpr int kILP = 4;  // elements per thread per iteration
constexpr int kMaxDepth = 6;

// Kernel-argument budgets, in bytes.
constexpr size_t kSmallArgBytes = 4096;
constexpr size_t kLargeArgBytes = 32764;
// What the non-metadata kernel arguments may take (checked by static_assert
// where the kernels are declared).
constexpr size_t kReservedArgBytes = 256;

// Block -> chunk index within its tensor. int32 is enough for tensors of up to
// 2^31 chunks = 2^47 elements; larger ones are refused by the planner.
using ChunkIndex = int32_t;
using SlotIndex = uint16_t;

constexpr size_t slot_bytes(int depth) { return sizeof(void*) * depth + sizeof(int64_t) + sizeof(int32_t); }
constexpr size_t block_bytes() { return sizeof(ChunkIndex) + sizeof(SlotIndex); }

// Limits for a metadata struct of `depth` address rows that must fit `budget`
// bytes (less the reserved argument bytes). Blocks get about 40% of the room:
// enough that big tensors need few launches, while leaving room for many
// small tensors per launch.
struct Limits {
  int max_tensors;
  int max_blocks;
};

constexpr Limits limits_for(int depth, size_t budget) {
  const size_t room = budget - kReservedArgBytes - 16;  // 16: the two counters and padding
  size_t blocks = (room * 2 / 5) / block_bytes();
  blocks = blocks - blocks % 32;
  size_t tensors = (room - blocks * block_bytes()) / slot_bytes(depth);
  if (tensors > 65535) tensors = 65535;
  return {static_cast<int>(tensors), static_cast<int>(blocks)};
}

// The by-value kernel argument. Trivially copyable; no constructor, so it can
// sit in __grid_constant__/param space as is.
template <int Depth, int MaxTensors, int MaxBlocks>
struct Meta {
  static constexpr int kDepth = Depth;
  static constexpr int kMaxTensors = MaxTensors;
  static constexpr int kMaxBlocks = MaxBlocks;
  void* addresses[Depth][MaxTensors];
  int64_t numel[MaxTensors];
  int32_t tensor_id[MaxTensors];
  ChunkIndex block_chunk[MaxBlocks];
  SlotIndex block_slot[MaxBlocks];
  int32_t num_slots;
  int32_t num_blocks;
};

template <int Depth, size_t Budget>
using MetaFor = Meta<Depth, limits_for(Depth, Budget).max_tensors, limits_for(Depth, Budget).max_blocks>;

// One tensor of the op's lists, as the launcher sees it.
struct TensorRef {
  void* addresses[kMaxDepth];
  int64_t numel;
  int32_t tensor_id;  // index in the op's lists (mask, steps)
};

inline int64_t num_chunks(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

inline void check_ref(const TensorRef& t) {
  if (t.numel < 0) throw std::invalid_argument("frozenopt: negative numel");
  if (num_chunks(t.numel) > int64_t(INT32_MAX)) {
    throw std::length_error("frozenopt: a tensor of " + std::to_string(t.numel) +
                            " elements has more chunks than the launcher indexes (2^31)");
  }
}

// Fills Meta structs for `tensors` (in order) and calls launch(meta) for each
// full one and for the last, partial one. Empty tensors take no slot and no
// block, wherever they are (in particular at the end of the list, where a
// launcher that only flushes inside the loop would drop the pending launch).
// A tensor whose chunks do not fit one launch continues in the next, its slot
// carried over as slot 0. `max_tensors`/`max_blocks` may be lowered below the
// struct's capacity (tests use that to force many launches on small lists).
template <typename M, typename Launch>
void for_each_launch(const std::vector<TensorRef>& tensors, Launch&& launch, int max_tensors = M::kMaxTensors,
                     int max_blocks = M::kMaxBlocks) {
  if (max_tensors < 1 || max_tensors > M::kMaxTensors || max_blocks < 1 || max_blocks > M::kMaxBlocks) {
    throw std::invalid_argument("frozenopt: launch limits out of range");
  }
  M meta;
  meta.num_slots = 0;
  meta.num_blocks = 0;
  for (const TensorRef& t : tensors) {
    check_ref(t);
    if (t.numel == 0) continue;
    int slot = meta.num_slots++;
    for (int d = 0; d < M::kDepth; ++d) meta.addresses[d][slot] = t.addresses[d];
    meta.numel[slot] = t.numel;
    meta.tensor_id[slot] = t.tensor_id;
    const int64_t chunks = num_chunks(t.numel);
    for (int64_t c = 0; c < chunks; ++c) {
      const int b = meta.num_blocks++;
      meta.block_slot[b] = static_cast<SlotIndex>(slot);
      meta.block_chunk[b] = static_cast<ChunkIndex>(c);
      const bool last_chunk = c == chunks - 1;
      const bool blocks_full = meta.num_blocks == max_blocks;
      const bool slots_full = meta.num_slots == max_tensors;
      if (!blocks_full && !(slots_full && last_chunk)) continue;
      launch(static_cast<const M&>(meta));
      meta.num_blocks = 0;
      if (last_chunk) {
        meta.num_slots = 0;
      } else {
        // The tensor goes on in the next launch: carry its slot over.
        for (int d = 0; d < M::kDepth; ++d) meta.addresses[d][0] = meta.addresses[d][slot];
        meta.numel[0] = meta.numel[slot];
        meta.tensor_id[0] = meta.tensor_id[slot];
        meta.num_slots = 1;
        slot = 0;
      }
    }
  }
  if (meta.num_blocks > 0) launch(static_cast<const M&>(meta));
}

// The per-tensor step counters: a tiny launch of its own (several blocks of a
// tensor read the step, so no block of the main kernel may write it). One slot
// per tensor, empty tensors included (torch.optim advances their step too).
template <int MaxSteps>
struct StepMeta {
  static constexpr int kMaxSteps = MaxSteps;
  float* step[MaxSteps];
  int32_t tensor_id[MaxSteps];
  int32_t count;
};

constexpr int step_limit(size_t budget) {
  return static_cast<int>((budget - kReservedArgBytes - 16) / (sizeof(float*) + sizeof(int32_t)));
}

template <size_t Budget>
using StepMetaFor = StepMeta<step_limit(Budget)>;

template <typename M, typename Launch>
void for_each_step_launch(const std::vector<float*>& steps, const std::vector<int32_t>& ids, Launch&& launch,
                          int max_steps = M::kMaxSteps) {
  if (max_steps < 1 || max_steps > M::kMaxSteps || steps.size() != ids.size()) {
    throw std::invalid_argument("frozenopt: bad step launch arguments");
  }
  M meta;
  meta.count = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    meta.step[meta.count] = steps[i];
    meta.tensor_id[meta.count] = ids[i];
    if (++meta.count == max_steps) {
      launch(static_cast<const M&>(meta));
      meta.count = 0;
    }
  }
  if (meta.count > 0) launch(static_cast<const M&>(meta));
}

}  // namespace mt
}  // namespace frozenopt
