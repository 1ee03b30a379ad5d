"""Fine-tuning helpers in the style of fastai, Lightning and timm, built on freeze/unfreeze.

Nothing here rebuilds an optimizer or swaps a module:

- ``FineTuner(model, opt, keep_norm=True)``: ``freeze``/``unfreeze``/``freeze_to`` that keep
  normalization layers trainable inside frozen blocks (fastai's ``train_bn``);
- ``frozen_bn_eval(model, opt)``: BatchNorm layers whose params are frozen run in eval mode
  (running statistics used, not updated) even after ``model.train()``, without being replaced;
- ``GradualUnfreeze(opt, {step_or_epoch: targets})``: a schedule of unfreezes (or fastai
  ``freeze_to(n)`` calls) applied by ``step()``, checkpointable;
- ``stop_gradient(model, names)``: BigDL's stop-gradient: the named layers' input gradients
  are not computed and do not flow to what comes before them (their own weights still train);
- ``layer_groups(model, splits, lr=slice(a, b))`` and ``spread_lr``: fastai's discriminative
  learning rates, spread geometrically over param groups.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from frozenopt.names import NameIndex, names_exactly, resolve_targets

__all__ = [
    "NORM_TYPES",
    "FineTuner",
    "GradualUnfreeze",
    "frozen_bn_eval",
    "layer_groups",
    "norm_param_names",
    "spread_lr",
    "stop_gradient",
]

#: Module types whose params ``keep_norm`` keeps trainable.
NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _check_freezable(opt: Any) -> None:
    for attr in ("freeze", "unfreeze", "is_frozen", "params_of", "is_param_frozen"):
        if not callable(getattr(opt, attr, None)):
            raise TypeError(
                f"expected a frozenopt optimizer (SGD, Adam, AdamW), got {type(opt).__name__}; "
                "`import frozenopt as optim` gives one with the same arguments as torch.optim")


def norm_param_names(model: nn.Module) -> list[str]:
    """Names (as ``model.named_parameters()`` gives them) of the params of normalization layers."""
    names = []
    for mname, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            names += [f"{mname}.{pname}" if mname else pname for pname, _ in module.named_parameters(recurse=False)]
    return names


class FineTuner:
    """freeze/unfreeze/freeze_to on a frozenopt optimizer, keeping norm layers trainable.

    ``keep_norm=True`` is fastai's ``train_bn``: when a block is frozen, the params of
    its BatchNorm/LayerNorm/GroupNorm/InstanceNorm/RMSNorm layers stay trainable (unless
    they are named on their own, e.g. ``freeze("backbone.bn1")``). ``bn_eval=True``
    installs :func:`frozen_bn_eval`, so BatchNorm layers whose params end up frozen
    run in eval mode.
    """

    def __init__(self, model: nn.Module, optimizer: Any, *, keep_norm: bool = True, bn_eval: bool = False) -> None:
        _check_freezable(optimizer)
        self.model = model
        self.optimizer = optimizer
        self.keep_norm = keep_norm
        self._norm = {p for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
        self._bn_handle = frozen_bn_eval(model, optimizer) if bn_eval else None

    def _without_norm(self, targets: Sequence[Any], params: list[Tensor]) -> list[Tensor]:
        """Drop norm params a target reached only through an enclosing block."""
        if not self.keep_norm:
            return params
        names = {p: name for name, p in self.optimizer.named_params()}
        named_directly = {p for target in targets for p in self.optimizer.params_of(target)
                          if p in self._norm and self._names_norm_layer(target, names[p])}
        return [p for p in params if p not in self._norm or p in named_directly]

    @staticmethod
    def _names_norm_layer(target: Any, name: str | None) -> bool:
        """True when the target is the norm layer itself or its param (not a block around it)."""
        if isinstance(target, Tensor):
            return True
        if isinstance(target, nn.Module):
            return isinstance(target, NORM_TYPES)
        layer = name.rsplit(".", 1)[0] if "." in name else ""
        return names_exactly(target, name) or bool(layer) and names_exactly(target, layer)

    def freeze(self, *targets: Any, release_state: bool = False) -> list[str]:
        """Freeze what the targets match, except norm layers inside them when ``keep_norm``.

        With no target: every param group but the last (fastai's ``freeze()``).
        """
        groups = self.optimizer.param_groups
        if targets:
            params = self.optimizer.params_of(*targets)
        elif len(groups) < 2:
            return self.optimizer.freeze()  # its own error message says what to write
        else:
            params = [p for g in groups[:-1] for p in g["params"]]
        params = self._without_norm(targets, params)
        return self.optimizer.freeze(params, release_state=release_state) if params else []

    def unfreeze(self, *targets: Any, reset_state: bool = False) -> list[str]:
        """Unfreeze what the targets match (everything with none)."""
        return self.optimizer.unfreeze(*targets, reset_state=reset_state)

    def freeze_to(self, n: int) -> list[str]:
        """fastai's ``freeze_to``: groups ``[:n]`` frozen (norm layers kept), ``[n:]`` trainable."""
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"freeze_to takes an int number of param groups, got {type(n).__name__}")
        groups = self.optimizer.param_groups
        freeze = self._without_norm((), [p for g in groups[:n] for p in g["params"]])
        kept = set(freeze)
        thaw = [p for g in groups for p in g["params"] if p not in kept]
        changed = self.optimizer.freeze(freeze) if freeze else []
        return changed + (self.optimizer.unfreeze(thaw) if thaw else [])

    def remove(self) -> None:
        """Remove the BatchNorm hooks ``bn_eval=True`` installed."""
        if self._bn_handle is not None:
            self._bn_handle.remove()
            self._bn_handle = None


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> _Handles:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def frozen_bn_eval(model: nn.Module, optimizer: Any) -> _Handles:
    """Run BatchNorm layers whose params are all frozen in eval mode, without swapping them.

    A forward pre-hook turns ``training`` off for the call and a forward hook turns it
    back on, so ``model.train()``/``model.eval()`` and ``module.training`` behave as
    usual; only the frozen layers' forward uses (and does not update) their running
    statistics. Affine-less BatchNorm layers have no params to be frozen and are left
    alone. Returns a handle whose ``remove()`` takes the hooks off.
    """
    _check_freezable(optimizer)
    known = {id(p) for g in optimizer.param_groups for p in g["params"]}
    handles: list[RemovableHandle] = []
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        params = [p for p in module.parameters(recurse=False) if id(p) in known]
        if not params:
            continue

        def pre(mod: nn.Module, args: Any, params: list[Tensor] = params) -> None:
            if mod.training and all(optimizer.is_param_frozen(p) for p in params):
                mod.training = False
                mod._frozenopt_was_training = True

        def post(mod: nn.Module, args: Any, output: Any) -> None:
            if getattr(mod, "_frozenopt_was_training", False):
                mod.training = True
                mod._frozenopt_was_training = False

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return _Handles(handles)


class GradualUnfreeze:
    """Unfreeze on a schedule: ``{step_or_epoch: targets}``.

    Each value is what to unfreeze at that step (a name, glob, regex, module, param or a
    list of them), or an int ``n`` meaning fastai's ``freeze_to(n)`` (e.g. ``{0: -1, 2:
    -2, 4: 0}`` thaws one param group more every two epochs). ``step()`` advances the
    counter (call it once per step or per epoch, before the training step it governs)
    and applies every entry whose key has been reached and was not applied yet, so a
    run resumed from ``state_dict()`` ends up with the same frozen set. Returns the
    names that changed.
    """

    def __init__(self, optimizer: Any, schedule: Mapping[int, Any], *, reset_state: bool = False,
                 finetuner: FineTuner | None = None) -> None:
        _check_freezable(optimizer)
        if not isinstance(schedule, Mapping) or not schedule:
            raise ValueError("schedule must be a non-empty {step_or_epoch: targets} mapping")
        for key in schedule:
            if not isinstance(key, int) or isinstance(key, bool) or key < 0:
                raise ValueError(f"schedule keys are step or epoch numbers >= 0, got {key!r}")
        self.optimizer = optimizer
        self.schedule = dict(sorted(schedule.items()))
        self.reset_state = reset_state
        self._tuner = finetuner
        self.last = -1  # the last step or epoch applied
        self._applied: set[int] = set()

    def step(self, t: int | None = None) -> list[str]:
        """Move to step/epoch ``t`` (default: the next one) and apply what is due."""
        self.last = self.last + 1 if t is None else int(t)
        changed: list[str] = []
        for key, targets in self.schedule.items():
            if key <= self.last and key not in self._applied:
                changed += self._apply(targets)
                self._applied.add(key)
        return changed

    def _apply(self, targets: Any) -> list[str]:
        if isinstance(targets, int) and not isinstance(targets, bool):
            return (self._tuner or self.optimizer).freeze_to(targets)
        if isinstance(targets, (list, tuple)):
            return self.optimizer.unfreeze(*targets, reset_state=self.reset_state)
        return self.optimizer.unfreeze(targets, reset_state=self.reset_state)

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last, "applied": sorted(self._applied)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last = int(state["last"])
        self._applied = set(int(k) for k in state["applied"])


def _match_modules(model: nn.Module, names: Any) -> list[tuple[str, nn.Module]]:
    """Modules named by exact names, globs, regexes or given as objects (all-or-nothing)."""
    if isinstance(names, (str, re.Pattern, nn.Module)):
        names = [names]
    modules = dict(model.named_modules())
    found: dict[int, tuple[str, nn.Module]] = {}
    for target in names:
        if isinstance(target, nn.Module):
            hits = [(n, m) for n, m in modules.items() if m is target]
        elif isinstance(target, (str, re.Pattern)):
            hits = [(n, m) for n, m in modules.items() if n and names_exactly(target, n)]
        else:
            raise TypeError(f"stop_gradient takes module names, globs, regexes or modules, got {type(target).__name__}")
        if not hits:
            word = target.pattern if isinstance(target, re.Pattern) else str(target)
            close = difflib.get_close_matches(word, [n for n in modules if n], n=5, cutoff=0.4)
            raise ValueError(f"no module matches {target!r}; closest names: {close}")
        for n, m in hits:
            found[id(m)] = (n, m)
    return list(found.values())


def _detach(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def stop_gradient(model: nn.Module, names: Any) -> _Handles:
    """BigDL's stop-gradient: the named layers' inputs are detached.

    Their input gradients are not computed, and nothing before them gets gradient
    through them; their own params still get gradients (freeze them too to stop those).
    ``names`` are module names (exact, globs, regexes) or modules. Returns a handle whose
    ``remove()`` (or a ``with`` block) undoes it.
    """
    handles = []
    for _, module in _match_modules(model, names):
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return _detach(args), _detach(kwargs)
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    return _Handles(handles)


def spread_lr(lr: float | slice, n: int) -> list[float]:
    """fastai's ``lr=slice(a, b)`` over ``n`` groups: geometric from ``a`` (first) to ``b`` (last).

    ``slice(None, b)`` gives ``b / 10`` to every group but the last, and ``b`` to the
    last; a float gives every group the same lr.
    """
    if n < 1:
        raise ValueError(f"need at least one param group, got {n}")
    if not isinstance(lr, slice):
        return [float(lr)] * n
    if lr.step is not None:
        raise ValueError("lr slice takes no step: slice(first_group_lr, last_group_lr)")
    if lr.stop is None:
        raise ValueError("lr slice needs a stop: slice(a, b) or slice(None, b)")
    stop = float(lr.stop)
    if lr.start is None:
        return [stop / 10] * (n - 1) + [stop]
    start = float(lr.start)
    if start <= 0 or stop <= 0:
        raise ValueError(f"geometric spread needs positive lrs, got {start} and {stop}")
    if n == 1:
        return [stop]
    ratio = math.log(stop / start) / (n - 1)
    return [start * math.exp(ratio * i) for i in range(n - 1)] + [stop]


def layer_groups(model: nn.Module, splits: Sequence[Any], *, lr: float | slice | None = None,
                 rest: str = "error", **group_options: Any) -> list[dict[str, Any]]:
    """Named param groups, one per split, for discriminative learning rates.

    ``splits`` lists the groups in order, earliest layers first; each entry is what
    ``freeze`` takes (a name, glob, regex, module or a list of them). A param goes to
    the first split that matches it. Params no split matches raise an error, or go to
    the first or last group with ``rest="first"``/``"last"``. With ``lr`` given (a float
    or a ``slice(a, b)``), each group gets its lr from :func:`spread_lr`. The groups
    carry param names, so ``freeze``, ``freeze_to(n)`` and checkpoints work by name.
    """
    if rest not in ("error", "first", "last"):
        raise ValueError(f"rest must be 'error', 'first' or 'last', got {rest!r}")
    if not splits:
        raise ValueError("layer_groups needs at least one split")
    named = list(model.named_parameters())
    index = NameIndex([n for n, _ in named], [p for _, p in named])
    owner: dict[int, int] = {}
    for gi, split in enumerate(splits):
        targets = split if isinstance(split, (list, tuple)) else (split,)
        for i in resolve_targets(index, targets):
            owner.setdefault(i, gi)
    unmatched = [i for i in range(len(named)) if i not in owner]
    if unmatched and rest == "error":
        raise ValueError(
            f"{len(unmatched)} params are in no split (e.g. {[named[i][0] for i in unmatched[:5]]}); "
            "add splits for them or pass rest='first' / rest='last'")
    for i in unmatched:
        owner[i] = 0 if rest == "first" else len(splits) - 1
    groups: list[dict[str, Any]] = [{"params": [], **group_options} for _ in splits]
    for i, (name, p) in enumerate(named):
        groups[owner[i]]["params"].append((name, p))
    empty = [gi for gi, g in enumerate(groups) if not g["params"]]
    if empty:
        raise ValueError(f"splits {empty} match no param that an earlier split did not take")
    if lr is not None:
        for group, group_lr in zip(groups, spread_lr(lr, len(groups))):
            group["lr"] = group_lr
    return groups
