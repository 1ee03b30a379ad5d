"""``opt.summary()``: what is trainable and what is frozen, per module, as a table.

Like PEFT's ``print_trainable_parameters()``, but one row per module: trainable and
frozen element counts, the trainable share, and the bytes of optimizer state the
module's params hold. The optimizer builds it (``FreezableOptimizer.summary``); this
module only groups and prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["FreezeSummary", "SummaryRow"]

UNNAMED = "(unnamed)"


@dataclass
class SummaryRow:
    """One row: a module (or a param held by the root module), counted in elements."""

    name: str
    trainable: int = 0
    frozen: int = 0
    state_bytes: int = 0

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def trainable_percent(self) -> float | None:
        return 100.0 * self.trainable / self.total if self.total else None


@dataclass
class FreezeSummary:
    """Rows in optimizer order, the total, and notes; ``str()`` is the table."""

    rows: list[SummaryRow]
    total: SummaryRow
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, names: Sequence[str | None], shown: Sequence[str], params: Sequence[Tensor], depth: int,
              frozen_elements: Callable[[Tensor], int], state_bytes: Callable[[Tensor], int]) -> FreezeSummary:
        """``names[i]``: the name of ``params[i]`` (None when it has none); ``shown[i]``: that name
        with a tied param's other names, ``"wte.weight (= lm_head.weight)"``."""
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be an int >= 1 (1: one row per top-level module), got {depth!r}")
        wrapper = _shared_prefix([n.split(".")[:-1] for n in names if n is not None])
        rows: dict[str, SummaryRow] = {}
        total = SummaryRow("total")
        for name, p in zip(names, params):
            key = UNNAMED if name is None else _row_name(name, len(wrapper) + depth)
            row = rows.setdefault(key, SummaryRow(key))
            frozen = frozen_elements(p)
            held = state_bytes(p)
            for r in (row, total):
                r.frozen += frozen
                r.trainable += p.numel() - frozen
                r.state_bytes += held
        notes = []
        tied = [s for n, s in zip(names, shown) if n is not None and s != n]
        if tied:
            notes.append(f"tied params are counted once, under their first name: {', '.join(tied)}")
        unnamed = sum(1 for n in names if n is None)
        if unnamed:
            notes.append(f"{unnamed} param(s) were given to the optimizer without names, so they are counted under "
                         f"{UNNAMED}: build the optimizer from the model or model.named_parameters() for one row "
                         "per module")
        return cls(list(rows.values()), total, notes)

    def __str__(self) -> str:
        header = ("module", "trainable", "frozen", "trainable %", "optimizer state")
        lines = [header, *(_cells(r) for r in self.rows), _cells(self.total)]
        widths = [max(len(line[c]) for line in lines) for c in range(len(header))]

        def fmt(line: tuple[str, ...]) -> str:
            return "  ".join([line[0].ljust(widths[0])] + [s.rjust(w) for s, w in zip(line[1:], widths[1:])])

        rule = "-" * len(fmt(header))
        body = [fmt(header), rule, *(fmt(line) for line in lines[1:-1]), rule, fmt(lines[-1])]
        return "\n".join(body + [f"note: {note}" for note in self.notes])

    __repr__ = __str__


def _shared_prefix(paths: list[list[str]]) -> list[str]:
    """The module path every param lies under (a wrapper such as PEFT's ``base_model.model``)."""
    if not paths:
        return []
    prefix = paths[0]
    for path in paths[1:]:
        n = 0
        while n < min(len(prefix), len(path)) and prefix[n] == path[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def _row_name(name: str, levels: int) -> str:
    """The module that holds the param, cut to ``levels`` components; a param of the root module is its own row."""
    module = name.split(".")[:-1]
    return ".".join(module[:levels]) if module else name


def _cells(row: SummaryRow) -> tuple[str, ...]:
    percent = row.trainable_percent
    return (row.name, f"{row.trainable:,}", f"{row.frozen:,}", "-" if percent is None else f"{percent:.2f}%",
            _bytes(row.state_bytes))


def _bytes(n: int) -> str:
    size, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
