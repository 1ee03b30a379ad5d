"""Checkpoints mid-schedule with frozen params: torch.save / torch.load(weights_only=True), and DCP;
the frozen set saved unambiguously, torch.optim's hook order, and what freeze/unfreeze do to state."""

import copy
import io

import pytest
import torch
from matrix import BodyHead, assert_same, config, snapshot
from torch import nn

import frozenopt
from frozenopt.finetune import GradualUnfreeze, layer_groups


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


OPTIMIZERS = ["adamw_amsgrad", "sgd_all"]  # configurations of tests/matrix.py


def build(kind):
    model = make_model()
    opt = config(kind).make(layer_groups(model, ["0", "2", "4"], lr=slice(1e-3, 1e-2)))
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


@pytest.mark.parametrize("kind", OPTIMIZERS)
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
    if config(kind).name == "AdamW":
        assert float(opt.state[model[2].weight]["step"]) == 4.0  # trained at steps 4-7 only
        assert float(opt.state[model[0].weight]["step"]) == 10.0  # steps 14-23


def test_checkpoint_loads_into_torch_optim_and_back():
    model, opt, sched, unfreezer = build("adamw")
    run(model, opt, sched, unfreezer, 0, 10)
    ckpt = torch.load(save(model, opt, sched, unfreezer), weights_only=True)
    torch_groups = [{"params": [p for _, p in g["params"]]} for g in layer_groups(model, ["0", "2", "4"])]
    torch_opt = torch.optim.AdamW(torch_groups, amsgrad=True)
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


def test_distributed_checkpoint_refuses_rows_frozen_and_writes_nothing(tmp_path):
    pytest.importorskip("torch.distributed.checkpoint")
    from frozenopt.distributed import save_checkpoint

    model, opt, _, _ = build("adamw")
    opt.freeze("4.weight", rows=[0])
    with pytest.raises(ValueError, match="'4.weight' has one"):
        save_checkpoint(model, opt, str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


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


def test_reset_state_and_release_state_touch_only_what_they_should():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = frozenopt.Adam(model, lr=0.1)
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    opt.freeze("0.weight")
    opt.unfreeze("0", reset_state=True)  # 0.bias was training: its state stays
    assert model[0].weight not in opt.state
    assert opt.state[model[0].bias]["step"].item() == 1
    opt.unfreeze(reset_state=True)  # nothing frozen: nothing reset
    assert opt.state[model[1].weight]["step"].item() == 1
    opt.freeze("1.weight")
    opt.freeze("1", release_state=True)  # every param it names ends frozen: all give their state back
    assert model[1].weight not in opt.state and model[1].bias not in opt.state
    assert opt.state[model[0].bias]["step"].item() == 1


# ---------------------------------------------------------------- groups that repeat bare names


def bare_named(model, **kwargs):
    """Groups built from each submodule's own named_parameters(): "weight" and "bias" twice."""
    return frozenopt.AdamW([{"params": model.body.named_parameters()},
                            {"params": model.head.named_parameters()}], **kwargs)


def trained_bare_named():
    model = BodyHead(3, 3, 2)
    opt = bare_named(model)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("frozen", [["body.weight"], ["head.weight"], ["body.bias", "head.weight"],
                                    ["body.weight", "head.weight"]])
def test_repeated_bare_names_restore_the_exact_frozen_set(frozen):
    model, opt = trained_bare_named()
    opt.freeze(*[model.get_parameter(n) for n in frozen])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)

    model2, opt2 = trained_bare_named()
    opt2.freeze(model2.body)  # a different frozen set: the checkpoint's replaces it
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    got = [n for n, p in model2.named_parameters() if opt2.is_frozen(p)]
    assert got == frozen
    assert [n for n, p in model2.named_parameters() if not p.requires_grad] == frozen


def test_names_only_checkpoints_still_load_and_ambiguous_ones_are_refused():
    """Older checkpoints list the frozen params by name only."""
    model, opt = trained_bare_named()
    saved = opt.state_dict()
    model2, opt2 = trained_bare_named()
    opt2.freeze(model2.head.bias)
    before = snapshot(opt2)
    with pytest.raises(ValueError, match=r"lists 'weight' 1 time\(s\), but 2 params.*cannot tell which"):
        opt2.load_state_dict(copy.deepcopy({**saved, "frozen": ["weight"]}))
    assert_same(before, snapshot(opt2))
    # all or none of the params that share a name: unambiguous
    opt2.load_state_dict(copy.deepcopy({**saved, "frozen": ["weight", "weight"]}))
    assert [n for n, p in model2.named_parameters() if opt2.is_frozen(p)] == ["body.weight", "head.weight"]
    # names that are unique load as before
    model3 = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt3 = frozenopt.SGD(model3, lr=0.1)
    opt3.load_state_dict({**opt3.state_dict(), "frozen": ["1.weight"]})
    assert opt3.frozen == ["1.weight"]


def test_loading_keeps_the_optimizers_own_param_names():
    model, opt = trained_bare_named()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["param_names"] = ["old.weight", "old.bias"]  # e.g. a renamed model
    named = opt.param_groups[0]["param_names"]
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["param_names"] is named and named == ["weight", "bias"]
    # into an optimizer without names: none appear
    plain = frozenopt.AdamW(list(model.parameters()))
    plain.load_state_dict(torch.optim.AdamW(model.named_parameters()).state_dict())
    assert all("param_names" not in g for g in plain.param_groups)


def test_state_dict_hooks_run_in_torch_optims_order():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = frozenopt.SGD(model, lr=0.1)
    opt.freeze("0")
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(("post", copy.deepcopy(sd["frozen"]))))
    saved = opt.state_dict()
    assert seen == [("post", {"params": [0, 1], "names": ["0.weight", "0.bias"]})]

    fresh_model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    fresh = frozenopt.SGD(fresh_model, lr=0.1)
    seen.clear()

    def migrate(o, sd):  # an old checkpoint that names a layer since renamed
        seen.append("pre")
        sd["frozen"] = [n.replace("first", "0") for n in sd["frozen"]]

    fresh.register_load_state_dict_pre_hook(migrate)
    fresh.register_load_state_dict_post_hook(lambda o: seen.append(("loaded", list(o.frozen))))
    fresh.load_state_dict({**saved, "frozen": ["first.weight", "first.bias"]})
    assert seen == ["pre", ("loaded", ["0.weight", "0.bias"])]  # each hook once, the post-hook after the load
    assert fresh.frozen == ["0.weight", "0.bias"] and not fresh_model[0].weight.requires_grad
