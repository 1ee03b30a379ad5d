// The op schemas, the one place they are declared (torch.ops.frozenopt.*).
// Their kernels: cpu/ops_cpu.cpp, and cuda/ops_cuda.cpp in CUDA builds.
//
// The ops take every param of a group plus one mask entry per param (frozen:
// non-zero), so a compiled graph or a captured CUDA graph stays valid when the
// mask flips.
#include <torch/library.h>

TORCH_LIBRARY(frozenopt, m) {
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor? mask, *, "
      "float lr, Tensor? lr_tensor=None, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool is_first_step, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor? mask, *, float lr, "
      "Tensor? lr_tensor=None, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  // The same steps over params of many param groups in one call: param i
  // takes the values of row tensor_group[i] of group_table (float64, one row
  // per group, update_math.h's row layout, lr first), read where the table
  // lies, so new values need no new graph. The flags decide the state layout.
  m.def(
      "sgd_groups_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor? mask, "
      "Tensor group_table, Tensor tensor_group, *, bool momentum, bool is_first_step, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "adam_groups_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor? mask, Tensor group_table, "
      "Tensor tensor_group, *, bool amsgrad, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}
