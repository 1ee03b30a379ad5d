"""Adam with a per-parameter freeze mask (AdamW is this with decoupled weight decay)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from frozenopt import ops
from frozenopt.optim.base import COMPAT_DOC, MASK_ONLY_DOC, PARAMS_DOC, FreezableOptimizer, check_number, on_device_of
from frozenopt.optim.partial import ROWS_KEY

__all__ = ["Adam"]


def check_betas(betas: Any) -> None:
    """torch.optim's rules: a pair (or a 2-element tensor) of numbers in [0, 1), both floats
    or both tensors. A tensor off the CPU is not read (that would synchronise)."""
    if isinstance(betas, Tensor) and betas.numel() == 2:
        betas = tuple(betas.flatten())
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        value = check_number(beta, f"betas[{i}]", f"Invalid beta parameter at index {i}")
        if value is not None and not value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


class Adam(FreezableOptimizer):
    # The docstring is set below the class: it shares the common arguments' text with the others.
    _op = "adam"

    def __init__(self, params: Any, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 amsgrad: bool = False, *, foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool = False, mask_only: bool | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, mask_only=mask_only)

    def _check_hyper(self, group):
        check_number(group["lr"], "lr", "Invalid learning rate")
        check_number(group["eps"], "eps", "Invalid epsilon value")
        check_betas(group["betas"])
        check_number(group["weight_decay"], "weight_decay", "Invalid weight_decay value")

    def _check_state_entry(self, key, entry):
        keys = ("exp_avg", "exp_avg_sq", "step")
        present, missing = [k for k in keys if k in entry], [k for k in keys if k not in entry]
        if present and missing:
            raise ValueError(f"state_dict state[{key}] has {present[0]} but no {missing[0]}")
        step = entry.get("step", 0)
        if ROWS_KEY in entry:  # row state: one count per row, checked with its shape
            return
        if not (isinstance(step, (int, float)) or isinstance(step, Tensor) and step.numel() == 1):
            raise ValueError(f"state_dict state[{key}]['step'] must be a number or a one-element tensor, "
                             f"got {step!r}")

    def _plan_key(self, group):
        return bool(group["amsgrad"])

    def _has_state(self, p, group):
        state = self.state.get(p)
        return bool(state) and "exp_avg" in state

    def _new_state(self, p, group):
        # Steps live with the param, float32, as torch.optim's fused Adam keeps them.
        state = {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _state_of(self, p, group):
        """This param's state, with a loaded checkpoint's step made a float32 tensor on the param's device."""
        state = self.state[p]
        step = state["step"]
        if not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.device == p.device):
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _lists_of(self, states, group):
        return [[s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                [s["step"] for s in states]]

    _hyper_names = ("beta1", "beta2", "weight_decay", "eps", "amsgrad", "maximize", "decoupled_weight_decay")

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return (float(beta1), float(beta2), float(group["weight_decay"]), float(group["eps"]),
                bool(group["amsgrad"]), bool(group["maximize"]), bool(group["decoupled_weight_decay"]))

    def _run_lists(self, group, params, grads, states, mask, first, grad_scale, found_inf):
        lr, grad_scale, found_inf = on_device_of(group, group["lr"], grad_scale, found_inf)
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = states
        ops.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, mask,
                  lr=lr, grad_scale=grad_scale, found_inf=found_inf, **self._kwargs(group))


Adam.__doc__ = f"""``torch.optim.Adam`` that freezes and unfreezes params by name.

    Same arguments, defaults, update rule (that of torch's fused Adam) and
    ``state_dict`` layout as ``torch.optim.Adam``; a frozen param is stepped as if
    its grad were None: its value, moments and step count stay as they are.

    Args:
        {PARAMS_DOC}
        lr: learning rate, a float or a one-element tensor.
        betas: coefficients of the running averages of the grad and of its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: L2 penalty added to the grad (decoupled with
            ``decoupled_weight_decay=True``, as in AdamW).
        amsgrad: use the maximum of the past squared-grad averages.
        maximize: maximize the objective instead of minimizing it.
        capturable: accepted for compatibility with torch.optim: the step counters always
            live on the params' device, so a step can be captured in a CUDA graph.
        decoupled_weight_decay: decay the weights directly (AdamW) instead of adding the
            penalty to the grad.
        {COMPAT_DOC}
        {MASK_ONLY_DOC}
    """
