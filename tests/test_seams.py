"""The optimizer's public methods that frozenopt's own helpers (finetune, distributed)
build on: named_params, params_of, is_param_frozen, init_state."""

import pytest
import torch
from torch import nn

import frozenopt


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_named_params_in_optimizer_order():
    model = _model()
    opt = frozenopt.AdamW(model, lr=0.1)
    assert [n for n, _ in opt.named_params()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(p is q for (_, p), q in zip(opt.named_params(), model.parameters()))
    unnamed = frozenopt.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    assert [n for n, _ in unnamed.named_params()] == [None]


def test_named_params_lists_a_tied_param_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    opt = frozenopt.Adam(Tied(), lr=0.1)
    assert [n for n, _ in opt.named_params()] == ["emb.weight"]


def test_params_of_matches_like_freeze_and_changes_nothing():
    model = _model()
    opt = frozenopt.AdamW(model, lr=0.1)
    assert opt.params_of("0") == [model[0].weight, model[0].bias]
    assert opt.params_of("*.bias") == [model[0].bias, model[2].bias]
    assert opt.frozen == []
    with pytest.raises(ValueError, match="no parameter matches"):
        opt.params_of("nothing.here")
    with pytest.raises(TypeError, match="needs a target"):
        opt.params_of()


@pytest.mark.parametrize("mask_only", [False, True])
def test_is_param_frozen_follows_freeze_and_requires_grad(mask_only):
    model = _model()
    opt = frozenopt.SGD(model, lr=0.1, mask_only=mask_only)
    opt.freeze("0")
    assert opt.is_param_frozen(model[0].weight) and not opt.is_param_frozen(model[2].weight)
    opt.unfreeze("0")
    assert not opt.is_param_frozen(model[0].weight)
    if not mask_only:  # the default mode follows requires_grad, as is_frozen does
        model[2].weight.requires_grad_(False)
        assert opt.is_param_frozen(model[2].weight) == opt.is_frozen(model[2].weight) is True


def test_init_state_creates_first_step_state_for_the_targets_only():
    model = _model()
    opt = frozenopt.AdamW(model, lr=0.1)
    opt.freeze("0")
    opt.init_state("0")
    assert set(opt.state) == {model[0].weight, model[0].bias}
    assert torch.equal(opt.state[model[0].weight]["exp_avg"], torch.zeros(4, 4))
    assert float(opt.state[model[0].weight]["step"]) == 0.0
    before = model[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # frozen: bitwise unchanged, state untouched
    assert torch.equal(model[0].weight, before)
    assert float(opt.state[model[0].weight]["step"]) == 0.0
    assert float(opt.state[model[2].weight]["step"]) == 1.0


def test_init_state_keeps_existing_state_and_refuses_unknown_targets():
    model = _model()
    opt = frozenopt.Adam(model, lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    exp_avg = opt.state[model[0].weight]["exp_avg"].clone()
    opt.init_state()
    assert torch.equal(opt.state[model[0].weight]["exp_avg"], exp_avg)
    with pytest.raises(ValueError, match="no parameter matches"):
        opt.init_state("nothing.here")


@pytest.mark.parametrize("mask_only", [False, True])
def test_frozen_version_goes_up_when_the_frozen_set_may_change_and_not_at_steps(mask_only):
    model = _model()
    opt = frozenopt.AdamW(model, lr=0.1, mask_only=mask_only)
    seen = [opt.frozen_version]

    def changed():
        seen.append(opt.frozen_version)
        return seen[-1] != seen[-2]

    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    assert opt.frozen == [] and not opt.is_frozen("0")
    assert not changed()  # steps and questions: caches keyed on it stay valid
    opt.freeze("0")
    assert changed()
    checkpoint = opt.state_dict()
    opt.unfreeze()
    assert changed()
    opt.load_state_dict(checkpoint)
    assert changed() and opt.frozen == ["0.weight", "0.bias"]
    opt.add_param_group({"params": [("extra", nn.Parameter(torch.zeros(2)))]})
    assert changed()
    del opt.param_groups[1]  # an edit the optimizer sees at its next look
    assert opt.frozen == ["0.weight", "0.bias"] and changed()
