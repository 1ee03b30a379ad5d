"""Freezing part of a param: rows (``rows=``) and elements (``mask=``).

The reference for rows holds each row of a param as its own param, with grad None
while that row is frozen: frozenopt must match it bitwise when it steps those rows
as its own params (the same kernels), and torch.optim (fused Adam/AdamW) within the
tolerance of the parity tests (float32, float64). Frozen rows and elements are bitwise unchanged, state included.
"""

import copy
import io

import pytest
import torch
from matrix import DTYPES, FLOATS, KERNEL_SWEEP, config, snapshot, tolerance
from matrix import assert_same as assert_unchanged
from torch import nn

import frozenopt
from frozenopt.optim.partial import ROWS_KEY, expand_row_state

ROWS = 12
# 64 elements a row: whole runs of rows per view; 5: one view per row.
WIDTHS = (64, 5)


def make_params(dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(ROWS, w, generator=gen, dtype=torch.float64).to(device, dtype)) for w in WIDTHS]


def row_params(params):
    """Each row of each param as a param of its own."""
    return [[nn.Parameter(p.detach()[r].clone()) for r in range(ROWS)] for p in params]


def grads_for(step, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(ROWS, w, generator=gen, dtype=torch.float64).to(device, dtype) for w in WIDTHS]


# What is frozen at each step (rows of both params), and the changes before that step:
# rows frozen before the first step (no state), thawed later (their first step then),
# one frozen with its state released, then thawed again (starting afresh).
SCHEDULE = {
    0: ("freeze", dict(rows=slice(0, 8))),
    2: ("unfreeze", dict(rows=[2, 3])),
    4: ("freeze", dict(rows=[9], release_state=True)),
    5: ("unfreeze", dict(rows=torch.tensor([9]))),
}
STEPS = 7


def frozen_rows_at(step):
    frozen = set()
    for s in range(step + 1):
        verb, kwargs = SCHEDULE.get(s, (None, {}))
        rows = kwargs.get("rows")
        rows = range(ROWS)[rows] if isinstance(rows, slice) else [int(r) for r in (rows if rows is not None else [])]
        frozen = frozen | set(rows) if verb == "freeze" else frozen - set(rows)
    return frozen


def run_rows(cfg, dtype, mask_only, device):
    """frozenopt with row freezes, and the two references stepped alongside."""
    params = make_params(dtype, device=device)
    start = [p.detach().clone() for p in params]
    opt = cfg.make([{"params": params}], mask_only=mask_only)
    per_row = row_params(params)
    own = cfg.make([p for rows in per_row for p in rows])
    torch_rows = row_params(params)
    # (torch's fused SGD refuses momentum buffers that some params have and others lack yet)
    ref = cfg.reference([p for rows in torch_rows for p in rows], fused=cfg.name != "SGD")
    for step in range(STEPS):
        if step in SCHEDULE:
            verb, kwargs = SCHEDULE[step]
            getattr(opt, verb)(*params, **kwargs)
            if kwargs.get("release_state"):
                for rows in per_row + torch_rows:
                    for r in kwargs["rows"]:
                        own.state.pop(rows[r], None)
                        ref.state.pop(rows[r], None)
        frozen = frozen_rows_at(step)
        for p, rows_own, rows_ref, g in zip(params, per_row, torch_rows, grads_for(step, dtype, device)):
            p.grad = g.clone()
            for r in range(ROWS):
                rows_own[r].grad = None if r in frozen else g[r].clone()
                rows_ref[r].grad = None if r in frozen else g[r].clone()
        opt.step()
        own.step()
        ref.step()
    return opt, params, start, per_row, torch_rows


@pytest.mark.parametrize("mask_only", [False, True], ids=["default", "mask_only"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg_id", KERNEL_SWEEP)
def test_rows_step_as_their_own_params(cfg_id, dtype, mask_only, device):
    opt, params, start, per_row, torch_rows = run_rows(config(cfg_id), dtype, mask_only, device)
    always_frozen = [0, 1, 4, 5, 6, 7]
    for p, p0, rows_own, rows_ref in zip(params, start, per_row, torch_rows):
        assert torch.equal(p.detach()[always_frozen], p0[always_frozen]), "a frozen row moved"
        assert not torch.equal(p.detach()[10], p0[10]), "a trainable row did not move"
        own = torch.stack([r.detach() for r in rows_own])
        assert torch.equal(p.detach(), own), "rows differ from the same rows stepped as params of their own"
        if dtype in FLOATS:  # (half types: the parity tests compare the kernels with torch in float64)
            torch.testing.assert_close(p.detach(), torch.stack([r.detach() for r in rows_ref]),
                                       **tolerance(dtype, "torch"))
        state = opt.state[p]
        if state:  # SGD without momentum keeps none
            # Rows 0, 1, 4-7 never trained: no state; each row its own step count.
            assert state[ROWS_KEY].tolist() == [2, 3, 8, 9, 10, 11]
            if "step" in state:
                assert state["step"].tolist() == [5, 5, 7, 2, 7, 7]


@pytest.mark.parametrize("cfg_id", ["sgd_momentum", "adamw_amsgrad"])
def test_rows_frozen_before_the_first_step_hold_no_state(cfg_id):
    emb = nn.Embedding(3000, 64)
    opt = config(cfg_id).make(emb)
    opt.freeze("weight", rows=slice(0, 2998))
    before = emb.weight.detach().clone()
    for _ in range(3):
        emb(torch.tensor([[1, 2998, 2999]])).sum().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[emb.weight]
    assert state[ROWS_KEY].tolist() == [2998, 2999]
    for key, value in state.items():
        if key not in (ROWS_KEY, "step"):
            assert value.shape == (2, 64), key
    assert torch.equal(emb.weight.detach()[:2998], before[:2998])
    assert not torch.equal(emb.weight.detach()[2998:], before[2998:])
    assert opt.frozen == ["weight [2998 of 3000 rows frozen]"]
    assert not opt.is_frozen("weight") and emb.weight.requires_grad
    row = opt.summary().rows[0]
    assert (row.trainable, row.frozen) == (128, 2998 * 64)


def test_release_state_gives_back_the_rows_memory():
    emb = nn.Embedding(100, 64)
    opt = frozenopt.AdamW(emb)
    emb.weight.grad = torch.ones(100, 64)
    opt.step()
    assert opt.state[emb.weight]["exp_avg"].shape == (100, 64)
    opt.freeze("weight", rows=slice(10, 100), release_state=True)
    state = opt.state[emb.weight]
    assert state["exp_avg"].shape == (10, 64) and state[ROWS_KEY].tolist() == list(range(10))
    assert state["step"].tolist() == [1.0] * 10


def test_element_mask_freezes_single_elements():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(6, 7, generator=gen) < 0.5
    p = nn.Parameter(torch.randn(6, 7, generator=gen))
    twin = nn.Parameter(p.detach().clone())
    opt = frozenopt.AdamW([p], weight_decay=0.1, amsgrad=True)
    whole = frozenopt.AdamW([twin], weight_decay=0.1, amsgrad=True)
    opt.freeze(p, mask=mask)
    start = p.detach().clone()
    for _ in range(4):
        g = torch.randn(6, 7, generator=gen)
        p.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        whole.step()
    assert torch.equal(p.detach()[mask], start[mask])
    assert torch.equal(p.detach()[~mask], twin.detach()[~mask])
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert torch.equal(opt.state[p][key][mask], torch.zeros(int(mask.sum())))
        assert torch.equal(opt.state[p][key][~mask], whole.state[twin][key][~mask])
    assert torch.equal(opt.frozen_mask(p), mask)
    assert opt.frozen == [f"<param 0> [{int(mask.sum())} of 42 elements frozen]"]


def test_frozen_mask_and_whole_calls():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    opt = frozenopt.SGD(model, lr=0.1, momentum=0.9)
    opt.freeze("0.weight", rows=[1, 4])
    expected = torch.zeros(6, 4, dtype=torch.bool)
    expected[[1, 4]] = True
    assert torch.equal(opt.frozen_mask("0.weight"), expected)
    assert torch.equal(opt.frozen_mask("1.bias"), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="matches 2"):
        opt.frozen_mask("1")
    opt.freeze("0.weight")  # a whole freeze ends the partial one
    assert opt.frozen == ["0.weight"] and not model[0].weight.requires_grad
    opt.unfreeze("0.weight", rows=[1])
    assert opt.frozen == ["0.weight [5 of 6 rows frozen]"] and model[0].weight.requires_grad
    opt.freeze("0.weight", rows=[1])  # every row frozen again: frozen whole
    assert opt.frozen == ["0.weight"] and not model[0].weight.requires_grad
    opt.unfreeze("0.weight", rows=slice(None))
    assert opt.frozen == []
    opt.freeze("0", rows=[0])
    assert opt.frozen == ["0.weight [1 of 6 rows frozen]", "0.bias [1 of 6 elements frozen]"]
    opt.unfreeze()  # bare: every partial freeze ends too
    assert opt.frozen == [] and all(p.requires_grad for p in model.parameters())


def test_state_dict_keeps_masks_and_row_state():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 64)
    opt = frozenopt.AdamW(emb, weight_decay=0.1)
    opt.freeze("weight", rows=slice(0, 15))
    for step in range(3):
        if step == 1:
            opt.unfreeze("weight", rows=[3])
        emb.weight.grad = torch.randn(20, 64)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin_emb = copy.deepcopy(emb)
    twin = frozenopt.AdamW(twin_emb, weight_decay=0.1)
    buffer.seek(0)
    twin.load_state_dict(torch.load(buffer))
    assert twin.frozen == opt.frozen == ["weight [14 of 20 rows frozen]"]
    for key, value in opt.state[emb.weight].items():
        assert torch.equal(twin.state[twin_emb.weight][key], value), key
    assert twin.state[twin_emb.weight][ROWS_KEY].dtype == torch.int64
    for _ in range(2):
        g = torch.randn(20, 64)
        emb.weight.grad, twin_emb.weight.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
    assert torch.equal(emb.weight, twin_emb.weight)
    # A deep copy carries the masks too.
    assert copy.deepcopy(opt).frozen == opt.frozen


def test_torch_checkpoint_loads_into_a_row_freeze():
    torch.manual_seed(1)
    emb = nn.Embedding(8, 64)
    ref = torch.optim.AdamW(emb.parameters(), weight_decay=0.1, fused=True)
    emb.weight.grad = torch.randn(8, 64)
    ref.step()
    opt = frozenopt.AdamW(emb, weight_decay=0.1)
    opt.freeze("weight", rows=slice(0, 6))
    saved = copy.deepcopy(ref.state_dict())
    opt.load_state_dict(copy.deepcopy(saved))  # torch.optim's layout: no frozen set, the masks stay
    assert opt.frozen == ["weight [6 of 8 rows frozen]"]
    before = emb.weight.detach().clone()
    g = torch.randn(8, 64)
    emb.weight.grad = g.clone()
    opt.step()
    twin = nn.Parameter(before.clone())
    twin_opt = torch.optim.AdamW([twin], weight_decay=0.1, fused=True)
    twin_opt.load_state_dict(saved)
    twin.grad = g.clone()
    twin_opt.step()
    assert torch.equal(emb.weight.detach()[:6], before[:6])
    assert torch.equal(emb.weight.detach()[6:], twin.detach()[6:])
    full = expand_row_state(opt.state[emb.weight], emb.weight)
    assert torch.equal(full["exp_avg"][6:], twin_opt.state[twin]["exp_avg"][6:])
    assert float(full["step"]) == 2.0


def test_all_rows_training_again_go_back_to_torch_layout():
    emb = nn.Embedding(6, 64)
    opt = frozenopt.Adam(emb)
    emb.weight.grad = torch.ones(6, 64)
    opt.step()
    opt.freeze("weight", rows=[0])
    opt.step()
    opt.unfreeze("weight", rows=[0])  # row 0 is a step behind: row state stays
    assert ROWS_KEY in opt.state[emb.weight]
    opt.step()
    opt.freeze("weight", rows=[1, 2, 3, 4, 5])
    opt.step()  # row 0 catches up
    opt.unfreeze()
    state = opt.state[emb.weight]
    assert ROWS_KEY not in state and state["step"].shape == () and float(state["step"]) == 3.0


@pytest.mark.parametrize("call", [
    lambda opt, p: opt.freeze("0.weight", rows=6),
    lambda opt, p: opt.freeze("0.weight", rows=[-7]),
    lambda opt, p: opt.freeze("0.weight", rows=torch.ones(5, dtype=torch.bool)),
    lambda opt, p: opt.freeze("0.weight", rows=[0.5]),
    lambda opt, p: opt.freeze("0.weight", rows=True),
    lambda opt, p: opt.freeze("0.weight", mask=torch.ones(4, 6, dtype=torch.bool)),
    lambda opt, p: opt.freeze("0.weight", mask=torch.ones(6, 4)),
    lambda opt, p: opt.freeze("0.weight", rows=[0], mask=torch.ones(6, 4, dtype=torch.bool)),
    lambda opt, p: opt.freeze(rows=[0]),
    lambda opt, p: opt.freeze("scale", rows=[0]),
    lambda opt, p: opt.freeze("0.weight", mask=torch.ones(6, 4, dtype=torch.bool), release_state=True),
    lambda opt, p: opt.freeze("1.weight", mask=torch.zeros(2, 6, dtype=torch.bool)),  # has rows frozen
    lambda opt, p: opt.freeze("0", rows=[5, 9]),  # 0.bias has 6 rows too, 9 is out of range for both
], ids=["row-past-end", "negative-past-start", "bool-length", "float-index", "bool-scalar", "mask-shape",
        "mask-dtype", "rows-and-mask", "no-target", "0-dim", "release-elements", "mixed-kinds", "one-bad"])
def test_bad_partial_freeze_changes_nothing(call):
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    model.scale = nn.Parameter(torch.tensor(1.0))
    opt = frozenopt.AdamW(model)
    opt.freeze("1.weight", rows=[0])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    before = snapshot(opt)
    masks = {p: opt.frozen_mask(p) for p in model.parameters()}
    with pytest.raises((ValueError, TypeError, IndexError)):
        call(opt, model)
    assert_unchanged(before, snapshot(opt))
    for p, mask in masks.items():
        assert torch.equal(opt.frozen_mask(p), mask)


def test_compiled_step_follows_row_masks_without_recompiling():
    """mask_only under torch.compile: the rows of a param frozen in part step outside the graph
    (read on the host), so changing which rows are frozen compiles nothing new."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    params = make_params(torch.float32)
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    opt = frozenopt.AdamW(params, weight_decay=0.1, mask_only=True)
    eager = frozenopt.AdamW(twin, weight_decay=0.1, mask_only=True)
    for o, ps in ((opt, params), (eager, twin)):
        o.freeze(ps[0], rows=slice(0, 8))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(opt.step, backend=counter)
    frames = []
    for step in range(7):
        for o, ps in ((opt, params), (eager, twin)):
            if step == 3:
                o.unfreeze(ps[0], rows=[4])
            if step == 5:
                o.freeze(ps[0], rows=[10, 11])
        for p, q, g in zip(params, twin, grads_for(step, torch.float32)):
            p.grad, q.grad = g.clone(), g.clone()
        compiled()
        eager.step()
        frames.append(counter.frame_count)
    torch._dynamo.reset()
    assert frames[-1] == frames[2], f"a change of the row mask recompiled: frames after each step {frames}"
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cfg_id", ["sgd_nesterov", "adamw_amsgrad"])
def test_scattered_rows_are_gathered_and_written_back(cfg_id):
    cfg = config(cfg_id)
    gen = torch.Generator().manual_seed(5)
    table = nn.Parameter(torch.randn(50, 128, generator=gen))
    start = table.detach().clone()
    frozen = torch.ones(50, dtype=torch.bool)
    frozen[::7] = False
    opt = cfg.make([table])
    opt.freeze(table, rows=frozen)
    rows = [nn.Parameter(start[r].clone()) for r in range(0, 50, 7)]
    own = cfg.make(rows)
    for _ in range(3):
        g = torch.randn(50, 128, generator=gen)
        table.grad = g.clone()
        for k, r in enumerate(range(0, 50, 7)):
            rows[k].grad = g[r].clone()
        opt.step()
        own.step()
    assert torch.equal(table.detach()[frozen], start[frozen])
    assert torch.equal(table.detach()[~frozen], torch.stack([r.detach() for r in rows]))
    assert opt.state[table][ROWS_KEY].tolist() == list(range(0, 50, 7))


@pytest.mark.parametrize("seed", range(12))
def test_random_row_programs_match_each_row_as_its_own_param(seed):
    """Random freezes, thaws (with released or reset state), whole freezes, steps with and
    without grads, and state_dict round trips; after each, every row and its state must be
    bitwise those of the row held as its own param (grad None while frozen)."""
    rng = torch.Generator().manual_seed(seed)
    cfg = config(["adamw_amsgrad", "sgd_nesterov", "adam_l2", "sgd_dampening"][seed % 4])
    rows_n, width = 10, 64
    table = nn.Parameter(torch.randn(rows_n, width, generator=rng))
    opt = cfg.make([table], mask_only=bool(seed % 2))
    own_rows = [nn.Parameter(table.detach()[r].clone()) for r in range(rows_n)]
    own = cfg.make(own_rows)
    frozen = set()

    def pick():
        return sorted(set(torch.randint(0, rows_n, (int(torch.randint(1, 5, (1,), generator=rng)),),
                                        generator=rng).tolist()))

    for op in range(14):
        kind = int(torch.randint(0, 6, (1,), generator=rng))
        if kind == 0:
            rows, release = pick(), bool(torch.randint(0, 2, (1,), generator=rng))
            opt.freeze(table, rows=rows, release_state=release)
            if release:
                for r in rows:
                    own.state.pop(own_rows[r], None)
            frozen |= set(rows)
        elif kind == 1:
            rows, reset = pick(), bool(torch.randint(0, 2, (1,), generator=rng))
            opt.unfreeze(table, rows=rows, reset_state=reset)
            if reset:
                for r in set(rows) & frozen:
                    own.state.pop(own_rows[r], None)
            frozen -= set(rows)
        elif kind == 2:
            whole = bool(torch.randint(0, 2, (1,), generator=rng))
            (opt.freeze if whole else opt.unfreeze)(table)
            frozen = set(range(rows_n)) if whole else set()
        elif kind == 3:
            saved = copy.deepcopy(opt.state_dict())
            opt.load_state_dict(saved)
        else:
            g = torch.randn(rows_n, width, generator=rng)
            with_grad = kind == 4 or op % 3 == 0
            table.grad = g.clone() if with_grad else None
            for r in range(rows_n):
                own_rows[r].grad = g[r].clone() if with_grad and r not in frozen else None
            opt.step()
            own.step()
        assert torch.equal(opt.frozen_mask(table)[:, 0], torch.tensor([r in frozen for r in range(rows_n)]))
        assert torch.equal(table.detach(), torch.stack([r.detach() for r in own_rows])), f"op {op} (kind {kind})"
        state = opt.state.get(table) or {}
        if ROWS_KEY in state:
            full = expand_row_state(state, table)
            for k, r in enumerate(state[ROWS_KEY].tolist()):
                for key, value in own.state.get(own_rows[r], {}).items():
                    mine = state[key][k]
                    assert torch.equal(mine, value), f"op {op}: row {r} {key}"
            assert set(full) == {k for k in state if k != ROWS_KEY}
        elif state:
            for r in range(rows_n):
                for key, value in own.state.get(own_rows[r], {}).items():
                    mine = state[key] if key == "step" else state[key][r]
                    assert torch.equal(mine, value), f"op {op}: row {r} {key}"


@pytest.mark.parametrize("cfg_id", ["sgd_dampening", "adamw_amsgrad"])
def test_grad_scaler_skips_and_unscales_rows_like_their_own_params(cfg_id):
    """An overflowing step moves nothing (a row's first step included: the state made for it goes,
    as torch.optim drops it); a finite one unscales, as for each row as its own param."""
    cfg = config(cfg_id)
    gen = torch.Generator().manual_seed(9)
    table = nn.Parameter(torch.randn(8, 64, generator=gen))
    rows = [nn.Parameter(table.detach()[r].clone()) for r in range(8)]
    opt, own = cfg.make([table]), cfg.make(rows)
    opt.freeze(table, rows=slice(0, 5))
    scaler, own_scaler = torch.amp.GradScaler("cpu", init_scale=8.0), torch.amp.GradScaler("cpu", init_scale=8.0)
    for s in (scaler, own_scaler):
        s.scale(torch.ones(()))  # (as a loss would: the scaler starts)
    for step in range(4):
        g = torch.randn(8, 64, generator=gen)
        if step == 1:
            g[6, 3] = float("inf")  # a trainable row overflows: the whole step is skipped
        if step == 1:
            opt.unfreeze(table, rows=[1])  # its first step is the one that overflows
        table.grad = g * scaler.get_scale()
        for r in range(8):
            trains = r >= 5 or (step >= 1 and r == 1)
            rows[r].grad = g[r] * own_scaler.get_scale() if trains else None
        before = table.detach().clone()
        scaler.step(opt)
        own_scaler.step(own)
        scaler.update()
        own_scaler.update()
        if step == 1:
            assert torch.equal(table.detach(), before)
        assert torch.equal(table.detach(), torch.stack([r.detach() for r in rows])), f"step {step}"
    assert opt.state[table][ROWS_KEY].tolist() == [1, 5, 6, 7]
