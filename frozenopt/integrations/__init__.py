"""frozenopt inside training frameworks that hold the optimizer for you.

Framework-free (``import frozenopt`` never imports this package, and this module
imports no framework):

- ``find_optimizer(obj)``: the frozenopt optimizer behind a wrapper: accelerate's
  ``AcceleratedOptimizer`` (what the HF ``Trainer`` holds after ``train()``),
  Lightning's ``LightningOptimizer``, a Trainer, an LR scheduler, anything with an
  ``.optimizer``;
- ``decay_param_groups(model, weight_decay)``: the HF Trainer's default grouping (no
  weight decay for biases and normalization weights), every param kept;
- ``FreezeSchedule``: freeze at the start of training, then unfreeze on a schedule,
  resuming correctly; what the callbacks run.

The callbacks, one module per framework (each imports its framework):
``frozenopt.integrations.huggingface.FreezeCallback`` (a ``TrainerCallback``) and
``frozenopt.integrations.lightning.FreezeCallback`` / ``BackboneFinetuning``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from frozenopt.finetune import FineTuner, GradualUnfreeze
from frozenopt.optim import FreezableOptimizer
from frozenopt.optim.base import _as_param_groups, _unwrap

__all__ = ["FreezeSchedule", "decay_param_groups", "find_optimizer"]


def find_optimizer(obj: Any) -> FreezableOptimizer:
    """The one frozenopt optimizer ``obj`` is or wraps.

    Follows ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, the HF ``Trainer``, LR schedulers), ``.optimizers`` when it
    is a list (Lightning's ``Trainer``) and the items of a list or tuple. Raises
    TypeError when there is none behind ``obj``, ValueError when there are several.
    """
    found: list[FreezableOptimizer] = []
    seen: set[int] = set()
    walked: list[str] = []
    todo = [obj]
    while todo:
        current = todo.pop(0)
        if id(current) in seen or current is None:
            continue
        seen.add(id(current))
        walked.append(type(current).__name__)
        if isinstance(current, (list, tuple)):
            todo += list(current)
            continue
        inner = getattr(current, "optimizer", None)
        # A LightningOptimizer is an instance of a subclass of the class it wraps, with a
        # copy of its attributes: the optimizer is the one it wraps, not the wrapper.
        if inner is None and isinstance(current, FreezableOptimizer):
            found.append(current)
            continue
        many = getattr(current, "optimizers", None)
        todo += list(many) if isinstance(many, (list, tuple)) else []
        todo.append(inner)
    if not found:
        raise TypeError(
            f"no frozenopt optimizer behind {type(obj).__name__} (looked at: {', '.join(walked)}); build the "
            "optimizer with frozenopt (e.g. frozenopt.AdamW(model, lr=...)) and hand it to the framework "
            "(HF Trainer: optimizers=(opt, None); Lightning: return it from configure_optimizers)")
    if len({id(o) for o in found}) > 1:
        raise ValueError(f"{len(found)} frozenopt optimizers behind {type(obj).__name__}; pass the one you mean "
                         "(e.g. trainer.optimizers[i])")
    return found[0]


# What the HF Trainer keeps out of weight decay, matched against lowercased param names.
_NO_DECAY_NAME = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def _decays(model: nn.Module, name: str) -> bool:
    """The HF Trainer's rule: no decay for a param under an nn.LayerNorm, or whose name says bias or norm."""
    if _NO_DECAY_NAME.search(name.lower()):
        return False
    parts = name.split(".")[:-1]
    return not any(isinstance(model.get_submodule(".".join(parts[:k])), nn.LayerNorm)
                   for k in range(1, len(parts) + 1))


def decay_param_groups(model: nn.Module, weight_decay: float, **group_options: Any) -> list[dict[str, Any]]:
    """Two named param groups, as the HF Trainer makes by default: weight decay, and none.

    A param gets no decay when it is in an ``nn.LayerNorm`` or its name contains "bias",
    "layernorm", "rmsnorm", a component "norm" or one ending in "_norm" (the Trainer's
    ``get_decay_parameter_names``). Unlike the Trainer, params that do not require grad
    are kept (they start frozen, and ``unfreeze`` can thaw them later); an empty group is
    left out. The groups carry names (and a tied param's other names), so freezing by
    name works. ``group_options`` (``lr``, ...) go into both groups.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"decay_param_groups takes the model (an nn.Module), got {type(model).__name__}")
    named = _as_param_groups(model)
    aliases: dict[str, list[str]] = {}
    if isinstance(named, list) and named and isinstance(named[0], dict):
        named, aliases = named[0]["params"], named[0]["param_aliases"]
    root = _unwrap(model)  # the names _as_param_groups gives are the unwrapped model's
    groups = []
    for decays, wd in ((True, weight_decay), (False, 0.0)):
        params = [(n, p) for n, p in named if _decays(root, n) == decays]
        if params:
            group = {"params": params, "weight_decay": wd, **group_options}
            tied = {n: aliases[n] for n, _ in params if n in aliases}
            if tied:
                group["param_aliases"] = tied
            groups.append(group)
    return groups


class FreezeSchedule:
    """Freeze targets when training starts, then unfreeze on a schedule, resuming where a run stopped.

    ``freeze``: what to freeze at the start (a name, glob, regex, module, param or a list).
    ``schedule``: ``{t: targets}`` as ``GradualUnfreeze`` takes it (an int value is fastai's
    ``freeze_to(n)``); the entry for ``t`` applies before step or epoch ``t`` (from 0) runs,
    as ``by`` (``"step"`` or ``"epoch"``) says.
    ``keep_norm=True`` keeps normalization layers inside frozen targets trainable
    (``FineTuner``). Resuming: ``load_state_dict`` restores which entries ran; without it, a
    run that starts at ``done > 0`` steps or epochs counts the entries due before ``done`` as
    applied. Either way the initial freeze is not repeated: the optimizer's checkpoint
    holds the frozen set.
    """

    def __init__(self, schedule: Mapping[int, Any] | None = None, *, freeze: Any = (), by: str = "step",
                 keep_norm: bool = False, reset_state: bool = False) -> None:
        if by not in ("step", "epoch"):
            raise ValueError(f"by must be 'step' or 'epoch', got {by!r}")
        self.by = by  # what t counts: optimizer steps or epochs
        self.schedule = dict(schedule or {})
        self.freeze = freeze if isinstance(freeze, (list, tuple)) else (freeze,)
        self.keep_norm = keep_norm
        self.reset_state = reset_state
        self.optimizer: FreezableOptimizer | None = None
        self.resumed = False  # whether start() found a run to resume (and so froze nothing)
        self._unfreeze: GradualUnfreeze | None = None
        self._loaded: dict[str, Any] | None = None

    def start(self, optimizer: Any, model: nn.Module | None = None, *, done: float = 0) -> list[str]:
        """Bind to the optimizer (or a wrapper around it) at the start of training; return what froze."""
        opt = find_optimizer(optimizer)
        if self.keep_norm and model is None:
            raise ValueError("keep_norm=True needs the model, to find its normalization layers")
        tuner = FineTuner(model, opt, keep_norm=True) if self.keep_norm else None
        self.optimizer = opt
        self._unfreeze = GradualUnfreeze(opt, self.schedule, reset_state=self.reset_state,
                                         finetuner=tuner) if self.schedule else None
        self.resumed = self._loaded is not None or done > 0
        if self.resumed:
            if self._unfreeze is not None:
                self._unfreeze.load_state_dict(self._loaded or {
                    "last": -1, "applied": [t for t in self.schedule if t < done]})
            self._loaded = None  # used up: a later start() without a new load is a fresh run
            return []
        return (tuner or opt).freeze(*self.freeze) if self.freeze else []

    def advance(self, t: int) -> list[str]:
        """Apply the entries due at step or epoch ``t``; return the names that changed."""
        if self.optimizer is None:
            raise RuntimeError("FreezeSchedule.advance() before start(): start() binds it to the optimizer")
        return self._unfreeze.step(t) if self._unfreeze is not None else []

    def state_dict(self) -> dict[str, Any]:
        if self._unfreeze is not None:
            return self._unfreeze.state_dict()
        return self._loaded or {"last": -1, "applied": []}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._loaded = {"last": int(state["last"]), "applied": [int(t) for t in state["applied"]]}
        if self._unfreeze is not None:
            self._unfreeze.load_state_dict(self._loaded)
