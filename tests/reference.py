"""A torch.optim twin of a frozenopt optimizer, for differential tests.

``Reference(opt)`` holds detached clones of ``opt``'s params, in the same param
groups with the same hyper-parameters, inside the torch.optim optimizer of the
same class. It keeps its own frozen set, resolved by its own (deliberately
simple) reading of frozenopt's name rules rather than by frozenopt.names, and
steps with ``grad=None`` for every frozen param: a frozen param is one that
torch.optim would see without a grad. ``check(opt)`` then asserts that
frozenopt and the reference agree on every param, every state tensor, the step
counters, the param groups, the frozen set and ``requires_grad``, and that a
frozen param and its state are bitwise what they were when it was frozen. After a check passes the reference
takes frozenopt's values (``sync``), so each step is compared from the same
starting point: two correct float implementations drift apart by rounding over
hundreds of steps, and that drift is not what is being tested.

Other tests may reuse it; tests/test_fuzz.py drives it with random programs.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from matrix import HALF, tolerance
from torch import Tensor, nn

__all__ = ["Reference", "clone_param", "state_bytes"]


def clone_param(p: Tensor, contiguous: bool = False) -> nn.Parameter:
    """A detached copy of ``p`` with the same sizes and strides (so the same layout quirks), or contiguous."""
    if contiguous:
        return nn.Parameter(p.detach().clone(memory_format=torch.contiguous_format), requires_grad=True)
    q = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype, device=p.device)
    q.copy_(p.detach())
    return nn.Parameter(q, requires_grad=True)


def _glob_regex(glob: str) -> re.Pattern[str]:
    # '*' and '?' stay within one dotted component, '**' crosses components.
    out = []
    i = 0
    while i < len(glob):
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^.]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^.]")
            i += 1
        elif glob[i] == "[" and "]" in glob[i + 2:]:  # a character class, '!' negates
            close = glob.index("]", i + 2)
            body = glob[i + 1:close]
            out.append("[^." + body[1:] + "]" if body[0] in "!^" else "[" + body + "]")
            i = close + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out))


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (each storage counted once)."""
    seen, total = set(), 0
    for s in opt.state.values():
        for v in s.values():
            if isinstance(v, Tensor):
                key = (v.untyped_storage().data_ptr(), v.device)
                if key not in seen:
                    seen.add(key)
                    total += v.untyped_storage().nbytes()
    return total


class Reference:
    """torch.optim twin of a frozenopt optimizer (see the module docstring).

    impl: "forloop" (torch.optim's single-tensor path), "foreach" or "fused".
    With "fused" the reference's params and grads are contiguous copies: torch
    2.13's fused CPU SGD/Adam give wrong results when a grad's strides differ
    from its param's or a param is not dense (found by this fuzzer, see
    docs/guarantees.md), so it is only an oracle for contiguous tensors.

    With "forloop" or "foreach", bfloat16/float16 params are stepped on float32
    twins (``work``) that are rounded to the half type after every step, state
    included: torch's update rule done in float32 and rounded once per step,
    which is what frozenopt (and torch's fused kernels) do. torch.optim's own
    for-loop on half tensors rounds after every op and drifts from both.
    """

    def __init__(self, opt: torch.optim.Optimizer, impl: str = "forloop") -> None:
        self.cls = getattr(torch.optim, type(opt).__name__)
        self.impl = impl
        self.mask_only = bool(getattr(opt, "mask_only", False))
        self.names: list[str | None] = []
        self.group_sizes: list[int] = []
        ours = []
        for g in opt.param_groups:
            self.names += g.get("param_names") or [None] * len(g["params"])
            self.group_sizes.append(len(g["params"]))
            ours += g["params"]
        self.params = [clone_param(p, contiguous=impl == "fused") for p in ours]
        self.work = [nn.Parameter(p.detach().float()) if impl != "fused" and p.dtype in HALF else p
                     for p in self.params]  # what the torch.optim optimizer steps
        self.initial_requires_grad = [p.requires_grad for p in ours]
        self.frozen: set[int] = {i for i, p in enumerate(ours) if not p.requires_grad}
        self.snapshots: dict[int, tuple[Tensor, dict[str, Tensor]]] = {}
        self.swaps: list[tuple[int, int, int]] = []  # (group, a, b): params swapped in a group's list
        self.scales: dict[tuple[int, str], float] = {}  # largest magnitude going into the last step
        self.opt = self._build(opt.param_groups)

    # ------------------------------------------------------------ building

    def _impl_flags(self) -> dict[str, Any]:
        return {"forloop": dict(foreach=False, fused=None), "foreach": dict(foreach=True, fused=None),
                "fused": dict(foreach=None, fused=True)}[self.impl]

    def _build(self, groups: Sequence[dict[str, Any]]) -> torch.optim.Optimizer:
        flat, start, ref_groups = self.work, 0, []
        # a tensor hyper-parameter shared by groups (a tensor lr in the defaults) stays shared
        clones: dict[int, Any] = {}
        for g, n in zip(groups, self.group_sizes):
            hyper = {k: (clones.setdefault(id(v), v.detach().clone()) if isinstance(v, Tensor) else copy.deepcopy(v))
                     for k, v in g.items() if k not in ("params", "param_names")}
            hyper.update(self._impl_flags())
            ref_groups.append({"params": flat[start:start + n], **hyper})
            start += n
        return self.cls(ref_groups, lr=ref_groups[0]["lr"])

    def groups_of(self) -> list[range]:
        out, start = [], 0
        for n in self.group_sizes:
            out.append(range(start, start + n))
            start += n
        return out

    # ------------------------------------------------------------ targets

    def resolve(self, targets: Iterable[Any], ours_params: Sequence[Tensor],
                modules: dict[int, nn.Module] | None = None) -> set[int]:
        """Indices matched by the targets, by the name rules: a plain name
        is a module prefix (cut at dots) or an exact param name; '*'/'?' globs
        stay within a component; a compiled regex must fullmatch a prefix;
        Modules and Parameters by identity."""
        found: set[int] = set()
        for t in targets:
            if isinstance(t, nn.Module):
                ids = {id(p) for p in t.parameters()}
                found |= {i for i, p in enumerate(ours_params) if id(p) in ids}
            elif isinstance(t, Tensor):
                found |= {i for i, p in enumerate(ours_params) if p is t}
            elif isinstance(t, re.Pattern) or any(c in t for c in "*?["):
                rx = t if isinstance(t, re.Pattern) else _glob_regex(t)
                found |= {i for i, n in enumerate(self.names)
                          if n is not None and any(rx.fullmatch(x) for x in _prefixes(n))}
            else:
                found |= {i for i, n in enumerate(self.names) if n is not None and t in _prefixes(n)}
        return found

    def name_of(self, i: int) -> str:
        return self.names[i] if self.names[i] is not None else f"<param {i}>"

    # ------------------------------------------------------------ the contract

    def freeze(self, indices: Iterable[int], release_state: bool = False) -> list[str]:
        """Freeze; returns the names that changed, in optimizer order (what frozenopt returns)."""
        indices = sorted(set(indices))
        changed = [i for i in indices if i not in self.frozen]
        if release_state:
            for i in indices:
                self.opt.state.pop(self.work[i], None)
                self.snapshots.pop(i, None)  # its state is legitimately gone
        self.frozen |= set(indices)
        return [self.name_of(i) for i in changed]

    def unfreeze(self, indices: Iterable[int], reset_state: bool = False) -> list[str]:
        indices = sorted(set(indices))
        changed = [i for i in indices if i in self.frozen]
        if reset_state:  # only the params it thaws: one that was training keeps its state
            for i in changed:
                self.opt.state.pop(self.work[i], None)
        self.frozen -= set(indices)
        for i in changed:
            self.snapshots.pop(i, None)
        return [self.name_of(i) for i in changed]

    def swap(self, a: int, b: int) -> None:
        """Params a and b (of one group, in optimizer order) trade places, as frozenopt's did."""
        for seq in (self.names, self.params, self.work, self.initial_requires_grad):
            seq[a], seq[b] = seq[b], seq[a]
        self.frozen = {b if i == a else a if i == b else i for i in self.frozen}
        self.snapshots = {b if i == a else a if i == b else i: v for i, v in self.snapshots.items()}
        self.scales = {(b if i == a else a if i == b else i, k): v for (i, k), v in self.scales.items()}

    def step(self, grads: Sequence[Tensor | None]) -> None:
        """One torch.optim step; frozen params get grad=None whatever ``grads`` holds."""
        for i, (p, g) in enumerate(zip(self.work, grads)):
            if g is None or i in self.frozen:
                p.grad = None
            else:
                p.grad = torch.empty_like(p).copy_(g.detach())  # laid out like its param
                self.scales[i, "grad"] = _amax(p.grad)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # torch's fused CPU path opens a parallel region per tensor
        try:
            self.opt.step()
        finally:
            torch.set_num_threads(threads)
        with torch.no_grad():
            for p, w in zip(self.params, self.work):
                if w is not p:  # round the float32 twin (and its state) once, to the half type
                    p.copy_(w)
                    w.copy_(p)
                    for k, v in self.opt.state.get(w, {}).items():
                        if k != "step" and isinstance(v, Tensor):
                            v.copy_(v.to(p.dtype))

    def set_lr(self, group: int, lr: Any) -> None:
        cur = self.opt.param_groups[group]["lr"]
        if isinstance(cur, Tensor):
            cur.fill_(float(lr))
        else:
            self.opt.param_groups[group]["lr"] = float(lr)

    def reload(self) -> None:
        """state_dict into a fresh torch.optim optimizer."""
        self.opt = self.load_fresh(self.opt.state_dict())

    def load_fresh(self, state_dict: dict[str, Any]) -> torch.optim.Optimizer:
        """A fresh torch.optim optimizer loaded from a (deep) copy of state_dict."""
        loaded = copy.deepcopy(state_dict)
        fresh = self._build(self.opt.param_groups)
        fresh.load_state_dict(loaded)
        if self.impl == "fused":  # torch's fused path needs state laid out like its (contiguous) param
            for st in fresh.state.values():
                for k, v in st.items():
                    if isinstance(v, Tensor) and k != "step":
                        st[k] = v.contiguous()
        for g in fresh.param_groups:
            g.update(self._impl_flags())
        return fresh

    # ------------------------------------------------------------ checking

    def check(self, opt: torch.optim.Optimizer, where: str = "", sync: bool = True) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # comparing is cheap on one thread, and costly when 2 contend
        try:
            self._check(opt, where)
            if sync:
                self.sync(opt)
        finally:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def sync(self, opt: torch.optim.Optimizer) -> None:
        """Take frozenopt's param and state values (already checked to match), and note the
        magnitudes going into the next step for the tolerance of the next check."""
        ours = [p for g in opt.param_groups for p in g["params"]]
        self.scales = {}
        for i, p in enumerate(ours):
            for t in {id(self.params[i]): self.params[i], id(self.work[i]): self.work[i]}.values():
                t.copy_(p)
            self.scales[i, "param"] = _amax(p)
            s_ours, s_ref = opt.state.get(p) or {}, self.opt.state.get(self.work[i]) or {}
            for k, v in s_ref.items():
                if k != "step" and isinstance(v, Tensor) and k in s_ours:
                    v.copy_(s_ours[k])
                    self.scales[i, k] = _amax(v)

    def _check(self, opt: torch.optim.Optimizer, where: str) -> None:
        ours = [p for g in opt.param_groups for p in g["params"]]
        assert len(ours) == len(self.params), where
        at = f" ({where})" if where else ""

        # the frozen set and requires_grad
        expect_frozen = [self.name_of(i) for i in sorted(self.frozen)]
        assert list(opt.frozen) == expect_frozen, f"frozen set {opt.frozen} != {expect_frozen}{at}"
        for i, p in enumerate(ours):
            want = self.initial_requires_grad[i] if self.mask_only else i not in self.frozen
            assert p.requires_grad == want, f"param {self.name_of(i)} requires_grad={p.requires_grad}{at}"

        # param groups: same hyper-parameters
        for gi, (g, r) in enumerate(zip(opt.param_groups, self.opt.param_groups)):
            for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize",
                      "betas", "eps", "amsgrad"):
                if k in r:
                    a, b = g[k], r[k]
                    a = float(a) if isinstance(a, Tensor) else a
                    b = float(b) if isinstance(b, Tensor) else b
                    assert a == b, f"group {gi} {k}: {a} != {b}{at}"

        for i, (p, q) in enumerate(zip(ours, self.params)):
            name = self.name_of(i)
            s_ours = opt.state.get(p) or {}
            s_ref = self.opt.state.get(self.work[i]) or {}
            if not s_ref and _is_fresh(s_ours):
                s_ours = {}  # Adam state allocated on a skipped (GradScaler) first step: the same as none
            assert set(s_ours) == set(s_ref), f"{name}: state keys {sorted(s_ours)} != {sorted(s_ref)}{at}"
            grad = self.scales.get((i, "grad"), 0.0)
            _close(p.detach(), q.detach(), f"{name}{at}", max(grad, self.scales.get((i, "param"), 0.0)))
            for k in s_ref:
                a, b = s_ours[k], s_ref[k]
                if k == "step":
                    assert float(a) == float(b), f"{name}: step {float(a)} != {float(b)}{at}"
                else:
                    assert a.shape == p.shape and a.dtype == p.dtype, f"{name}: {k} is {a.dtype} {a.shape}{at}"
                    _close(a, b.to(a.dtype), f"{name}.{k}{at}", max(grad, self.scales.get((i, k), 0.0)))

            # frozen is exact: bitwise what it was when it froze
            if i in self.frozen:
                if i not in self.snapshots:
                    self.snapshots[i] = (p.detach().clone(), {k: v.detach().clone() for k, v in s_ours.items()})
                else:
                    value, state = self.snapshots[i]
                    assert torch.equal(p.detach(), value), f"frozen {name} moved{at}"
                    assert set(state) == set(s_ours), f"frozen {name}: state keys changed{at}"
                    for k, v in state.items():
                        assert torch.equal(s_ours[k], v), f"frozen {name}: state {k} changed{at}"
            else:
                self.snapshots.pop(i, None)


def _is_fresh(state: dict[str, Any]) -> bool:
    """Adam state that no step has touched: step 0 and all-zero buffers."""
    return ("step" in state and float(state["step"]) == 0
            and all(not v.any() for k, v in state.items() if k != "step"))


def _amax(t: Tensor) -> float:
    """Largest finite magnitude in t (0 for an empty or all-nonfinite tensor)."""
    if t.numel() == 0:
        return 0.0
    m = float(t.detach().abs().amax())
    if not math.isfinite(m):
        finite = t[torch.isfinite(t)]
        m = float(finite.abs().amax()) if finite.numel() else 0.0
    return m


def _close(a: Tensor, b: Tensor, what: str, inputs: float = 0.0) -> None:
    """torch's tolerances for the dtype, elementwise, plus 4*rtol of the largest finite
    magnitude in b or in what went into the step (`inputs`: the grad, the tensor before the
    step): a rounding difference in (grad - exp_avg), or in p - lr*u when the result nearly
    cancels, is relative to those, not to the (possibly much smaller) result. NaN matches
    NaN, inf matches the same inf."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.numel() == 0 or torch.equal(a, b):
        return
    tol = tolerance(a.dtype)
    rtol, atol = tol["rtol"], tol["atol"]
    scale = max(_amax(b), inputs)
    if math.isfinite(float(b.abs().amax())):  # fast path: max(|a - b| - rtol*|b|) <= atol' (False when NaN)
        if float((a - b).abs_().sub_(b.abs().mul_(rtol)).amax()) <= atol + 4 * rtol * scale:
            return
    ok = torch.isclose(a, b, rtol=rtol, atol=atol + 4 * rtol * scale, equal_nan=True)
    if not bool(ok.all()):
        bad = ~ok
        k = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} {a.dtype} elements differ; first at flat index {k}: "
            f"ours {a.flatten()[k].item()!r} vs torch.optim {b.flatten()[k].item()!r}")
