"""SGD with a per-parameter freeze mask."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from frozenopt import ops
from frozenopt.optim.base import COMPAT_DOC, MASK_ONLY_DOC, PARAMS_DOC, FreezableOptimizer, check_number, on_device_of

__all__ = ["SGD"]


class SGD(FreezableOptimizer):
    # The docstring is set below the class: it shares the common arguments' text with the others.
    _op = "sgd"

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 mask_only: bool | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults, mask_only=mask_only)

    def _check_hyper(self, group):
        check_number(group["lr"], "lr", "Invalid learning rate")
        momentum = check_number(group["momentum"], "momentum", "Invalid momentum value")
        dampening = check_number(group["dampening"], "dampening", "Invalid dampening value", at_least_zero=False)
        check_number(group["weight_decay"], "weight_decay", "Invalid weight_decay value")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _check_capturable(self, group):
        # A buffer made before a capture starts at zero and the first real step blends into it,
        # which equals torch's first step (the buffer takes the grad) only without dampening.
        if group["momentum"] == 0 or group["dampening"] == 0:
            return
        missing = [p for p in group["params"] if not self._has_state(p, group)]
        if missing:
            raise ValueError(
                "prepare_capture: SGD with momentum and dampening cannot pre-create momentum "
                f"buffers exactly ({len(missing)} param(s) have none, e.g. "
                f"{self._name_of(missing[0])}); run an eager step with them unfrozen first")

    def _plan_key(self, group):
        return group["momentum"] != 0

    def _first_step_skip_needs_host(self, group, found_inf):
        # The buffers made for a first step stay zero when GradScaler skips it. Without
        # dampening the next step's blend, momentum * 0 + 1 * grad, is exactly torch's
        # first-step rule, so on a GPU the buffers stay and nothing waits for found_inf;
        # on the CPU (reading found_inf costs nothing) they go, as in torch.optim.
        if found_inf is None or group["momentum"] == 0:
            return False
        return found_inf.device.type == "cpu" or group["dampening"] != 0

    def _keeps_state(self, group):
        return group["momentum"] != 0

    def _has_state(self, p, group):
        return group["momentum"] == 0 or self.state.get(p, {}).get("momentum_buffer") is not None

    def _new_state(self, p, group):
        if group["momentum"] == 0:
            return {}
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def _lists_of(self, states, group):
        if group["momentum"] == 0:
            return [[]]
        return [[s["momentum_buffer"] for s in states]]

    _hyper_names = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")

    def _hyper(self, group):
        return (float(group["momentum"]), float(group["dampening"]), float(group["weight_decay"]),
                bool(group["nesterov"]), bool(group["maximize"]))

    def _run_lists(self, group, params, grads, states, mask, first, grad_scale, found_inf):
        # A new momentum buffer takes the first grad as it is (torch.optim's rule): the
        # tensors with a fresh buffer go to the op apart from the others.
        lr, grad_scale, found_inf = on_device_of(group, group["lr"], grad_scale, found_inf)
        (buffers,) = states
        for is_first in (True, False):
            subset = [i for i, f in enumerate(first) if f == is_first]
            if not subset:
                continue
            if len(subset) == len(params):
                lists = (params, grads, buffers, mask)
            else:
                lists = ([params[i] for i in subset], [grads[i] for i in subset],
                         [buffers[i] for i in subset] if buffers else [], None if mask is None else mask[subset])
            ops.sgd_(*lists, lr=lr,
                     is_first_step=is_first and group["momentum"] != 0, grad_scale=grad_scale,
                     found_inf=found_inf, **self._kwargs(group))


SGD.__doc__ = f"""``torch.optim.SGD`` that freezes and unfreezes params by name.

    Same arguments, defaults, update rule and ``state_dict`` layout as
    ``torch.optim.SGD``; a frozen param is stepped as if its grad were None.

    Args:
        {PARAMS_DOC}
        lr: learning rate, a float or a one-element tensor.
        momentum: momentum factor (0 keeps no state).
        dampening: dampening for momentum.
        weight_decay: L2 penalty added to the grad.
        nesterov: Nesterov momentum (needs a momentum and zero dampening).
        maximize: maximize the objective instead of minimizing it.
        {COMPAT_DOC}
        {MASK_ONLY_DOC}
    """
