"""Turn user freeze/unfreeze "targets" into parameter indices.

The optimizer builds one ``NameIndex`` from its (name, param) lists and then
calls ``resolve_targets`` for every freeze/unfreeze request. Resolution either
returns the full set of indices or raises before returning anything, so the
caller can apply changes all-or-nothing.
"""

from __future__ import annotations

import collections.abc
import difflib
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["NameIndex", "resolve_targets", "describe", "names_exactly"]

_GLOB_CHARS = frozenset("*?[")
_ACCEPTED = (
    "str (name, module prefix or glob), re.Pattern, torch.nn.Module, "
    "torch.Tensor / nn.Parameter, or a list/tuple/set/generator of these"
)


class NameIndex:
    """Precomputed lookup tables over the optimizer's parameters.

    ``names[i]`` is the dotted name of ``params[i]`` (or None if unnamed).
    Without ``params`` the index holds names only (what the benchmark's torch
    recipes resolve), and a Module or tensor target matches nothing.
    ``aliases`` maps a param's name to the other names the model reaches the
    same tensor by (tied weights: ``{"wte.weight": ["lm_head.weight"]}``);
    every alias resolves like the name itself.
    Built once so that each resolve is a few dict lookups or one regex pass
    over the distinct prefixes, even for models with tens of thousands of
    parameters.
    """

    def __init__(self, names: Sequence[str | None], params: Sequence[torch.Tensor] | None = None,
                 aliases: dict[str, Sequence[str]] | None = None):
        names = list(names)
        names_only = params is None
        params = [None] * len(names) if names_only else list(params)
        if len(names) != len(params):
            raise ValueError(
                f"names and params must have the same length "
                f"(got {len(names)} names, {len(params)} params)"
            )
        self.names: list[str | None] = names
        # Keep references so id() values stay valid for the index's lifetime.
        self.params: list[torch.Tensor] = params

        self._id_to_index: dict[int, int] = {}
        for i, p in enumerate(() if names_only else params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] is {type(p).__name__}, expected a torch.Tensor")
            if id(p) in self._id_to_index:
                raise ValueError(f"params[{i}] is the same tensor as params[{self._id_to_index[id(p)]}]")
            self._id_to_index[id(p)] = i

        # Every dotted prefix of every name (including the full name) -> the
        # indices under it. "fc2" covers "fc2" and "fc2.*" but never "fc20.*",
        # because prefixes are cut only at dots.
        self._prefixes: dict[str, list[int]] = {}
        # Top-level components in first-seen order, for error hints.
        self._top_level: dict[str, None] = {}
        for i, name in enumerate(names):
            if name is None:
                continue
            if not isinstance(name, str) or not name:
                raise TypeError(f"names[{i}] must be a non-empty str or None, got {name!r}")
            self._add_prefixes(name, i)
        self.has_names = bool(self._prefixes)

        # Tied params: each alias is indexed like a name, and name_of shows them all,
        # e.g. "wte.weight (= lm_head.weight)", a string that resolves back to the param.
        self._aliases: dict[int, list[str]] = {}
        self._shown: dict[str, int] = {}
        position = {name: i for i, name in enumerate(names) if name is not None}
        for name, others in (aliases or {}).items():
            if name not in position:
                raise ValueError(f"aliases name {name!r}, which is not the name of a param")
            i = position[name]
            self._aliases[i] = list(others)
            for alias in others:
                self._add_prefixes(alias, i)
            self._shown[self.name_of(i)] = i

    def _add_prefixes(self, name: str, i: int) -> None:
        parts = name.split(".")
        self._top_level.setdefault(parts[0], None)
        for k in range(1, len(parts) + 1):
            self._prefixes.setdefault(".".join(parts[:k]), []).append(i)

    def __len__(self) -> int:
        return len(self.params)

    def param_name(self, i: int) -> str:
        """The param's name, or a stable placeholder for unnamed params."""
        name = self.names[i]
        return name if name is not None else f"<param {i}>"

    def name_of(self, i: int) -> str:
        """``param_name(i)``, followed by the aliases of a tied param: "wte.weight (= lm_head.weight)"."""
        aliases = self._aliases.get(i)
        if aliases:
            return f"{self.param_name(i)} (= {', '.join(aliases)})"
        return self.param_name(i)

    def index_of(self, tensor: torch.Tensor) -> int | None:
        """Index of this exact tensor object, or None if it is not indexed."""
        i = self._id_to_index.get(id(tensor))
        # Compare identity too, in case an id() was reused by a dead object.
        if i is not None and self.params[i] is tensor:
            return i
        return None

    # -- string/regex matching -------------------------------------------

    def _match_exact(self, target: str) -> list[int]:
        if target in self._shown:
            return [self._shown[target]]
        return self._prefixes.get(target, [])

    def _match_regex(self, pattern: re.Pattern[str]) -> set[int]:
        out: set[int] = set()
        for prefix, idxs in self._prefixes.items():
            if pattern.fullmatch(prefix):
                out.update(idxs)
        return out

    def _closest(self, word: str) -> str:
        candidates = list(self._prefixes)
        close = difflib.get_close_matches(word, candidates, n=5, cutoff=0.4)
        if close:
            return "closest names: " + ", ".join(repr(c) for c in close)
        top = list(self._top_level)[:5]
        return "top-level names: " + ", ".join(repr(c) for c in top)


def describe(target: Any) -> str:
    """Short human-readable form of a target, for error messages."""
    if isinstance(target, (str, re.Pattern)):
        return repr(target)
    if isinstance(target, torch.nn.Module):
        return f"Module({type(target).__name__})"
    if isinstance(target, torch.nn.Parameter):
        return f"Parameter(shape={tuple(target.shape)})"
    if isinstance(target, torch.Tensor):
        return f"Tensor(shape={tuple(target.shape)})"
    text = repr(target)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(target).__name__} {text}"


@functools.lru_cache(maxsize=256)
def _glob_to_regex(glob: str) -> re.Pattern[str]:
    """Compile a dotted-name glob: '*' and '?' stay inside one component,
    '**' crosses dots. fnmatch is not used because its '*' crosses dots."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if glob.startswith("**", i):
                out.append(".*")
                i += 2
                while i < n and glob[i] == "*":  # '***' is the same as '**'
                    i += 1
                continue
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            j = i + 1
            negate = j < n and glob[j] in "!^"
            if negate:
                j += 1
            if j < n and glob[j] == "]":  # ']' first in a class is literal
                j += 1
            close = glob.find("]", j)
            if close == -1:
                out.append(re.escape(c))  # unclosed '[' is just a character
            else:
                start = i + 2 if negate else i + 1
                body = "".join(ch if ch == "-" else re.escape(ch) for ch in glob[start:close])
                # A negated class must still not cross a component boundary.
                out.append(f"[^.{body}]" if negate else f"[{body}]")
                i = close + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def names_exactly(target: str | re.Pattern[str], name: str) -> bool:
    """Whether a name, glob or regex target names this dotted name itself, not a module above it.

    The rules of ``resolve_targets`` applied to one full name: an exact name, else a glob
    (a string with ``*``, ``?`` or ``[``) or a regex that matches the whole name.
    """
    if isinstance(target, re.Pattern):
        return target.fullmatch(name) is not None
    if target == name:
        return True
    return bool(_GLOB_CHARS.intersection(target)) and _glob_to_regex(target).fullmatch(name) is not None


def _flatten(targets: Any) -> Iterable[Any]:
    """Yield leaf targets from arbitrarily nested lists/tuples/sets/generators."""
    stack = [iter(targets)]
    while stack:
        try:
            t = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        # Modules and tensors are iterable-ish, so check them before containers.
        if isinstance(t, (list, tuple, set, frozenset, collections.abc.Iterator)) and not isinstance(
            t, (torch.nn.Module, torch.Tensor, str)
        ):
            stack.append(iter(t))
        else:
            yield t


def _resolve_one(index: NameIndex, target: Any) -> Iterable[int]:
    if isinstance(target, torch.nn.Module):
        found = [i for p in target.parameters() if (i := index.index_of(p)) is not None]
        if not found:
            raise ValueError(f"{describe(target)} has no parameters in this optimizer")
        return found

    if isinstance(target, torch.Tensor):
        i = index.index_of(target)
        if i is None:
            raise ValueError(f"{describe(target)} is not a parameter of this optimizer")
        return (i,)

    if isinstance(target, (str, re.Pattern)):
        if isinstance(target, str):
            if not target:
                raise ValueError("empty string is not a valid parameter name or prefix")
            if target.endswith("."):
                raise ValueError(f"{target!r} ends with '.'; use the prefix without the trailing dot")
        if not index.has_names:
            raise ValueError(
                f"cannot resolve {describe(target)} by name: the optimizer was built from plain "
                f"parameters, so freezing is by object only (pass a module or "
                f"named_parameters() to the optimizer to use names)"
            )
        if isinstance(target, re.Pattern):
            found = index._match_regex(target)
            word = target.pattern
        else:
            # The exact name of a module or param wins over a glob reading of it:
            # modules built from config keys may be called "layer[0]" or "a*b".
            found = index._match_exact(target)
            if not found and _GLOB_CHARS.intersection(target):
                found = index._match_regex(_glob_to_regex(target))
            word = target
        if not found:
            raise ValueError(f"no parameter matches {describe(target)}; {index._closest(word)}")
        return found

    raise TypeError(f"cannot freeze/unfreeze by {describe(target)}; expected {_ACCEPTED}")


def resolve_targets(index: NameIndex, targets: Iterable[Any]) -> list[int]:
    """Sorted, de-duplicated indices matched by any target.

    Raises ValueError/TypeError on the first bad target, before returning
    anything, so callers can apply freeze/unfreeze all-or-nothing. Nothing is
    mutated (except that generators passed as targets are consumed).
    """
    if isinstance(targets, (str, re.Pattern, torch.nn.Module, torch.Tensor)):
        targets = (targets,)  # tolerate a single bare target
    elif not isinstance(targets, (list, tuple, set, frozenset, collections.abc.Iterator)):
        raise TypeError(f"cannot freeze/unfreeze by {describe(targets)}; expected {_ACCEPTED}")
    found: set[int] = set()
    for t in _flatten(targets):
        found.update(_resolve_one(index, t))
    return sorted(found)
