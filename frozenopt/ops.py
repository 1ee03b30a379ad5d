"""Typed wrappers around ``torch.ops.frozenopt.*`` and their fake kernels.

The ops are in-place multi-tensor steps with one mask entry per param
(non-zero = frozen: the kernel skips that tensor before reading any of it).
The fake kernels let ``torch.compile`` trace through them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor

REBUILD = ("in the frozenopt source folder run `pip install --no-build-isolation --no-deps --force-reinstall .` "
           "(add -e for an editable install; `./run.sh` rebuilds its own .venv by itself)")


def check_built_against(built: str | None, loaded: str) -> None:
    """Raise ImportError when the extension was compiled against another torch than ``loaded``.

    Checked before the module is loaded: a module compiled against another torch
    fails to load at best, and can misbehave if it does load.
    """
    if built is not None and built != loaded:
        raise ImportError(
            f"frozenopt's compiled extension was built against torch {built}, but torch {loaded} is "
            f"loaded; it only works with the torch it was compiled against. Rebuild it against this "
            f"torch: {REBUILD}.")


try:
    from frozenopt._build_info import TORCH_VERSION as _BUILT_AGAINST
except ImportError:  # never built; require_extension says so
    _BUILT_AGAINST = None
check_built_against(_BUILT_AGAINST, torch.__version__)

try:
    from frozenopt import _C
except ImportError as error:  # reported at optimizer construction, not at import
    _C = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None


def require_extension():
    """The compiled extension module, or a clear error that says how to build it."""
    if _C is None:
        raise RuntimeError(
            f"frozenopt's compiled extension (frozenopt._C) is not built or does not load "
            f"({_IMPORT_ERROR}). Build it against the torch you run with: {REBUILD}."
        )
    return _C


if _C is not None:

    @torch.library.register_fake("frozenopt::sgd_")
    def _sgd_fake(params, grads, momentum_buffers, mask, *, lr, lr_tensor=None, momentum, dampening,
                  weight_decay, nesterov, maximize, is_first_step, grad_scale=None, found_inf=None):
        return None

    @torch.library.register_fake("frozenopt::adam_")
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask, *, lr,
                   lr_tensor=None, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                   decoupled_weight_decay, grad_scale=None, found_inf=None):
        return None

    @torch.library.register_fake("frozenopt::sgd_groups_")
    def _sgd_groups_fake(params, grads, momentum_buffers, mask, group_table, tensor_group, *, momentum,
                         is_first_step, grad_scale=None, found_inf=None):
        return None

    @torch.library.register_fake("frozenopt::adam_groups_")
    def _adam_groups_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask, group_table,
                          tensor_group, *, amsgrad, grad_scale=None, found_inf=None):
        return None


def local_tensor(t: Tensor) -> Tensor:
    """A DTensor's (an FSDP2 shard's) local tensor, which the kernels step in place; any other tensor as it is."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # loaded by whoever made a DTensor
    return t._local_tensor if dtensor is not None and isinstance(t, dtensor.DTensor) else t


def _local(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    """The tensors with DTensors replaced by their local tensors (the list itself when there are none)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None or not any(isinstance(t, dtensor.DTensor) for t in tensors):
        return tensors
    return [local_tensor(t) for t in tensors]


def split_lr(lr: float | Tensor) -> tuple[float, Tensor | None]:
    """(float lr, tensor lr or None): the ops take a 0-dim tensor lr as its own argument."""
    if isinstance(lr, Tensor):
        return 0.0, lr
    return float(lr), None


def sgd_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
         mask: Tensor | None, *, lr: float | Tensor, momentum: float, dampening: float,
         weight_decay: float, nesterov: bool, maximize: bool, is_first_step: bool,
         grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """One fused SGD step over the lists; ``momentum_buffers`` is empty when momentum is 0."""
    lr_value, lr_tensor = split_lr(lr)
    torch.ops.frozenopt.sgd_(
        _local(params), _local(grads), _local(momentum_buffers), mask, lr=lr_value, lr_tensor=lr_tensor,
        momentum=momentum,
        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
        is_first_step=is_first_step, grad_scale=grad_scale, found_inf=found_inf)


def adam_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor],
          mask: Tensor | None, *, lr: float | Tensor, beta1: float, beta2: float,
          weight_decay: float, eps: float, amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
          grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """One fused Adam (AdamW when decoupled) step; ``max_exp_avg_sqs`` is empty without amsgrad."""
    lr_value, lr_tensor = split_lr(lr)
    torch.ops.frozenopt.adam_(
        _local(params), _local(grads), _local(exp_avgs), _local(exp_avg_sqs), _local(max_exp_avg_sqs),
        _local(state_steps), mask, lr=lr_value,
        lr_tensor=lr_tensor, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
        amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
        grad_scale=grad_scale, found_inf=found_inf)


def sgd_groups_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                mask: Tensor | None, group_table: Tensor, tensor_group: Tensor, *, momentum: bool,
                is_first_step: bool, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """One fused SGD step over params of many param groups: param i takes the values of row
    ``tensor_group[i]`` (int32) of ``group_table`` (float64, one row per group:
    ``(lr, momentum, dampening, weight_decay, nesterov, maximize)``, flags 0 or 1), read
    where the table lies. ``momentum`` says whether the rows have momentum (then
    ``momentum_buffers`` is parallel to params); ``is_first_step`` fills the buffers."""
    torch.ops.frozenopt.sgd_groups_(
        _local(params), _local(grads), _local(momentum_buffers), mask, group_table, tensor_group,
        momentum=momentum, is_first_step=is_first_step, grad_scale=grad_scale, found_inf=found_inf)


def adam_groups_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor],
                 mask: Tensor | None, group_table: Tensor, tensor_group: Tensor, *, amsgrad: bool,
                 grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """One fused Adam/AdamW step over params of many param groups: param i takes row
    ``tensor_group[i]`` of ``group_table`` (float64: ``(lr, beta1, beta2, weight_decay, eps,
    amsgrad, maximize, decoupled_weight_decay)``, flags 0 or 1). ``amsgrad`` must match the
    rows' (``max_exp_avg_sqs`` is empty without it)."""
    torch.ops.frozenopt.adam_groups_(
        _local(params), _local(grads), _local(exp_avgs), _local(exp_avg_sqs), _local(max_exp_avg_sqs),
        _local(state_steps), mask, group_table, tensor_group, amsgrad=amsgrad, grad_scale=grad_scale,
        found_inf=found_inf)
