"""The group table of the traced step: every param group's values on the device.

The ``*_groups_`` ops (``frozenopt.ops``) step the params of many param groups
in one call; each param reads its group's row of a float64 table where the
table lies. The traced step (``torch.compile``, CUDA graph capture) keeps one
table per device and state layout and rewrites it in place only when a group's
values change, outside the compiled graph, so a compiled step takes new values
without being compiled again and a captured graph reads the table's current
contents at every replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor


class TracedLaunch(NamedTuple):
    """One ``*_groups_`` op call of the traced step: the params with a grad of the groups of
    one device and state layout, their grads, state lists and freeze flags (or None), the
    group table and each param's row in it, the layout (the optimizer's ``_plan_key``),
    whether the params' state was just made, and the AMP tensors on their device."""

    params: list[Tensor]
    grads: list[Tensor]
    states: list[list[Tensor]]
    mask: Tensor | None
    table: Tensor
    tensor_group: Tensor
    layout: Any
    first_step: bool
    grad_scale: Tensor | None
    found_inf: Tensor | None


class GroupTable:
    """The rows of some param groups on one device, and each step's row index per param.

    A row is ``(lr, *values)`` in the op's argument order (``frozenopt.ops``).
    A tensor lr on the table's device is copied into its row on that device at
    every ``update`` (so a captured copy reads it again at each replay); any
    other lr is a host value like the rest of the row.
    """

    def __init__(self, device: torch.device, groups: Sequence[int]) -> None:
        self.device = device
        self.groups = tuple(groups)  # the optimizer's group index of each row
        self.tensor: Tensor | None = None
        self._host_rows: list[tuple[float, ...]] | None = None
        self._indices: dict[tuple[int, ...], Tensor] = {}

    def stale(self, rows: list[tuple[float, ...]]) -> bool:
        """Whether the table does not hold these host values yet."""
        return self.tensor is None or rows != self._host_rows

    def update(self, rows: list[tuple[float, ...]], device_lrs: dict[int, Tensor]) -> Tensor:
        """Writes the rows whose host values changed (the whole table, in place, on the
        current stream: steps queued before it on that stream read the old values) and
        copies the device lrs (row -> one-element tensor) into their rows."""
        if self.stale(rows):
            host = torch.tensor(rows, dtype=torch.float64)
            if self.tensor is None:
                self.tensor = host.to(self.device)
            elif self.device.type == "cuda":
                # pinned: the copy is queued without waiting, and the host allocator
                # keeps the buffer until it has run
                self.tensor.copy_(host.pin_memory(), non_blocking=True)
            else:
                self.tensor.copy_(host)
            self._host_rows = rows
        for row, lr in device_lrs.items():
            self.tensor[row, 0].copy_(lr)
        return self.tensor

    def indices(self, rows_of_params: tuple[int, ...], capturing: bool) -> Tensor:
        """Each param's row as the op's int32 ``tensor_group``, cached per pattern. Under a
        CUDA graph capture a new pattern is built from fills (host data cannot be copied)."""
        cached = self._indices.get(rows_of_params)
        if cached is not None:
            return cached
        if capturing:
            counts: list[list[int]] = []
            for row in rows_of_params:
                if counts and counts[-1][0] == row:
                    counts[-1][1] += 1
                else:
                    counts.append([row, 1])
            return torch.cat([torch.full((n,), row, dtype=torch.int32, device=self.device) for row, n in counts])
        index = torch.tensor(rows_of_params, dtype=torch.int32, device=self.device)
        self._indices[rows_of_params] = index
        return index
