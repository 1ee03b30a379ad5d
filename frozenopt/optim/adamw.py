"""AdamW: Adam with decoupled weight decay, and a per-parameter freeze mask."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from frozenopt.optim.adam import Adam
from frozenopt.optim.base import COMPAT_DOC, MASK_ONLY_DOC, PARAMS_DOC

__all__ = ["AdamW"]


class AdamW(Adam):
    # The docstring is set below the class: it shares the common arguments' text with the others.
    def __init__(self, params: Any, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 mask_only: bool | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, mask_only=mask_only)


AdamW.__doc__ = f"""``torch.optim.AdamW`` (decoupled weight decay) that freezes and unfreezes params by name.

    Same arguments, defaults (``weight_decay=1e-2``), update rule and ``state_dict``
    layout as ``torch.optim.AdamW``; a frozen param is stepped as if its grad were None.

    Args:
        {PARAMS_DOC}
        lr: learning rate, a float or a one-element tensor.
        betas: coefficients of the running averages of the grad and of its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: decoupled weight decay: each step multiplies the weights by ``1 - lr * weight_decay``.
        amsgrad: use the maximum of the past squared-grad averages.
        maximize: maximize the objective instead of minimizing it.
        capturable: accepted for compatibility with torch.optim: the step counters always
            live on the params' device, so a step can be captured in a CUDA graph.
        {COMPAT_DOC}
        {MASK_ONLY_DOC}
    """
