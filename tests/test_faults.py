"""Faults: inf/nan grads (with and without torch.amp.GradScaler), exceptions raised in a
closure, and KeyboardInterrupt around freeze/unfreeze.

The rule being tested: a fault either leaves the optimizer exactly as it was, or it
is torch.optim's own behaviour (inf/nan grads without a scaler propagate, as they do
in torch.optim, and frozen params stay bitwise unchanged whatever their grad holds).
"""

from __future__ import annotations

import collections

import pytest
import torch
from matrix import assert_same, config, snapshot
from reference import Reference
from torch import nn

OPTIMIZERS = ["sgd_all", "sgd_nesterov", "adam_all", "adamw_weight_decay"]  # configurations of tests/matrix.py


def make(kind: str, *, mask_only: bool = True, groups: bool = True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    named = list(net.named_parameters())
    params = [{"params": named[:2]}, {"params": named[2:], "lr": 0.05}] if groups else net
    opt = config(kind).make(params, mask_only=mask_only)
    return net, opt


def grads(net, seed: int, scale: float = 1.0, skip=()):
    g = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        p.grad = None if name in skip else torch.randn(p.shape, generator=g) * scale


def params_and_state(opt) -> tuple:
    """Params, state and groups, cloned: what a fault that is refused must leave alone (not grads)."""
    s = snapshot(opt)
    return s["values"], s["state"], s["groups"], s["frozen"], s["requires_grad"]


def assert_params_and_state_same(a: tuple, b: tuple) -> None:
    """Bitwise the same, except that a param that had no state may now have fresh Adam
    state (step 0, all zeros), which is what torch's fused Adam allocates on a skipped
    first step too and is the same as none. (SGD must not get a zero momentum buffer: that
    would change its next step, so frozenopt allocates none.)"""
    for i, (x, y) in enumerate(zip(a[0], b[0])):
        assert torch.equal(x, y), f"param {i} moved"
    state_a, state_b = a[1], dict(b[1])
    for i in set(state_b) - set(state_a):
        entry = state_b.pop(i)
        assert set(entry) >= {"step", "exp_avg", "exp_avg_sq"}, f"param {i} got state {sorted(entry)}"
        assert all(not v[0].any() for v in entry.values()), f"param {i} got non-zero state"
    for key, x, y in zip(["state", "groups", "frozen", "requires_grad"], (state_a, *a[2:]), (state_b, *b[2:])):
        assert_same({key: x}, {key: y})


# ------------------------------------------------------------------- inf / nan, no scaler


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_inf_nan_grads_without_a_scaler_do_what_torch_does(kind, bad):
    """Without a GradScaler nobody checks for overflow, in torch.optim either: the bad value
    propagates into the param and the state exactly as torch.optim's does (NaN where torch
    has NaN), frozen params stay bitwise unchanged, and the other params are unaffected."""
    net, opt = make(kind)
    ref = Reference(opt)
    opt.freeze("2")
    ref.freeze([2, 3])
    for step in range(4):
        grads(net, step)
        if step >= 2:
            net[0].weight.grad[0, 0] = bad  # an unfrozen param
            net[2].weight.grad[1, 1] = bad  # a frozen one: must be ignored
        opt.step()
        ref.step([p.grad for p in net.parameters()])
        ref.check(opt, f"step {step}")
    assert not torch.isfinite(net[0].weight).all()  # it did propagate, as in torch
    assert torch.isfinite(net[4].weight).all()  # other tensors are not touched by it


# ------------------------------------------------------------------- GradScaler


def _record_amp_args(opt):
    """Wraps opt.step to record what GradScaler handed it."""
    seen = []
    real = opt.step

    def step(*args, **kwargs):
        seen.append((getattr(opt, "grad_scale", "absent"), getattr(opt, "found_inf", "absent")))
        return real(*args, **kwargs)

    opt.step = step
    return seen


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscale_"])
def test_grad_scaler_overflow_changes_nothing(kind, bad, unscale_first):
    """An overflowing step under GradScaler (CPU): no param, no state tensor, no step
    counter moves, and a param taking its first step gets no state; the steps that do
    happen match torch.optim stepped only on the non-overflowing iterations with the
    unscaled grads. Also pins what GradScaler passes: with _step_supports_amp_scaling it
    sets opt.grad_scale (the scale tensor, or None after unscale_) and opt.found_inf (a
    float32 0/1 tensor) for the duration of step() and deletes them afterwards."""
    net, opt = make(kind)
    ref = Reference(opt)
    seen = _record_amp_args(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    late = {"4.weight", "4.bias"}  # first grad only at step 3, which overflows
    for step in range(7):
        scale = scaler.get_scale()
        overflow = step in (3, 5)
        scaler.scale(torch.ones(()))  # makes the scaler live, as scaler.scale(loss) would
        grads(net, step, scale=scale, skip=late if step < 3 else ())
        unscaled = [None if p.grad is None else p.grad / scale for p in net.parameters()]
        if overflow:
            net[2].weight.grad[0, 0] = bad
        if unscale_first:
            scaler.unscale_(opt)
        before = params_and_state(opt)
        scaler.step(opt)
        grad_scale, found_inf = seen[-1]
        if unscale_first:
            assert grad_scale is None
        else:
            assert isinstance(grad_scale, torch.Tensor) and float(grad_scale) == scale
        assert isinstance(found_inf, torch.Tensor) and found_inf.dtype == torch.float32
        assert float(found_inf) == float(overflow)
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        scaler.update()
        if overflow:
            assert_params_and_state_same(before, params_and_state(opt))
            if config(kind).name == "SGD":
                assert all(p not in opt.state for p in net[4].parameters()) or step == 5
            assert scaler.get_scale() == scale / 2
        else:
            ref.step(unscaled)
        ref.check(opt, f"step {step}")
    adam = config(kind).name != "SGD"
    if adam:  # the step counters count the 5 steps taken (4 for the late params)
        assert float(opt.state[net[0].weight]["step"]) == 5
        assert float(opt.state[net[4].weight]["step"]) == 2


@pytest.mark.parametrize("kind", ["sgd_all", "adam_all"])
def test_grad_scaler_frozen_grads_in_mask_only_mode(kind):
    """Known limit, pinned: GradScaler looks at every grad in param_groups. In mask_only
    mode frozen params keep requires_grad (DDP), so an overflow in a frozen param's grad
    skips the whole step (nothing moves, which is safe) where torch.optim with that grad set
    to None would have stepped the rest. In the default mode freeze() sets
    requires_grad=False and drops the grad, so backward gives the frozen param no grad and
    an overflow there cannot happen."""
    net, opt = make(kind, mask_only=True)
    opt.freeze("2")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))
    grads(net, 0, scale=4.0)
    net[2].weight.grad[0, 0] = float("inf")
    before = params_and_state(opt)
    scaler.step(opt)
    assert_params_and_state_same(before, params_and_state(opt))

    net, opt = make(kind, mask_only=False)
    opt.freeze("2")
    x = torch.randn(3, 4)
    loss = net(x).sum()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(loss).backward()
    assert net[2].weight.grad is None
    w0 = net[0].weight.detach().clone()
    scaler.step(opt)
    assert not torch.equal(w0, net[0].weight)


# ------------------------------------------------------------------- closures


class Boom(Exception):
    pass


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_exception_in_closure_changes_nothing(kind, exc):
    """step(closure) runs the closure before anything else; if it raises, the params,
    the state, the groups and the frozen set are untouched, and the optimizer then steps
    on as if the failed call never happened."""
    net, opt = make(kind)
    ref = Reference(opt)
    x, y = torch.randn(5, 4), torch.randn(5, 2)

    def closure(fail):
        def run():
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            if fail:
                raise exc("inside the closure")
            return loss
        return run

    for _step in range(3):
        opt.step(closure(False))
        ref.step([p.grad for p in net.parameters()])
    opt.freeze("0")
    ref.freeze([0, 1])
    before = params_and_state(opt)
    with pytest.raises(exc, match="inside the closure"):
        opt.step(closure(True))
    assert_params_and_state_same(before, params_and_state(opt))
    loss = opt.step(closure(False))
    assert isinstance(loss, torch.Tensor)
    ref.step([p.grad for p in net.parameters()])
    ref.check(opt, "after the failed closure")


# ------------------------------------------------------------------- KeyboardInterrupt


def _consistent(opt, net, mask_only: bool) -> None:
    """The optimizer agrees with itself and with autograd: its frozen list, is_frozen, the
    requires_grad flags (default mode), and what a step actually moves."""
    frozen = set(opt.frozen)
    names = [n for n, _ in net.named_parameters()]
    for name, p in net.named_parameters():
        assert opt.is_frozen(p) == (name in frozen)
        if not mask_only:
            assert p.requires_grad == (name not in frozen), f"{name}: requires_grad vs frozen set"
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads(net, 99)
    opt.step()
    for n, p in net.named_parameters():
        assert torch.equal(before[n], p) == (n in frozen), f"{n}: moved={not torch.equal(before[n], p)}"
    assert len(frozen) < len(names)


class _InterruptingState(collections.defaultdict):
    """opt.state whose n-th pop() raises KeyboardInterrupt (a Ctrl-C landing there)."""

    def __init__(self, state, at_call):
        super().__init__(dict, state)
        self.calls, self.at_call = 0, at_call

    def pop(self, *args):
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt
        return super().pop(*args)


INTERRUPT_CASES = [(mask_only, where) for mask_only in (False, True)
                   for where in ("requires_grad_", "state.pop") if not (mask_only and where == "requires_grad_")]


@pytest.mark.parametrize("kind", ["sgd_all", "adam_all"])
@pytest.mark.parametrize("mask_only,where", INTERRUPT_CASES, ids=[f"{'mask_only' if m else 'default'}-{w}"
                                                                  for m, w in INTERRUPT_CASES])
@pytest.mark.parametrize("at_call", [1, 2, 4])
@pytest.mark.parametrize("method", ["freeze", "unfreeze"])
def test_keyboard_interrupt_inside_freeze(monkeypatch, kind, mask_only, where, at_call, method):
    """A KeyboardInterrupt part-way through freeze()/unfreeze() (simulated at the n-th
    requires_grad_ call, or at the n-th state drop of release_state/reset_state) leaves a
    consistent optimizer: the params dealt with before the interrupt are fully done, the
    others untouched, and the masks and cached step plans follow (the next step moves
    exactly the unfrozen params, with exactly the state the optimizer reports). A retry
    completes the call."""
    net, opt = make(kind, mask_only=mask_only, groups=False)
    ref = Reference(opt)
    for step in range(2):
        grads(net, step)
        opt.step()
        ref.step([p.grad for p in net.parameters()])
    target, indices = ("0", "2"), [0, 1, 2, 3]
    if method == "unfreeze":
        opt.freeze(*target)
        ref.freeze(indices)
    drop = where == "state.pop"
    kwargs = {"release_state" if method == "freeze" else "reset_state": drop}
    if drop:
        opt.state = _InterruptingState(opt.state, at_call)
    else:
        real = torch.Tensor.requires_grad_
        calls = {"n": 0}

        def interrupted(self, *args, **kw):
            calls["n"] += 1
            if calls["n"] == at_call:
                raise KeyboardInterrupt
            return real(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, "requires_grad_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        getattr(opt, method)(*target, **kwargs)
    monkeypatch.undo()
    done = indices[:at_call - 1]  # what happened before the interrupt
    if drop:
        for i in done:
            ref.opt.state.pop(ref.work[i], None)
    else:
        getattr(ref, method)(done)
    ref.check(opt, "after the interrupt")
    _consistent(opt, net, mask_only)  # steps once with fresh grads
    ref.step([p.grad for p in net.parameters()])
    ref.check(opt, "step after the interrupt")

    getattr(opt, method)(*target, **kwargs)  # the retry finishes the job
    getattr(ref, method)(indices, **kwargs)
    assert opt.frozen == (["0.weight", "0.bias", "2.weight", "2.bias"] if method == "freeze" else [])
    ref.check(opt, "after the retry")
    _consistent(opt, net, mask_only)
    ref.step([p.grad for p in net.parameters()])
    ref.check(opt, "step after the retry")


@pytest.mark.parametrize("kind", ["sgd_all", "adam_all", "adamw_weight_decay"])
def test_keyboard_interrupt_between_freeze_and_step(kind):
    """The usual place: the user hits Ctrl-C after freeze() returned and before step()."""
    net, opt = make(kind, mask_only=False)
    ref = Reference(opt)
    for step in range(3):
        grads(net, step)
        opt.step()
        ref.step([p.grad for p in net.parameters()])
        try:
            opt.freeze("2") if step == 1 else None
            ref.freeze([2, 3]) if step == 1 else None
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        ref.check(opt, f"after interrupt {step}")
    _consistent(opt, net, mask_only=False)


@pytest.mark.parametrize("kind", ["sgd_all", "adam_all"])
def test_failed_step_under_grad_scaler_leaves_no_amp_arguments_behind(kind):
    """GradScaler sets opt.grad_scale/opt.found_inf for one step() and deletes them only when
    step() returns. When step() raises (a sparse grad here), frozenopt drops them itself:
    otherwise the next plain opt.step() would silently divide its grads by the old scale
    (or skip, if found_inf was set)."""
    net, opt = make(kind)
    ref = Reference(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))
    grads(net, 0)
    net[0].bias.grad = net[0].bias.grad.to_sparse()
    before = params_and_state(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        scaler.step(opt)
    assert_params_and_state_same(before, params_and_state(opt))
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    grads(net, 1)
    opt.step()  # a plain step: unscaled grads, nothing skipped
    ref.step([p.grad for p in net.parameters()])
    ref.check(opt, "plain step after the failed scaled one")
