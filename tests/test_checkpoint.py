"""Checkpoints mid-schedule with frozen params: torch.save / torch.load(weights_only=True), and DCP."""

import io

import pytest
import torch
from torch import nn

import frozenopt
from frozenopt.finetune import GradualUnfreeze, layer_groups


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


OPTIMIZERS = {
    "adamw": lambda groups: frozenopt.AdamW(groups, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "sgd": lambda groups: frozenopt.SGD(groups, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
}


def build(kind):
    model = make_model()
    opt = OPTIMIZERS[kind](layer_groups(model, ["0", "2", "4"], lr=slice(1e-3, 1e-2)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-3, 3e-3, 1e-2], total_steps=30)
    opt.freeze("0", "2")  # frozen from the start: no state
    unfreezer = GradualUnfreeze(opt, {4: "2", 14: ["0"]})
    return model, opt, sched, unfreezer


def run(model, opt, sched, unfreezer, start, stop):
    for step in range(start, stop):
        unfreezer.step(step)
        if step == 8:
            opt.freeze("2.weight")  # trained for a while, then frozen: its state is kept
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def save(model, opt, sched, unfreezer):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                "unfreeze": unfreezer.state_dict()}, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_resume_mid_schedule_is_bitwise_identical(kind):
    straight = build(kind)
    run(*straight, 0, 24)

    first = build(kind)
    run(*first, 0, 11)
    assert first[1].frozen == ["0.weight", "0.bias", "2.weight"]
    assert first[0][0].weight not in first[1].state  # frozen from the start: no state allocated
    buf = save(*first)

    model, opt, sched, unfreezer = resumed = build(kind)
    ckpt = torch.load(buf, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    sched.load_state_dict(ckpt["sched"])
    unfreezer.load_state_dict(ckpt["unfreeze"])
    assert opt.frozen == ["0.weight", "0.bias", "2.weight"]  # restored by name from the checkpoint
    assert model[0].weight.requires_grad is False
    run(*resumed, 11, 24)

    assert opt.frozen == straight[1].frozen == ["2.weight"]
    for p, q in zip(model.parameters(), straight[0].parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), straight[0].parameters()):
        for key, value in straight[1].state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in straight[1].param_groups]
    if kind == "adamw":
        assert float(opt.state[model[2].weight]["step"]) == 4.0  # trained at steps 4-7 only
        assert float(opt.state[model[0].weight]["step"]) == 10.0  # steps 14-23


def test_checkpoint_loads_into_torch_optim_and_back():
    model, opt, sched, unfreezer = build("adamw")
    run(model, opt, sched, unfreezer, 0, 10)
    ckpt = torch.load(save(model, opt, sched, unfreezer), weights_only=True)
    torch_opt = torch.optim.AdamW([{"params": [p for _, p in g["params"]]} for g in layer_groups(model, ["0", "2", "4"])],
                                  amsgrad=True)
    torch_opt.load_state_dict({k: v for k, v in ckpt["optim"].items() if k != "frozen"})
    assert set(torch_opt.state_dict()["state"]) == set(ckpt["optim"]["state"])
    back = frozenopt.AdamW(layer_groups(model, ["0", "2", "4"]), amsgrad=True)
    back.load_state_dict(torch_opt.state_dict())  # a torch.optim checkpoint: frozen set left as is
    assert back.frozen == ["0.weight", "0.bias", "2.weight"]  # requires_grad=False params start frozen


def test_distributed_checkpoint_keeps_state_of_trained_then_frozen_params(tmp_path):
    pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from frozenopt.distributed import load_checkpoint, save_checkpoint

    model, opt, sched, unfreezer = build("adamw")
    run(model, opt, sched, unfreezer, 0, 11)
    _, optim_sd = get_state_dict(model, opt)
    assert {"2.weight", "2.bias", "4.weight"} <= set(optim_sd["state"])  # 2.weight: trained, then frozen
    assert "0.weight" not in optim_sd["state"]  # never trained: no state to keep
    save_checkpoint(model, opt, str(tmp_path), extra={"sched": sched.state_dict()})

    model2, opt2, sched2, _ = build("adamw")  # 0 and 2 frozen from the start, no state
    opt2.unfreeze("0")  # a different frozen set: the checkpoint's replaces it
    extra = load_checkpoint(model2, opt2, str(tmp_path), extra={"sched": sched2.state_dict()})
    assert extra["sched"]["last_epoch"] == 11
    assert opt2.frozen == opt.frozen == ["0.weight", "0.bias", "2.weight"]
    assert model2[0].weight.requires_grad is False and model2[2].bias.requires_grad is True
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert set(opt.state.get(p, {})) == set(opt2.state.get(q, {}))
        for key, value in opt.state.get(p, {}).items():
            assert torch.equal(opt2.state[q][key], value), key
    # and the resumed optimizer steps like the original
    sched2.load_state_dict(extra["sched"])
    unfreezer2 = GradualUnfreeze(opt2, {4: "2", 14: ["0"]})
    unfreezer2.load_state_dict(unfreezer.state_dict())
    run(model, opt, sched, unfreezer, 11, 16)
    run(model2, opt2, sched2, unfreezer2, 11, 16)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_plain_dcp_drops_state_of_frozen_params_that_the_helper_keeps(tmp_path):
    """Why frozenopt.distributed exists: DCP loads only the state a fresh optimizer already has."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, sched, unfreezer = build("adamw")
    run(model, opt, sched, unfreezer, 0, 11)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    model2, opt2, _, _ = build("adamw")
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    loaded = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert model2[2].weight not in opt2.state  # measured: the trained-then-frozen state is not loaded
    assert opt2.frozen == ["0.weight", "0.bias", "2.weight", "2.bias"]  # nor the frozen set
