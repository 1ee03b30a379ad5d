"""The base class of frozenopt's optimizers: freezing, plans, state and the step paths.

``FreezableOptimizer`` holds everything SGD, Adam and AdamW share; each of them
fills in the hooks at the end of the class (its hyper-parameter checks, its state
and the fused op it runs). A frozen param is treated exactly as if its grad were
None: its value and its state are not touched, its step does not advance.

Two step paths share the same ops (``frozenopt.ops``):
- eager (the usual case): one compiled ``StepPlan`` per device and state layout
  holds the unfrozen params that have state, of every param group that shares
  them, reads their grads in C++ and steps them in one launch, each with its
  group's hyper-parameters; it is rebuilt only when the frozen set, the state
  or the groups change;
- traced (``torch.compile``, CUDA graph capture): every param with a grad goes
  to a ``*_groups_`` op, one call per device and state layout, with the
  groups' mask tensors and a table of every group's values on the device
  (``group_table``), so flipping the mask in ``mask_only`` mode or editing a
  group's values changes no graph.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from frozenopt import ops
from frozenopt.names import NameIndex, describe, resolve_targets
from frozenopt.optim import partial
from frozenopt.optim.group_table import GroupTable, TracedLaunch
from frozenopt.optim.state_dict import (
    PARAM_KEYS,
    check_loadable,
    hooks_held,
    loaded_frozen,
    loaded_partial,
    partial_entry,
)
from frozenopt.report import FreezeSummary

__all__ = ["FreezableOptimizer"]

# Complex params are stepped as their real and imaginary parts, as torch.optim does.
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128)


def check_number(value: Any, name: str, message: str, *, at_least_zero: bool = True) -> float | None:
    """Raise ValueError(message) unless value is a finite number (>= 0 by default).

    A tensor must have one element; one not on the CPU is not read (that would
    synchronise), the kernel then gets it as it is.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        if value.device.type != "cpu":
            return None
    number = float(value)
    if not math.isfinite(number) or (at_least_zero and number < 0.0):
        raise ValueError(f"{message}: {value}")
    return number


def _unwrap(module: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers, so names carry no "module." prefix."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            module = module._orig_mod
        else:
            return module


def _wraps_ddp(params: Any) -> bool:
    while isinstance(params, torch._dynamo.eval_frame.OptimizedModule):
        params = params._orig_mod
    return isinstance(params, nn.parallel.DistributedDataParallel)


_DDP_NOTICE_GIVEN = False


def _default_mask_only(params: Any) -> bool:
    """mask_only=None: True for a DDP-wrapped module (said once per process), else False."""
    global _DDP_NOTICE_GIVEN
    if not _wraps_ddp(params):
        return False
    if not _DDP_NOTICE_GIVEN:
        _DDP_NOTICE_GIVEN = True
        warnings.warn(
            "frozenopt: the optimizer was given a DistributedDataParallel module, so it uses "
            "mask_only=True: freeze/unfreeze leave requires_grad alone, because DDP fixes its "
            "gradient buckets at wrap time and flipping requires_grad afterwards breaks its reducer. "
            "Pass mask_only=True (or False) explicitly to silence this message.", stacklevel=4)
    return True


def _is_dtensor(t: Tensor) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")  # loaded by whoever made a DTensor
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _rows_stay_whole(p: Tensor) -> bool:
    """Whether each rank's local shard of DTensor p is a block of whole rows (Shard(0), Replicate)."""
    return all(pl.is_replicate() or (pl.is_shard() and pl.dim == 0) for pl in p.placements)


def _rows_of(t: Tensor, rows: slice | Tensor) -> Tensor:
    """t's rows: a view for a slice, a gathered copy for an index tensor."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _as_param_groups(params: Any) -> Any:
    """torch.optim's params argument, with an nn.Module taken as its named parameters.

    A tied param (``lm_head.weight`` is ``wte.weight``) is listed once, under its first
    name, as ``named_parameters()`` does; its other names go in the group's
    ``"param_aliases"`` (``{"wte.weight": ["lm_head.weight"]}``) so freezing by any of them works.
    """
    if isinstance(params, nn.Module):
        module = _unwrap(params)
        first: dict[int, str] = {}
        aliases: dict[str, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in first:
                aliases.setdefault(first[id(p)], []).append(name)
            else:
                first[id(p)] = name
        named = list(module.named_parameters())
        return [{"params": named, "param_aliases": aliases}] if aliases else named
    if isinstance(params, Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, "
            f"or an nn.Module, but got {torch.typename(params)}")
    return params


def _write_mask(mask: Tensor, flags: Tensor) -> None:
    """Rewrites a mask in place. On a GPU, steps or graph replays queued on any stream
    may still read it: the write waits for them, and is done before anything queued
    after it on any stream runs (freezing is rare; a step never waits)."""
    if mask.device.type != "cuda":
        mask.copy_(flags)
        return
    torch.cuda.synchronize(mask.device)
    mask.copy_(flags)
    torch.cuda.current_stream(mask.device).synchronize()


# The state of a param stepped apart in a group that keeps none: one object, so its row pieces stay cached.
_NO_STATE: dict[str, Any] = {}


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def on_device_of(group: dict[str, Any], *tensors: Any) -> list[Any]:
    """The tensors, copied to the group's GPU when they are on another one (GradScaler's
    found_inf/grad_scale, a tensor lr), as torch.optim's fused optimizers do; CPU
    tensors and numbers stay as they are."""
    device = group["params"][0].device
    return [t.to(device) if isinstance(t, Tensor) and t.device.type != "cpu" and t.device != device else t
            for t in tensors]


# The arguments every optimizer shares, for the ``Args:`` sections of their docstrings.
PARAMS_DOC = """params: an ``nn.Module`` (its named parameters: freezing by name then works),
            ``named_parameters()``, an iterable of params (freezing by object only) or
            of param group dicts. Params with ``requires_grad=False`` start frozen."""
COMPAT_DOC = """foreach: accepted for compatibility with torch.optim; the fused kernels always run.
        differentiable: must be False: the kernels update params in place, outside autograd.
        fused: accepted for compatibility with torch.optim; the fused kernels always run."""
MASK_ONLY_DOC = """mask_only: how ``freeze``/``unfreeze`` act. False: they also turn ``requires_grad``
            off/on (and drop the grads of frozen params), so autograd skips their weight
            grads, and the frozen set follows ``requires_grad``. True: only the optimizer's
            mask changes, as DDP (buckets fixed at wrap time), ``torch.compile`` and CUDA
            graphs need. None (the default): True for a ``DistributedDataParallel`` module,
            said once per process, else False."""


def _synced(method):
    """Run method on an optimizer that has taken in what user code changed since its last look."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._sync()
        return method(self, *args, **kwargs)
    return wrapper


class FreezableOptimizer(torch.optim.Optimizer):
    """What SGD, Adam and AdamW share: freezing, plans, state and the two step paths.

    The frozen set, the group masks and the step plans are derived from what
    the Python side holds (param_groups, state and, in default mode, each
    param's requires_grad), which user and library code may edit between
    steps as with torch.optim. A C++ watch notices such edits cheaply before
    each step and each freezing call, and only the groups they touched are
    derived again (``_sync``). frozenopt's own changes record themselves in
    the watch (``_invalidate``).
    """

    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale/found_inf; the step applies them

    def __init__(self, params: Any, defaults: dict[str, Any], *, mask_only: bool | None) -> None:
        self._check_hyper(defaults)
        ops.require_extension()
        if defaults.get("differentiable"):
            raise ValueError(
                f"frozenopt.{type(self).__name__} does not support differentiable=True: its fused "
                "kernels update params in place outside autograd. Use torch.optim for "
                "differentiable optimization.")
        self._mask_only = _default_mask_only(params) if mask_only is None else bool(mask_only)
        self._ready = False  # add_param_group leaves set-up to the constructor until then
        super().__init__(_as_param_groups(params), defaults)
        self._check_params()
        self._derive({p for p in self._all_params() if not p.requires_grad})
        self._frozen_at_start = set(self._frozen)  # what reset_frozen() goes back to
        self._ready = True

    def _derive(self, frozen: set) -> None:
        """Sets up everything derived from the groups, the state and the frozen set."""
        self._extension = ops.require_extension()
        self._watch = self._extension.Watch()
        self._frozen: set[Tensor] = frozen
        # Params frozen in part: the CPU bool mask of their frozen rows ([shape[0]]) or
        # elements (their shape); never in _frozen (some of them trains). See partial.py.
        self._partial: dict[Tensor, Tensor] = {}
        self._apart: list[list[Tensor]] = []  # per group: its unfrozen params stepped apart from its plan
        self._row_pieces: dict[Tensor, tuple] = {}  # each one's pieces and what they were worked out from
        self._device_masks: dict[Tensor, Tensor] = {}  # element masks on their param's device
        # Per param that is or was frozen by rows: uint8 flags per row on its device (1: frozen),
        # rewritten in place, which a captured step reads at every replay.
        self._row_flags: dict[Tensor, Tensor] = {}
        self._params: list[Tensor] = []  # every group's params at the last sync
        # Per group: the StepPlan that steps it (shared by the groups of one plan), None when
        # it must be built again, False for a group with no params.
        self._plans: list = []
        self._plan_sets: list[tuple[list[int], Any]] = []  # each plan with its groups, in order
        self._pending: list[list[Tensor]] = []  # per group: unfrozen params with no state yet
        self._plan_keys: dict[int, Any] = {}  # per group: the _plan_key its plan was built for
        self._checked_rows: list[tuple] = []  # per group: the _plan_row checked at the last step
        self._masks: list[Tensor] = []
        self._mask_subsets: dict[tuple, Tensor] = {}
        self._group_tables: dict[tuple, GroupTable] = {}  # the traced step's, per (device, _plan_key)
        self._captured = False  # a CUDA graph has captured a step
        self._frozen_version = 0
        self._refresh_masks()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._ready:
            self._sync()
        super().add_param_group(param_group)
        if not self._ready:
            return
        try:
            self._check_params()
        except Exception:
            self.param_groups.pop()
            raise
        joined_frozen = {p for p in self.param_groups[-1]["params"] if not p.requires_grad}
        self._frozen |= joined_frozen
        self._frozen_at_start |= joined_frozen
        self._refresh_masks()

    def _check_params(self, groups: Iterable[int] | None = None) -> None:
        """Checks the params and hyper-parameters of the given groups (all by default)."""
        if not self.param_groups or not any(g["params"] for g in self.param_groups):
            raise ValueError("optimizer got an empty parameter list")
        self._sharded = any(_is_dtensor(p) for p in self._all_params())  # FSDP2 / DTensor params
        for gi in range(len(self.param_groups)) if groups is None else groups:
            group = self.param_groups[gi]
            missing = [k for k in ("params", *self.defaults) if k not in group]
            if missing:
                raise ValueError(
                    f"param group {gi} has no {', '.join(map(repr, missing))}: add param groups with "
                    "add_param_group, which fills in the optimizer's defaults")
            if not isinstance(group["params"], list):
                raise TypeError(f"param group {gi}'s 'params' must be a list, got {type(group['params']).__name__}")
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                raise ValueError(
                    f"param group {gi} lists the same parameter more than once; each param may appear "
                    "once (it would otherwise be stepped twice per step)")
            self._check_hyper(group)
            for p in group["params"]:
                if not isinstance(p, Tensor):
                    raise TypeError(f"param group {gi} holds a {type(p).__name__}, not a tensor")
            devices = {p.device for p in group["params"]}
            if len(devices) > 1:
                raise ValueError(
                    f"param group {gi} holds params on more than one device ({sorted(map(str, devices))}); "
                    "put the params of each device in their own param group")
            for p in group["params"]:
                if p.dtype not in _FLOAT_DTYPES:
                    raise TypeError(
                        f"param {self._name_of(p)} has dtype {p.dtype}; frozenopt steps float32, "
                        "float64, float16, bfloat16, complex64 and complex128 params")
                if p.layout is not torch.strided:
                    raise TypeError(f"param {self._name_of(p)} is not a dense (strided) tensor")
        if groups is not None and len({id(p) for p in self._all_params()}) != len(self._all_params()):
            raise ValueError("some parameters appear in more than one parameter group")
        self._devices = {g["params"][0].device for g in self.param_groups if g["params"]}

    # Copies and pickles carry what torch.optim's do, plus the mode and the frozen set.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["mask_only"] = self._mask_only
        state["frozen_flags"] = [p in self._frozen for p in self._all_params()]
        state["frozen_at_start_flags"] = [p in self._frozen_at_start for p in self._all_params()]
        state["partial_masks"] = [self._partial.get(p) for p in self._all_params()]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        flags = state.pop("frozen_flags", None)
        at_start = state.pop("frozen_at_start_flags", None)
        masks = state.pop("partial_masks", None)
        mask_only = state.pop("mask_only", False)
        super().__setstate__(state)
        if "_watch" in self.__dict__:
            return  # torch.optim's load_state_dict sets state and groups this way; it syncs after
        self._mask_only = mask_only
        params = self._all_params()
        flags = flags if flags is not None and len(flags) == len(params) else [not p.requires_grad for p in params]
        self._check_params()
        self._derive({p for p, frozen in zip(params, flags) if frozen})
        at_start = at_start if at_start is not None and len(at_start) == len(params) else flags
        self._frozen_at_start = {p for p, frozen in zip(params, at_start) if frozen}
        if masks is not None and len(masks) == len(params):
            self._partial = {p: mask for p, mask in zip(params, masks) if mask is not None}
            self._refresh_masks()
        self._ready = True

    # ------------------------------------------------------------ keeping in step with Python

    def _sync(self) -> None:
        """Takes in what user code changed since the last look (cheap when nothing did).

        Edits of param_groups (a param swapped, a group appended or deleted),
        of state (an entry replaced or deleted, the dict replaced) and, in
        default mode, flips of requires_grad: as torch.optim, which reads them
        afresh at every step, would see them.
        """
        stale = self._watch.stale(self.param_groups, self.state)
        if not stale:
            return
        if self._capturing():
            raise RuntimeError(
                "the optimizer's param groups, state or params' requires_grad changed since its last "
                "step, and it cannot take that in during a CUDA graph capture: run one eager step "
                "(or call opt.prepare_capture()) before capturing")
        self._check_params(stale)  # a bad edit raises here, before anything of ours changes
        params = self._all_params()
        if self._partial or self._row_flags:  # a param taken out of the groups leaves its row masks behind
            present = set(params)
            self._partial = {p: mask for p, mask in self._partial.items() if p in present}
            self._row_flags = {p: flags for p, flags in self._row_flags.items() if p in present}
        if self._mask_only:
            # The mask alone says what is frozen; params new to the optimizer
            # start frozen when they do not require grad, as at construction.
            known = set(self._params)
            self._frozen = {p for p in params if p in self._frozen or (p not in known and not p.requires_grad)}
        else:
            self._frozen = {p for p in params if not p.requires_grad}
        self._mask_subsets.clear()
        self._invalidate_names()
        self._refresh_masks(stale)

    def _capturing(self) -> bool:
        """Whether a CUDA graph is capturing on a device of the groups (known since the last
        check of the params: a step asks at every call, whatever the number of groups)."""
        return any(_is_capturing(device) for device in self._devices)

    def _snapshot(self) -> None:
        self._watch.snapshot(self.param_groups, self.state, not self._mask_only)

    # ------------------------------------------------------------------ names

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _group_key(self) -> tuple[tuple, list]:
        """Cheap signature of the groups (which dicts, params lists and names lists, and their
        lengths), and the objects it names, to hold so that their ids stay theirs."""
        key: list[int] = []
        held: list[Any] = []
        for g in self.param_groups:
            names, aliases = g.get("param_names"), g.get("param_aliases")
            key += (id(g), id(g["params"]), len(g["params"]), id(names), len(names or ()), id(aliases))
            held += (g, g["params"], names, aliases)
        return tuple(key), held

    def _name_index(self) -> NameIndex:
        """The index of names and params, cached until the groups' signature changes
        (or ``_sync`` sees a param list edited in place)."""
        cached = getattr(self, "_names_cache", None)
        key, held = self._group_key()
        if cached is not None and cached[0] == key:
            return cached[2]
        names: list[str | None] = []
        aliases: dict[str, list[str]] = {}
        for group in self.param_groups:
            names += group.get("param_names") or [None] * len(group["params"])
            aliases.update(group.get("param_aliases") or {})
        index = NameIndex(names, self._all_params(), aliases)
        self._names_cache = (key, held, index)
        return index

    def _invalidate_names(self) -> None:
        """Forget the name index: the params, their names or the groups changed."""
        self._names_cache = None

    def _name_of(self, p: Tensor) -> str:
        for group in self.param_groups:
            for i, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    return repr(names[i]) if names else describe(p)
        return describe(p)

    # ---------------------------------------------------------------- freezing

    @property
    @_synced
    def frozen(self) -> list[str]:
        """Names of the frozen params, in optimizer order.

        A tied param shows every name it has, ``"wte.weight (= lm_head.weight)"``;
        freeze/unfreeze/is_frozen accept that string back. A param frozen in part
        (``rows=``, ``mask=``) shows how much: ``"emb.weight [30522 of 30524 rows frozen]"``.
        """
        index = self._name_index()
        out = []
        for i, p in enumerate(index.params):
            mask = self._partial.get(p)
            if p in self._frozen:
                out.append(index.name_of(i))
            elif mask is not None:
                unit = "rows" if partial.is_row_mask(mask) and p.dim() > 1 else "elements"
                out.append(f"{index.name_of(i)} [{int(mask.sum())} of {mask.numel()} {unit} frozen]")
        return out

    @_synced
    def frozen_mask(self, target: Any) -> Tensor:
        """A bool tensor of the param's shape (on its device), True where it is frozen: a copy.

        The target must match one param (a name, the param itself, ...)."""
        index = self._name_index()
        indices = resolve_targets(index, [target])
        if len(indices) != 1:
            raise ValueError(f"frozen_mask takes a target that matches one param; {describe(target)} matches "
                             f"{len(indices)} ({', '.join(index.name_of(i) for i in indices[:3])}, ...)")
        p = index.params[indices[0]]
        mask = self._partial.get(p)
        if p in self._frozen or mask is None:
            return torch.full(p.shape, p in self._frozen, dtype=torch.bool, device=p.device)
        if partial.is_row_mask(mask):
            mask = mask.view(-1, *[1] * (p.dim() - 1)).expand(p.shape)
        return mask.to(p.device, copy=True).contiguous()

    @_synced
    def named_params(self) -> list[tuple[str | None, Tensor]]:
        """``(name, param)`` for every param, in optimizer order (groups in turn).

        The names are those ``freeze`` matches; a tied param appears once, under its
        first name, and a param given without a name has None.
        """
        index = self._name_index()
        return list(zip(index.names, index.params))

    @_synced
    def params_of(self, *targets: Any) -> list[Tensor]:
        """The params the targets match, in optimizer order, by the rules of ``freeze``.

        Nothing changes; a target that matches nothing raises as ``freeze`` does.
        """
        if not targets:
            raise TypeError("params_of() needs a target: a name, glob, regex, Module or Parameter")
        index = self._name_index()
        return [index.params[i] for i in resolve_targets(index, targets)]

    def is_param_frozen(self, p: Tensor) -> bool:
        """Whether ``p``, a param of this optimizer, is frozen, in O(1): for hooks that run at every forward.

        It reads what decides it directly: ``requires_grad`` in the default mode,
        the optimizer's mask in ``mask_only`` mode, without checking that ``p`` is
        still in a param group (``is_frozen(p)`` checks that, also in O(1) unless
        the groups were edited since the last step).
        """
        return p in self._frozen if self._mask_only else not p.requires_grad

    @property
    def frozen_version(self) -> int:
        """A number that goes up whenever the frozen set may have changed (freeze, unfreeze,
        load_state_dict, param groups edited): code that caches what ``is_param_frozen``
        says compares it, in O(1), to know when to look again. In the default mode
        ``is_param_frozen`` reads ``requires_grad``, which a flip outside the optimizer
        changes before this number does (at the optimizer's next step or freezing call)."""
        return self._frozen_version

    @property
    def mask_only(self) -> bool:
        """True when freezing leaves ``requires_grad`` alone (DDP, compiled graphs)."""
        return self._mask_only

    def is_frozen(self, *targets: Any) -> bool:
        """True when every param the targets match is frozen (a param frozen in part is not).

        ``is_frozen(p)`` for one param that sits where the optimizer last saw it
        answers in O(1) from ``p`` itself; other edits of the groups are taken in at
        the next step or freezing call, as ever.
        """
        if len(targets) == 1 and isinstance(targets[0], Tensor) and self._in_place_since_sync(targets[0]):
            return self.is_param_frozen(targets[0])
        return self._is_frozen_synced(*targets)

    def _in_place_since_sync(self, p: Tensor) -> bool:
        """Whether ``p`` was a param at the last sync and still sits at the same place in its group."""
        if self._positions is None:
            # Only params at the flat position they had at the last sync: one added
            # since then (mask_only: frozen or not by its requires_grad) is left to the sync.
            self._positions, k = {}, 0
            for gi, group in enumerate(self.param_groups):
                for i, q in enumerate(group["params"]):
                    if k < len(self._params) and self._params[k] is q:
                        self._positions[id(q)] = (gi, i)
                    k += 1
        where = self._positions.get(id(p))
        if where is None:
            return False
        gi, i = where
        params = self.param_groups[gi]["params"] if gi < len(self.param_groups) else ()
        return i < len(params) and params[i] is p

    @_synced
    def _is_frozen_synced(self, *targets: Any) -> bool:
        if not targets:
            raise TypeError("is_frozen() needs a target: a name, glob, regex, Module or Parameter, "
                            "e.g. is_frozen('encoder'); opt.frozen lists every frozen param")
        index = self._name_index()
        return all(index.params[i] in self._frozen for i in resolve_targets(index, targets))

    @_synced
    def freeze(self, *targets: Any, release_state: bool = False, rows: Any = None, mask: Tensor | None = None,
               ) -> list[str]:
        """Freeze the params the targets match; return the names that changed.

        Targets are names (a module prefix like ``"fc2"`` or an exact param
        name), globs (``"encoder.layer.*"``), compiled regexes, Modules or
        Parameters. With no target, every param group but the last is frozen
        (fastai's ``freeze()``). ``release_state=True`` also drops the state of
        the matched params to give the memory back.

        ``rows=R`` freezes only rows ``R`` (along dim 0) of each matched param: an int,
        a slice, row indices or a bool tensor over the rows; ``mask=M`` only the
        elements where the bool tensor ``M`` (the param's shape) is True. The other
        rows and elements train as before; see ``frozen_mask``.
        """
        if rows is not None or mask is not None:
            return self._set_partial(targets, rows, mask, True, drop_state=release_state)
        if targets:
            indices = resolve_targets(self._name_index(), targets)
        elif len(self.param_groups) < 2:
            raise ValueError(
                "freeze() with no argument freezes every param group but the last (fastai's rule), "
                "and this optimizer has a single param group, so it would freeze nothing. Write "
                "freeze('*') to freeze every named param, or name what to freeze, "
                "e.g. freeze('embeddings', 'encoder.layer.0').")
        else:
            indices = self._group_indices(slice(None, -1))
        return self._set_frozen(indices, True, drop_state=release_state)

    @_synced
    def unfreeze(self, *targets: Any, reset_state: bool = False, rows: Any = None, mask: Tensor | None = None,
                 ) -> list[str]:
        """Unfreeze the params the targets match (all params with no target, and every
        part-frozen param whole).

        Their state resumes where it stopped; ``reset_state=True`` starts it
        afresh, as fastai does (only for the params this call unfreezes: the
        state of params that were training already is kept). With no target, a
        warning says when params frozen since the optimizer was built thaw (PEFT's
        base weights); ``reset_frozen`` goes back. ``rows=`` and ``mask=`` unfreeze
        only those rows or elements, as ``freeze`` takes them.
        """
        if rows is not None or mask is not None:
            return self._set_partial(targets, rows, mask, False, drop_state=reset_state)
        index = self._name_index()
        indices = resolve_targets(index, targets) if targets else range(len(index))
        if not targets:
            self._warn_thawing_start_set(index)
        return self._set_frozen(indices, False, drop_state=reset_state)

    @_synced
    def freeze_to(self, n: int) -> list[str]:
        """fastai's ``freeze_to``: freeze param groups ``[:n]``, unfreeze ``[n:]``."""
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"freeze_to takes an int number of param groups, got {type(n).__name__}")
        if len(self.param_groups) < 2:
            raise ValueError(
                f"freeze_to({n}) counts param groups (fastai's rule), and this optimizer has a single "
                "param group, so it would freeze everything or nothing. Write freeze('*') to freeze "
                "every named param, unfreeze() to unfreeze them all, or name what to freeze, "
                "e.g. freeze('embeddings', 'encoder.layer.0').")
        freeze = self._group_indices(slice(None, n))
        thaw = self._group_indices(slice(n, None))
        return self._set_frozen(freeze, True) + self._set_frozen(thaw, False)

    @_synced
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the params the next step moves: unfrozen, with a grad.

        Returns the total norm of those grads, as torch does. In ``mask_only`` mode
        frozen params keep their grads, and clipping ``model.parameters()`` would
        count them (HF Trainer and Lightning clip over every param); this does not.
        With a GradScaler, call ``scaler.unscale_(opt)`` first, as for torch's function.
        """
        if not float(max_norm) >= 0:  # torch would flip (negative) or poison (nan) every grad
            raise ValueError(f"max_norm must be a number >= 0 (inf measures without clipping), got {max_norm}")
        params = [p for p in self._all_params() if p.grad is not None and p not in self._frozen]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)

    @_synced
    def reset_frozen(self) -> list[str]:
        """Go back to the frozen set the optimizer started with; return the names that changed.

        That set is the params that did not require grad when the optimizer was built
        (or when their group was added): the base weights PEFT froze, for instance, which
        a bare ``unfreeze()`` thaws. State is kept, as with ``freeze``/``unfreeze``.
        ``load_state_dict`` restores the frozen set of the checkpoint and leaves this one
        as it is (an optimizer built the same way in a resumed run has the same one);
        ``copy.deepcopy`` and pickling carry it.
        """
        params = self._all_params()
        start = self._frozen_at_start
        return (self._set_frozen([i for i, p in enumerate(params) if p in start], True)
                + self._set_frozen([i for i, p in enumerate(params) if p not in start], False))

    def _warn_thawing_start_set(self, index: NameIndex) -> None:
        """A bare unfreeze() about to thaw params frozen from the start (PEFT's base weights) says so."""
        thawed = [i for i, p in enumerate(index.params) if p in self._frozen and p in self._frozen_at_start]
        if thawed:
            warnings.warn(
                f"frozenopt: unfreeze with no target thaws {len(thawed)} param(s) that were frozen when the "
                f"optimizer was built (e.g. {index.name_of(thawed[0])!r}); with PEFT (LoRA) these are the base "
                "weights, and training them is full fine-tuning. Name what to unfreeze, call "
                "opt.reset_frozen() to go back to the set the optimizer started with, or write "
                "unfreeze('*') to mean every named param.", stacklevel=4)

    @_synced
    def summary(self, depth: int = 1) -> FreezeSummary:
        """Trainable and frozen element counts, trainable share and optimizer-state bytes per module.

        One row per module ``depth`` levels down (module levels that hold every param,
        such as PEFT's ``base_model.model``, are not counted), a total, and notes.
        ``print(opt.summary())`` shows the table; ``.rows`` and ``.total`` hold the numbers.
        A tied param is counted once, under its first name.
        """
        index = self._name_index()
        return FreezeSummary.build(index.names, [index.name_of(i) for i in range(len(index))], index.params, depth,
                                   self._frozen_elements, self._state_bytes)

    def _frozen_elements(self, p: Tensor) -> int:
        """How many of p's elements are frozen, as ``summary`` counts them."""
        mask = self._partial.get(p)
        if p in self._frozen or mask is None:
            return p.numel() if p in self._frozen else 0
        return int(mask.sum()) * (p.numel() // mask.numel())

    def _state_bytes(self, p: Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.get(p, {}).values() if isinstance(t, Tensor))

    def _group_indices(self, groups: slice) -> list[int]:
        start, indices = 0, []
        ranges = []
        for group in self.param_groups:
            ranges.append(range(start, start + len(group["params"])))
            start += len(group["params"])
        for r in ranges[groups]:
            indices += list(r)
        return indices

    def _set_frozen(self, indices: Iterable[int], frozen: bool, *, drop_state: bool = False) -> list[str]:
        params = self._all_params()
        index = self._name_index()
        # A param frozen in part changes too: a whole freeze or unfreeze ends that.
        changed = [i for i in indices if (params[i] in self._frozen) != frozen or params[i] in self._partial]
        try:  # the masks and plans follow whatever changed, even if interrupted (KeyboardInterrupt)
            # unfreeze(reset_state=True) resets only the params it thaws: one that was training
            # keeps its state. freeze(release_state=True) may release every param it matched:
            # all of them end frozen, none is training.
            for i in (indices if frozen else changed) if drop_state else ():
                self.state.pop(params[i], None)
            for i in changed:
                p = params[i]
                self._partial.pop(p, None)
                if not frozen:
                    self._settle_row_state(p)
                if not self._mask_only:
                    p.requires_grad_(not frozen)
                    if frozen:
                        p.grad = None  # requires_grad off: the grad would only hold memory
                if frozen:
                    self._frozen.add(p)
                else:
                    self._frozen.discard(p)
        finally:
            self._refresh_masks()
        return [index.name_of(i) for i in changed]

    def _set_partial(self, targets: tuple, rows: Any, mask: Tensor | None, frozen: bool, *,
                     drop_state: bool) -> list[str]:
        """freeze/unfreeze of rows or elements; every matched param is checked before any changes.

        A param whose mask ends all frozen or all trainable is frozen or unfrozen whole.
        ``drop_state``: freeze releases the state of the frozen rows; unfreeze resets
        that of the rows (elements) it thaws.
        """
        verb = "freeze" if frozen else "unfreeze"
        if not targets:
            raise TypeError(f"{verb}(rows=...) and {verb}(mask=...) need a target, the params whose rows or "
                            f"elements to {verb}: e.g. {verb}('embeddings.word_embeddings', rows=[0, 1])")
        if rows is not None and mask is not None:
            raise ValueError(f"{verb} takes rows= or mask=, not both")
        if drop_state and frozen and mask is not None:
            raise ValueError("freeze(mask=..., release_state=True): the state of single elements cannot be given "
                             "back; release whole rows with rows=, or whole params")
        index = self._name_index()
        plans = []
        for i in resolve_targets(index, targets):
            p, name = index.params[i], index.name_of(i)
            if _is_dtensor(p) and (mask is not None or not _rows_stay_whole(p)):
                raise ValueError(f"param {name} is a DTensor placed {list(p.placements)}: only its rows can be "
                                 "frozen, and only while each rank holds whole rows (Shard(0) or Replicate "
                                 "placements, as FSDP2 gives); freeze it whole")
            given = partial.rows_mask(rows, p, name) if rows is not None else partial.elements_mask(mask, p, name)
            now = self._partial.get(p)
            if now is not None and now.shape != given.shape:
                has, other = ("rows", "elements") if partial.is_row_mask(now) else ("elements", "rows")
                raise ValueError(f"param {name} has {has} frozen and cannot also take a mask of {other}: "
                                 f"unfreeze it whole first")
            if now is None:
                now = torch.full(given.shape, p in self._frozen)
            plans.append((i, p, given, now, now | given if frozen else now & ~given))
        changed = []
        try:
            for i, p, given, now, new in plans:
                if torch.equal(now, new) and not (frozen and drop_state):
                    continue
                changed.append(i)
                if drop_state:  # the rows named that end frozen; those thawed now
                    self._drop_state_of(p, given if frozen else now & ~new)
                if bool(new.all()) or not bool(new.any()):
                    self._set_frozen([i], bool(new.all()))
                else:
                    self._put_partial(p, new)
        finally:
            self._refresh_masks()
        return [index.name_of(i) for i in changed]

    def _put_partial(self, p: Tensor, mask: Tensor) -> None:
        """p is frozen in part, by ``mask``: it trains (requires grad, in the default mode)."""
        self._partial[p] = mask
        self._frozen.discard(p)
        if not self._mask_only:
            p.requires_grad_(True)

    def _drop_state_of(self, p: Tensor, chosen: Tensor) -> None:
        """Drops the state of p's chosen rows (elements: sets it back to zero)."""
        state = self.state.get(p)
        if not state:
            return
        if not partial.is_row_mask(chosen):
            where = chosen.to(p.device)
            for key, value in state.items():
                if key != "step" and isinstance(value, Tensor):
                    value[where] = 0
            return
        local, start = self._local_rows(p)
        if not partial.is_row_state(state):
            partial.to_row_state(state, local)
        partial.take_state_rows(state, ~chosen[start:start + local.shape[0]][state[partial.ROWS_KEY]])

    def _settle_row_state(self, p: Tensor) -> None:
        """A param that trains whole again goes back to torch.optim's state layout when its
        row state covers every row with one step count (else it keeps per-row counts)."""
        state = self.state.get(p)
        if state and partial.is_row_state(state) and not _is_dtensor(p):  # (a DTensor's stays local)
            partial.to_plain_state(state, p.shape[0])

    def _refresh_masks(self, groups: Iterable[int] | None = None) -> None:
        """Brings the masks of the given groups (all by default) in line with the frozen set.

        A mask is rewritten in place when its size and device allow it, so a
        compiled step or a captured graph that reads it sees the change.
        """
        self._frozen_version += 1
        count = len(self.param_groups)
        if len(self._plans) != count:  # groups appended or deleted: everything is derived again
            self._plans, self._pending, self._plan_keys = [None] * count, [[] for _ in range(count)], {}
            self._apart = [[] for _ in range(count)]
            self._plan_sets = []
            del self._masks[count:]
            groups = None
        for gi in range(count) if groups is None else groups:
            group = self.param_groups[gi]
            flags = torch.tensor([p in self._frozen for p in group["params"]], dtype=torch.uint8)
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            if gi < len(self._masks) and self._masks[gi].numel() == flags.numel() and self._masks[gi].device == device:
                _write_mask(self._masks[gi], flags)
            elif gi < len(self._masks):
                self._masks[gi] = flags.to(device)
            else:
                self._masks.append(flags.to(device))
        for cache in (self._row_pieces, self._device_masks):
            for p in [p for p in cache if p not in self._partial]:
                del cache[p]
        for p in {*self._partial, *self._row_flags}:
            self._update_row_flags(p)
        self._invalidate(groups)

    def _update_row_flags(self, p: Tensor) -> None:
        """p's device row flags, in place when they exist (a captured step reads them)."""
        mask = self._partial.get(p)
        if _is_dtensor(p) or (mask is not None and not partial.is_row_mask(mask)):
            return
        flags = mask.to(torch.uint8) if mask is not None else \
            torch.full((p.shape[0],), p in self._frozen, dtype=torch.uint8)
        old = self._row_flags.get(p)
        if old is not None and old.numel() == flags.numel() and old.device == p.device:
            _write_mask(old, flags)
        else:
            self._row_flags[p] = flags.to(p.device)

    def _invalidate(self, groups: Iterable[int] | None = None) -> None:
        """After a change of ours: the plans of those groups (all by default) are built
        again at the next step, and the watch records what Python holds now. A plan shared
        with other groups is dropped for them too, so nothing keeps its tensors alive."""
        dropped = {id(self._plans[gi]) for gi in (range(len(self._plans)) if groups is None else groups)}
        if dropped:
            self._plans = [None if id(plan) in dropped else plan for plan in self._plans]
            self._plan_sets = [(gis, plan) for gis, plan in self._plan_sets if id(plan) not in dropped]
        self._params = self._all_params()
        self._positions: dict[int, tuple[int, int]] | None = None  # built on demand by _in_place_since_sync
        self._snapshot()

    # ------------------------------------------------------------------- state

    @torch._disable_dynamo  # as torch.optim's own
    @_synced
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout, plus the frozen set under ``"frozen"``.

        ``{"params": [ids], "names": [names], "partial": {"params": [ids], "masks": [...]}}``:
        the ids are those of ``"state"`` and of the groups' ``"params"`` (unambiguous even
        when groups repeat bare names such as "weight") and decide what a load freezes;
        the names are for reading; ``"partial"`` (when some are) holds the params frozen in part with their
        masks (rows: ``[shape[0]]``, elements: the param's shape). The state of a param with
        row state has its rows only: see ``frozenopt.optim.partial.expand_row_state`` for
        torch.optim's layout. ``state_dict`` post-hooks see the entry.
        """
        with hooks_held(self, "_optimizer_state_dict_post_hooks"):
            state = super().state_dict()
        index = self._name_index()
        ids = [k for group in state["param_groups"] for k in group["params"]]
        frozen = [i for i, p in enumerate(index.params) if p in self._frozen]
        state["frozen"] = {"params": [ids[i] for i in frozen], "names": [index.param_name(i) for i in frozen]}
        if self._partial:
            state["frozen"]["partial"] = partial_entry(self, ids)
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    @torch._disable_dynamo  # as torch.optim's own
    @_synced
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a frozenopt or torch.optim checkpoint; a frozenopt one restores its frozen set.

        As in torch.optim, load pre-hooks run first (they may rewrite ``"frozen"``), then
        everything is checked before anything changes, and post-hooks run last (they see
        the loaded frozen set). The optimizer keeps its own param names (torch.optim would
        take the checkpoint's). Older checkpoints list the frozen params by name only; a
        name that several params share is refused unless all or none of them are frozen.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        check_loadable(self, state_dict)
        frozen = loaded_frozen(self, state_dict)
        masks = loaded_partial(self, state_dict)
        own = [{k: g[k] for k in PARAM_KEYS if k in g} for g in self.param_groups]
        # Row state's row indices go around torch.optim's load, which would cast them to the param's dtype.
        saved = state_dict["state"]
        rows = {k: entry[partial.ROWS_KEY] for k, entry in saved.items() if partial.ROWS_KEY in entry}
        loadable = {k: {n: v for n, v in entry.items() if n != partial.ROWS_KEY} if k in rows else entry
                    for k, entry in saved.items()}
        with hooks_held(self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            super().load_state_dict({**{k: v for k, v in state_dict.items() if k != "frozen"}, "state": loadable})
        by_id = dict(zip((k for g in state_dict["param_groups"] for k in g["params"]), self._all_params()))
        for k, value in rows.items():
            self.state[by_id[k]][partial.ROWS_KEY] = value.to("cpu", torch.int64, copy=True)
        for group, keys in zip(self.param_groups, own):
            for k in PARAM_KEYS:
                group.pop(k, None)
            group.update(keys)
        self._invalidate_names()
        if frozen is not None:
            everything = range(len(self._all_params()))
            self._set_frozen([i for i in everything if i in frozen], True)
            self._set_frozen([i for i in everything if i not in frozen], False)
        params = self._all_params()
        for i, mask in masks.items():
            self._put_partial(params[i], mask)
        if masks:
            self._refresh_masks()
        self._invalidate()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # -------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step over the unfrozen params that have a grad."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if torch.compiler.is_compiling():
            self._step_traced(grad_scale, found_inf)
            return loss
        try:
            self._sync()
            if self._capturing():
                self._step_traced(grad_scale, found_inf)
                return loss
            if self._sharded:
                for group in self.param_groups:  # a bad group fails the step before any group moves
                    self._check_hyper(group)
                self._step_sharded(grad_scale, found_inf)
            else:
                self._step_eager(grad_scale, found_inf)
        except BaseException:
            # GradScaler sets grad_scale/found_inf for one step() and deletes them only after
            # a step that returned: left behind, they would rescale the next plain step().
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise
        return loss

    def _step_eager(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        rows = self._plan_rows()  # a bad group fails the step before any group moves
        built = None in self._plans
        plan_sets = self._current_plan_sets()
        fresh_by_group = [[p for p in pending if p.grad is not None] for pending in self._pending] \
            if any(self._pending) else [[]] * len(self._pending)
        apart_by_group = [[p for p in apart if p.grad is not None] for apart in self._apart] \
            if any(self._apart) else [[]] * len(self._apart)
        # Every grad is checked before anything is allocated or moves, so a bad
        # grad in any group leaves the optimizer as it was. (The params stepped
        # apart step after the plans, which check their own grads first.)
        for params in fresh_by_group + apart_by_group:
            if params:
                self._extension.check_grads(params, [p.grad for p in params])
        if len(plan_sets) > 1 or any(fresh_by_group):
            for _, plan in plan_sets:
                plan.check_grads()
        for gi, group in enumerate(self.param_groups):
            fresh = fresh_by_group[gi]
            if fresh:
                for p in fresh:
                    self.state[p].update(self._new_state(p, group))
                self._run_op(group, fresh, None, fresh, grad_scale, found_inf)
                if self._first_step_skip_needs_host(group, found_inf) and bool(found_inf):
                    # GradScaler skipped this first step: the state it made goes, as in torch.optim
                    # (where the optimizer says a kept zero state would change the next step).
                    for p in fresh:
                        self.state.pop(p, None)
        for gis, plan in plan_sets:
            scale = on_device_of(self.param_groups[gis[0]], grad_scale, found_inf)
            getattr(plan, self._op)([rows[gi] for gi in gis], *scale)
        for gi, params in enumerate(apart_by_group):
            if params:
                self._step_apart(self.param_groups[gi], params, grad_scale, found_inf)
        # Building a plan may have normalised loaded state, and fresh params now
        # have state (they join their plan at the next step).
        if built or any(fresh_by_group):
            self._invalidate([gi for gi, fresh in enumerate(fresh_by_group) if fresh])

    def _step_apart(self, group: dict[str, Any], params: list[Tensor], grad_scale: Tensor | None,
                    found_inf: Tensor | None) -> None:
        """One step of a group's params that are frozen in part or hold row state, in one op call:
        their trainable rows as views or gathered (frozen rows are not touched), or, for a mask
        of elements, the whole param with its frozen elements and their state put back after."""
        views: list[Tensor] = []
        grads: list[Tensor] = []
        states: list[dict[str, Any]] = []
        first: list[bool] = []
        spread: list[tuple[Tensor, slice | Tensor, int]] = []  # per-row step counts a piece's first row stands for
        written: list[tuple[Tensor, Tensor, Tensor]] = []  # gathered rows to write back
        put_back: list[tuple[Tensor, Tensor, Tensor]] = []
        made: list[tuple[Tensor, Tensor | None]] = []  # params whose state (rows) this step made
        for p in params:
            mask = self._partial.get(p)
            if mask is not None and not partial.is_row_mask(mask):
                fresh = not self._has_state(p, group)
                if fresh:
                    self.state[p].update(self._new_state(p, group))
                    made.append((p, None))
                state = self._state_of(p, group)
                kept = self._device_mask(p, mask)
                for t in (p, *(v for k, v in state.items() if k != "step" and isinstance(v, Tensor))):
                    put_back.append((t, kept, t[kept]))
                views.append(p)
                grads.append(p.grad)
                states.append(state)
                first.append(fresh)
                continue
            local, start = self._local_rows(p)
            mask = None if mask is None else mask[start:start + local.shape[0]]
            state, new_rows = _NO_STATE, None
            if self._keeps_state(group):
                state = self.state.get(p, _NO_STATE)
                if self._cached_pieces(p, state) is None:  # else the rows that train all had state
                    state, new_rows = self._row_state(p, local, mask, group)
            if new_rows is not None:
                made.append((p, new_rows))
            grad = ops.local_tensor(p.grad)
            for piece in self._pieces_of(p, local, mask, state, new_rows):
                # A slice gives a view; index tensors gather a copy, written back after the step.
                views.append(_rows_of(local, piece.rows))
                grads.append(_rows_of(grad, piece.rows))
                if not isinstance(piece.rows, slice):
                    written.append((local, piece.rows, views[-1]))
                rows_state = {}
                for key, value in state.items():
                    if key == partial.ROWS_KEY:
                        continue
                    if key == "step":
                        rows_state[key] = value[piece.first]
                        if piece.count > 1:
                            spread.append((value, piece.states, piece.first))
                    else:
                        rows_state[key] = _rows_of(value, piece.states)
                        if not isinstance(piece.states, slice):
                            written.append((value, piece.states, rows_state[key]))
                states.append(rows_state)
                first.append(piece.fresh)
        if views:
            self._run_lists(group, views, grads, self._lists_of(states, group), None, first, grad_scale, found_inf)
        for t, index, rows in written:
            t.index_copy_(0, index, rows)
        for steps, where, at in spread:
            count = steps[at].clone()
            if isinstance(where, slice):
                steps[where].fill_(count)
            else:
                steps.index_fill_(0, where, count)
        for t, kept, saved in put_back:
            t[kept] = saved
        if made and self._first_step_skip_needs_host(group, found_inf) and bool(found_inf):
            # GradScaler skipped the first step of these rows: the state made for them goes (as in torch.optim).
            for p, new_rows in made:
                if new_rows is None:
                    self.state.pop(p, None)
                else:
                    partial.take_state_rows(self.state[p], ~new_rows)
        if made:
            self._invalidate([])  # the watch takes in the state made here

    def _local_rows(self, p: Tensor) -> tuple[Tensor, int]:
        """The tensor whose rows a step of p touches (a DTensor's local shard: whole rows) and the
        index of its first row among p's rows."""
        if not _is_dtensor(p):
            return p, 0
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return ops.local_tensor(p), offset[0]

    def _row_state(self, p: Tensor, local: Tensor, mask: Tensor | None,
                   group: dict[str, Any]) -> tuple[dict[str, Any], Tensor | None]:
        """p's state as row state over the rows of ``local`` (p, or its local shard) with a row for
        each trainable row (``mask``: its frozen rows; made at zero, as a first step starts, for
        rows that have none), and which state rows were made now (None: none)."""
        state = self.state.get(p, _NO_STATE)
        if not self._has_state(p, group):
            state = self.state[p]
            state.clear()
        elif not partial.is_row_state(state):
            partial.to_row_state(state, local)
        self._fill_row_state(local, group, state)
        need = torch.arange(local.shape[0]) if mask is None else (~mask).nonzero().flatten()
        have = state.get(partial.ROWS_KEY)
        new = need if have is None else need[~torch.isin(need, have)]
        if new.numel() == 0:
            return state, None
        partial.add_state_rows(state, new, self._fresh_rows(local, group, new.numel()))
        return state, torch.isin(state[partial.ROWS_KEY], new)

    def _fresh_rows(self, p: Tensor, group: dict[str, Any], count: int) -> dict[str, Tensor]:
        """The state ``count`` rows of p start from, one step count per row."""
        fresh = self._new_state(p.narrow(0, 0, count), group)
        if "step" in fresh:
            fresh["step"] = torch.zeros(count, dtype=torch.float32, device=p.device)
        return fresh

    def _fill_row_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Row state the group's settings need more of (amsgrad turned on) gets it at zero, and a
        loaded step count becomes float32 on the param's device, as the kernels read it."""
        rows = state.get(partial.ROWS_KEY)
        count = 0 if rows is None else rows.numel()
        missing = [k for k in self._new_state(p.narrow(0, 0, 0), group) if k not in state]
        if missing and rows is not None:
            fresh = self._fresh_rows(p, group, count)
            state.update({k: fresh[k] for k in missing})
        step = state.get("step")
        if isinstance(step, Tensor) and (step.dtype != torch.float32 or step.device != p.device):
            state["step"] = step.to(torch.float32, p.device)

    def _pieces_of(self, p: Tensor, local: Tensor, mask: Tensor | None, state: dict[str, Any],
                   new_rows: Tensor | None) -> list[partial.Piece]:
        """partial.row_pieces of the trainable rows of ``local`` (p or its local shard; ``mask``:
        its frozen rows), index tensors on its device; kept until p's mask or state rows change."""
        cached = self._cached_pieces(p, state)
        if new_rows is None and cached is not None:
            return cached
        rows = state.get(partial.ROWS_KEY)
        trainable = torch.ones(local.shape[0], dtype=torch.bool) if mask is None else ~mask
        steps = state["step"].cpu() if rows is not None and "step" in state else None
        pieces = partial.row_pieces(trainable, rows, steps, new_rows, math.prod(p.shape[1:]))
        for piece in pieces:
            for name in ("rows", "states"):
                index = getattr(piece, name)
                if isinstance(index, Tensor):
                    setattr(piece, name, index.to(local.device))
        if new_rows is None:
            self._row_pieces[p] = (self._partial.get(p), state, rows, pieces)
        return pieces

    def _cached_pieces(self, p: Tensor, state: dict[str, Any]) -> list[partial.Piece] | None:
        """p's pieces from its last step, while its mask, its state dict and its state rows are the same objects."""
        cached = self._row_pieces.get(p)
        if cached is None or cached[0] is not self._partial.get(p) or cached[1] is not state \
                or cached[2] is not state.get(partial.ROWS_KEY):
            return None
        return cached[3]

    def _device_mask(self, p: Tensor, mask: Tensor) -> Tensor:
        """An element mask on p's device, kept until the mask changes."""
        cached = self._device_masks.get(p)
        if cached is None or cached[0] is not mask:
            cached = self._device_masks[p] = (mask, mask.to(p.device))
        return cached[1]

    def _plan_rows(self) -> list[tuple]:
        """Each group's ``_plan_row``. A group is checked (``_check_hyper``) when its row
        differs from the one checked at the last step, or it has a tensor lr (whose
        value may change in place), so a bad group fails before anything moves; its plan
        is dropped then if its ``_plan_key`` changed (momentum turned on or off, amsgrad
        toggled: other state lists)."""
        rows = []
        checked = self._checked_rows
        for gi, group in enumerate(self.param_groups):
            try:
                row = self._plan_row(group)
            except Exception:
                self._check_hyper(group)  # raises the checks' message, where they see the problem
                raise
            if row[1] is not None or gi >= len(checked) or checked[gi] != row:
                self._check_hyper(group)
                if self._plan_keys.get(gi) != self._plan_key(group):
                    self._plans[gi] = None
            rows.append(row)
        self._checked_rows = rows
        return rows

    def _plan_row(self, group: dict[str, Any]) -> tuple:
        """The group's entry of a plan's step: (lr, tensor lr or None, *``_hyper(group)``)."""
        lr = group["lr"]
        if isinstance(lr, Tensor):
            return (0.0, on_device_of(group, lr)[0] if group["params"] else lr, *self._hyper(group))
        return (float(lr), None, *self._hyper(group))

    def _current_plan_sets(self) -> list[tuple[list[int], Any]]:
        """The step plans with the groups each steps: one plan for all the groups with params
        that share a device and a ``_plan_key`` (the state layout). The plan of a set in which
        some group's plan was dropped is built again; building notes each group's pending
        params (unfrozen, no state yet)."""
        if None not in self._plans:
            return self._plan_sets
        by_key: dict[Any, list[int]] = {}
        for gi, group in enumerate(self.param_groups):
            if group["params"]:
                by_key.setdefault((group["params"][0].device, self._plan_key(group)), []).append(gi)
            else:
                self._plans[gi], self._pending[gi], self._plan_keys[gi] = False, [], self._plan_key(group)
                self._apart[gi] = []
        old = {tuple(gis): plan for gis, plan in self._plan_sets}
        self._plan_sets = []
        for gis in by_key.values():
            plan = old.get(tuple(gis))
            if plan is None or any(self._plans[gi] is not plan for gi in gis):
                plan = self._build_plan(gis)
                for gi in gis:
                    self._plans[gi] = plan
                    self._plan_keys[gi] = self._plan_key(self.param_groups[gi])
            self._plan_sets.append((gis, plan))
        return self._plan_sets

    def _build_plan(self, gis: list[int]) -> Any:
        """A StepPlan over the unfrozen params with state of these groups (which share a
        device and a state layout); also notes each group's pending params and those it
        steps apart (frozen in part, or with row state)."""
        params: list[Tensor] = []
        group_of: list[int] = []
        states: list[list[Tensor]] | None = None
        for k, gi in enumerate(gis):
            group = self.param_groups[gi]
            unfrozen = [p for p in group["params"] if p not in self._frozen]
            self._apart[gi] = [p for p in unfrozen if self._is_apart(p)]
            if self._apart[gi]:
                apart = set(self._apart[gi])
                unfrozen = [p for p in unfrozen if p not in apart]
            ready = [p for p in unfrozen if self._has_state(p, group)]
            self._pending[gi] = [p for p in unfrozen if not self._has_state(p, group)]
            lists = self._state_lists(ready, group)
            states = lists if states is None else [a + b for a, b in zip(states, lists)]
            params += ready
            group_of += [k] * len(ready)
        return self._extension.StepPlan(self._op, params, states, group_of)

    def _is_apart(self, p: Tensor) -> bool:
        """Whether p is stepped apart from the plans: frozen in part, or holding row state."""
        return p in self._partial or partial.is_row_state(self.state.get(p, {}))

    def _step_traced(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        capturing = not torch.compiler.is_compiling() and self._capturing()
        for launch in self._traced_launches(capturing, grad_scale, found_inf):
            self._run_groups_op(launch)

    # Run outside the graph (a graph break before the ops): a compiled step then reads
    # no group's values, and editing one between steps compiles nothing again.
    @torch.compiler.disable
    def _traced_launches(self, capturing: bool, grad_scale: Tensor | None,
                         found_inf: Tensor | None) -> list[TracedLaunch]:
        """The traced step's op calls: one per device and state layout (SGD's params at their
        first momentum step apart), over the params with a grad of all its groups, with
        their masks and the group table, brought up to date here. Makes missing state.

        Params frozen in part (or with row state) are stepped here, outside the graph, by
        ``_step_apart`` (their masks and row step counts are read on the host); in a CUDA
        graph capture each is a launch of its own instead (``_rows_launch``)."""
        chosen: dict[tuple, list[tuple[int, list[int]]]] = {}  # (device, layout) -> (group, positions)
        apart_by_group: dict[int, list[Tensor]] = {}
        for gi, group in enumerate(self.param_groups):
            # In default mode frozen means requires_grad=False, read here as it is
            # now (a compiled step has no sync); in mask_only mode the mask says.
            positions = [i for i, p in enumerate(group["params"])
                         if p.grad is not None and (self._mask_only or p.requires_grad)]
            apart = [group["params"][i] for i in positions if self._is_apart(group["params"][i])]
            if apart:
                for p in apart if capturing else ():
                    self._check_rows_capturable(p, group)
                apart_by_group[gi] = apart
                positions = [i for i in positions if not self._is_apart(group["params"][i])]
            if not positions and not (apart and capturing):
                continue
            missing = [group["params"][i] for i in positions if not self._has_state(group["params"][i], group)]
            if missing and capturing:
                # A state made here would be zero-filled again at every replay
                # of the graph, and SGD's first-step rule would be baked in.
                raise RuntimeError(
                    f"{len(missing)} param(s) with a grad have no optimizer state yet (e.g. "
                    f"{self._name_of(missing[0])}, frozen since construction), and state cannot be "
                    "created inside a CUDA graph capture. Call opt.prepare_capture() before capturing "
                    "(it creates the state of every param, frozen ones included), or run an eager "
                    "step first.")
            chosen.setdefault((group["params"][0].device, self._plan_key(group)), []).append((gi, positions))
        tables = {key: self._group_table(*key, capturing) for key in chosen}  # checks: nothing moved yet
        launches = []
        for (device, layout), members in chosen.items():
            table = tables[device, layout]
            fresh: set[Tensor] = set()
            for gi, positions in members:
                group = self.param_groups[gi]
                for p in (group["params"][i] for i in positions):
                    if not self._has_state(p, group):
                        self.state[p].update(self._new_state(p, group))
                        fresh.add(p)
                if capturing:
                    self._note_capture(group)
            scale = on_device_of(self.param_groups[members[0][0]], grad_scale, found_inf)
            split_first = self._first_step_apart(layout)
            for first in (True, False) if split_first else (False,):
                params: list[Tensor] = []
                rows: list[int] = []
                masks: list[Tensor] = []
                states: list[list[Tensor]] | None = None
                for gi, positions in members:
                    group = self.param_groups[gi]
                    if split_first:
                        positions = [i for i in positions if (group["params"][i] in fresh) == first]
                    if not positions:
                        continue
                    mine = [group["params"][i] for i in positions]
                    lists = self._state_lists(mine, group)
                    states = lists if states is None else [a + b for a, b in zip(states, lists)]
                    params += mine
                    rows += [table.groups.index(gi)] * len(mine)
                    if self._mask_only:
                        masks.append(self._mask_for(gi, positions, capturing))
                if not params:
                    continue
                mask = None if not masks else masks[0] if len(masks) == 1 else torch.cat(masks)
                launches.append(TracedLaunch(params, [p.grad for p in params], states, mask, table.tensor,
                                             table.indices(tuple(rows), capturing), layout, first, *scale))
            if capturing:
                launches += [self._rows_launch(table, gi, p, layout, scale)
                             for gi, _ in members for p in apart_by_group.get(gi, ())]
        for gi, apart in () if capturing else apart_by_group.items():
            self._step_apart(self.param_groups[gi], [p for p in apart if p not in self._frozen], grad_scale, found_inf)
        return launches

    def _group_table(self, device: torch.device, layout: Any, capturing: bool) -> GroupTable:
        """The group table of the groups on ``device`` with this ``_plan_key``, holding their
        current values: rewritten in place when they changed (the groups checked first),
        which a CUDA graph capture cannot do."""
        gis = [gi for gi, g in enumerate(self.param_groups)
               if g["params"] and g["params"][0].device == device and self._plan_key(g) == layout]
        table = self._group_tables.get((device, layout))
        if table is None or table.groups != tuple(gis):
            table = self._group_tables[device, layout] = GroupTable(device, gis)
        rows, device_lrs = [], {}
        for row, gi in enumerate(gis):
            group = self.param_groups[gi]
            try:
                lr = on_device_of(group, group["lr"])[0]
                if isinstance(lr, Tensor) and lr.device == device:
                    device_lrs[row], lr = lr, 0.0
                rows.append((float(lr), *(float(v) for v in self._hyper(group))))
            except Exception:
                self._check_hyper(group)  # raises the checks' message, where they see the problem
                raise
        if table.stale(rows):
            if capturing:
                raise RuntimeError(
                    "frozenopt: the values of a param group changed since the group table that the "
                    "traced step reads was last written, and it cannot be written inside a CUDA graph "
                    "capture. Call opt.prepare_capture() before capturing, and again between replays "
                    "after editing a group's values.")
            for gi in gis:
                self._check_hyper(self.param_groups[gi])
        table.update(rows, device_lrs)
        return table

    def _check_rows_capturable(self, p: Tensor, group: dict[str, Any]) -> None:
        """Raise unless a CUDA graph can capture the step of p, frozen in part or with row state:
        rows only, each with its state (``prepare_capture`` makes it)."""
        mask = self._partial.get(p)
        if _is_dtensor(p) or (mask is not None and not partial.is_row_mask(mask)):
            raise RuntimeError(f"param {self._name_of(p)} is frozen in part by a mask of elements or is a DTensor, "
                               "and such a step cannot be captured in a CUDA graph: freeze or unfreeze it whole "
                               "before capturing")
        state = self.state.get(p, {})
        covered = not self._keeps_state(group) or (
            partial.is_row_state(state) and state[partial.ROWS_KEY].numel() == p.shape[0])
        if not covered or p not in self._row_flags:
            raise RuntimeError(f"param {self._name_of(p)} is frozen in part (rows=), and a CUDA graph steps each of "
                               "its rows, which all need optimizer state first: call opt.prepare_capture() after "
                               "freezing, before capturing")

    def _rows_launch(self, table: GroupTable, gi: int, p: Tensor, layout: Any, scale: list) -> TracedLaunch:
        """p's launch in a CUDA graph: every row as a tensor of its own with its own step count,
        skipped by the kernels where its flag in the device row mask (rewritten in place by
        freeze/unfreeze) is set, so replays follow later row freezes."""
        group = self.param_groups[gi]
        state = self.state.get(p, {}) if self._keeps_state(group) else {}
        per_row = [k for k in state if k != partial.ROWS_KEY]
        rows = range(p.shape[0])
        states = [{k: state[k][r] for k in per_row} for r in rows]
        return TracedLaunch([p[r] for r in rows], [p.grad[r] for r in rows], self._lists_of(states, group),
                            self._row_flags[p], table.tensor,
                            table.indices((table.groups.index(gi),) * len(rows), capturing=True), layout, False,
                            *scale)

    def _note_capture(self, group: dict[str, Any]) -> None:
        """Says, once per optimizer, what a CUDA graph of this step will not follow.

        The warnings name the user's ``step()`` call: 8 frames up, through
        ``_traced_launches`` and its ``torch.compiler.disable`` wrapper, ``_step_traced``,
        ``step`` and torch.optim's two wrappers of it."""
        if self._captured:
            return
        self._captured = True
        if not (isinstance(group["lr"], Tensor) and group["lr"].device.type == "cuda"):
            warnings.warn(
                "frozenopt: a CUDA graph is capturing step() with a float (or CPU tensor) lr: replays "
                "read the lr the optimizer's group table holds, which changes only when "
                "opt.prepare_capture() runs again, so LR schedulers will not change it on replay. Pass "
                "lr=torch.tensor(lr, device='cuda') to have replays read the current lr.", stacklevel=8)
        if not self._mask_only:
            warnings.warn(
                "frozenopt: a CUDA graph is capturing step() of an optimizer in default mode: params that "
                "are frozen now are not in the graph, and freeze() after the capture frees grads that "
                "replays still read. Build the optimizer with mask_only=True to freeze and unfreeze "
                "between replays (the graph covers every param and reads the mask on the device).",
                stacklevel=8)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none and self._captured:
            warnings.warn(
                "frozenopt: zero_grad(set_to_none=True) after step() was captured in a CUDA graph frees the "
                "grads that replays read; use zero_grad(set_to_none=False) and keep the grads static.",
                stacklevel=2)
        super().zero_grad(set_to_none)

    def _mask_for(self, gi: int, positions: list[int], capturing: bool) -> Tensor:
        """The group mask's entries at ``positions``, read from the group mask on the device.

        Every variant reads the mask tensor itself (a view or a gather kernel),
        so a graph captured with it follows later in-place freeze/unfreeze.
        None copies host data to the device: that is not allowed in a capture.
        """
        mask = self._masks[gi]
        if len(positions) == mask.numel():
            return mask
        if positions == list(range(positions[0], positions[0] + len(positions))):
            return mask.narrow(0, positions[0], len(positions))
        if capturing:
            return torch.stack([mask[i] for i in positions])
        if torch.compiler.is_compiling():
            # A constant of the graph: filling the cache below while tracing would
            # change what the guards saw and force a recompile on the next step.
            return mask.index_select(0, torch.tensor(positions, device=mask.device))
        key = (gi, tuple(positions))
        if key not in self._mask_subsets:
            self._mask_subsets[key] = torch.tensor(positions, device=mask.device)
        return mask.index_select(0, self._mask_subsets[key])

    @torch.no_grad()
    @_synced
    def prepare_capture(self) -> None:
        """Create the state of every param now, frozen ones included, before a CUDA graph capture.

        A captured ``step()`` covers every param that has a grad, frozen or not,
        so that ``mask_only`` freeze/unfreeze after the capture take effect on
        replay; their state must exist before the capture (made inside it, it
        would be zero-filled at every replay). The new state is what a first
        step would start from. For SGD with momentum, a buffer made here starts
        at zero and the first real step blends into it, which equals
        torch.optim's first step (the buffer takes the grad) only without
        dampening, so a group with momentum and dampening is refused. A param
        frozen by rows gets state for every row (a captured step steps each row
        as a tensor of its own, skipped on the device while its row is frozen).
        """
        for group in self.param_groups:  # checked first: a refusal changes nothing
            self._check_capturable(group)
        for key in {(g["params"][0].device, self._plan_key(g)) for g in self.param_groups if g["params"]}:
            self._group_table(*key, capturing=False)
        self.init_state()

    @torch.no_grad()
    @_synced
    def init_state(self, *targets: Any) -> None:
        """Create the state a first step would start from for the params the targets match
        (every param with no target) that have none, frozen ones included.

        Targets are what ``freeze`` takes. State that exists is kept (a loaded
        checkpoint's Adam step is only moved to the param's device as a float32
        tensor). For code that fills optimizer state in place, such as a
        distributed checkpoint loader; ``prepare_capture`` uses it before a CUDA
        graph capture.
        """
        index = self._name_index()
        chosen = {index.params[i] for i in resolve_targets(index, targets)} if targets else None
        for group in self.param_groups:
            params = [p for p in group["params"] if chosen is None or p in chosen]
            for p in [p for p in params if self._is_apart(p)]:  # state for every row, frozen ones too
                if self._keeps_state(group):
                    local, _ = self._local_rows(p)
                    self._row_state(p, local, None, group)
                self._update_row_flags(p)
            params = [p for p in params if not self._is_apart(p)]
            for p in params:
                if not self._has_state(p, group):
                    self.state[p].update(self._new_state(p, group))
            self._state_lists(params, group)
        self._invalidate()

    def _step_sharded(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """DTensor params (FSDP2, tensor parallel): the ops step each param's local shard.

        No StepPlan here (it reads ``param.grad()`` in C++, which for a DTensor is a
        wrapper with no storage of its own); the ops wrappers unwrap the shards.
        """
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p not in self._frozen]
            apart = [p for p in params if self._is_apart(p)]  # rows frozen: each rank steps its own
            if apart:
                params = [p for p in params if not self._is_apart(p)]
                self._step_apart(group, apart, grad_scale, found_inf)
            if not params:
                continue
            fresh = [p for p in params if not self._has_state(p, group)]
            for p in fresh:
                self.state[p].update(self._new_state(p, group))
            self._run_op(group, params, None, fresh, grad_scale, found_inf)

    # ------------------------------------------------------------------ hooks
    # What each optimizer fills in: its hyper-parameters, its state and the fused op it runs.

    def _check_hyper(self, group: dict[str, Any]) -> None:
        """Raise ValueError unless the group's hyper-parameters are valid (torch.optim's messages).

        Run on the constructor's defaults, on every group before each step, and on a
        checkpoint's groups before a load."""
        raise NotImplementedError

    def _check_state_entry(self, key: Any, entry: dict[str, Any]) -> None:
        """Raise ValueError when a checkpoint's state entry for one param cannot be loaded."""

    def _check_capturable(self, group: dict[str, Any]) -> None:
        """Raise ValueError when ``prepare_capture`` cannot create this group's state exactly."""

    def _keeps_state(self, group: dict[str, Any]) -> bool:
        """Whether the group's params have optimizer state (SGD without momentum has none)."""
        return True

    def _has_state(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether the param has the state a step needs (a fresh one gets ``_new_state``)."""
        raise NotImplementedError

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """The state a param starts from at its first step."""
        raise NotImplementedError

    def _state_lists(self, params: list[Tensor], group: dict[str, Any]) -> list[list[Tensor]]:
        """The params' state, one list per state tensor kind, as the op and the StepPlan take it."""
        return self._lists_of([self._state_of(p, group) for p in params], group)

    def _state_of(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """p's state as a step reads it (a loaded checkpoint's made ready for the kernels)."""
        return self.state.get(p, {})

    def _lists_of(self, states: list[dict[str, Any]], group: dict[str, Any]) -> list[list[Tensor]]:
        """State dicts (a param's, or views of its rows) as the op's state lists."""
        raise NotImplementedError

    def _plan_key(self, group: dict[str, Any]) -> Any:
        """What decides a group's state layout (a change rebuilds its plan); only groups
        with the same key (and device) share a plan. A function of ``_hyper``'s values:
        a group whose values did not change keeps its key."""
        return None

    # The fused update this optimizer runs: the StepPlan kind and the plan's method ("sgd", "adam").
    _op: str

    # The names of ``_hyper``'s values, as the fused update takes them.
    _hyper_names: tuple[str, ...]

    def _hyper(self, group: dict[str, Any]) -> tuple:
        """The group's hyper-parameters (lr apart) as numbers and flags, in ``_hyper_names``' order."""
        raise NotImplementedError

    def _kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's hyper-parameters as the fused op takes them (lr apart)."""
        return dict(zip(self._hyper_names, self._hyper(group)))

    def _run_op(self, group: dict[str, Any], params: list[Tensor], mask: Tensor | None, fresh: list[Tensor],
                grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """One step of these params (with grads and state) through the op; ``fresh``: those whose
        state was just made; ``mask``: their freeze flags, read on the device, or None."""
        fresh_set = set(fresh)
        self._run_lists(group, params, [p.grad for p in params], self._state_lists(params, group), mask,
                        [p in fresh_set for p in params], grad_scale, found_inf)

    def _run_lists(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                   states: list[list[Tensor]], mask: Tensor | None, first: list[bool], grad_scale: Tensor | None,
                   found_inf: Tensor | None) -> None:
        """The op over these lists (params or views of their rows); ``first``: per tensor, whether
        its state was just made."""
        raise NotImplementedError

    def _run_groups_op(self, launch: TracedLaunch) -> None:
        """One traced step of the launch's params through the ``*_groups_`` op."""
        raise NotImplementedError

    def _first_step_apart(self, layout: Any) -> bool:
        """Whether params whose state was just made take a call of their own (``first_step``)."""
        return False

    def _first_step_skip_needs_host(self, group: dict[str, Any], found_inf: Tensor | None) -> bool:
        """Whether the state made for a first step that GradScaler skipped must be dropped
        (which reads found_inf on the host)."""
        return False
