"""``--freeze`` targets as parameter names, for the torch recipes.

The torch recipes have no ``opt.freeze``; they need the explicit list of
parameter names a target list covers, by ``opt.freeze``'s own rules
(``frozenopt.names``): ``fc2`` matches ``fc2.weight`` but never ``fc20.weight``,
globs match dotted prefixes (``*`` within one component, ``**`` across), and
``re:PATTERN`` on the command line is a regular expression.

The frozenopt recipes pass the same targets to ``opt.freeze`` and then check
that ``opt.frozen`` is exactly this list, so the two can never silently differ.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from frozenopt.names import NameIndex, resolve_targets

__all__ = ["parse_target", "resolve"]


def parse_target(text: str) -> str | re.Pattern[str]:
    """A command-line target: ``re:PATTERN`` becomes a compiled regex."""
    if text.startswith("re:"):
        return re.compile(text[3:])
    return text


def resolve(names: Sequence[str], targets: Iterable[str | re.Pattern[str]]) -> list[str]:
    """Names (in model order) covered by any target; a target matching nothing is an error."""
    return [names[i] for i in resolve_targets(NameIndex(names), list(targets))]
