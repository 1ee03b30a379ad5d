"""Freezing part of a param: rows along dim 0 (``rows=``) or single elements (``mask=``).

A partly frozen param is in no step plan; each step hands the ops views of it:

- rows: a run of consecutive trainable rows goes to the op as a view, scattered rows
  gathered into one tensor and written back (``row_pieces``): a frozen row is never
  read or written, and the work of a step scales with the trainable rows.
  Its optimizer state is *row state*: tensors of ``[k, *param.shape[1:]]`` for
  the k rows that have state, ``"state_rows"`` (int64, sorted) naming the param
  row of each, and for Adam ``"step"`` holding one count per state row, so that
  every row keeps its own bias correction, as if it were its own param. Rows
  frozen before their first step hold no state.
- elements (a mask of the param's shape): the whole tensor is stepped and the
  frozen elements of the param and of its state are put back as they were: exact,
  at the cost of a whole step; the state keeps torch.optim's layout and the
  param's single step count, which advances at every step of the param.

A 1-D param's mask is a row mask (its rows are its elements).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from frozenopt import ops

ROWS_KEY = "state_rows"

__all__ = ["ROWS_KEY", "rows_mask", "elements_mask", "is_row_mask", "is_row_state", "to_row_state",
           "take_state_rows", "add_state_rows", "to_plain_state", "Piece", "row_pieces", "check_row_entry",
           "expand_row_state"]


def is_row_mask(mask: Tensor) -> bool:
    return mask.dim() == 1


def is_row_state(state: dict[str, Any]) -> bool:
    return ROWS_KEY in state


def rows_mask(rows: Any, p: Tensor, name: str) -> Tensor:
    """``rows`` (an int, a slice, a sequence or 1-D integer tensor of row indices, or a 1-D
    bool tensor of length ``p.shape[0]``) as a CPU bool tensor over p's rows."""
    if p.dim() == 0:
        raise ValueError(f"param {name} is 0-dim: it has no rows to freeze; freeze it whole")
    n = p.shape[0]
    out = torch.zeros(n, dtype=torch.bool)
    if isinstance(rows, Tensor) and rows.dtype == torch.bool:
        if rows.shape != (n,):
            raise ValueError(f"rows= bool mask has shape {list(rows.shape)}, but param {name} has {n} rows: "
                             f"it must have shape [{n}]")
        return rows.detach().to("cpu", copy=True)
    if isinstance(rows, slice):
        out[rows] = True
        return out
    if isinstance(rows, bool):
        raise TypeError("rows= takes row indices or a bool tensor, not a bool")
    if isinstance(rows, int):
        rows = [rows]
    try:
        index = torch.as_tensor(rows if isinstance(rows, Tensor) else list(rows)).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"rows= must be an int, a slice, a sequence or 1-D tensor of row indices, or a "
                        f"1-D bool tensor; got {type(rows).__name__} ({error})") from None
    if index.numel() == 0:
        return out
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"rows= must hold integer row indices in one dimension, got a {index.dtype} tensor "
                        f"of shape {list(index.shape)}")
    bad = index[(index < -n) | (index >= n)]
    if bad.numel():
        raise IndexError(f"row {int(bad[0])} is out of range for param {name}, which has {n} rows")
    out[index.long()] = True
    return out


def elements_mask(mask: Any, p: Tensor, name: str) -> Tensor:
    """``mask`` (a bool tensor of p's shape) as a CPU bool tensor; a 1-D param's is a row mask."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask= must be a bool tensor of the param's shape, got {type(mask).__name__}"
                        + (f" of dtype {mask.dtype}" if isinstance(mask, Tensor) else ""))
    if mask.shape != p.shape:
        raise ValueError(f"mask= has shape {list(mask.shape)}, but param {name} has shape {list(p.shape)}")
    if p.dim() == 0:
        raise ValueError(f"param {name} is 0-dim: freeze it whole")
    return mask.detach().to("cpu", copy=True)


def _per_row(state: dict[str, Any]) -> list[str]:
    return [k for k, v in state.items() if k != ROWS_KEY and isinstance(v, Tensor)]


def to_row_state(state: dict[str, Any], p: Tensor) -> None:
    """Turns torch.optim's layout (tensors of p's shape, one step count) into row state covering
    every row of p (a DTensor param's local shard: its state becomes its local shards too)."""
    n = p.shape[0]
    for key, value in list(state.items()):
        if key == "step":
            state[key] = torch.full((n,), float(value), dtype=torch.float32, device=p.device)
        elif isinstance(value, Tensor):
            state[key] = ops.local_tensor(value)
    state[ROWS_KEY] = torch.arange(n)


def take_state_rows(state: dict[str, Any], keep: Tensor) -> None:
    """Keeps the state rows where ``keep`` (a CPU bool tensor over the state rows) is True."""
    index = keep.nonzero().flatten()
    for key in _per_row(state):
        state[key] = state[key].index_select(0, index.to(state[key].device))
    state[ROWS_KEY] = state[ROWS_KEY][index]


def add_state_rows(state: dict[str, Any], rows: Tensor, fresh: dict[str, Tensor]) -> None:
    """Adds state rows for param ``rows`` (sorted, none of them present), with the values of
    ``fresh`` (each ``[len(rows), ...]``), keeping the state rows sorted."""
    if not state:
        state.update(fresh)
        state[ROWS_KEY] = rows.clone()
        return
    joined = torch.cat([state[ROWS_KEY], rows])
    order = joined.argsort()
    for key in _per_row(state):
        value = torch.cat([state[key], fresh[key].to(state[key].dtype)])
        state[key] = value.index_select(0, order.to(value.device))
    state[ROWS_KEY] = joined[order]


def to_plain_state(state: dict[str, Any], n: int) -> None:
    """Back to torch.optim's layout when the row state covers all n rows with one step count
    (else it stays as it is)."""
    step = state.get("step")
    if state[ROWS_KEY].numel() != n or (isinstance(step, Tensor) and not bool((step == step[0]).all())):
        return
    if isinstance(step, Tensor):
        state["step"] = step[0].clone()
    del state[ROWS_KEY]


# Rows of a multiple of this many elements step together (in a run, or gathered): the CPU
# kernels then give each row the vector and scalar work it would get as its own tensor
# (their vector widths all divide it), so the bits are those of the rows stepped one by one.
# Narrower rows step one view each.
ROW_ALIGN = 64


@dataclass
class Piece:
    """Trainable rows a step hands the op as one tensor: a view when ``rows`` is a slice (a run
    of consecutive rows), else gathered by the index tensors ``rows`` (param rows) and ``states``
    (their state rows; a slice when those are consecutive), and written back after the step.
    ``first``: index of the state row whose step count the piece steps with (None: no state)."""

    rows: slice | Tensor
    states: slice | Tensor | None
    first: int | None
    fresh: bool  # its state was made at this step
    count: int  # rows


def row_pieces(trainable: Tensor, state_rows: Tensor | None, split: Tensor | None, fresh: Tensor | None,
               row_numel: int) -> list[Piece]:
    """The trainable rows as Pieces, one per value of ``split`` (one value per state row: the
    step count) and of ``fresh`` (per state row: made at this step), views where they are
    consecutive, and one view per row when rows are not a multiple of ROW_ALIGN elements."""
    rows = trainable.nonzero().flatten()
    if rows.numel() == 0:
        return []
    pos = None if state_rows is None else torch.searchsorted(state_rows, rows)
    key = torch.zeros(rows.numel(), dtype=torch.float64)
    if split is not None:
        key += split[pos].double() * 2
    if fresh is not None:
        key += fresh[pos].double()
    if row_numel % ROW_ALIGN:
        classes = [torch.tensor([i]) for i in range(rows.numel())]
    else:
        values, inverse = torch.unique(key, return_inverse=True)
        classes = [(inverse == v).nonzero().flatten() for v in range(values.numel())]
    pieces = []
    for members in classes:
        r = rows[members]
        first_row, count = int(r[0]), r.numel()
        whole = int(r[-1]) - first_row + 1 == count
        if pos is None:
            pieces.append(Piece(slice(first_row, first_row + count) if whole else r, None, None, False, count))
            continue
        p = pos[members]
        first = int(p[0])
        states = slice(first, first + count) if int(p[-1]) - first + 1 == count else p
        made = fresh is not None and bool(fresh[first])
        pieces.append(Piece(slice(first_row, first_row + count) if whole else r, states, first, made, count))
    return pieces


def check_row_entry(entry: dict[str, Any], p: Tensor, where: str) -> None:
    """Raise ValueError unless a checkpoint's row state entry fits param p."""
    rows = entry[ROWS_KEY]
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"{where}[{ROWS_KEY!r}] must be a 1-D int64 tensor of row indices")
    if p.dim() == 0:
        raise ValueError(f"{where} holds row state, but its param is 0-dim")
    rows = rows.cpu()
    n, k = p.shape[0], rows.numel()
    if k and (int(rows.min()) < 0 or int(rows.max()) >= n or not bool((rows[1:] > rows[:-1]).all())):
        raise ValueError(f"{where}[{ROWS_KEY!r}] must hold sorted, distinct rows in [0, {n})")
    for key in _per_row(entry):
        shape = [k] if key == "step" else [k, *p.shape[1:]]
        if list(entry[key].shape) != shape:
            raise ValueError(f"{where}[{key!r}] has shape {list(entry[key].shape)}; row state of {k} rows of "
                             f"a param of shape {list(p.shape)} needs {shape}")


def expand_row_state(state: dict[str, Any], p: Tensor) -> dict[str, Any]:
    """torch.optim's layout of one param's row state: tensors of p's shape, rows with no
    state at zero (what a first step starts from), and the highest step count of the rows.

    For reading or handing to code that expects torch.optim's layout; the per-row step
    counts (which torch.optim cannot hold) are lost.
    """
    rows = state[ROWS_KEY]
    out: dict[str, Any] = {}
    for key in _per_row(state):
        value = state[key]
        if key == "step":
            out[key] = value.max() if value.numel() else torch.zeros((), dtype=torch.float32, device=value.device)
            continue
        full = value.new_zeros(p.shape)
        full.index_copy_(0, rows.to(full.device), value)
        out[key] = full
    return out
