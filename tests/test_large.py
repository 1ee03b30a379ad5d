"""Large and odd tensors: 2^31+ elements (opt-in), 100,000 tiny tensors, a frozen set that
flips every step for 1,000 steps, one param in two optimizers, a param whose storage is
swapped between steps.

FROZENOPT_LARGE_TESTS=1 runs the 2^31+ element SGD test (about 8.6 GB of RAM: a bfloat16
param and its grad of 2^31 + 4,099 elements, 4.3 GB each); FROZENOPT_LARGE_TESTS=adam adds
the Adam one (about 17.2 GB: param, grad, exp_avg, exp_avg_sq).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from reference import Reference
from torch import nn

import frozenopt

LARGE = os.environ.get("FROZENOPT_LARGE_TESTS", "")
N_HUGE = 2**31 + 4099  # past the int32 range, and not a multiple of any vector width


def _all_equal_to(t: torch.Tensor, value: float) -> bool:
    """t == value everywhere, checked in 2^26-element slices (no 2 GiB temporary)."""
    flat = t.view(-1)
    step = 2**26
    return all(bool((flat[i:i + step] == value).all()) for i in range(0, flat.numel(), step))


@pytest.mark.skipif(not LARGE, reason="set FROZENOPT_LARGE_TESTS=1 (needs ~8.6 GB of RAM)")
@pytest.mark.parametrize("frozen_small", [False, True])
def test_sgd_on_more_than_2_31_elements(frozen_small):
    """Every element past index 2^31 is updated (a 32-bit index or size would wrap or stop
    there, apex #1825); a frozen small param next to it in the same step is untouched."""
    huge = nn.Parameter(torch.zeros(N_HUGE, dtype=torch.bfloat16))
    small = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    opt = frozenopt.SGD([("huge", huge), ("small", small)], lr=1.0, mask_only=True)
    if frozen_small:
        opt.freeze("small")
    huge.grad = torch.ones_like(huge)
    small.grad = torch.ones_like(small)
    opt.step()
    del huge.grad
    assert huge[2**31 - 1].item() == huge[2**31].item() == huge[-1].item() == -1.0
    assert _all_equal_to(huge.detach(), -1.0)
    assert bool((small == (0.0 if frozen_small else -1.0)).all())


@pytest.mark.skipif(LARGE != "adam", reason="set FROZENOPT_LARGE_TESTS=adam (needs ~17.2 GB of RAM)")
def test_adam_on_more_than_2_31_elements():
    huge = nn.Parameter(torch.zeros(N_HUGE, dtype=torch.bfloat16))
    opt = frozenopt.Adam([huge], lr=0.5)
    huge.grad = torch.ones_like(huge)
    opt.step()  # first Adam step: -lr * g / (|g| + eps) = -0.5 in bfloat16
    del huge.grad
    assert huge[2**31].item() == huge[-1].item() == -0.5
    assert _all_equal_to(huge.detach(), -0.5)
    for key, value in (("exp_avg", 0.1), ("exp_avg_sq", 1e-3)):  # (1 - beta) * g, (1 - beta2) * g^2
        assert _all_equal_to(opt.state[huge][key], torch.tensor(value, dtype=torch.bfloat16).item())


# ----------------------------------------------------------------------------- many tiny tensors


def test_100000_tiny_tensors():
    """100,000 AdamW params of 1-4 elements in 1,000 'layers': a step, a glob freeze of 999
    layers, two steps, unfreeze, a step: matches torch.optim (foreach path) on every param and
    state tensor (compared as one concatenated tensor per kind, to keep the test fast)."""
    n = 100_000
    gen = torch.Generator().manual_seed(0)
    named = [(f"layer{i // 100}.p{i % 100}", nn.Parameter(torch.randn(1 + i % 4, generator=gen))) for i in range(n)]
    opt = frozenopt.AdamW(named, lr=1e-2, weight_decay=0.1, mask_only=True)
    ref = Reference(opt, impl="foreach")
    params = [p for _, p in named]
    sizes = [p.numel() for p in params]

    def step(seed):
        flat = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(seed))
        for p, chunk in zip(params, flat.split(sizes)):
            p.grad = chunk.view_as(p)
        opt.step()
        ref.step([p.grad for p in params])

    def cat(tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    step(1)
    frozen = opt.freeze("layer[1-9]*")  # layer1-layer999: all but layer0
    assert len(frozen) == 99_900 == len(ref.freeze(ref.resolve(["layer[1-9]*"], params)))
    kept = cat(params[100:]).clone()
    step(2)
    step(3)
    assert torch.equal(cat(params[100:]), kept)  # the frozen 99,900 did not move
    assert len(opt.unfreeze()) == 99_900
    ref.unfreeze(range(n))
    step(4)
    torch.testing.assert_close(cat(params), cat(ref.params))
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(cat(opt.state[p][key] for p in params),
                                   cat(ref.opt.state[q][key] for q in ref.params))
    steps = torch.tensor([float(opt.state[p]["step"]) for p in params])
    assert torch.equal(steps, torch.tensor([float(ref.opt.state[q]["step"]) for q in ref.params]))
    assert steps[:100].eq(4).all() and steps[100:].eq(2).all()


# ----------------------------------------------------------------------------- flipping


@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("mask_only", [False, True])
def test_frozen_set_flips_every_step_for_1000_steps(kind, mask_only):
    """Each of 1,000 steps first freezes and unfreezes random params (sometimes releasing
    or resetting state), so every step runs on a new frozen set and a rebuilt plan; after
    every step frozenopt matches torch.optim and frozen params are bitwise unchanged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    kwargs = (dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2) if kind == "SGD"
              else dict(lr=1e-2, amsgrad=kind == "Adam", weight_decay=1e-2))
    opt = getattr(frozenopt, kind)(net, mask_only=mask_only, **kwargs)
    ref = Reference(opt)
    params = list(net.parameters())
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(2)
    for step in range(1000):
        flip = rng.sample(range(len(params)), rng.randint(1, len(params)))
        freeze = [i for i in flip if i not in ref.frozen]
        thaw = [i for i in flip if i in ref.frozen]
        drop = rng.random() < 0.1
        if freeze:
            assert opt.freeze(*[params[i] for i in freeze], release_state=drop) == ref.freeze(freeze, drop)
        if thaw:
            assert opt.unfreeze(*[params[i] for i in thaw], reset_state=drop) == ref.unfreeze(thaw, drop)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        ref.step([p.grad for p in params])
        ref.check(opt, f"step {step}")


# ----------------------------------------------------------------------------- shared params


def test_same_param_in_two_frozenopt_optimizers():
    """A param in two optimizers has a state in each, and freezing it in one does not freeze
    it in the other (mask_only=True). Reference: two torch.optim optimizers, the first given
    grad=None for the shared param."""
    torch.manual_seed(0)
    a, shared, b = (nn.Parameter(torch.randn(4)) for _ in range(3))
    opt1 = frozenopt.SGD([("a", a), ("shared", shared)], lr=0.1, momentum=0.9, mask_only=True)
    opt2 = frozenopt.Adam([("shared", shared), ("b", b)], lr=1e-2, mask_only=True)
    ra, rs, rb = (nn.Parameter(t.detach().clone()) for t in (a, shared, b))
    ref1 = torch.optim.SGD([ra, rs], lr=0.1, momentum=0.9, foreach=False)
    ref2 = torch.optim.Adam([rs, rb], lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(20):
        if step == 5:
            opt1.freeze("shared")
        if step == 12:
            opt2.freeze("shared")
        if step == 15:
            opt1.unfreeze()
        grads = [torch.randn(4, generator=gen) for _ in range(3)]
        for p, g in zip((a, shared, b), grads):
            p.grad = g.clone()
        opt1.step()
        opt2.step()
        ra.grad, rs.grad, rb.grad = (g.clone() for g in grads)
        if opt1.is_frozen(shared):
            rs.grad = None
        ref1.step()
        rs.grad = None if opt2.is_frozen(shared) else grads[1].clone()
        ref2.step()
        for p, q in zip((a, shared, b), (ra, rs, rb)):
            torch.testing.assert_close(p, q, msg=f"step {step}")
    assert opt1.state[shared]["momentum_buffer"] is not opt2.state[shared].get("momentum_buffer")
    torch.testing.assert_close(opt2.state[shared]["exp_avg"], ref2.state[rs]["exp_avg"])


def test_freezing_a_shared_param_in_the_default_mode_reaches_the_other_optimizer():
    """Pinned, documented consequence: the default mode turns requires_grad off, which is the
    param's own flag, so autograd stops computing its grad for every optimizer that holds it,
    and every default-mode optimizer that holds it reports it frozen (its frozen set follows
    requires_grad). Share a param between optimizers with mask_only=True to freeze it in one."""
    lin = nn.Linear(3, 1)
    opt1 = frozenopt.SGD(lin, lr=0.1)
    opt2 = frozenopt.SGD(lin, lr=0.1)
    opt1.freeze("weight")
    assert not lin.weight.requires_grad and opt2.frozen == ["weight"]
    lin(torch.randn(2, 3)).sum().backward()
    w = lin.weight.detach().clone()
    opt2.step()
    assert lin.weight.grad is None and torch.equal(w, lin.weight)


def test_frozenopt_and_torch_optim_on_one_param():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5))
    q = nn.Parameter(p.detach().clone())
    ours = frozenopt.AdamW([p], lr=1e-2)
    theirs = torch.optim.SGD([p], lr=0.1, momentum=0.5)
    r1 = torch.optim.AdamW([q], lr=1e-2, foreach=False)
    r2 = torch.optim.SGD([q], lr=0.1, momentum=0.5, foreach=False)
    for _step in range(10):
        g = torch.randn(5)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        r1.step()
        r2.step()
    torch.testing.assert_close(p, q)


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_param_storage_swapped_between_steps(kind):
    """`param.data = ...` (what Module.to(), load_state_dict(assign=True) or a resize do)
    between steps: the cached step plan must follow the new storage, not write the old one."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    kwargs = dict(lr=0.1, momentum=0.9) if kind == "SGD" else dict(lr=1e-2)
    opt = getattr(frozenopt, kind)(net, **kwargs)
    ref = Reference(opt)
    params = list(net.parameters())
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        if step == 3:
            for p, q in zip(params, ref.params):
                old = p.detach()
                p.data = old.clone()  # new storage, same values
                old.fill_(float("nan"))  # a write to the old storage would not show; reading it would
                q.data = q.detach().clone()
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        ref.step([p.grad for p in params])
        ref.check(opt, f"step {step}")
