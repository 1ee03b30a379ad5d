"""Differential fuzzing of frozenopt against torch.optim (tests/reference.py).

Hypothesis draws a whole program: a random model (1-40 params: 0-dim, empty,
transposed, sliced, permuted and large tensors, float32/float64 and, against
torch's fused path, the half types; some params born with requires_grad=False),
a way of handing it to the optimizer (Module, named_parameters, named or plain
param groups), an optimizer with random hyper-parameters, and 20-200
operations: steps with random/zero/stale/non-contiguous/missing grads (frozen
params get grads too), closure steps, grad=None steps, freeze/unfreeze of
random targets (names, module prefixes, globs, regexes, Modules, Parameters,
with release_state/reset_state), bare freeze(), freeze_to(n), state_dict
save+load into a fresh optimizer (ours into ours, torch.optim's into ours,
ours into torch.optim), lr changes, other hyper-parameters edited between
steps, and calls that must fail. After every
operation every param, state tensor, step counter, group hyper-parameter, the
frozen set and requires_grad match the reference, and frozen params and their
state are bitwise unchanged.

Profiles (FROZENOPT_FUZZ_PROFILE or pytest's --hypothesis-profile):
  fuzz-ci    (default) a bounded run for the normal suite
  fuzz-long  10,000 examples per process; scripts/fuzz.sh runs it.
FROZENOPT_FUZZ_COUNT=<file> appends one line per finished example (for the count).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import os
import random
import re
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from matrix import assert_same, snapshot
from reference import Reference
from torch import nn

import frozenopt

settings.register_profile(
    "fuzz-ci", max_examples=int(os.environ.get("FROZENOPT_FUZZ_EXAMPLES", "60")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], derandomize=False,
    print_blob=True)
settings.register_profile(
    "fuzz-long", max_examples=int(os.environ.get("FROZENOPT_FUZZ_EXAMPLES", "10000")), deadline=None,
    suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile(  # for debugging: report the first failure as found, unshrunk
    "fuzz-noshrink", max_examples=int(os.environ.get("FROZENOPT_FUZZ_EXAMPLES", "200")), deadline=None,
    suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.reuse, Phase.generate],
    report_multiple_bugs=False, database=None)
_PROFILE = settings.get_profile(os.environ.get("FROZENOPT_FUZZ_PROFILE", "fuzz-ci"))

# ----------------------------------------------------------------------------- the model

MODULE_PATHS = ["", "fc1", "fc2", "fc20", "enc", "enc.layer.0", "enc.layer.1", "enc.layer.10",
                "enc.layer.1.attn", "head"]
ROOT_LEAVES = ["fc", "scale", "temp"]
LEAVES = ["weight", "bias", "w"]
SHAPE_KINDS = ["scalar", "empty", "empty2", "vec", "mat", "transposed", "sliced", "permuted", "big"]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    path: str
    leaf: str
    kind: str
    dims: tuple
    dtype: str
    requires_grad: bool


@dataclasses.dataclass(frozen=True)
class Program:
    params: tuple
    handoff: str        # module | named | named_groups | plain | plain_groups
    splits: tuple       # param-group boundaries (indices into the param order)
    group_lrs: tuple    # per-group lr override or None
    opt: str
    hyper: tuple        # (key, value) pairs
    tensor_lr: bool
    mask_only: bool
    impl: str
    seed: int
    ops: tuple


def _names(specs) -> list[str]:
    """Param names in registration order, made unique per module like the builder does."""
    seen, out = set(), []
    for s in specs:
        base = f"{s.path}.{s.leaf}" if s.path else s.leaf
        name, k = base, 2
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        out.append(name)
    return out


def _make_tensor(spec: ParamSpec, gen: torch.Generator) -> torch.Tensor:
    dtype = getattr(torch, spec.dtype)
    a, b, c = spec.dims
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    kind = spec.kind
    if kind == "scalar":
        return randn(())
    if kind == "empty":
        return randn(0)
    if kind == "empty2":
        return randn(0, b)
    if kind == "vec":
        return randn(a * b)
    if kind == "mat":
        return randn(a, b)
    if kind == "transposed":  # dense, non-contiguous
        return randn(b, a).t()
    if kind == "sliced":  # non-dense: holes in its storage
        return randn(a, 2 * b)[:, ::2]
    if kind == "permuted":
        return randn(a, b, c).permute(2, 0, 1)
    if kind == "big":  # enough elements for the kernel to split work across threads
        return randn(300, 220 + a)
    raise AssertionError(kind)


def build_model(prog: Program) -> tuple[nn.Module, list[str], dict[str, nn.Module]]:
    gen = torch.Generator().manual_seed(prog.seed)
    root = nn.Module()
    modules = {"": root}
    names = _names(prog.params)
    for spec, name in zip(prog.params, names):
        mod = root
        for depth, part in enumerate(spec.path.split(".") if spec.path else []):
            path = ".".join(spec.path.split(".")[:depth + 1])
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
            modules[path] = mod
        leaf = name.rsplit(".", 1)[-1]
        mod.register_parameter(leaf, nn.Parameter(_make_tensor(spec, gen), requires_grad=spec.requires_grad))
    return root, [n for n, _ in root.named_parameters()], modules


def handoff(prog: Program, root: nn.Module) -> Any:
    named = list(root.named_parameters())
    bounds = [0, *prog.splits, len(named)]
    chunks = [named[a:b] for a, b in zip(bounds, bounds[1:])]
    if prog.handoff == "module":
        return root
    if prog.handoff == "named":
        return named
    if prog.handoff == "plain":
        return [p for _, p in named]
    groups = []
    for chunk, lr in zip(chunks, prog.group_lrs):
        group = {"params": chunk if prog.handoff == "named_groups" else [p for _, p in chunk]}
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
    return groups


def make_opt(prog: Program, root: nn.Module):
    hyper = dict(prog.hyper)
    if prog.tensor_lr:
        hyper["lr"] = torch.tensor(hyper["lr"], dtype=torch.float64)
    return getattr(frozenopt, prog.opt)(handoff(prog, root), mask_only=prog.mask_only, **hyper)


# ----------------------------------------------------------------------------- strategies


@st.composite
def param_specs(draw, half: bool):
    n = draw(st.integers(1, 40))
    dtypes = ["float32", "float64"] + (["bfloat16", "float16"] if half else [])
    specs = []
    for _ in range(n):
        path = draw(st.sampled_from(MODULE_PATHS))
        leaf = draw(st.sampled_from(ROOT_LEAVES if path == "" else LEAVES))
        kind = draw(st.sampled_from(SHAPE_KINDS[:-1]))
        dims = (draw(st.integers(1, 5)), draw(st.integers(1, 9)), draw(st.integers(1, 3)))
        specs.append(ParamSpec(path, leaf, kind, dims, draw(st.sampled_from(dtypes)),
                               draw(st.integers(0, 9)) != 0))
    # In one program in four, one param is large enough (> 2 x 32768 elements) for the kernel
    # to split the step across threads, with chunk boundaries inside tensors.
    if draw(st.integers(0, 3)) == 0:
        i = draw(st.integers(0, n - 1))
        specs[i] = dataclasses.replace(specs[i], kind="big")
    return tuple(specs)


def _hyper(draw, opt: str) -> dict[str, Any]:
    wd = draw(st.sampled_from([0.0, 0.0, 1e-2, 0.1]))
    if opt == "SGD":
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        dampening = 0.0 if nesterov else draw(st.sampled_from([0.0, 0.1, 0.5]))
        return dict(lr=draw(st.sampled_from([1e-3, 1e-2, 0.1, 0.5])), momentum=momentum, dampening=dampening,
                    weight_decay=wd, nesterov=nesterov, maximize=draw(st.booleans()))
    return dict(lr=draw(st.sampled_from([1e-4, 1e-3, 1e-2, 0.1])),
                betas=(draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.5, 0.99, 0.999]))),
                eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])), weight_decay=wd,
                amsgrad=draw(st.booleans()), maximize=draw(st.booleans()))


OP_KINDS = (["step"] * 10 + ["closure"] * 2 + ["step_none", "zero_grad"] + ["freeze"] * 4 + ["unfreeze"] * 3
            + ["unfreeze_all", "freeze_bare", "freeze_to", "reload", "load_torch", "to_torch",
               "lr", "lr", "hyper", "bad_target"]
            # what user and library code does to an optimizer between steps
            + ["user_requires_grad"] * 2 + ["state_edit", "data_swap", "swap_params", "deepcopy", "threads"])


def _target(draw, names: list[str], n_params: int, named: bool):
    kinds = ["param", "module"] + (["name", "name", "prefix", "glob", "regex", "star"] if named else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "param":
        return ("param", draw(st.integers(0, n_params - 1)))
    if kind == "module":
        return ("module", draw(st.sampled_from(MODULE_PATHS)))
    name = draw(st.sampled_from(names))
    parts = name.split(".")
    if kind == "name":
        return ("str", name)
    if kind == "prefix":
        return ("str", ".".join(parts[:draw(st.integers(1, len(parts)))]))
    if kind == "glob":
        k = draw(st.integers(0, len(parts) - 1))
        style = draw(st.sampled_from(["*", "?", "**"]))
        if style == "?":
            parts[k] = parts[k][:-1] + "?"
        elif style == "**":
            parts = parts[:k] + ["**"]
        else:
            parts[k] = "*"
        return ("str", ".".join(parts))
    if kind == "regex":
        return ("regex", draw(st.sampled_from([r"enc\.layer\.\d+", r"fc\d", r"fc\d+\.weight", r".*bias",
                                               re.escape(name)])))
    return ("str", "*")


@st.composite
def programs(draw, max_ops: int = 200):
    half = draw(st.integers(0, 4)) == 0
    specs = draw(param_specs(half))
    opt = draw(st.sampled_from(["SGD", "Adam", "AdamW"]))
    hyper = _hyper(draw, opt)
    names = _names(specs)
    n = len(specs)
    handoff_kind = draw(st.sampled_from(["module", "named", "named_groups", "plain", "plain_groups"]))
    splits: tuple = ()
    if handoff_kind.endswith("groups") and n > 1:
        k = draw(st.integers(0, min(2, n - 1)))
        splits = tuple(sorted(draw(st.sets(st.integers(1, n - 1), min_size=k, max_size=k))))
    group_lrs = tuple(draw(st.sampled_from([None, None, 1e-3, 0.05])) for _ in range(len(splits) + 1))
    tensor_lr = draw(st.integers(0, 5)) == 0
    # For the half types the oracle does the math in float32 and rounds once per step, as
    # frozenopt does: torch's fused Adam, or its for-loop on float32 twins (reference.py).
    # torch 2.13's fused CPU SGD is no oracle for them (it leaves all but the scalar tail of a
    # half tensor unchanged), nor when some momentum buffers exist and others not (it raises).
    if half:
        impls = ["fused", "forloop"] if opt != "SGD" else ["forloop"]
    else:
        impls = (["forloop"] * 3 + (["fused"] if opt != "SGD" or hyper["momentum"] == 0 else [])
                 + ([] if tensor_lr and opt != "SGD" else ["foreach"]))
    impl = draw(st.sampled_from(impls))
    named = handoff_kind != "plain" and handoff_kind != "plain_groups"
    ops = []
    for _ in range(draw(st.integers(20, max_ops))):
        kind = draw(st.sampled_from(OP_KINDS))
        if kind in ("step", "closure"):
            ops.append((kind, draw(st.integers(0, 2**31 - 1))))
        elif kind == "freeze":
            targets = tuple(_target(draw, names, n, named) for _ in range(draw(st.integers(1, 3))))
            ops.append(("freeze", targets, draw(st.integers(0, 3)) == 0))
        elif kind == "unfreeze":
            targets = tuple(_target(draw, names, n, named) for _ in range(draw(st.integers(1, 3))))
            ops.append(("unfreeze", targets, draw(st.integers(0, 3)) == 0))
        elif kind == "unfreeze_all":
            ops.append(("unfreeze_all", draw(st.integers(0, 3)) == 0))
        elif kind == "freeze_to":
            ops.append(("freeze_to", draw(st.integers(-3, 3))))
        elif kind == "lr":
            ops.append(("lr", draw(st.integers(0, len(splits))), draw(st.sampled_from([0.0, 1e-3, 0.02, 0.3]))))
        elif kind == "hyper":  # what OneCycleLR (momentum/betas) or a user edits mid-training
            if opt == "SGD":  # the fused SGD oracle keeps momentum 0 (see impls above)
                key = draw(st.sampled_from(["dampening", "weight_decay", "maximize"]
                                           + (["momentum"] if impl != "fused" else [])))
                value = {"momentum": st.sampled_from([0.0, 0.5, 0.9]), "dampening": st.sampled_from([0.0, 0.3]),
                         "weight_decay": st.sampled_from([0.0, 0.05]), "maximize": st.booleans()}[key]
            else:
                key = draw(st.sampled_from(["betas", "weight_decay", "eps", "maximize"]))
                value = {"betas": st.tuples(st.sampled_from([0.0, 0.85, 0.9]), st.sampled_from([0.9, 0.999])),
                         "weight_decay": st.sampled_from([0.0, 0.05]), "eps": st.sampled_from([1e-8, 1e-4]),
                         "maximize": st.booleans()}[key]
            ops.append(("hyper", draw(st.integers(0, len(splits))), key, draw(value)))
        elif kind == "user_requires_grad":
            ops.append((kind, draw(st.integers(0, n - 1)), draw(st.booleans())))
        elif kind == "state_edit":
            ops.append((kind, draw(st.integers(0, n - 1)), draw(st.sampled_from(["scale", "del", "clear", "new"]))))
        elif kind == "swap_params":
            ops.append((kind, draw(st.integers(0, len(splits))), draw(st.integers(0, n)), draw(st.integers(0, n))))
        elif kind == "threads":
            ops.append((kind, draw(st.sampled_from([1, 2]))))
        elif kind == "bad_target":
            ops.append(("bad_target", draw(st.sampled_from(["fc3", "enc.lay", "fc2.weight.x", "enc.layer.2",
                                                            "nothing.*", "fc2."]))))
        else:
            ops.append((kind,))
    return Program(specs, handoff_kind, splits, group_lrs, opt, tuple(hyper.items()), tensor_lr,
                   draw(st.booleans()), impl, draw(st.integers(0, 2**31 - 1)), tuple(ops))


# ----------------------------------------------------------------------------- running


def _grads(params, seed: int) -> None:
    """Give every param (frozen ones too) a grad of a random kind, or leave/clear it."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        kind = rng.choices(["rand", "none", "zero", "keep", "noncontig", "large", "tiny"],
                           [55, 10, 5, 10, 10, 5, 5])[0]
        if kind == "keep":
            continue
        if kind == "none":
            p.grad = None
            continue
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if kind == "zero":
            g.zero_()
        elif kind == "large":
            g *= 1e3
        elif kind == "tiny":
            g *= 1e-4
        g = g.to(p.dtype)
        if kind == "noncontig" and p.dim() >= 2:
            g = g.transpose(0, 1).contiguous().transpose(0, 1)
        p.grad = g


def _resolve_objects(targets, params, modules):
    out = []
    for kind, value in targets:
        if kind == "param":
            out.append(params[value])
        elif kind == "module":
            out.append(modules.get(value))
        elif kind == "regex":
            out.append(re.compile(value))
        else:
            out.append(value)
    return out


def _expect_error(ref: Reference, targets, params) -> bool:
    """Whether freeze/unfreeze(*targets) must raise: a target that matches nothing (or a name without names)."""
    named = any(n is not None for n in ref.names)
    for t in targets:
        if isinstance(t, (str, re.Pattern)) and not named:
            return True
        if not ref.resolve([t], params):
            return True
    return False


def _must_fail(opt, call, match: str) -> None:
    before = snapshot(opt)
    with pytest.raises((ValueError, TypeError), match=match):
        call()
    assert_same(before, snapshot(opt))


_counter_file = os.environ.get("FROZENOPT_FUZZ_COUNT")


def run_program(prog: Program) -> None:
    root, names, modules = build_model(prog)
    opt = make_opt(prog, root)
    ref = Reference(opt, prog.impl)
    params = [p for g in opt.param_groups for p in g["params"]]
    ref.check(opt, "construction")
    threads = torch.get_num_threads()
    try:
        for k, op in enumerate(prog.ops):
            where = f"op {k} {op!r}"
            try:
                opt = _run_op(prog, k, op, opt, ref, root, params, modules)
            except BaseException as error:
                error.add_note(f"at {where}")
                raise
            ref.check(opt, where)
    finally:
        torch.set_num_threads(threads)
    if _counter_file:
        with open(_counter_file, "a") as fh:
            fh.write(f"{len(prog.ops)}\n")


def _run_op(prog: Program, k: int, op: tuple, opt, ref: Reference, root, params, modules):
    """Apply one operation to frozenopt and to the reference; returns the (possibly new) optimizer."""
    where = f"op {k} {op!r}"
    n_groups = len(opt.param_groups)
    kind = op[0]
    if kind in ("step", "closure"):
        _grads(params, op[1])
        if kind == "closure":
            loss = opt.step(lambda: torch.tensor(float(k)))
            assert float(loss) == float(k)
        else:
            assert opt.step() is None
        ref.step([p.grad for p in params])
    elif kind == "step_none":
        for p in params:
            p.grad = None
        opt.step()
        ref.step([None] * len(params))
    elif kind == "zero_grad":
        opt.zero_grad(set_to_none=bool(k % 2))
    elif kind in ("freeze", "unfreeze"):
        targets = _resolve_objects(op[1], params, modules)
        if any(t is None for t in targets):
            return opt  # a module path this model does not have
        if _expect_error(ref, targets, params):
            _must_fail(opt, lambda: getattr(opt, kind)(*targets),
                       "no parameter matches|has no parameters|not a parameter|by name")
        elif kind == "freeze":
            changed = opt.freeze(*targets, release_state=op[2])
            assert changed == ref.freeze(ref.resolve(targets, params), release_state=op[2]), where
        else:
            changed = opt.unfreeze(*targets, reset_state=op[2])
            assert changed == ref.unfreeze(ref.resolve(targets, params), reset_state=op[2]), where
    elif kind == "unfreeze_all":
        assert opt.unfreeze(reset_state=op[1]) == ref.unfreeze(range(len(params)), reset_state=op[1])
    elif kind == "freeze_bare":
        if n_groups < 2:
            _must_fail(opt, opt.freeze, "freeze\\('\\*'\\)")
        else:
            assert opt.freeze() == ref.freeze([i for r in ref.groups_of()[:-1] for i in r])
    elif kind == "freeze_to":
        n = op[1]
        if n_groups < 2:
            _must_fail(opt, lambda: opt.freeze_to(n), "single param group")
        else:
            groups = ref.groups_of()
            want = ref.freeze([i for r in groups[:n] for i in r]) + ref.unfreeze([i for r in groups[n:] for i in r])
            assert opt.freeze_to(n) == want, where
    elif kind == "reload":
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        opt = _fresh_opt(prog, root, ref)
        opt.load_state_dict(torch.load(buf, weights_only=True))
        ref.reload()
    elif kind == "load_torch":
        # a torch.optim checkpoint into a fresh frozenopt: state and groups load; the frozen
        # set is the one the constructor derives (requires_grad), there being none saved.
        buf = io.BytesIO()
        torch.save(ref.opt.state_dict(), buf)
        buf.seek(0)
        opt = _fresh_opt(prog, root, ref)
        opt.load_state_dict(torch.load(buf, weights_only=True))
        if prog.mask_only:
            now = {i for i, rg in enumerate(ref.initial_requires_grad) if not rg}
            ref.unfreeze(ref.frozen - now)
            ref.freeze(now - ref.frozen)
        ref.snapshots.clear()  # the frozen params' state was legitimately replaced
    elif kind == "to_torch":
        ref.opt = ref.load_fresh(opt.state_dict())
    elif kind == "lr":
        gi = op[1] % n_groups
        lr = opt.param_groups[gi]["lr"]
        if isinstance(lr, torch.Tensor):
            lr.fill_(op[2])
        else:
            opt.param_groups[gi]["lr"] = op[2]
        ref.set_lr(gi, op[2])
    elif kind == "hyper":
        gi, key, value = op[1] % n_groups, op[2], op[3]
        group = opt.param_groups[gi]
        if group.get("nesterov") and (key == "momentum" and value == 0 or key == "dampening" and value != 0):
            old, group[key] = group[key], value
            _must_fail(opt, opt.step, "Nesterov")  # refused before anything moves
            group[key] = old
        else:
            group[key] = value
            ref.opt.param_groups[gi][key] = value
    elif kind == "user_requires_grad":
        # a user's toggle, PEFT's set_adapter, Lightning's finetuning callbacks: in default mode the
        # frozen set follows it (no grad, not stepped); in mask_only mode the mask alone decides
        i, flag = op[1], op[2]
        params[i].requires_grad_(flag)
        if prog.mask_only:
            ref.initial_requires_grad[i] = flag
        elif flag:
            ref.unfreeze([i])
        else:
            ref.freeze([i])
    elif kind == "state_edit":
        _edit_state(opt, ref, params, op[1], op[2])
    elif kind == "data_swap":
        # the "move optimizer state" idiom re-seats storages under the cached plans
        for p in params:
            for value in opt.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    value.data = value.data.clone()
            p.data = p.data.clone()
    elif kind == "swap_params":
        gi, a, b = op[1] % n_groups, op[2], op[3]
        size = len(opt.param_groups[gi]["params"])
        a, b = a % size, b % size
        for group in (opt.param_groups[gi], ref.opt.param_groups[gi]):
            _swap(group, a, b)
        ref.swaps.append((gi, a, b))
        start = sum(len(g["params"]) for g in opt.param_groups[:gi])
        ref.swap(start + a, start + b)
        params[start + a], params[start + b] = params[start + b], params[start + a]
    elif kind == "deepcopy":
        # a copy of the optimizer over the same params (its state copied) carries on
        opt = copy.deepcopy(opt, memo={id(p): p for p in params})
    elif kind == "threads":
        torch.set_num_threads(op[1])
    elif kind == "bad_target":
        msg = "by name|ends with" if all(x is None for x in ref.names) else "closest|top-level|ends with"
        _must_fail(opt, lambda: opt.freeze(op[1]), msg)
        _must_fail(opt, lambda: opt.unfreeze(op[1]), msg)
    else:
        raise AssertionError(kind)
    return opt


def _swap(group: dict, a: int, b: int) -> None:
    for key in ("params", "param_names"):
        if key in group:
            group[key][a], group[key][b] = group[key][b], group[key][a]


def _fresh_opt(prog: Program, root: nn.Module, ref: Reference):
    """A new frozenopt optimizer with the params in the order the running one has them."""
    opt = make_opt(prog, root)
    for gi, a, b in ref.swaps:
        _swap(opt.param_groups[gi], a, b)
    return opt


def _edit_state(opt, ref: Reference, params, i: int, how: str) -> None:
    """The same edit of param i's state in both optimizers, as torch.optim lets a user make."""
    p, w = params[i], ref.work[i]
    if how == "clear":
        opt.state.clear()
        ref.opt.state.clear()
        ref.snapshots.clear()
        return
    if how == "new":
        opt.state = collections.defaultdict(dict, opt.state)
        ref.opt.state = collections.defaultdict(dict, ref.opt.state)
        return
    if p not in opt.state:
        return
    ref.snapshots.pop(i, None)  # its state legitimately changes, frozen or not
    if how == "del":
        del opt.state[p]
        ref.opt.state.pop(w, None)
        return
    for key, value in list(opt.state[p].items()):  # replaced by new tensors with other values
        if isinstance(value, torch.Tensor) and key != "step":
            opt.state[p][key] = value * 0.5
            if key in ref.opt.state.get(w, {}):
                ref.opt.state[w][key] = ref.opt.state[w][key] * 0.5  # exact: a power of two


# Programs thaw params frozen from the start with a bare unfreeze() on purpose: the warning that says so is expected.
@pytest.mark.filterwarnings("ignore:frozenopt. unfreeze with no target")
@_PROFILE
@given(prog=programs())
def test_differential_fuzz(prog: Program) -> None:
    note(f"names: {_names(prog.params)}")
    run_program(prog)


def test_fuzz_catches_a_wrong_optimizer(monkeypatch) -> None:
    """The harness is not vacuous: a frozenopt whose step also nudges frozen params fails it."""
    prog = Program(
        params=(ParamSpec("fc1", "weight", "mat", (2, 3, 1), "float32", True),
                ParamSpec("fc2", "weight", "mat", (2, 3, 1), "float32", True)),
        handoff="module", splits=(), group_lrs=(None,), opt="SGD",
        hyper=tuple(dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                         maximize=False).items()),
        tensor_lr=False, mask_only=True, impl="forloop", seed=0,
        ops=(("freeze", (("str", "fc2"),), False), ("step", 1)))
    run_program(prog)  # the honest optimizer passes

    real_step = frozenopt.SGD.step

    def leaky_step(self, closure=None):
        out = real_step(self, closure)
        with torch.no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None and self.is_frozen(p):
                        p.add_(p.grad, alpha=-1e-3)
        return out

    monkeypatch.setattr(frozenopt.SGD, "step", leaky_step)
    with pytest.raises(AssertionError, match="fc2.weight"):
        run_program(prog)


@pytest.mark.parametrize("error", [1.3e-5, 0.0])
def test_reference_catches_a_small_relative_error(monkeypatch, error):
    """The tolerances are tight enough for the kind of bug this fuzzer found in the kernels:
    (1 - beta2) rounded to float32 put a 1.3e-5 relative error into exp_avg_sq. Such an
    error on top of a correct step is caught within a few steps of large grads; no error
    passes (the control)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(16)) for _ in range(3)]
    opt = frozenopt.Adam(params, lr=1e-3)
    ref = Reference(opt)
    real_step = frozenopt.Adam.step

    def skewed_step(self, closure=None):
        out = real_step(self, closure)
        for p in params:
            self.state[p]["exp_avg_sq"].mul_(1 + error)
        return out

    monkeypatch.setattr(frozenopt.Adam, "step", skewed_step)

    def run():
        for step in range(5):
            for p in params:
                p.grad = torch.randn(16) * 1e3
            opt.step()
            ref.step([p.grad for p in params])
            ref.check(opt, f"step {step}")

    if error:
        with pytest.raises(AssertionError, match="exp_avg_sq"):
            run()
    else:
        run()
