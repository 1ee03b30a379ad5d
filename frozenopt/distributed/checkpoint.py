"""torch.distributed.checkpoint (DCP) save/load that keeps frozenopt's frozen set and state.

DCP's ``get_state_dict``/``set_state_dict`` rebuild the optimizer state dict in torch.optim's
layout, so two things need help:

- the frozen set (frozenopt's ``state_dict()["frozen"]``) is dropped: it is saved here beside
  the state, by name;
- DCP loads only the state entries the destination optimizer already has, and a fresh
  optimizer has none for params that are frozen (``requires_grad`` off): the state of a param
  that was trained and later frozen would be silently left out of the load. Here the names
  of the params that have state are saved too, and placeholders are made for exactly those
  before loading (zeros shaped and sharded like each param, then overwritten).

Works for plain tensors and FSDP2/DTensor params, in one process or many.
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint"]

_KEY = "frozenopt"


def _names(optimizer: Any) -> list[tuple[str, Any]]:
    named = optimizer.named_params()
    if any(name is None for name, _ in named):
        raise ValueError("save_checkpoint/load_checkpoint need an optimizer built with names "
                         "(a Module, named_parameters() or named param groups)")
    return named


def _frozen_names(optimizer: Any) -> list[str]:
    """The frozen params' own names (a tied param once, by its first name)."""
    return [n for n, p in _names(optimizer) if optimizer.is_param_frozen(p)]


def save_checkpoint(model: nn.Module, optimizer: Any, checkpoint_id: Any, *, extra: dict | None = None,
                    **save_kwargs: Any) -> None:
    """``dcp.save`` of the model, the optimizer, its frozen set and which params have state.

    ``extra`` entries (e.g. a scheduler's ``state_dict()``) are saved alongside under their keys.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    apart = [n for n, p in _names(optimizer) if optimizer._is_apart(p)]
    if apart:
        raise ValueError(f"save_checkpoint does not carry freezes of part of a param (rows=, mask=) or their "
                         f"row state yet ({apart[0]!r} has one): save opt.state_dict() with torch.save, or "
                         "freeze or unfreeze those params whole first")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    meta = {"frozen": _frozen_names(optimizer),
            "stateful": [n for n, p in _names(optimizer) if optimizer.state.get(p)]}
    state = {"model": model_sd, "optim": optim_sd, _KEY: json.dumps(meta), **(extra or {})}
    dcp.save(state, checkpoint_id=checkpoint_id, **save_kwargs)


def load_checkpoint(model: nn.Module, optimizer: Any, checkpoint_id: Any, *, extra: dict | None = None,
                    **load_kwargs: Any) -> dict:
    """Load what :func:`save_checkpoint` wrote into ``model`` and ``optimizer``; returns ``extra``, loaded.

    The optimizer ends with the saved frozen set and the saved state, including that of
    params that were trained and then frozen; params that had no state get none.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    head = {_KEY: ""}
    dcp.load(head, checkpoint_id=checkpoint_id, **load_kwargs)
    meta = json.loads(head[_KEY])
    stateful = set(meta["stateful"])
    named = _names(optimizer)
    unknown = (stateful | set(meta["frozen"])) - {n for n, _ in named}
    if unknown:
        raise ValueError(f"the checkpoint names params this optimizer does not have: {sorted(unknown)[:5]}")
    for name, p in named:
        if name not in stateful:
            optimizer.state.pop(p, None)
    placeholders = [p for name, p in named if name in stateful and not optimizer.state.get(p)]
    if placeholders:
        optimizer.init_state(placeholders)  # zero state shaped like each param: DCP loads into it
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, **(extra or {})}
    if stateful:
        state["optim"] = optim_sd
    dcp.load(state, checkpoint_id=checkpoint_id, **load_kwargs)
    set_model_state_dict(model, state["model"])
    if stateful:
        # DCP hands over only the state of params with requires_grad on, which frozen params
        # have off (frozenopt's default mode): turn it on for the load, then put it back.
        # strict=False: params with no saved state (never trained, or SGD without momentum)
        # are not an error; the placeholders above made sure nothing saved is left out.
        requires_grad = [(p, p.requires_grad) for _, p in named]
        try:
            for p, _ in requires_grad:
                p.requires_grad_(True)
            set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))
        finally:
            for p, flag in requires_grad:
                p.requires_grad_(flag)
    else:  # get_state_dict may have given it a zero-lr step to create state: drop it
        optimizer.state.clear()
    frozen, now = set(meta["frozen"]), set(_frozen_names(optimizer))
    if now - frozen:
        optimizer.unfreeze(*sorted(now - frozen))
    if frozen - now:
        optimizer.freeze(*sorted(frozen - now))
    return {k: state[k] for k in (extra or {})}
