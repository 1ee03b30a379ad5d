"""The freeze contract, the name rules through the optimizer, and worked examples with known values."""

import copy
import re

import pytest
import torch
from matrix import TwoBranch, assert_same, snapshot
from torch import nn

import frozenopt


def known_step(model, opt):
    """One step of the known-value example (see TwoBranch) from the filled weights."""
    model.filled()
    opt.zero_grad()
    a, b = (torch.tensor(x) for x in TwoBranch.KNOWN_INPUTS)
    out1, out2 = model(a, b)
    torch.testing.assert_close(out1, torch.tensor([[2.8, 2.8]]))
    torch.autograd.backward([out1, out2], [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])])
    opt.step()


def test_two_branch_freeze_example():
    model = TwoBranch()
    opt = frozenopt.SGD(model, lr=1.0)
    moved = torch.tensor(TwoBranch.FC2_AFTER_ONE_STEP)

    known_step(model, opt)
    torch.testing.assert_close(model.fc2.weight.detach(), moved)

    assert opt.freeze("fc2") == ["fc2.weight", "fc2.bias"]
    known_step(model, opt)
    assert torch.equal(model.fc2.weight.detach(), torch.full((2, 4), 2.0))
    assert not torch.equal(model.fc1.weight.detach(), torch.ones(2, 4))  # fc1 still trains

    assert opt.unfreeze() == ["fc2.weight", "fc2.bias"]
    known_step(model, opt)
    torch.testing.assert_close(model.fc2.weight.detach(), moved)


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 10)


class BertLike(nn.Module):
    def __init__(self, layers=12):
        super().__init__()
        self.embeddings = nn.ModuleDict({"word_embeddings": nn.Embedding(30, 8), "LayerNorm": nn.LayerNorm(8)})
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            nn.ModuleDict({"attention": nn.Linear(8, 8), "output": nn.Linear(8, 8)}) for _ in range(layers))
        self.pooler = nn.ModuleDict({"dense": nn.Linear(8, 8)})


def test_freeze_all_but_fc():
    model = ResNetLike()
    opt = frozenopt.Adam(model)
    opt.freeze("*")
    opt.unfreeze("fc")
    # The usual recipe: requires_grad=False for every name without "fc".
    expected = [name for name, _ in model.named_parameters() if "fc" not in name]
    assert opt.frozen == expected
    assert [p.requires_grad for p in model.parameters()] == [
        "fc" in name for name, _ in model.named_parameters()]


def test_freeze_bert_all_but_last_two_layers_and_pooler():
    model = BertLike()
    opt = frozenopt.AdamW(model)
    opt.freeze("*")
    opt.unfreeze("encoder.layer.10", "encoder.layer.11", "pooler")
    trainable = [name for name, _ in model.named_parameters() if not opt.is_frozen(name)]
    assert trainable == [name for name, _ in model.named_parameters()
                         if name.startswith(("encoder.layer.10.", "encoder.layer.11.", "pooler."))]
    # The same set through a glob and a regex.
    opt.unfreeze()
    opt.freeze("embeddings", re.compile(r"encoder\.layer\.\d"))
    assert sorted(opt.frozen) == sorted(
        name for name, _ in model.named_parameters() if not name.startswith(("encoder.layer.1", "pooler"))
        or name.startswith("encoder.layer.1."))


def test_frozen_params_and_state_are_bitwise_unchanged():
    """Non-zero, zero and stale grads, weight decay and momentum on: nothing frozen moves."""
    torch.manual_seed(0)
    for make in (lambda m: frozenopt.SGD(m, lr=0.1, momentum=0.9, weight_decay=0.1, mask_only=True),
                 lambda m: frozenopt.AdamW(m, lr=0.1, weight_decay=0.5, amsgrad=True, mask_only=True),
                 lambda m: frozenopt.Adam(m, lr=0.1, weight_decay=0.5, maximize=True, mask_only=True)):
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
        opt = make(model)
        for _ in range(3):  # build up state first
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        opt.freeze("0")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state_before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
        stale = torch.randn(16, 16)
        for step in range(50):
            for p in model.parameters():
                kind = step % 3
                p.grad = torch.randn_like(p) if kind == 0 else torch.zeros_like(p) if kind == 1 else (
                    stale.clone() if p.shape == stale.shape else torch.ones_like(p))
            opt.step()
        for name in ("0.weight", "0.bias"):
            p = dict(model.named_parameters())[name]
            assert torch.equal(p, before[name])
            for key, value in state_before[name].items():
                assert torch.equal(opt.state[p][key], value)
        assert not torch.equal(model[1].weight, before["1.weight"])


def test_frozen_from_start_allocates_no_state_and_step_is_per_param():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen when the model is built, before the optimizer
    opt = frozenopt.Adam(model)
    assert opt.frozen == ["0.weight", "0.bias"]
    for _ in range(3):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert model[0].weight not in opt.state
    assert opt.state[model[1].weight]["step"].item() == 3
    opt.unfreeze("0")
    assert model[0].weight.requires_grad
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["step"].item() == 1
    assert opt.state[model[1].weight]["step"].item() == 4


def test_unfreeze_resumes_state_and_reset_or_release_drops_it():
    model = nn.Linear(4, 4)
    opt = frozenopt.Adam(model)
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    exp_avg = opt.state[model.weight]["exp_avg"].clone()
    opt.freeze("weight")
    assert model.weight.grad is None and not model.weight.requires_grad
    opt.unfreeze("weight")
    assert torch.equal(opt.state[model.weight]["exp_avg"], exp_avg)
    assert opt.state[model.weight]["step"].item() == 2
    opt.unfreeze("weight", reset_state=True)  # was training: nothing to reset
    assert opt.state[model.weight]["step"].item() == 2
    opt.freeze("weight")
    opt.unfreeze("weight", reset_state=True)
    assert model.weight not in opt.state
    opt.freeze("bias", release_state=True)
    assert model.bias not in opt.state


def test_bare_freeze_follows_fastai_and_refuses_a_single_group():
    model = BertLike(layers=2)
    single = frozenopt.SGD(model, lr=0.1)
    with pytest.raises(ValueError, match=r"freeze\('\*'\)"):
        single.freeze()
    assert single.frozen == []
    groups = [{"params": list(model.embeddings.named_parameters(prefix="embeddings"))},
              {"params": list(model.encoder.named_parameters(prefix="encoder"))},
              {"params": list(model.pooler.named_parameters(prefix="pooler"))}]
    opt = frozenopt.SGD(groups, lr=0.1)
    changed = opt.freeze()
    assert changed == [n for n, _ in model.named_parameters() if not n.startswith("pooler")]
    assert opt.freeze_to(1) == [n for n, _ in model.named_parameters() if n.startswith("encoder")]
    assert opt.frozen == [n for n, _ in model.named_parameters() if n.startswith("embeddings")]
    opt.freeze_to(-1)
    assert opt.frozen == changed
    assert opt.unfreeze() == changed


def test_name_rules_through_the_optimizer():
    model = nn.ModuleDict({"fc2": nn.Linear(2, 2), "fc20": nn.Linear(2, 2)})
    opt = frozenopt.SGD(model, lr=0.1)
    assert opt.freeze("fc2") == ["fc2.weight", "fc2.bias"]
    assert opt.freeze("fc2") == []  # already frozen: nothing changes
    assert not opt.is_frozen("fc20")
    assert opt.freeze(model["fc20"].weight) == ["fc20.weight"]
    assert opt.unfreeze(model["fc2"]) == ["fc2.weight", "fc2.bias"]
    assert opt.freeze("fc2?.*") == ["fc20.bias"]


def test_plain_params_freeze_by_object_only():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = frozenopt.SGD([a, b], lr=1.0)
    with pytest.raises(ValueError, match="plain parameters"):
        opt.freeze("a")
    opt.freeze(a)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert torch.equal(a.detach(), torch.ones(2)) and torch.equal(b.detach(), torch.zeros(2))


@pytest.mark.parametrize("call,error,message", [
    (lambda o, m: o.freeze("fc3"), ValueError, r"no parameter matches 'fc3'.*fc2"),
    (lambda o, m: o.freeze("fc2", "nope"), ValueError, "nope"),
    (lambda o, m: o.freeze(3), TypeError, "int"),
    (lambda o, m: o.unfreeze(nn.Linear(2, 2)), ValueError, "Module"),
    (lambda o, m: o.freeze(nn.Parameter(torch.ones(1))), ValueError, "not a parameter of this optimizer"),
    (lambda o, m: o.freeze_to("1"), TypeError, "freeze_to"),
    (lambda o, m: o.freeze(), ValueError, "single param group"),
])
def test_bad_freeze_calls_raise_and_change_nothing(call, error, message):
    model = nn.ModuleDict({"fc1": nn.Linear(2, 2), "fc2": nn.Linear(2, 2)})
    opt = frozenopt.AdamW(model)
    model["fc1"](torch.randn(1, 2)).sum().backward()
    opt.step()
    opt.freeze("fc2")
    before = snapshot(opt)
    with pytest.raises(error, match=message):
        call(opt, model)
    assert_same(before, snapshot(opt))


def test_construction_errors():
    with pytest.raises(ValueError, match="empty parameter list"):
        frozenopt.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        frozenopt.SGD([nn.Parameter(torch.ones(2, dtype=torch.long), requires_grad=False)], lr=0.1)
    with pytest.raises(ValueError, match="more than one device"):
        frozenopt.SGD([nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, device="meta"))], lr=0.1)
    with pytest.raises(ValueError, match="differentiable"):
        frozenopt.Adam([nn.Parameter(torch.ones(2))], differentiable=True)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        frozenopt.AdamW([nn.Parameter(torch.ones(2))], lr=-1.0)


def test_sparse_grad_raises_and_changes_nothing():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 3), "fc": nn.Linear(3, 1)})
    opt = frozenopt.SGD(model, lr=0.1, momentum=0.9)
    model["fc"](torch.randn(2, 3)).sum().backward()
    opt.step()
    model["emb"].weight.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 3), (10, 3), check_invariants=True)
    model["fc"].weight.grad = torch.ones_like(model["fc"].weight)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_same(before, snapshot(opt))


def test_state_dict_round_trip_mid_training_with_frozen_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 1))
    opt = frozenopt.AdamW(model, lr=0.01, amsgrad=True)
    data = [torch.randn(4, 6) for _ in range(8)]

    def train(m, o, batches):
        for x in batches:
            o.zero_grad()
            m(x).sum().backward()
            o.step()

    train(model, opt, data[:3])
    opt.freeze("1")
    train(model, opt, data[3:5])
    saved = copy.deepcopy(opt.state_dict())
    assert saved["frozen"] == {"params": [2, 3], "names": ["1.weight", "1.bias"]}
    clone = copy.deepcopy(model)
    train(model, opt, data[5:])

    for p in clone.parameters():
        p.requires_grad_(True)
    restored = frozenopt.AdamW(clone, lr=0.01, amsgrad=True)
    restored.load_state_dict(saved)
    assert restored.frozen == ["1.weight", "1.bias"] and not clone[1].weight.requires_grad
    train(clone, restored, data[5:])
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_torch_adamw_checkpoint_loads_and_goes_on_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 1))
    twin = copy.deepcopy(model)
    torch_opt = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    for _ in range(3):
        torch_opt.zero_grad()
        model(torch.randn(3, 5)).sum().backward()
        torch_opt.step()
    twin.load_state_dict(model.state_dict())
    ours = frozenopt.AdamW(twin, lr=0.01)
    # A deep copy, as torch.save/torch.load give: torch.optim's load keeps the
    # very step tensors it is handed, which would then be shared.
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for _ in range(3):
        x = torch.randn(3, 5)
        for m, o in ((model, torch_opt), (twin, ours)):
            o.zero_grad()
            m(x).sum().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    # ... and back: our checkpoint loads into torch.optim.AdamW.
    back = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert back.state[model[0].weight]["step"].item() == 6


def test_cpu_capabilities_agree():
    """Each compiled copy of the kernels (ATEN_CPU_CAPABILITY) gives torch.optim's result."""
    import subprocess
    import sys
    script = (
        "import torch, frozenopt, copy\n"
        "torch.manual_seed(0)\n"
        "ps=[torch.nn.Parameter(torch.randn(n, dtype=d)) for n in (1, 7, 300, 4099) "
        "for d in (torch.float32, torch.float64, torch.bfloat16)]\n"
        "qs=copy.deepcopy(ps)\n"
        "a=frozenopt.AdamW(ps, lr=0.1, amsgrad=True); b=torch.optim.AdamW(qs, lr=0.1, amsgrad=True, fused=True)\n"
        "s=frozenopt.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)\n"
        "t=torch.optim.SGD(qs, lr=0.1, momentum=0.9, nesterov=True)\n"
        "for _ in range(3):\n"
        "  for p, q in zip(ps, qs):\n"
        "    p.grad = torch.randn_like(p); q.grad = p.grad.clone()\n"
        "  a.step(); b.step(); s.step(); t.step()\n"
        "print(max(((p.double() - q.double()).abs().max() / (q.double().abs().max() + 1)).item()\n"
        "          for p, q in zip(ps, qs)))\n"
    )
    for cap in ("default", "avx2", "avx512"):
        env = dict(__import__("os").environ, ATEN_CPU_CAPABILITY=cap)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert float(out.stdout) < 2e-2, (cap, out.stdout)  # bfloat16 rounding bounds this


def test_state_made_by_a_traced_step_is_kept_by_the_next_eager_step():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = frozenopt.Adam(model, lr=0.1)
    model[0].weight.grad = torch.ones(3, 3)
    opt.step()  # the other params are pending: no grad, no state yet
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt._step_traced(None, None)  # the compiled path creates their state
    exp_avg = opt.state[model[1].weight]["exp_avg"].clone()
    opt.step()
    assert opt.state[model[1].weight]["step"].item() == 2
    assert not torch.equal(opt.state[model[1].weight]["exp_avg"], torch.zeros_like(exp_avg))
