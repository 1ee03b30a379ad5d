"""The eager step plan's cached CPU launch stays exact when grads or storages change between steps.

The plan re-validates a param only when its grad object, its grad's or param's
storage, or its size changed since the last step; these tests change each of
those (and nothing) between steps and compare with torch.optim step for step.
"""

import copy

import pytest
import torch
from matrix import FLOATS, config, config_params
from torch import nn

import frozenopt

CONFIGS = config_params(["sgd_nesterov_decay", "sgd", "adam_all", "adamw_maximize"])


def make_pair(cfg, dtype=torch.float32, sizes=(1, 7, 300, 0, 4099)):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(n, dtype=dtype)) for n in sizes]
    theirs = copy.deepcopy(ours)
    for p in ours:
        p.grad = torch.randn_like(p)
    for p, q in zip(ours, theirs):
        q.grad = p.grad.clone()
    return ours, theirs, cfg.make(ours), cfg.reference(theirs)


def same_grads(ours, theirs):
    for p, q in zip(ours, theirs):
        q.grad = None if p.grad is None else p.grad.clone()


def assert_same(ours, theirs, o, t):
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q)
        mine, ref = o.state.get(p, {}), t.state.get(q, {})
        assert mine.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(mine[key].to(ref[key].dtype), ref[key])


@pytest.mark.parametrize("dtype", [*FLOATS, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_reused_and_changed_grads_follow_torch(cfg, dtype):
    ours, theirs, o, t = make_pair(cfg, dtype)
    for step in range(10):
        if step in (3, 4):
            ours[2].grad.mul_(-0.5)  # same grad object, new values
        if step == 5:
            ours[1].grad = None  # no grad: skipped, like torch.optim
        if step == 6:
            ours[1].grad = torch.randn_like(ours[1])  # a new grad object
        if step == 7:
            with torch.no_grad():
                ours[3].data = torch.randn_like(ours[3])  # a new storage under the same param
                theirs[3].data = ours[3].data.clone()
        if step == 8:
            g = torch.randn(ours[4].numel() * 2, dtype=dtype)[::2]  # non-contiguous grad: the op path
            ours[4].grad = g
        if step == 9:
            ours[4].grad = ours[4].grad.contiguous()
        same_grads(ours, theirs)
        o.step()
        t.step()
        if dtype == torch.bfloat16:  # torch's for-loop rounds differently in bf16; check the contract only
            continue
        assert_same(ours, theirs, o, t)


def test_bad_grad_raises_then_steps_resume():
    ours, theirs, o, t = make_pair(config("adamw"))
    o.step()
    t.step()
    before = [p.detach().clone() for p in ours]
    good = ours[2].grad.clone()
    ours[2].grad.resize_(5)  # the same grad object, resized in place
    with pytest.raises(RuntimeError, match=r"grad 2 has shape \[5\]"):
        o.step()
    ours[0].grad = torch.sparse_coo_tensor([[0]], torch.ones(1), (1,))
    with pytest.raises(RuntimeError, match="sparse"):
        o.step()
    for p, b in zip(ours, before):
        assert torch.equal(p, b)
    assert all(o.state[p]["step"].item() == 1 for p in ours)
    ours[2].grad = good
    ours[0].grad = theirs[0].grad.clone()
    same_grads(ours, theirs)
    o.step()
    t.step()
    assert_same(ours, theirs, o, t)


def test_several_groups_and_amp_scale_follow_torch():
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(n)) for n in (33, 64, 5)]
    theirs = copy.deepcopy(ours)
    o = frozenopt.Adam([{"params": ours[:2]}, {"params": ours[2:], "lr": 0.1}], lr=0.01)
    t = torch.optim.Adam([{"params": theirs[:2]}, {"params": theirs[2:], "lr": 0.1}], lr=0.01, fused=True)
    for p in ours:
        p.grad = torch.randn_like(p) * 8
    for step in range(6):
        scale = torch.tensor(8.0)
        inf = torch.tensor(1.0 if step == 2 else 0.0)
        o.grad_scale, o.found_inf = scale, inf
        t.grad_scale, t.found_inf = scale, inf
        same_grads(ours, theirs)
        o.step()
        t.step()
        assert_same(ours, theirs, o, t)
    assert o.state[ours[0]]["step"].item() == 5  # the overflow step did not count


def test_frozen_with_grads_untouched_while_cache_is_warm():
    ours, _, o, _ = make_pair(config("sgd_momentum"))
    o = frozenopt.SGD(ours, lr=0.1, momentum=0.9, mask_only=True)
    o.step()
    o.freeze(ours[2])
    before = ours[2].detach().clone(), o.state[ours[2]]["momentum_buffer"].clone()
    for _ in range(3):
        o.step()
    assert torch.equal(ours[2], before[0])
    assert torch.equal(o.state[ours[2]]["momentum_buffer"], before[1])
