"""frozenopt follows torch.optim step for step, with freezing treated as grad=None,
on every device: each test runs once per device of the matrix (tests/matrix.py),
and its CUDA column skips itself where there is no GPU.

On a GPU the optimizers' eager path launches only the unfrozen params; the
flat-list tests give frozen params a grad (mask_only), with sizes that cross
the kernels' chunk and vector boundaries, so the skip itself is checked.
"""

import copy

import pytest
import torch
from matrix import CLASSES, DTYPES, FLOATS, HALF, KERNEL_SWEEP, config_params, random_tensors, tolerance
from torch import nn

import frozenopt


def make_model(dtype, device, seed=0):
    torch.manual_seed(seed)
    # Sizes cover the vector body, the scalar tail and one-element tensors.
    model = nn.Sequential(nn.Linear(37, 300), nn.Tanh(), nn.Linear(300, 5), nn.Linear(5, 1))
    return model.to(dtype=dtype, device=device)


# Which params are frozen at each step: freeze in the middle, unfreeze later,
# and a second layer frozen for a while, so state resumes after a pause.
FROZEN_AT = {3: {"0"}, 4: {"0"}, 5: {"0", "3"}, 6: {"0", "3"}, 7: {"3"}, 8: {"3"}}


def run_pair(cfg, dtype, device, reference_kw, steps=12, mask_only=False):
    model = make_model(dtype, device)
    reference = copy.deepcopy(model)
    ours = cfg.make(model, mask_only=mask_only)
    theirs = cfg.reference(reference.parameters(), **reference_kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        want = FROZEN_AT.get(step, set())
        ours.unfreeze()
        if want:
            ours.freeze(*sorted(want))
        for (pname, p), q in zip(model.named_parameters(), reference.parameters()):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
            frozen = pname.split(".")[0] in want
            p.grad = g.clone() if (mask_only or not frozen) else None
            q.grad = None if frozen else g.clone()
        ours.step()
        theirs.step()
    return model, reference, ours, theirs


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("reference_kw", [dict(foreach=False), dict(fused=True)], ids=["for-loop", "fused"])
@pytest.mark.parametrize("cfg", config_params())
def test_matches_torch_optim(cfg, dtype, reference_kw, device):
    model, reference, ours, theirs = run_pair(cfg, dtype, device, reference_kw)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, **tolerance(dtype))
    for p, q in zip(model.parameters(), reference.parameters()):
        mine, ref = ours.state.get(p, {}), theirs.state.get(q, {})
        assert mine.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(mine[key].to(ref[key].dtype), ref[key], check_device=False)


@pytest.mark.parametrize("cfg", config_params(["sgd_momentum", "adam_amsgrad", "adamw_amsgrad"]))
def test_mask_only_matches_with_grads_on_frozen(cfg, device):
    """In mask_only mode frozen params keep their grads; the result is still torch's grad=None result."""
    model, reference, _, _ = run_pair(cfg, torch.float32, device, dict(foreach=False), mask_only=True)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", config_params(["sgd_dampening", "sgd_nesterov", "adam_l2", "adamw_amsgrad"]))
def test_half_types_within_torchs_own_error(cfg, dtype, device):
    """Half-type params: our error against a float64 run is within a small multiple of torch's own
    (its fused path, which like ours does the math in float; its for-loop path overflows float16)."""
    model, reference, _, _ = run_pair(cfg, dtype, device, dict(fused=True))
    exact, _, _, _ = run_pair(cfg, torch.float64, device, dict(foreach=False))
    for p, q, e in zip(model.parameters(), reference.parameters(), exact.parameters()):
        ours = (p.double() - e).abs().max().item()
        torchs = (q.double() - e).abs().max().item()
        scale = e.abs().max().item() + 1e-3
        assert ours <= 4 * torchs + 1e-3 * scale, (ours, torchs)


# ----------------------------------------------------------------- flat lists of params, frozen by name

SIZES = [0, 1, 3, 64, 1000, 2 * 65536 + 5, 4096, 0, 33]  # empty, ragged, multi-chunk
STEPS = 6
ALWAYS = {2, 6}  # frozen throughout
SOMETIMES = {4, 5}  # frozen on steps 2 and 3


def frozen_at(step):
    return ALWAYS | (SOMETIMES if step in (2, 3) else set())


def grads_for(params, step):
    """The grads of step ``step``: the same values for every dtype and device."""
    return [g.to(p.device) for g, p in zip(random_tensors([p.numel() for p in params], params[0].dtype, 1000 + step),
                                           params)]


def run_flat(cfg, dtype, device, reference_kw, ref_dtype=None):
    """frozenopt (mask_only, freezing by name, frozen params keep a grad that must be ignored)
    and torch.optim on the same flat list of params, torch's getting grad=None for frozen ones."""
    start = random_tensors(SIZES, dtype, 0, device)
    ours_p = [torch.nn.Parameter(p.clone()) for p in start]
    ref_p = [torch.nn.Parameter(p.clone().to(ref_dtype or dtype)) for p in start]
    ours = cfg.make([(f"p{i}", p) for i, p in enumerate(ours_p)], mask_only=True)
    ref = cfg.reference(ref_p, **reference_kw)
    for step in range(STEPS):
        frozen = frozen_at(step)
        ours.unfreeze()
        ours.freeze(*[f"p{i}" for i in sorted(frozen)])
        for i, (p, r, g) in enumerate(zip(ours_p, ref_p, grads_for(start, step))):
            p.grad = g.clone()
            r.grad = None if i in frozen else g.to(r.dtype)
        ours.step()
        ref.step()
    for i in ALWAYS:
        assert torch.equal(ours_p[i].detach(), start[i]), f"frozen param {i} moved"
        assert not ours.state.get(ours_p[i]), "a param frozen from the start has state"
    return ours, ref, ours_p, ref_p


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", config_params(KERNEL_SWEEP))
def test_flat_params_match_torch_optim(cfg, dtype, device):
    if cfg.name == "SGD" and dtype in HALF:
        # Against torch.optim in float64 from the same start: torch's own fused SGD with
        # momentum rounds its half buffers differently.
        ref_dtype, reference_kw, tol = torch.float64, dict(foreach=False), tolerance(dtype, "torch")
    else:
        ref_dtype, reference_kw, tol = None, dict(fused=True), tolerance(dtype, "fused")
    ours, ref, ours_p, ref_p = run_flat(cfg, dtype, device, reference_kw, ref_dtype)
    for i, (p, r) in enumerate(zip(ours_p, ref_p)):
        torch.testing.assert_close(p.detach().to(r.dtype), r.detach(), **tol, msg=f"param {i}")
        if i in ALWAYS or not p.numel():
            continue
        s, rs = ours.state.get(p, {}), ref.state.get(r, {})
        assert s.keys() == rs.keys(), f"param {i}"
        for key, value in rs.items():
            if key == "step":
                assert s["step"].device == p.device and s["step"].item() == value.item()
            else:
                torch.testing.assert_close(s[key].to(value.dtype), value, **tol, msg=f"param {i} {key}")
    if cfg.name != "SGD":
        for i in SOMETIMES:
            assert ours.state[ours_p[i]]["step"].item() == STEPS - 2


def test_frozen_params_and_state_are_bitwise_unchanged(device):
    params = [torch.nn.Parameter(p) for p in random_tensors(SIZES, torch.float32, 3, device)]
    opt = frozenopt.AdamW([(f"p{i}", p) for i, p in enumerate(params)], lr=0.1, weight_decay=0.5, amsgrad=True,
                          mask_only=True)
    for step in range(2):  # every param gets state
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
    opt.freeze("p1", "p5", "p8")
    frozen = [1, 5, 8]
    before = {i: (params[i].detach().clone(), {k: v.clone() for k, v in opt.state[params[i]].items()})
              for i in frozen}
    for step in range(5):
        for p, g in zip(params, grads_for(params, 10 + step)):
            p.grad = g * (step - 2) if step != 3 else torch.full_like(g, float("inf"))
        opt.step()
    for i in frozen:
        assert torch.equal(params[i].detach(), before[i][0])
        for k, v in opt.state[params[i]].items():
            assert torch.equal(v, before[i][1][k]), f"state {k} of p{i}"


@pytest.mark.parametrize("cfg", config_params(["sgd_momentum", "adam", "adamw"]))
def test_found_inf_moves_nothing(cfg, device):
    params = [torch.nn.Parameter(p) for p in random_tensors(SIZES, torch.float32, 5, device)]
    opt = cfg.make(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    opt.found_inf = torch.ones((), device=device)
    opt.grad_scale = torch.tensor(1024.0, device=device)
    opt.step()
    del opt.found_inf, opt.grad_scale
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[p][k])


def test_grad_scaler_skips_an_overflowing_step(device):
    model = torch.nn.Linear(16, 4).to(device)
    opt = frozenopt.AdamW(model, lr=0.1)
    scaler = torch.amp.GradScaler(device)
    scaler.scale(model(torch.randn(8, 16, device=device)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    steps = [opt.state[p]["step"].clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(torch.randn(8, 16, device=device)).sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    for p, b, s in zip(model.parameters(), before, steps):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["step"], s)


def test_tensor_lr_and_scheduler_changes_follow_torch(device):
    model = make_model(torch.float32, device)
    reference = copy.deepcopy(model)
    ours = frozenopt.AdamW(model, lr=torch.tensor(0.01))
    theirs = torch.optim.AdamW(reference.parameters(), lr=torch.tensor(0.01), foreach=False)
    for step in range(6):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.param_groups[0]["lr"].fill_(0.01 / (step + 1))
        theirs.param_groups[0]["lr"].fill_(0.01 / (step + 1))
        ours.step()
        theirs.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_non_contiguous_params_follow_torch(device):
    torch.manual_seed(0)
    base = torch.randn(8, 6, device=device)
    p = nn.Parameter(base.t())  # a transposed, non-contiguous param
    q = nn.Parameter(base.t().clone())
    ours, theirs = frozenopt.Adam([p], lr=0.1, amsgrad=True), torch.optim.Adam([q], lr=0.1, amsgrad=True)
    for _ in range(4):
        g = torch.randn(6, 8, device=device)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p, q)


def test_non_dense_params_are_stepped_through_copies(device):
    base = torch.randn(64, 64, device=device)
    strided = torch.nn.Parameter(base[:, ::2])  # not dense: copied, stepped, written back
    ref = torch.nn.Parameter(strided.detach().clone())
    opt = frozenopt.Adam([strided], lr=0.1)
    ref_opt = torch.optim.Adam([ref], lr=0.1, fused=True)
    for _ in range(3):
        g = torch.randn(64, 32, device=device)
        strided.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(strided.detach(), ref.detach())


def test_grads_are_never_written(device):
    model = make_model(torch.float32, device)
    for opt in (frozenopt.SGD(model, lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True),
                frozenopt.AdamW(model, lr=0.1, maximize=True)):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.grad_scale, opt.found_inf = torch.tensor(4.0, device=device), torch.tensor(0.0, device=device)
        opt.step()
        del opt.grad_scale, opt.found_inf
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)


@pytest.mark.parametrize("cfg", config_params(["sgd_momentum", "adamw_weight_decay"]))
def test_step_plan_matches_the_op_bitwise(cfg, device):
    """The eager step plan launches cached rows directly; the op path (what a compiled
    step calls) builds them per call. Both give the same bits, also when grads are
    replaced and storages re-seated between steps."""
    ours = [torch.nn.Parameter(p) for p in random_tensors([5, 300, 0, 70_000, 1], torch.float32, 0, device)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    plan_opt, op_opt = cfg.make(ours), cfg.make(theirs)
    for step in range(STEPS):
        for p, q, g in zip(ours, theirs, grads_for(ours, step)):
            p.grad, q.grad = g, g.clone()
        if step == 3:
            for p in ours:
                p.data = p.data.clone()
        plan_opt.step()
        torch.compile(op_opt.step, backend="eager")()  # the traced path: the ops themselves
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q), (cfg.id, step)


# Hyper-parameters edited between steps, as a user or a scheduler that cycles momentum
# does; turning momentum or amsgrad on and off changes which state each step reads.
EDITS = {
    "SGD": [dict(momentum=0.9), dict(dampening=0.3), dict(momentum=0.0), dict(momentum=0.5, weight_decay=0.05)],
    "Adam": [dict(amsgrad=True), dict(betas=(0.85, 0.99)), dict(amsgrad=False), dict(eps=1e-4, maximize=True)],
}


@pytest.mark.parametrize("name", CLASSES)
def test_hyper_parameter_edits_between_steps_follow_torch(name, device):
    model = make_model(torch.float32, device)
    reference = copy.deepcopy(model)
    ours = getattr(frozenopt, name)(model, lr=0.01)
    theirs = getattr(torch.optim, name)(reference.parameters(), lr=0.01, foreach=False)
    gen = torch.Generator().manual_seed(2)
    edits = EDITS["SGD" if name == "SGD" else "Adam"]
    for step in range(2 * len(edits) + 1):
        if step % 2 == 1:
            for opt in (ours, theirs):
                opt.param_groups[0].update(edits[step // 2])
            if theirs.param_groups[0].get("amsgrad"):
                # torch.optim raises KeyError when amsgrad is turned on after the first step;
                # frozenopt starts the running max at zero, as a fresh param's would be.
                for q in reference.parameters():
                    theirs.state[q].setdefault("max_exp_avg_sq", torch.zeros_like(q))
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=gen).to(device)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
        where = f"step {step}"
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m, where=where: f"{where}: {m}")
            for key, value in theirs.state[q].items():
                torch.testing.assert_close(ours.state[p][key], value,
                                           msg=lambda m, where=f"{where} {key}": f"{where}: {m}")
