// The step plan: the eager fast path of a step of one or more param groups.
//
// It holds the groups' params and, for those whose state exists, the state
// tensors, in order, and the group of each param. A step takes one entry of
// hyper-parameters per group and steps every group in one launch, each
// tensor with its group's entry (on a GPU, from a table in device memory that
// is sent again only when an entry changes). The groups of one plan share the
// layout of their state (SGD: momentum on or off; Adam: amsgrad or not).
// Python rebuilds a plan when the frozen set, the state or the groups change
// (its watch notices edits made by user code).
//
// On the CPU, and on a GPU in CUDA builds, a step does not go through the
// dispatcher: the plan keeps, per param, the raw pointers the kernels need (a
// cpu::Slot; on a GPU also the launchers' rows) together with what they were
// taken from (the grad's TensorImpl, the storages, sizes and layouts). Each
// step compares those with param.grad() and the tensors, and re-validates only
// the params whose grad or storage changed, with the op's own checks; when
// nothing changed (grads kept between steps) the cached launch runs as it is,
// so per-step host work is a short C++ loop over the unfrozen params.
// The op path (dispatcher) remains for layouts the kernels cannot walk,
// tensor subclasses, active dispatch modes and, on a GPU, params that share
// memory; it gives the op's error messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/launch.h"
#include "layout.h"
#ifdef FROZENOPT_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace frozenopt {

// One param group's hyper-parameters as a plan's step takes them: the lr as
// a number, or a one-element tensor read where it lies (lr_tensor).
template <typename Hyper>
struct PlanGroup {
  double lr;
  OptTensor lr_tensor;
  Hyper hyper;
};

using SGDGroup = PlanGroup<math::SGDHyper>;
using AdamGroup = PlanGroup<math::AdamHyper>;

class StepPlan {
 public:
  // kind: "sgd" or "adam". states: the op's state lists in its order (sgd:
  // momentum_buffers; adam: exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
  // state_steps), each parallel to params, or empty where the op takes none
  // (no momentum, no amsgrad). groups: each param's group, 0, 1, ... in
  // the order of the entries a step takes (empty: every param in group 0).
  StepPlan(const std::string& kind, std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states,
           std::vector<int32_t> groups);

  int64_t size() const { return static_cast<int64_t>(params_.size()); }

  // The op's checks, without stepping: lets a step over several plans fail
  // before any of them has moved.
  void check_grads();

  // One step of the params that have a grad, like torch.optim's grad-is-None
  // skip; `groups`: one entry per group, by group index (a group whose
  // params all wait for state has an entry too). Every group's
  // hyper-parameters are checked before anything moves.
  void sgd(const std::vector<SGDGroup>& groups, const OptTensor& grad_scale, const OptTensor& found_inf);
  void adam(const std::vector<AdamGroup>& groups, const OptTensor& grad_scale, const OptTensor& found_inf);

 private:
  // The params that have a grad, their grads and their state lists.
  struct Gathered {
    std::vector<at::Tensor> params, grads;
    std::vector<std::vector<at::Tensor>> states;
  };

  // What the cached slot of one param was built from, and the slot itself.
  // The param part (param and state checked, their pointers) stays valid while
  // the storages, sizes and layouts of the param and its state tensors do
  // (`t.data = ...` on any of them, a resize or a restride invalidates it);
  // the grad part is checked again whenever the grad object or its storage
  // changes.
  struct Entry {
    const void* param_data = nullptr;  // the param's storage when its part was checked
    const void* state_data[4] = {};    // each state tensor's, where the op takes that list
    int64_t numel = -1;                // -1: the param part is not checked
    bool param_direct = false;         // the kernels can step param and state in place
    bool contiguous = false;           // ... and all of them are contiguous (the fast check)
    c10::TensorImpl* grad = nullptr;   // the grad checked last; nullptr: no grad then
    const void* grad_data = nullptr;
    bool direct = false;  // param_direct, and the grad too
    Span span{};          // the param's memory, for finding params that share it
    cpu::Slot slot{};
    float* step = nullptr;  // adam's step counter
  };

  template <typename Group, typename Layout>
  void check_groups(const std::vector<Group>& groups, const Layout& layout) const;
  template <typename Group>
  void check_launch_scalars(const std::vector<Group>& groups, const OptTensor& grad_scale,
                            const OptTensor& found_inf) const;
  bool plain(const at::Tensor& t) const;
  bool use_direct() const;
  bool is_step_list(size_t k) const { return adam_ && k == 3; }
  bool param_part_unchanged(size_t i, const c10::TensorImpl& p) const;
  bool entry_unchanged(size_t i) const;
  bool grad_unchanged(const Entry& e, const c10::TensorImpl& p, const c10::TensorImpl& g) const;
  bool refresh(bool from_check_grads);
  // refresh's staged prefetches, kAhead entries apart.
  static constexpr int64_t kAhead = 4;
  void prefetch_tensors(size_t i) const;
  void prefetch_storages(size_t i) const;
  void prefetch_grad(size_t i) const;
  void prefetch_grad_storage(size_t i) const;
  void drop_grad(Entry& e);
  void validate(size_t i, const at::Tensor& grad, bool from_check_grads);
  template <typename StateList>
  void check_op_args(at::TensorList params, at::TensorList grads, const StateList& state) const;
  void fail_with_op_message(bool from_check_grads) const;
  void rebuild_slots();
  template <typename Launch, typename Run>
  void run_on_cpu(Launch& launch, const Run& run);
  template <typename Group, typename Call>
  void run_ops(const std::vector<Group>& groups, const Call& call) const;
#ifdef FROZENOPT_WITH_CUDA
  void rebuild_rows();
  template <typename Group, typename Hyper>
  void launch_on_gpu(const std::vector<Group>& groups, cuda::DeviceGroupTable<Hyper>& table,
                     const OptTensor& grad_scale, const OptTensor& found_inf);
#endif
  Gathered gather(int32_t group = -1) const;

  std::vector<at::Tensor> params_;
  std::vector<std::vector<at::Tensor>> states_;
  std::vector<int32_t> group_of_;  // parallel to params_
  size_t group_count_ = 1;         // the entries a step needs at least: the highest group index + 1
  bool adam_ = false;
  const char* op_name_ = "";
  c10::DeviceType device_;           // the params' device type
  bool direct_ = false;              // a plan of plain tensors on a device with direct launches
  std::vector<Entry> entries_;       // parallel to params_
  int64_t indirect_ = 0;             // entries with a grad that need the op path
  std::vector<int32_t> active_;      // entries with a grad
  std::vector<cpu::Slot> slots_;     // their non-empty ones, for the kernels
  std::vector<int32_t> slot_entry_;  // entry of each slot
  std::vector<size_t> wave_ends_;    // the slots' waves; empty: one wave
  bool spans_checked_ = false;       // memory_shared_ is up to date with the entries
  bool memory_shared_ = false;       // some params share memory: slots run in waves
  std::vector<uint8_t> unchanged_;   // refresh's scratch: entry i needs no new check
#ifdef FROZENOPT_WITH_CUDA
  std::vector<cuda::OpTensor> rows_;  // on a GPU: what the launchers take, from the entries
  std::vector<int32_t> row_group_;    // ... and the group of each row
  cuda::DeviceGroupTable<math::SGDHyper> sgd_table_;
  cuda::DeviceGroupTable<math::AdamHyper> adam_table_;
#endif
  cpu::SGDLaunch sgd_launch_;
  cpu::AdamLaunch adam_launch_;
};

}  // namespace frozenopt
