"""torch.optim.lr_scheduler with frozenopt, and discriminative (per-group) learning rates."""

import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

import frozenopt
from frozenopt.finetune import layer_groups, spread_lr


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.body = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.body(self.embed(x).relu()))


def twins():
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    return a, b


SPLITS = ["embed", "body", "head"]

SCHEDULERS = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=spread_lr(slice(1e-3, 1e-1), 3), total_steps=16),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, [lambda s: 0.9 ** s, lambda s: 1 / (1 + s), lambda s: 1.0]),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=1e-4),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_scheduler_matches_torch_optim_with_frozen_groups(name, kind):
    model, ref_model = twins()
    groups = layer_groups(model, SPLITS, lr=slice(1e-3, 1e-1))
    ref_groups = [{"params": [p for _, p in g["params"]], "lr": g["lr"]}
                  for g in layer_groups(ref_model, SPLITS, lr=slice(1e-3, 1e-1))]
    if kind == "sgd":
        opt = frozenopt.SGD(groups, momentum=0.9)
        ref = torch.optim.SGD(ref_groups, momentum=0.9)
    else:
        opt = frozenopt.AdamW(groups)
        ref = torch.optim.AdamW(ref_groups)
    sched, ref_sched = SCHEDULERS[name](opt), SCHEDULERS[name](ref)
    g = torch.Generator().manual_seed(5)
    lrs, ref_lrs = [], []
    for i in range(16):
        if i == 4:
            opt.freeze_to(1)  # embed frozen (fastai freeze_to over param groups)
            for p in ref_model.embed.parameters():
                p.requires_grad_(False)
        if i == 10:
            opt.unfreeze()
            for p in ref_model.embed.parameters():
                p.requires_grad_(True)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        embed_before = model.embed.weight.detach().clone()
        for m, o in ((model, opt), (ref_model, ref)):
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad()
        if 4 <= i < 10:
            assert torch.equal(model.embed.weight, embed_before), f"frozen group moved at step {i}"
        sched.step()
        ref_sched.step()
        lrs.append([grp["lr"] for grp in opt.param_groups])
        ref_lrs.append([grp["lr"] for grp in ref.param_groups])
    assert lrs == ref_lrs
    assert len({tuple(step) for step in lrs}) > 1, "the scheduler never changed the lrs"
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q)
    assert sched.state_dict()["last_epoch"] == 16


def test_spread_lr_is_geometric():
    lrs = spread_lr(slice(1e-5, 1e-3), 5)
    assert lrs[0] == 1e-5 and lrs[-1] == 1e-3
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(math.isclose(r, 10 ** 0.5) for r in ratios)
    assert spread_lr(slice(None, 1e-3), 3) == [1e-4, 1e-4, 1e-3]  # fastai's slice(None, b)
    assert spread_lr(3e-4, 2) == [3e-4, 3e-4]
    assert spread_lr(slice(1e-5, 1e-3), 1) == [1e-3]
    with pytest.raises(ValueError):
        spread_lr(slice(0.0, 1e-3), 3)
    with pytest.raises(ValueError):
        spread_lr(slice(1e-5, None), 3)


def test_layer_groups_assigns_each_param_once_and_reports_leftovers():
    model, _ = twins()
    groups = layer_groups(model, ["embed", ["body.0", "body.2"], "head"], lr=slice(1e-4, 1e-2), weight_decay=0.0)
    assert [[n for n, _ in g["params"]] for g in groups] == [
        ["embed.weight", "embed.bias"], ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"],
        ["head.weight", "head.bias"]]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-3, 1e-2])
    assert all(g["weight_decay"] == 0.0 for g in groups)
    with pytest.raises(ValueError, match="in no split"):
        layer_groups(model, ["embed", "head"])
    groups = layer_groups(model, ["embed", "head"], rest="first")
    assert [n for n, _ in groups[0]["params"]][-1] == "body.2.bias"
    with pytest.raises(ValueError, match="match no param"):
        layer_groups(model, ["**", "head"])  # '**' takes everything first
    with pytest.raises(ValueError, match="no parameter matches"):
        layer_groups(model, ["embedd"])
    # the optimizer keeps the names: freeze by name works on the groups
    opt = frozenopt.AdamW(layer_groups(model, SPLITS, lr=slice(1e-4, 1e-2)))
    assert opt.freeze() == ["embed.weight", "embed.bias", "body.0.weight", "body.0.bias",
                            "body.2.weight", "body.2.bias"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3, 1e-2])
