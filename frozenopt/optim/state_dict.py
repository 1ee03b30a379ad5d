"""What ``load_state_dict`` checks before anything changes, and how it reads the frozen set.

torch.optim's own ``load_state_dict`` loads what it can and fails half-way on the
rest; a frozenopt optimizer refuses a bad checkpoint whole, with an error naming
the entry, and leaves itself as it was.
"""

from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict, defaultdict
from typing import Any

import torch
from torch import Tensor

from frozenopt.optim import partial

# Group keys that describe the params rather than how to step them: a loaded
# checkpoint does not replace them.
PARAM_KEYS = ("param_names", "param_aliases")


@contextlib.contextmanager
def hooks_held(optimizer: torch.optim.Optimizer, *tables: str):
    """Empty these hook tables while torch.optim's method runs; the caller runs the hooks in torch's order."""
    held = {name: getattr(optimizer, name) for name in tables}
    try:
        for name in tables:
            setattr(optimizer, name, OrderedDict())
        yield
    finally:
        for name, hooks in held.items():
            setattr(optimizer, name, hooks)


def check_loadable(optimizer: Any, state_dict: Any) -> None:
    """Refuse, before anything changes, what torch.optim would load partly or wrongly."""
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"state_dict has no '{key}' entry: not an optimizer state_dict")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    owner: dict[Any, tuple[Tensor, dict[str, Any]]] = {}
    for group, saved in zip(optimizer.param_groups, saved_groups):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size "
                             "of optimizer's group")
        owner.update((k, (p, group)) for k, p in zip(saved["params"], group["params"]))
        optimizer._check_hyper({**group, **{k: v for k, v in saved.items() if k != "params" and k not in PARAM_KEYS}})
    extra = [k for k in state_dict["state"] if k not in owner]
    if extra:
        raise ValueError(f"state_dict has state for parameter ids {extra[:5]} that no param group lists")
    for k, entry in state_dict["state"].items():
        p, group = owner[k]
        if not isinstance(entry, dict):
            raise ValueError(f"state_dict state[{k}] must be a dict, got {type(entry).__name__}")
        if partial.ROWS_KEY in entry:
            partial.check_row_entry(entry, p, f"state_dict state[{k}]")
            continue
        for name, value in entry.items():
            if isinstance(value, Tensor) and name != "step" and value.shape != p.shape:
                raise ValueError(f"state_dict state[{k}][{name!r}] has shape {list(value.shape)} but its param "
                                 f"{optimizer._name_of(p)} has shape {list(p.shape)}")
        optimizer._check_state_entry(k, entry)


def loaded_frozen(optimizer: Any, state_dict: dict[str, Any]) -> set[int] | None:
    """Positions (optimizer order) of the params ``state_dict["frozen"]`` freezes; None without one."""
    frozen = state_dict.get("frozen")
    if frozen is None:
        return None
    if isinstance(frozen, dict):
        ids = frozen.get("params")
        if not isinstance(ids, (list, tuple)) or not all(isinstance(k, int) for k in ids):
            raise ValueError(f"state_dict['frozen']['params'] must be a list of param ids, got {ids!r}")
        position = {k: i for i, k in enumerate(k for g in state_dict["param_groups"] for k in g["params"])}
        unknown = [k for k in ids if k not in position]
        if unknown:
            raise ValueError(f"state_dict['frozen'] lists param ids {unknown[:5]} that no param group lists")
        return {position[k] for k in ids}
    if not isinstance(frozen, (list, tuple)) or not all(isinstance(n, str) for n in frozen):
        raise ValueError("state_dict['frozen'] must be a list of parameter names (older checkpoints) or "
                         f"{{'params': [param ids], 'names': [...]}}, got {frozen!r}")
    index = optimizer._name_index()
    by_name: dict[str, list[int]] = defaultdict(list)
    for i in range(len(index)):
        by_name[index.param_name(i)].append(i)
    unknown = [n for n in frozen if n not in by_name]
    if unknown:
        raise ValueError(f"state_dict['frozen'] names parameters this optimizer does not have: {unknown[:5]}")
    counts = Counter(frozen)
    ambiguous = [n for n, c in counts.items() if c != len(by_name[n])]
    if ambiguous:
        n = ambiguous[0]
        raise ValueError(
            f"state_dict['frozen'] lists {n!r} {counts[n]} time(s), but {len(by_name[n])} params of this "
            "optimizer are named so (param groups built from submodules repeat bare names): it cannot "
            "tell which are frozen. Rewrite the entry as {'params': [param ids]} (the ids of the "
            "checkpoint's param groups) with a load_state_dict pre-hook.")
    return {i for n in counts for i in by_name[n]}


def partial_entry(optimizer: Any, ids: list[int]) -> dict[str, list]:
    """``state_dict()["frozen"]["partial"]``: the params frozen in part, by their ids in
    ``ids`` (the state dict's, in optimizer order), and their masks."""
    chosen = [(k, optimizer._partial[p]) for k, p in zip(ids, optimizer._all_params()) if p in optimizer._partial]
    return {"params": [k for k, _ in chosen], "masks": [mask.clone() for _, mask in chosen]}


def loaded_partial(optimizer: Any, state_dict: dict[str, Any]) -> dict[int, Tensor]:
    """Positions (optimizer order) of the params ``state_dict["frozen"]["partial"]`` freezes in
    part, with their masks (rows: ``[shape[0]]``; elements: the param's shape)."""
    frozen = state_dict.get("frozen")
    entry = frozen.get("partial") if isinstance(frozen, dict) else None
    if entry is None:
        return {}
    ids, masks = (entry.get("params"), entry.get("masks")) if isinstance(entry, dict) else (None, None)
    if not isinstance(ids, (list, tuple)) or not isinstance(masks, (list, tuple)) or len(ids) != len(masks):
        raise ValueError("state_dict['frozen']['partial'] must be {'params': [param ids], 'masks': [bool tensors]} "
                         "with one mask per id")
    position = {k: i for i, k in enumerate(k for g in state_dict["param_groups"] for k in g["params"])}
    params = optimizer._all_params()
    out = {}
    for k, mask in zip(ids, masks):
        if k not in position:
            raise ValueError(f"state_dict['frozen']['partial'] lists param id {k!r}, which no param group lists")
        p = params[position[k]]
        shapes = ([p.shape[0]], list(p.shape)) if p.dim() else ()
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or list(mask.shape) not in shapes:
            raise ValueError(f"state_dict['frozen']['partial'] mask of param id {k} must be a bool tensor of shape "
                             f"[{p.shape[0] if p.dim() else 'rows'}] (rows) or {list(p.shape)} (elements)")
        out[position[k]] = mask.detach().to("cpu", copy=True)
    return out
