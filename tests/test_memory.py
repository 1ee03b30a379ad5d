"""Memory: a param frozen from the start never allocates state; release_state/reset_state
and freezing give memory back (state byte counts, weak references, and the process RSS
for a large model).

Byte counts are those of the storages the optimizer's state tensors hold
(tests/reference.py: state_bytes), each storage counted once.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch
from matrix import config
from reference import Reference, state_bytes
from torch import nn

import frozenopt

KINDS = ["sgd_momentum", "adam", "adamw_amsgrad"]  # configurations of tests/matrix.py


def make_opt(kind, params, **extra):
    return config(kind).make(params, **extra)


def expected_bytes(kind, params) -> int:
    """SGD: a momentum buffer per element; Adam/AdamW: exp_avg + exp_avg_sq (+ max_exp_avg_sq)
    per element, and a 4-byte step per param."""
    cfg = config(kind)
    if cfg.name == "SGD":
        return sum(p.numel() * p.element_size() for p in params)
    buffers = 3 if cfg.kwargs.get("amsgrad") else 2
    return sum(buffers * p.numel() * p.element_size() + 4 for p in params)


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 16, dtype=dtype)
        self.body = nn.Sequential(nn.Linear(16, 32, dtype=dtype), nn.Linear(32, 32, dtype=dtype))
        self.head = nn.Linear(32, 4, dtype=dtype)


def all_grads(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["requires_grad", "freeze_before_step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # 4- and 2-byte elements
def test_frozen_from_the_start_allocates_no_state(kind, how, dtype):
    """Frozen before its first step (requires_grad=False at construction, the Flux request,
    or freeze() before any step): no state entry at all, however many steps run and whatever
    grads it is given; the state holds exactly the unfrozen params' bytes."""
    net = Net(dtype)
    if how == "requires_grad":
        for p in [*net.embed.parameters(), *net.body.parameters()]:
            p.requires_grad_(False)
        opt = make_opt(kind, net, mask_only=True)
    else:
        opt = make_opt(kind, net, mask_only=True)
        opt.freeze("embed", "body")
    assert opt.frozen == ["embed.weight", "body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias"]
    for step in range(5):
        all_grads(net, step)  # the frozen params get grads too
        opt.step()
    frozen = [*net.embed.parameters(), *net.body.parameters()]
    assert all(p not in opt.state or not opt.state[p] for p in frozen)
    assert state_bytes(opt) == expected_bytes(kind, net.head.parameters()) > 0
    assert set(opt.state_dict()["state"]) == {5, 6}  # only head.weight and head.bias


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask_only", [False, True])
def test_release_state_gives_the_memory_back(kind, mask_only):
    """freeze(..., release_state=True) drops exactly the matched params' state bytes, the
    state tensors are really freed (no cached step plan or mask keeps them alive), a plain
    freeze keeps them, and unfreeze then starts them afresh (Adam's step counts from 1)."""
    net = Net()
    opt = make_opt(kind, net, mask_only=mask_only)
    for step in range(3):
        all_grads(net, step)
        opt.step()
    total = state_bytes(opt)
    assert total == expected_bytes(kind, net.parameters())

    opt.freeze("body")  # a plain freeze keeps the state (unfreeze resumes it)
    assert state_bytes(opt) == total
    refs = [weakref.ref(t) for p in net.body.parameters() for t in opt.state[p].values()
            if isinstance(t, torch.Tensor)]
    opt.freeze("body", release_state=True)
    gc.collect()
    assert state_bytes(opt) == total - expected_bytes(kind, net.body.parameters())
    assert all(r() is None for r in refs), "released state tensors are still alive"
    all_grads(net, 10)
    opt.step()  # a step while released allocates nothing for them
    assert state_bytes(opt) == total - expected_bytes(kind, net.body.parameters())

    opt.unfreeze("body")
    all_grads(net, 11)
    opt.step()
    assert state_bytes(opt) == total
    if config(kind).name != "SGD":
        assert float(opt.state[net.body[0].weight]["step"]) == 1
        assert float(opt.state[net.head.weight]["step"]) == 5


@pytest.mark.parametrize("kind", KINDS)
def test_reset_state_frees_and_restarts(kind):
    net = Net()
    opt = make_opt(kind, net)
    ref = Reference(opt)
    for step in range(3):
        all_grads(net, step)
        opt.step()
        ref.step([p.grad for p in net.parameters()])
    refs = [weakref.ref(t) for t in opt.state[net.head.weight].values() if isinstance(t, torch.Tensor)]
    opt.freeze("head")  # its state is kept while frozen
    ref.freeze([5, 6])
    assert opt.unfreeze("head", reset_state=True) == ["head.weight", "head.bias"]
    ref.unfreeze([5, 6], reset_state=True)
    gc.collect()
    assert all(r() is None for r in refs)
    assert state_bytes(opt) == expected_bytes(kind, [p for n, p in net.named_parameters() if "head" not in n])
    all_grads(net, 3)
    opt.step()
    ref.step([p.grad for p in net.parameters()])
    ref.check(opt, "after reset_state")


def test_freezing_drops_grads_in_the_default_mode():
    """Default mode: freeze() turns requires_grad off and drops the grad, so the frozen
    params' grad memory goes too (mask_only keeps both, for DDP)."""
    net = Net()
    opt = frozenopt.AdamW(net)
    all_grads(net)
    grads = [weakref.ref(p.grad) for p in net.body.parameters()]
    opt.freeze("body")
    gc.collect()
    assert all(r() is None for r in grads)
    assert all(p.grad is None and not p.requires_grad for p in net.body.parameters())
    loss = net.head(net.body(net.embed(torch.tensor([1, 2, 3])))).sum()
    loss.backward()
    assert all(p.grad is None for p in net.body.parameters())  # autograd skipped them

    net = Net()
    opt = frozenopt.AdamW(net, mask_only=True)
    all_grads(net)
    opt.freeze("body")
    assert all(p.grad is not None and p.requires_grad for p in net.body.parameters())


_RSS_SCRIPT = r"""
import gc, os, torch, frozenopt
from torch import nn

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

big = nn.Parameter(torch.zeros(16 * 2**20))
small = nn.Parameter(torch.zeros(10))
opt = frozenopt.Adam([("big", big), ("small", small)], lr=1e-3, mask_only=True)  # keeps the grad
big.grad, small.grad = torch.ones_like(big), torch.ones_like(small)
opt.step()
gc.collect()
before = rss()
opt.freeze("big", release_state=True)
gc.collect()
print(before - rss(), len(opt.state[big]), len(opt.state[small]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux) to read the RSS")
def test_release_state_lowers_the_process_rss():
    """The bytes go back to the system, not just out of opt.state: releasing the 2 x 64 MiB of
    Adam state of one 16M-element param lowers the RSS of a fresh process by most of it (a fresh
    process, so that what earlier tests left in the C heap does not blur the figure)."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    freed, big_state, small_state = map(int, out.stdout.split())
    assert (big_state, small_state) == (0, 3)
    assert freed > 100 * 2**20, f"RSS fell by only {freed / 2**20:.1f} MiB"
