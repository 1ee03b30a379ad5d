"""AMP on the CPU: torch.amp.GradScaler + autocast with frozenopt, against torch.optim's fused path.

frozenopt optimizers set ``_step_supports_amp_scaling``: GradScaler hands them
``grad_scale``/``found_inf`` and they unscale inside the kernel and skip the whole
step (no param, no state, no step counter moves) when ``found_inf`` is set, as
torch.optim's ``fused=True`` optimizers do.
"""

import pytest
import torch
from torch import nn

import frozenopt


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


def twins():
    a = make_model()
    b = make_model()
    b.load_state_dict(a.state_dict())
    return a, b


FROZEN_AT = {3: "2", 9: None}  # step -> freeze this layer (None: unfreeze all)
INJECT_INF_AT = (5,)  # steps where an unfrozen grad gets an inf after backward


def train(model, opt, scaler, dtype, *, reference, steps=12, clip=None):
    """Runs the loop; for the reference, frozen params get requires_grad=False (grad None)."""
    g = torch.Generator().manual_seed(3)
    scales, moved = [], []
    for i in range(steps):
        if i in FROZEN_AT:
            target = FROZEN_AT[i]
            if reference:
                for name, p in model.named_parameters():
                    p.requires_grad_(target is None or not name.startswith(target + "."))
            elif target is None:
                opt.unfreeze()
            else:
                opt.freeze(target)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if i in INJECT_INF_AT:
            model[0].bias.grad[0] = float("inf")
        if clip is not None:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
        moved.append([not torch.equal(b, p) for b, p in zip(before, model.parameters())])
    return scales, moved


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["scaled", "unscale_then_clip"])
def test_grad_scaler_matches_torch_fused(dtype, clip):
    model, ref_model = twins()
    opt = frozenopt.AdamW(model, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30, growth_interval=3)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30, growth_interval=3)
    scales, moved = train(model, opt, scaler, dtype, reference=False, clip=clip)
    ref_scales, ref_moved = train(ref_model, ref, ref_scaler, dtype, reference=True, clip=clip)

    assert scales == ref_scales  # the same overflow decisions
    assert moved == ref_moved  # the same params moved at each step
    skipped = [i for i, m in enumerate(moved) if not any(m)]
    assert 5 in skipped  # the injected inf
    if dtype is torch.float16:
        assert 0 in skipped  # 2**30 overflows float16 grads: a real overflow, not only the injected one
    for i in range(3, 9):
        assert not moved[i][2] and not moved[i][3], f"frozen layer 2 moved at step {i}"
    # bfloat16 autocast rounds activations to 8 bits of mantissa, which turns the last-bit
    # differences between two correct fp32 kernels into visible ones after a few steps.
    tol = {} if dtype is torch.float16 else dict(rtol=2e-2, atol=1e-3)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **tol)
    # step counters count only the steps taken, as torch's do
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])
    assert float(opt.state[model[0].weight]["step"]) == 12 - len(skipped)


def test_overflow_step_leaves_everything_bitwise_unchanged():
    model, _ = twins()
    opt = frozenopt.SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-2, mask_only=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = torch.randn(4, 8), torch.randn(4, 4)

    def backward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()

    backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    opt.freeze("4")
    params = [p.detach().clone() for p in model.parameters()]
    buffers = {p: opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    backward()
    model[2].weight.grad[1, 1] = float("nan")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0  # backed off: the step was an overflow
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
        assert torch.equal(opt.state[p]["momentum_buffer"], buffers[p])
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # GradScaler cleans up


def test_mask_only_inf_in_frozen_grad_skips_the_step():
    """mask_only keeps frozen params' grads, and GradScaler checks every grad of the optimizer.

    So an inf in a frozen layer's grad makes GradScaler skip the step (and back off its scale),
    where torch.optim with that param's grad None would step. Frozen params stay untouched
    either way. Measured behaviour, documented in docs/ecosystem.md.
    """
    model, _ = twins()
    opt = frozenopt.Adam(model, lr=1e-2, mask_only=True)
    opt.freeze("0")
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.mse_loss(model(torch.randn(4, 8)).float(), torch.randn(4, 4))
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 4.0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
