"""The optimizer's CUDA-graph capture path (``_step_traced`` while capturing),
checked on the CPU by making the optimizer believe a capture is under way.
test_cuda_gpu.py captures real graphs where a GPU exists."""

from __future__ import annotations

import pytest
import torch

import frozenopt
from frozenopt.optim import base as optim_mod


@pytest.fixture
def capturing(monkeypatch):
    monkeypatch.setattr(optim_mod, "_is_capturing", lambda device: True)


def _named(n=4, size=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(f"p{i}", torch.nn.Parameter(torch.randn(size, generator=g))) for i in range(n)]


@pytest.mark.parametrize("cls", [frozenopt.SGD, frozenopt.Adam])
def test_state_cannot_be_made_while_capturing(capturing, cls):
    named = _named()
    opt = cls(named, lr=0.1, mask_only=True, **({"momentum": 0.9} if cls is frozenopt.SGD else {}))
    opt.freeze("p1")
    for _, p in named:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="prepare_capture"):
        opt.step()
    assert not opt.state, "a refused step made state"


@pytest.mark.parametrize("cls", [frozenopt.SGD, frozenopt.Adam, frozenopt.AdamW])
def test_captured_path_after_prepare_capture_matches_eager(monkeypatch, cls):
    kw = {"momentum": 0.9} if cls is frozenopt.SGD else {"weight_decay": 0.1}
    traced_named, eager_named = _named(seed=1), _named(seed=1)
    traced = cls(traced_named, lr=0.1, mask_only=True, **kw)
    eager = cls(eager_named, lr=0.1, mask_only=True, **kw)
    for opt in (traced, eager):
        opt.freeze("p1", "p2")
        opt.prepare_capture()
    assert all(p in traced.state for _, p in traced_named), "prepare_capture leaves params without state"
    g = torch.Generator().manual_seed(2)
    for step in range(4):
        if step == 2:
            for opt in (traced, eager):
                opt.unfreeze("p1")
        grads = [torch.randn(10, generator=g) for _ in traced_named]
        for (_, a), (_, b), gr in zip(traced_named, eager_named, grads):
            a.grad, b.grad = gr.clone(), gr.clone()
        monkeypatch.setattr(optim_mod, "_is_capturing", lambda device: True)
        traced.step()
        monkeypatch.setattr(optim_mod, "_is_capturing", lambda device: False)
        eager.step()
    for (_, a), (_, b) in zip(traced_named, eager_named):
        torch.testing.assert_close(a, b)
    assert torch.equal(traced_named[2][1], _named(seed=1)[2][1]), "frozen p2 moved"


def test_partial_grads_use_views_of_the_group_mask_while_capturing(capturing):
    named = _named(n=5)
    opt = frozenopt.Adam(named, lr=0.1, mask_only=True)
    opt.prepare_capture()
    opt.freeze("p3")
    # Grads on p1..p3 only: a contiguous range, a view of the mask.
    for i, (_, p) in enumerate(named):
        p.grad = torch.ones_like(p) if 1 <= i <= 3 else None
    mask = opt._mask_for(0, [1, 2, 3], capturing=True)
    assert mask._base is opt._masks[0] or mask.data_ptr() == opt._masks[0].data_ptr() + 1
    before = named[3][1].detach().clone()
    opt.step()
    assert torch.equal(named[3][1].detach(), before)
    # Grads on p0, p2, p3: gathered from views, no index tensor made from host data.
    for i, (_, p) in enumerate(named):
        p.grad = torch.ones_like(p) if i in (0, 2, 3) else None
    opt.step()
    assert not opt._mask_subsets
    assert torch.equal(named[3][1].detach(), before)
    assert opt.state[named[0][1]]["step"].item() == 1 and opt.state[named[1][1]]["step"].item() == 1


def test_prepare_capture_refuses_sgd_dampening_without_buffers():
    opt = frozenopt.SGD(_named(), lr=0.1, momentum=0.9, dampening=0.5)
    with pytest.raises(ValueError, match="dampening"):
        opt.prepare_capture()
    assert not opt.state


def test_a_param_frozen_in_part_is_refused_while_capturing(capturing):
    named = _named()
    opt = frozenopt.AdamW(named, mask_only=True)
    opt.prepare_capture()
    opt.freeze("p2", rows=[0, 1])
    for _, p in named:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for _, p in named]
    with pytest.raises(RuntimeError, match="'p2' is frozen in part"):
        opt.step()
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before)), "a refused step moved a param"


@pytest.mark.parametrize("cls", [frozenopt.SGD, frozenopt.AdamW])
def test_captured_rows_follow_the_device_row_mask(monkeypatch, cls):
    """A param frozen by rows steps each row as a tensor of its own, with its own step count,
    masked by the device row flags that freeze/unfreeze rewrite in place: what a replay reads."""
    kw = {"momentum": 0.9, "nesterov": True} if cls is frozenopt.SGD else {"weight_decay": 0.1}
    gen = torch.Generator().manual_seed(4)
    table = torch.nn.Parameter(torch.randn(6, 8, generator=gen))
    bias = torch.nn.Parameter(torch.randn(8, generator=gen))
    rows = [torch.nn.Parameter(table.detach()[r].clone()) for r in range(6)]
    twin_bias = torch.nn.Parameter(bias.detach().clone())
    opt = cls([table, bias], lr=0.1, mask_only=True, **kw)
    own = cls([*rows, twin_bias], lr=0.1, **kw)
    opt.freeze(table, rows=[0, 1, 2])
    monkeypatch.setattr(optim_mod, "_is_capturing", lambda device: True)
    table.grad, bias.grad = torch.ones(6, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match="prepare_capture"):  # rows 0-2 have no state yet
        opt.step()
    assert not opt.state
    opt.prepare_capture()
    flags = opt._row_flags[table]
    seen = []
    real = opt._run_lists

    def spy(group, params, grads, states, mask, first, *rest):
        seen.append(mask)
        return real(group, params, grads, states, mask, first, *rest)

    monkeypatch.setattr(opt, "_run_lists", spy)
    frozen = {0, 1, 2}
    for step in range(5):
        if step == 2:
            opt.unfreeze(table, rows=[1])
            frozen.discard(1)
        if step == 3:
            opt.freeze(table, rows=[4])
            frozen.add(4)
        g, gb = torch.randn(6, 8, generator=gen), torch.randn(8, generator=gen)
        table.grad, bias.grad = g.clone(), gb.clone()
        for r in range(6):
            rows[r].grad = None if r in frozen else g[r].clone()
        twin_bias.grad = gb.clone()
        monkeypatch.setattr(optim_mod, "_is_capturing", lambda device: True)
        opt.step()
        monkeypatch.setattr(optim_mod, "_is_capturing", lambda device: False)
        own.step()
        assert torch.equal(table.detach(), torch.stack([r.detach() for r in rows])), f"step {step}"
        assert torch.equal(bias, twin_bias)
    assert opt._row_flags[table] is flags and any(m is flags for m in seen), "the row flags were replaced"
    assert flags.tolist() == [1, 0, 1, 0, 1, 0]
