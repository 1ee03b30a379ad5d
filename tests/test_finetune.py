"""frozenopt.finetune: keep_norm, frozen BatchNorm in eval mode, gradual unfreezing, stop_gradient."""

import re

import pytest
import torch
from matrix import TwoBranch
from torch import nn

import frozenopt
from frozenopt.finetune import FineTuner, GradualUnfreeze, frozen_bn_eval, layer_groups, norm_param_names, stop_gradient


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU())

    def forward(self, x):
        return self.block(self.bn(self.conv(x)).relu())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def make():
    torch.manual_seed(0)
    model = Net()
    return model, frozenopt.AdamW(model, lr=1e-2)


def train_step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(10, 6, generator=g), torch.randn(10, 3, generator=g)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


NORM = ["backbone.bn.weight", "backbone.bn.bias", "backbone.block.1.weight", "backbone.block.1.bias"]


def test_norm_param_names():
    model, _ = make()
    assert norm_param_names(model) == NORM


def test_keep_norm_leaves_norm_layers_trainable_inside_a_frozen_block():
    model, opt = make()
    tuner = FineTuner(model, opt, keep_norm=True)
    changed = tuner.freeze("backbone")
    assert changed == ["backbone.conv.weight", "backbone.conv.bias", "backbone.block.0.weight",
                       "backbone.block.0.bias"]
    assert opt.frozen == changed
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in changed}
    norm_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in NORM}
    for s in range(3):
        train_step(model, opt, s)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen_before.items())
    assert all(not torch.equal(params[n], v) for n, v in norm_before.items()), "norm params did not train"
    # naming a norm layer itself freezes it, keep_norm or not
    assert tuner.freeze("backbone.bn") == ["backbone.bn.weight", "backbone.bn.bias"]
    assert tuner.freeze(re.compile(r"backbone\.block\.1")) == ["backbone.block.1.weight", "backbone.block.1.bias"]
    assert tuner.unfreeze() and opt.frozen == []


def test_keep_norm_false_freezes_the_whole_block():
    model, opt = make()
    tuner = FineTuner(model, opt, keep_norm=False)
    assert set(tuner.freeze("backbone")) == {n for n, _ in model.backbone.named_parameters(prefix="backbone")}
    with pytest.raises(ValueError, match="no parameter matches"):
        tuner.freeze("backbon")  # a bad name changes nothing
    assert len(opt.frozen) == 8


def test_keep_norm_with_freeze_and_freeze_to_over_groups():
    torch.manual_seed(0)
    model = Net()
    opt = frozenopt.SGD(layer_groups(model, ["backbone.conv", "backbone.bn", "backbone.block", "head"], lr=0.1))
    tuner = FineTuner(model, opt, keep_norm=True)
    tuner.freeze()  # every group but the last, norm layers kept
    assert opt.frozen == ["backbone.conv.weight", "backbone.conv.bias", "backbone.block.0.weight",
                          "backbone.block.0.bias"]
    tuner.freeze_to(-2)  # conv, bn frozen (bn kept), block and head trainable
    assert opt.frozen == ["backbone.conv.weight", "backbone.conv.bias"]
    tuner.freeze_to(0)
    assert opt.frozen == []
    tuner.freeze_to(10)  # all groups, norm kept
    assert opt.frozen == ["backbone.conv.weight", "backbone.conv.bias", "backbone.block.0.weight",
                          "backbone.block.0.bias", "head.weight", "head.bias"]


def test_frozen_batchnorm_runs_in_eval_mode_without_swapping_modules():
    model, opt = make()
    bn = model.backbone.bn
    handle = frozen_bn_eval(model, opt)
    model.train()
    x = torch.randn(10, 6) * 3 + 1

    mean0 = bn.running_mean.clone()
    model(x)
    assert not torch.equal(bn.running_mean, mean0), "unfrozen BN must update its statistics"

    opt.freeze("backbone")
    mean1, var1, count1 = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    out_train = model(x)
    assert torch.equal(bn.running_mean, mean1) and torch.equal(bn.running_var, var1)
    assert int(bn.num_batches_tracked) == count1
    assert bn.training and model.training  # the flag is only off during the frozen layer's forward
    assert type(bn) is nn.BatchNorm1d  # not swapped
    model.eval()
    torch.testing.assert_close(model(x), out_train, rtol=0, atol=0)  # the same as eval mode
    model.train()

    opt.unfreeze("backbone.bn")  # trainable again: batch statistics again
    model(x)
    assert not torch.equal(bn.running_mean, mean1)

    opt.freeze("backbone.bn")
    handle.remove()
    mean2 = bn.running_mean.clone()
    model(x)
    assert not torch.equal(bn.running_mean, mean2), "hooks removed: train mode is train mode again"


def test_finetuner_bn_eval_and_keep_norm_together():
    model, opt = make()
    tuner = FineTuner(model, opt, keep_norm=True, bn_eval=True)
    tuner.freeze("backbone")  # bn params kept trainable -> bn stays in train mode (fastai's train_bn)
    mean = model.backbone.bn.running_mean.clone()
    model(torch.randn(10, 6) + 2)
    assert not torch.equal(model.backbone.bn.running_mean, mean)
    tuner.freeze("backbone.bn")
    mean = model.backbone.bn.running_mean.clone()
    model(torch.randn(10, 6) + 2)
    assert torch.equal(model.backbone.bn.running_mean, mean)
    tuner.remove()


def test_gradual_unfreeze_by_names_and_resume():
    model, opt = make()
    opt.freeze("backbone")
    def schedule(m):
        return {2: "backbone.block", 4: ["backbone.bn", m.backbone.conv]}  # names and modules

    unfreezer = GradualUnfreeze(opt, schedule(model))
    seen = []
    for step in range(6):
        changed = unfreezer.step()
        seen.append((step, changed))
        train_step(model, opt, step)
    assert seen[0] == (0, []) and seen[1] == (1, [])
    assert seen[2][1] == ["backbone.block.0.weight", "backbone.block.0.bias", "backbone.block.1.weight",
                          "backbone.block.1.bias"]
    assert seen[4][1] == ["backbone.conv.weight", "backbone.conv.bias", "backbone.bn.weight", "backbone.bn.bias"]
    assert opt.frozen == []

    # resuming at step 3 from a saved schedule state reapplies nothing already applied
    model2, opt2 = make()
    opt2.freeze("backbone")
    state = {"last": 3, "applied": [2]}
    resumed = GradualUnfreeze(opt2, schedule(model2))
    resumed.load_state_dict(state)
    assert resumed.step() == ["backbone.conv.weight", "backbone.conv.bias", "backbone.bn.weight", "backbone.bn.bias"]
    assert resumed.state_dict() == {"last": 4, "applied": [2, 4]}
    # a jump applies everything due
    opt3 = frozenopt.SGD(Net(), lr=0.1)
    opt3.freeze("*")
    assert len(GradualUnfreeze(opt3, {1: "head", 5: "backbone"}).step(7)) == 10


def test_gradual_unfreeze_with_freeze_to_ints():
    torch.manual_seed(0)
    model = Net()
    opt = frozenopt.AdamW(layer_groups(model, ["backbone.conv", "backbone.bn", "backbone.block", "head"]))
    unfreezer = GradualUnfreeze(opt, {0: -1, 1: -2, 2: -3, 3: 0})
    counts = []
    for epoch in range(4):
        unfreezer.step(epoch)
        counts.append(len(opt.frozen))
    assert counts == [8, 4, 2, 0]  # groups of 2, 2, 4 and 2 params
    with pytest.raises(ValueError):
        GradualUnfreeze(opt, {-1: "head"})
    with pytest.raises(TypeError, match="frozenopt optimizer"):
        GradualUnfreeze(torch.optim.SGD(model.parameters(), lr=0.1), {0: "head"})


def known_run(stop=None):
    """The known-value example of TwoBranch, with stop_gradient(model, stop) when stop is given."""
    model = TwoBranch().filled()
    handle = stop_gradient(model, stop) if stop is not None else None
    x1, x2 = (torch.tensor(x, requires_grad=True) for x in TwoBranch.KNOWN_INPUTS)
    out1, out2 = model(x1, x2)
    (out1 * torch.tensor([1.0, 2.0])).sum().backward(retain_graph=True)
    (out2 * torch.tensor([3.0, 4.0])).sum().backward()
    return model, x1, x2, handle


def test_stop_gradient_two_branch():
    plain, x1, x2, _ = known_run()
    assert x1.grad is not None and x2.grad is not None
    torch.testing.assert_close(plain.fc2.weight.detach() - plain.fc2.weight.grad,  # one step with lr=1
                               torch.tensor(TwoBranch.FC2_AFTER_ONE_STEP))
    model, y1, y2, handle = known_run("fc2")
    assert y1.grad is None, "fc2's input gradient must not reach what comes before it"
    torch.testing.assert_close(y2.grad, x2.grad)  # the fc1 branch is untouched
    torch.testing.assert_close(model.fc2.weight.grad, plain.fc2.weight.grad)  # fc2 still trains
    handle.remove()
    z1 = torch.randn(4, requires_grad=True)
    model(z1, torch.randn(1, 4))[0].sum().backward()
    assert z1.grad is not None

    _, w1, w2, _ = known_run(["fc*"])  # a glob: both branches stopped
    assert w1.grad is None and w2.grad is None
    with pytest.raises(ValueError, match="closest names"):
        stop_gradient(TwoBranch(), "fc3")
    with stop_gradient(model, model.fc1):  # a module object, and a with block
        v2 = torch.randn(1, 4, requires_grad=True)
        model(torch.randn(4), v2)[0].sum().backward()
        assert v2.grad is None
