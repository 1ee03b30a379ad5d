"""frozenopt follows torch.optim step for step, with freezing treated as grad=None."""

import copy

import pytest
import torch
from torch import nn

import frozenopt

CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.5, weight_decay=0.05)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01, maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("Adam", dict(lr=0.01, maximize=True, betas=(0.8, 0.99), eps=1e-6)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.3, amsgrad=True)),
    ("AdamW", dict(lr=0.01, maximize=True)),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in CONFIGS]


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    # Sizes cover the vector body, the scalar tail and one-element tensors.
    return nn.Sequential(nn.Linear(37, 300), nn.Tanh(), nn.Linear(300, 5), nn.Linear(5, 1)).to(dtype)


# Which params are frozen at each step: freeze in the middle, unfreeze later,
# and a second layer frozen for a while, so state resumes after a pause.
FROZEN_AT = {3: {"0"}, 4: {"0"}, 5: {"0", "3"}, 6: {"0", "3"}, 7: {"3"}, 8: {"3"}}


def run_pair(name, kw, dtype, reference_kw, steps=12, mask_only=False):
    model = make_model(dtype)
    reference = copy.deepcopy(model)
    ours = getattr(frozenopt, name)(model, mask_only=mask_only, **kw)
    theirs = getattr(torch.optim, name)(reference.parameters(), **kw, **reference_kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        want = FROZEN_AT.get(step, set())
        ours.unfreeze()
        if want:
            ours.freeze(*sorted(want))
        for (pname, p), q in zip(model.named_parameters(), reference.parameters()):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            frozen = pname.split(".")[0] in want
            p.grad = g.clone() if (mask_only or not frozen) else None
            q.grad = None if frozen else g.clone()
        ours.step()
        theirs.step()
    return model, reference, ours, theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reference_kw", [dict(foreach=False), dict(fused=True)], ids=["for-loop", "fused"])
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_matches_torch_optim(name, kw, dtype, reference_kw):
    model, reference, ours, theirs = run_pair(name, kw, dtype, reference_kw)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    for p, q in zip(model.parameters(), reference.parameters()):
        mine, ref = ours.state.get(p, {}), theirs.state.get(q, {})
        assert mine.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(mine[key].cpu().to(ref[key].dtype), ref[key], check_device=False)


@pytest.mark.parametrize("name,kw", [CONFIGS[1], CONFIGS[8], CONFIGS[11]], ids=[IDS[1], IDS[8], IDS[11]])
def test_mask_only_matches_with_grads_on_frozen(name, kw):
    """In mask_only mode frozen params keep their grads; the result is still torch's grad=None result."""
    model, reference, _, _ = run_pair(name, kw, torch.float32, dict(foreach=False), mask_only=True)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", [CONFIGS[2], CONFIGS[3], CONFIGS[7], CONFIGS[11]],
                         ids=[IDS[2], IDS[3], IDS[7], IDS[11]])
def test_half_types_within_torchs_own_error(name, kw, dtype):
    """Half-type params: our error against a float64 run is within a small multiple of torch's own
    (its fused path, which like ours does the math in float; its for-loop path overflows float16)."""
    model, reference, _, _ = run_pair(name, kw, dtype, dict(fused=True))
    exact, _, _, _ = run_pair(name, kw, torch.float64, dict(foreach=False))
    for p, q, e in zip(model.parameters(), reference.parameters(), exact.parameters()):
        ours = (p.double() - e).abs().max().item()
        torchs = (q.double() - e).abs().max().item()
        scale = e.abs().max().item() + 1e-3
        assert ours <= 4 * torchs + 1e-3 * scale, (ours, torchs)


def test_tensor_lr_and_scheduler_changes_follow_torch():
    model = make_model(torch.float32)
    reference = copy.deepcopy(model)
    ours = frozenopt.AdamW(model, lr=torch.tensor(0.01))
    theirs = torch.optim.AdamW(reference.parameters(), lr=torch.tensor(0.01))
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


def test_non_contiguous_params_follow_torch():
    torch.manual_seed(0)
    base = torch.randn(8, 6)
    p = nn.Parameter(base.t())  # a transposed, non-contiguous param
    q = nn.Parameter(base.t().clone())
    ours, theirs = frozenopt.Adam([p], lr=0.1, amsgrad=True), torch.optim.Adam([q], lr=0.1, amsgrad=True)
    for _ in range(4):
        g = torch.randn(6, 8)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p, q)


def test_grads_are_never_written():
    model = make_model(torch.float32)
    for opt in (frozenopt.SGD(model, lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True),
                frozenopt.AdamW(model, lr=0.1, maximize=True)):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        scale = torch.tensor(4.0)
        opt.grad_scale, opt.found_inf = scale, torch.tensor(0.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)


# Hyper-parameters edited between steps, as a user or a scheduler that cycles momentum
# does; turning momentum or amsgrad on and off changes which state each step reads.
EDITS = {
    "SGD": [dict(momentum=0.9), dict(dampening=0.3), dict(momentum=0.0), dict(momentum=0.5, weight_decay=0.05)],
    "Adam": [dict(amsgrad=True), dict(betas=(0.85, 0.99)), dict(amsgrad=False), dict(eps=1e-4, maximize=True)],
}


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_hyper_parameter_edits_between_steps_follow_torch(name):
    model = make_model(torch.float32)
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
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"step {step}: {m}")
            for key, value in theirs.state[q].items():
                torch.testing.assert_close(ours.state[p][key], value, msg=lambda m: f"step {step} {key}: {m}")
