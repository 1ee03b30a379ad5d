"""AdamW: Adam with decoupled weight decay, and a per-parameter freeze mask."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from frozenopt.optim.adam import Adam

__all__ = ["AdamW"]


class AdamW(Adam):
    """``torch.optim.AdamW`` (decoupled weight decay) that freezes and unfreezes params by name.

    Same arguments, defaults (``weight_decay=1e-2``), update rule and ``state_dict``
    layout as ``torch.optim.AdamW``; a frozen param is stepped as if its grad were None.

    Args:
        params: an ``nn.Module`` (its named parameters: freezing by name then works),
            ``named_parameters()``, an iterable of params (freezing by object only) or
            of param group dicts. Params with ``requires_grad=False`` start frozen.
        lr: learning rate, a float or a one-element tensor.
        betas: coefficients of the running averages of the grad and of its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: decoupled weight decay: each step multiplies the weights by ``1 - lr * weight_decay``.
        amsgrad: use the maximum of the past squared-grad averages.
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted for compatibility with torch.optim; the fused kernels always run.
        capturable: accepted for compatibility with torch.optim: the step counters always
            live on the params' device, so a step can be captured in a CUDA graph.
        differentiable: must be False: the kernels update params in place, outside autograd.
        fused: accepted for compatibility with torch.optim; the fused kernels always run.
        mask_only: how ``freeze``/``unfreeze`` act. False: they also turn ``requires_grad``
            off/on (and drop the grads of frozen params), so autograd skips their weight
            grads, and the frozen set follows ``requires_grad``. True: only the optimizer's
            mask changes, as DDP (buckets fixed at wrap time), ``torch.compile`` and CUDA
            graphs need. None (the default): True for a ``DistributedDataParallel`` module,
            said once per process, else False.
    """

    def __init__(self, params: Any, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 mask_only: bool | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, mask_only=mask_only)
