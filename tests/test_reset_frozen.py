"""opt.reset_frozen() goes back to the frozen set the optimizer started with, and a bare
unfreeze() that thaws params frozen from the start (PEFT's base weights) says so."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import frozenopt

THAW_WARNING = "frozenopt: unfreeze with no target thaws"


def adapter_model():
    """A base model frozen before the optimizer is built, as PEFT leaves it, and a trainable adapter."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"base": nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)), "adapter": nn.Linear(4, 4)})
    model["base"].requires_grad_(False)
    return model


def step(model, opt):
    opt.zero_grad()
    model["adapter"](model["base"](torch.randn(3, 4))).pow(2).sum().backward()
    opt.step()


BASE = ["base.0.weight", "base.0.bias", "base.1.weight", "base.1.bias"]


@pytest.mark.parametrize("mask_only", [False, True])
def test_bare_unfreeze_warns_and_reset_frozen_goes_back(mask_only):
    model = adapter_model()
    opt = frozenopt.AdamW(model, lr=1e-2, mask_only=mask_only)
    assert opt.frozen == BASE
    with pytest.warns(UserWarning, match=r"thaws 4 param\(s\) that were frozen when the optimizer was built "
                                         r"\(e.g. 'base.0.weight'\).*full fine-tuning.*reset_frozen"):
        assert opt.unfreeze() == BASE
    if mask_only:
        model["base"].requires_grad_(True)  # mask_only leaves autograd alone: grads are the user's (DDP) choice
    step(model, opt)
    assert not torch.equal(model["base"][0].weight, adapter_model()["base"][0].weight)  # the base trained
    trained = model["base"][0].weight.detach().clone()
    assert opt.reset_frozen() == BASE
    assert opt.frozen == BASE
    assert all(p.requires_grad == mask_only for p in model["base"].parameters())  # mask_only: untouched
    state = {k: v.clone() for k, v in opt.state[model["base"][0].weight].items()}
    step(model, opt)
    assert torch.equal(model["base"][0].weight, trained)  # frozen again: does not move
    assert all(torch.equal(state[k], v) for k, v in opt.state[model["base"][0].weight].items())  # state kept
    assert opt.reset_frozen() == []


def test_reset_frozen_unfreezes_what_was_frozen_later():
    model = adapter_model()
    opt = frozenopt.SGD(model, lr=0.1)
    opt.freeze("adapter")
    assert opt.reset_frozen() == ["adapter.weight", "adapter.bias"]
    assert opt.frozen == BASE and model["adapter"].weight.requires_grad


def test_no_warning_when_nothing_was_frozen_from_the_start_or_targets_are_named():
    model = adapter_model()
    model.requires_grad_(True)
    opt = frozenopt.AdamW(model, lr=1e-2)
    opt.freeze("base")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.unfreeze() == BASE  # frozen after construction: the user's own choice
        frozen_at_start = frozenopt.AdamW(adapter_model(), lr=1e-2)
        assert frozen_at_start.unfreeze("*") == BASE  # every param, said explicitly
        assert frozen_at_start.reset_frozen() == BASE
        assert frozen_at_start.unfreeze("base.0") == BASE[:2]


def test_add_param_group_params_frozen_when_they_join_count():
    model = adapter_model()
    opt = frozenopt.SGD(model["adapter"].parameters(), lr=0.1)
    opt.add_param_group({"params": list(model["base"].parameters())})
    with pytest.warns(UserWarning, match=r"thaws 4 param\(s\)"):
        opt.unfreeze()
    assert len(opt.reset_frozen()) == 4
    assert all(not p.requires_grad for p in model["base"].parameters())


def test_deepcopy_and_pickle_carry_the_start_set():
    model = adapter_model()
    opt = frozenopt.AdamW(model, lr=1e-2)
    with pytest.warns(UserWarning):
        opt.unfreeze()
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        params = [p for g in copied.param_groups for p in g["params"]]
        assert copied.frozen == []
        assert copied.reset_frozen() == BASE
        assert [p.requires_grad for p in params] == [False] * 4 + [True] * 2
    assert opt.frozen == []  # the original as it was
    assert all(p.requires_grad for p in model.parameters())


def test_load_state_dict_restores_the_frozen_set_and_keeps_the_start_set():
    """A resumed run builds its model and optimizer the same way, then loads: the checkpoint's
    frozen set is restored, and reset_frozen still goes back to the start set."""
    model = adapter_model()
    opt = frozenopt.AdamW(model, lr=1e-2)
    opt.unfreeze("base.1")
    step(model, opt)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = adapter_model()
    resumed = frozenopt.AdamW(resumed_model, lr=1e-2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.frozen == BASE[:2]
    assert resumed.reset_frozen() == BASE[2:]
    assert resumed.frozen == BASE
    # An optimizer that started with nothing frozen keeps that start set through a load.
    plain = adapter_model().requires_grad_(True)
    other = frozenopt.AdamW(plain, lr=1e-2)
    other.load_state_dict(opt.state_dict())
    assert other.frozen == BASE[:2] and other.reset_frozen() == BASE[:2] and other.frozen == []
