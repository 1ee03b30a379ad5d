"""Resolve ``--freeze`` targets to parameter names, for the torch recipes.

The torch recipes have no ``opt.freeze``; they need the explicit list of
parameter names a target list covers. The rules mirror ``opt.freeze``:

- a plain name matches the module (or parameter) of that exact dotted name and
  everything under it: ``fc2`` matches ``fc2.weight`` but never ``fc20.weight``;
- a glob (``*``, ``?``, ``[...]``) is matched against every dotted prefix of
  every name; ``*`` and ``?`` stay inside one component, ``**`` crosses dots;
- ``re:PATTERN`` on the command line is a regular expression, full-matched
  against every dotted prefix.

The frozenopt recipes pass the same targets to ``opt.freeze`` and then check
that ``opt.frozen`` is exactly this list, so the two can never silently differ.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Union

Target = Union[str, "re.Pattern[str]"]

__all__ = ["parse_target", "resolve", "Target"]


def parse_target(text: str) -> Target:
    """A command-line target: ``re:PATTERN`` becomes a compiled regex."""
    if text.startswith("re:"):
        return re.compile(text[3:])
    return text


def _glob_regex(glob: str) -> re.Pattern[str]:
    parts: list[str] = []
    i = 0
    while i < len(glob):
        ch = glob[i]
        if ch == "*":
            j = i
            while j < len(glob) and glob[j] == "*":
                j += 1
            parts.append(".*" if j - i >= 2 else "[^.]*")
            i = j
            continue
        if ch == "?":
            parts.append("[^.]")
        elif ch == "[":
            end = glob.find("]", i + 2)
            if end == -1:
                parts.append(re.escape(ch))
            else:
                body = glob[i + 1:end]
                if body[:1] in ("!", "^"):
                    parts.append("[^." + re.escape(body[1:]).replace("\\-", "-") + "]")
                else:
                    parts.append("[" + re.escape(body).replace("\\-", "-") + "]")
                i = end + 1
                continue
        else:
            parts.append(re.escape(ch))
        i += 1
    return re.compile("".join(parts))


def _prefixes(name: str) -> Iterable[str]:
    pieces = name.split(".")
    for k in range(1, len(pieces) + 1):
        yield ".".join(pieces[:k])


def resolve(names: Sequence[str], targets: Iterable[Target]) -> list[str]:
    """Names (in model order) covered by any target; a target matching nothing is an error."""
    chosen = set()
    for target in targets:
        if isinstance(target, re.Pattern):
            pattern, word = target, target.pattern
        elif isinstance(target, str) and any(c in target for c in "*?["):
            pattern, word = _glob_regex(target), target
        elif isinstance(target, str):
            pattern, word = None, target
        else:
            raise TypeError(f"unsupported target {target!r}")
        hit = False
        for name in names:
            if pattern is None:
                ok = name == word or name.startswith(word + ".")
            else:
                ok = any(pattern.fullmatch(p) for p in _prefixes(name))
            if ok:
                chosen.add(name)
                hit = True
        if not hit:
            every = sorted({p for n in names for p in _prefixes(n)})
            close = difflib.get_close_matches(word, every, n=5, cutoff=0.4)
            hint = ("closest names: " + ", ".join(close)) if close else (
                "top-level names: " + ", ".join(sorted({n.split('.')[0] for n in names})))
            raise ValueError(f"--freeze target {word!r} matches no parameter; {hint}")
    return [n for n in names if n in chosen]
