"""Bad input is refused with a clear message, and nothing changes.

Every row of every table asserts (a) the exception type and a message that
names the problem, and (b) that the optimizer and the model are exactly as
they were: param values, strides and identity, requires_grad, grads, every
state tensor (value and storage), param groups (hyper-parameters and
membership), the frozen set. Rows that build an optimizer assert the model is
unchanged (there is no optimizer to compare).
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from matrix import BY_CLASS, CLASSES, assert_same, model_snapshot, snapshot
from torch import nn

import frozenopt


class Net(nn.Module):
    """fc1, fc2 and fc20: 'fc2' must never match fc20, 'fc' must match nothing. `late`
    gets its first grad only in the call under test, so that call would allocate its state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(3, 4)
        self.late = nn.Linear(2, 1)
        self.fc2 = nn.Linear(4, 2)
        self.fc20 = nn.Linear(2, 2)


def trained(kind: str, *, groups: int = 2, mask_only: bool = False, plain: bool = False):
    """A model and an optimizer with state (but none yet for `late`), a frozen param and
    grads on every param. Groups: [fc1, late] and [fc2, fc20] (lr 0.05)."""
    net = Net()
    named = list(net.named_parameters())
    if plain:
        params = [p for _, p in named]
    elif groups == 1:
        params = net
    else:
        params = [{"params": named[:4]}, {"params": named[4:], "lr": 0.05}]
    opt = BY_CLASS[kind].make(params, mask_only=mask_only)
    for _step in range(3):
        for p in net.parameters():
            p.grad = None if p in set(net.late.parameters()) else torch.randn_like(p)
        opt.step()
    opt.freeze(net.fc20.bias if plain else "fc20.bias")
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    return net, opt


def refused(opt, net, call, exc, match) -> None:
    """call() raises exc with a message matching `match`; opt and net are unchanged."""
    before, model_before = snapshot(opt), model_snapshot(net)
    with pytest.raises(exc, match=match):
        call()
    assert_same(before, snapshot(opt))
    assert_same(model_before, model_snapshot(net))


# ---------------------------------------------------------------------------- names and targets

FOREIGN = nn.Linear(2, 2)
TARGET_ROWS = [
    # (id, targets, exception, message)
    ("unknown name", ("fc3",), ValueError, r"no parameter matches 'fc3'; closest names: .*'fc\d"),
    ("prefix is not a substring: 'fc'", ("fc",), ValueError, r"no parameter matches 'fc'; closest names"),
    ("'fc2.w' is not 'fc2.weight'", ("fc2.w",), ValueError, r"no parameter matches 'fc2.w'.*'fc2.weight'"),
    ("too deep", ("fc2.weight.x",), ValueError, r"no parameter matches 'fc2.weight.x'"),
    ("good then bad: all or nothing", ("fc1", "fc3"), ValueError, r"no parameter matches 'fc3'"),
    ("bad inside a list", (["fc1", ["fc2", "nope"]],), ValueError, r"no parameter matches 'nope'"),
    ("trailing dot", ("fc2.",), ValueError, r"ends with '\.'"),
    ("empty string", ("",), ValueError, r"empty string"),
    ("glob matching nothing", ("enc.*",), ValueError, r"no parameter matches 'enc\.\*'"),
    ("regex matching nothing", (re.compile(r"fc\d{3}"),), ValueError, r"no parameter matches"),
    ("int", (42,), TypeError, r"cannot freeze/unfreeze by int 42; expected str"),
    ("None", (None,), TypeError, r"cannot freeze/unfreeze by NoneType"),
    ("float inside a list", (["fc1", 3.5],), TypeError, r"cannot freeze/unfreeze by float"),
    ("dict", ({"fc1": True},), TypeError, r"cannot freeze/unfreeze by dict"),
    ("foreign module", (FOREIGN,), ValueError, r"Module\(Linear\) has no parameters in this optimizer"),
    ("foreign tensor", (torch.zeros(2),), ValueError, r"Tensor\(shape=\(2,\)\) is not a parameter of this optimizer"),
    ("foreign parameter", (FOREIGN.weight,), ValueError, r"Parameter\(shape=\(2, 2\)\) is not a parameter"),
]


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("method", ["freeze", "unfreeze", "is_frozen"])
@pytest.mark.parametrize("row", TARGET_ROWS, ids=[r[0] for r in TARGET_ROWS])
def test_bad_target(kind, method, row):
    _, targets, exc, match = row
    net, opt = trained(kind)
    refused(opt, net, lambda: getattr(opt, method)(*targets), exc, match)


@pytest.mark.parametrize("kind", CLASSES)
def test_names_on_a_plain_param_optimizer(kind):
    net, opt = trained(kind, plain=True)
    for method in ("freeze", "unfreeze"):
        refused(opt, net, lambda method=method: getattr(opt, method)("fc1"), ValueError,
                r"cannot resolve 'fc1' by name: the optimizer was built from plain parameters")


@pytest.mark.parametrize("kind", CLASSES)
def test_bare_freeze_with_one_group(kind):
    """Bare freeze() is ambiguous (all or nothing?); with one param group it is refused, saying what to write."""
    net, opt = trained(kind, groups=1)
    refused(opt, net, opt.freeze, ValueError, r"single param group.*freeze\('\*'\)")


@pytest.mark.parametrize("n", ["1", 1.0, True, None])
def test_freeze_to_needs_an_int(n):
    net, opt = trained("Adam")
    refused(opt, net, lambda: opt.freeze_to(n), TypeError, r"freeze_to takes an int number of param groups")


# ---------------------------------------------------------------------------- construction

NAN, INF = float("nan"), float("inf")
CONSTRUCT_ROWS = [
    # (id, optimizer, kwargs, exception, message)
    ("SGD lr nan", "SGD", dict(lr=NAN), ValueError, r"Invalid learning rate: nan"),
    ("SGD lr inf", "SGD", dict(lr=INF), ValueError, r"Invalid learning rate: inf"),
    ("SGD lr negative", "SGD", dict(lr=-0.1), ValueError, r"Invalid learning rate: -0.1"),
    ("SGD lr 2-element tensor", "SGD", dict(lr=torch.tensor([0.1, 0.2])), ValueError, r"Tensor lr must be 1-element"),
    ("SGD momentum nan", "SGD", dict(momentum=NAN), ValueError, r"Invalid momentum value: nan"),
    ("SGD momentum negative", "SGD", dict(momentum=-0.5), ValueError, r"Invalid momentum value: -0.5"),
    ("SGD dampening nan", "SGD", dict(momentum=0.9, dampening=NAN), ValueError, r"Invalid dampening value: nan"),
    ("SGD weight_decay nan", "SGD", dict(weight_decay=NAN), ValueError, r"Invalid weight_decay value: nan"),
    ("SGD weight_decay negative", "SGD", dict(weight_decay=-1.0), ValueError, r"Invalid weight_decay value: -1"),
    ("SGD nesterov without momentum", "SGD", dict(nesterov=True), ValueError, r"Nesterov momentum requires a momentum"),
    ("SGD nesterov with dampening", "SGD", dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
     r"Nesterov momentum requires a momentum and zero dampening"),
    ("SGD differentiable", "SGD", dict(differentiable=True), ValueError, r"does not support differentiable=True"),
    ("Adam lr nan", "Adam", dict(lr=NAN), ValueError, r"Invalid learning rate: nan"),
    ("Adam lr inf", "Adam", dict(lr=INF), ValueError, r"Invalid learning rate: inf"),
    ("Adam lr negative", "Adam", dict(lr=-1e-3), ValueError, r"Invalid learning rate: -0.001"),
    ("Adam eps nan", "Adam", dict(eps=NAN), ValueError, r"Invalid epsilon value: nan"),
    ("Adam eps negative", "Adam", dict(eps=-1e-8), ValueError, r"Invalid epsilon value"),
    ("Adam beta1 nan", "Adam", dict(betas=(NAN, 0.999)), ValueError, r"Invalid beta parameter at index 0: nan"),
    ("Adam beta1 = 1", "Adam", dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0: 1.0"),
    ("Adam beta2 nan", "Adam", dict(betas=(0.9, NAN)), ValueError, r"Invalid beta parameter at index 1: nan"),
    ("Adam beta2 negative", "Adam", dict(betas=(0.9, -0.1)), ValueError, r"Invalid beta parameter at index 1"),
    ("Adam one beta", "Adam", dict(betas=(0.9,)), ValueError, r"betas must be a pair"),
    ("Adam betas float", "Adam", dict(betas=0.9), ValueError, r"betas must be a pair"),
    ("Adam weight_decay nan", "Adam", dict(weight_decay=NAN), ValueError, r"Invalid weight_decay value: nan"),
    ("AdamW weight_decay negative", "AdamW", dict(weight_decay=-0.01), ValueError, r"Invalid weight_decay value"),
    ("AdamW differentiable", "AdamW", dict(differentiable=True), ValueError, r"does not support differentiable=True"),
]


@pytest.mark.parametrize("row", CONSTRUCT_ROWS, ids=[r[0] for r in CONSTRUCT_ROWS])
def test_bad_hyper_parameter(row):
    _, kind, kwargs, exc, match = row
    net = Net()
    before = model_snapshot(net)
    with pytest.raises(exc, match=match):
        getattr(frozenopt, kind)(net, **kwargs)
    assert_same(before, model_snapshot(net))


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("key,value,match", [
    ("lr", NAN, r"Invalid learning rate: nan"),
    ("lr", -1.0, r"Invalid learning rate: -1"),
    ("weight_decay", NAN, r"Invalid weight_decay value: nan"),
])
def test_bad_hyper_parameter_in_a_param_group(kind, key, value, match):
    """A group's own hyper-parameters are checked like the defaults (at construction)."""
    net = Net()
    before = model_snapshot(net)
    groups = [{"params": net.fc1.parameters()}, {"params": net.fc2.parameters(), key: value}]
    with pytest.raises(ValueError, match=match):
        BY_CLASS[kind].make(groups)
    assert_same(before, model_snapshot(net))


def _params_rows():
    p = nn.Parameter(torch.ones(3))
    return [
        ("int64 param", lambda: [nn.Parameter(torch.ones(2, dtype=torch.int64), requires_grad=False)], TypeError,
         r"has dtype torch\.int64; frozenopt steps float32, float64, float16, bfloat16, complex64 and complex128"),
        ("sparse param", lambda: [nn.Parameter(torch.ones(2).to_sparse())], TypeError, r"not a dense \(strided\)"),
        ("mixed devices in one group", lambda: [p, nn.Parameter(torch.ones(2, device="meta"))], ValueError,
         r"param group 0 holds params on more than one device \(\['cpu', 'meta'\]\)"),
        ("duplicate param in a group", lambda: [p, nn.Parameter(torch.ones(1)), p], ValueError,
         r"param group 0 lists the same parameter more than once"),
        ("same param in two groups", lambda: [{"params": [p]}, {"params": [p]}], ValueError,
         r"some parameters appear in more than one parameter group"),
        ("empty list", lambda: [], ValueError, r"optimizer got an empty parameter list"),
        ("empty groups", lambda: [{"params": []}], ValueError, r"empty parameter list"),
        ("a bare tensor", lambda: p, TypeError, r"should be an iterable of Tensors or dicts, or an nn\.Module"),
        ("a group without params", lambda: [{"lr": 0.1}], KeyError, r"params"),
    ]


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("row", _params_rows(), ids=[r[0] for r in _params_rows()])
def test_bad_params(kind, row):
    _, make, exc, match = row
    params = make()
    tensors = [params] if isinstance(params, torch.Tensor) else [
        t for x in params for t in (x["params"] if isinstance(x, dict) and "params" in x else
                                    [] if isinstance(x, dict) else [x])]
    before = [(t.detach().clone() if t.layout == torch.strided and t.device.type == "cpu" else None,
               t.requires_grad) for t in tensors]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own duplicate-parameter warning
        with pytest.raises(exc, match=match):
            getattr(frozenopt, kind)(params, lr=0.1)
    for t, (v, rg) in zip(tensors, before):
        assert t.requires_grad == rg and (v is None or torch.equal(t.detach(), v))


@pytest.mark.parametrize("kind", CLASSES)
def test_bad_add_param_group(kind):
    """add_param_group refuses the same things; the optimizer is as it was (no half-added group)."""
    net, opt = trained(kind)
    extra = nn.Parameter(torch.ones(2))
    refused(opt, net, lambda: opt.add_param_group({"params": [("again", net.fc1.weight)]}), ValueError,
            r"some parameters appear in more than one parameter group")
    refused(opt, net, lambda: opt.add_param_group({"params": [("ints", nn.Parameter(torch.ones(2, dtype=torch.int32),
                                                                                     requires_grad=False))]}),
            TypeError, r"dtype torch\.int32")
    refused(opt, net, lambda: opt.add_param_group({"params": [("extra", extra),
                                                              ("meta", nn.Parameter(torch.ones(1, device="meta")))]}),
            ValueError, r"more than one device")
    refused(opt, net, lambda: opt.add_param_group({"params": [("extra", extra)], "lr": NAN}), ValueError,
            r"Invalid learning rate: nan")
    assert len(opt.param_groups) == 2


# ---------------------------------------------------------------------------- step


def _set(attr, value):
    def mutate(net, opt):
        p = getattr(net.fc2, attr)
        p.grad = value(p)
    return mutate


def _set_data(attr, value):
    def mutate(net, opt):
        p = getattr(net.fc2, attr)
        p.grad.data = value(p)
    return mutate


def _group(key, value):
    def mutate(net, opt):
        opt.param_groups[1][key] = value
    return mutate


STEP_ROWS = [
    # (id, mutation, optimizers, exception, message)
    ("sparse grad", _set("weight", lambda p: p.detach().clone().to_sparse()), CLASSES, RuntimeError,
     r"grad \d+ is sparse; frozenopt does not support sparse gradients"),
    # torch's .grad setter refuses these; `.grad.data =` (or a hook) still gets them through
    ("grad of the wrong shape", _set_data("weight", lambda p: torch.ones(p.numel())), CLASSES, RuntimeError,
     r"grad \d+ has shape \[8\] but its param has shape \[2, 4\]"),
    ("grad of the wrong dtype", _set_data("bias", lambda p: torch.ones(p.shape, dtype=torch.float64)), CLASSES,
     RuntimeError, r"grad \d+ has dtype Double but its param has dtype Float"),
    ("group lr nan", _group("lr", NAN), CLASSES, (ValueError, RuntimeError), r"Invalid learning rate: nan"),
    ("group lr negative", _group("lr", -0.5), CLASSES, (ValueError, RuntimeError), r"Invalid learning rate: -0.5"),
    ("group lr 2-element tensor", _group("lr", torch.tensor([0.1, 0.1])), CLASSES, (ValueError, RuntimeError),
     r"lr must .*one element|1-element"),
    ("group weight_decay nan", _group("weight_decay", NAN), CLASSES, (ValueError, RuntimeError),
     r"Invalid weight_decay value: nan"),
    ("group momentum negative", _group("momentum", -1.0), ["SGD"], (ValueError, RuntimeError),
     r"Invalid momentum value: -1"),
    ("group beta2 = 1", _group("betas", (0.9, 1.0)), ["Adam", "AdamW"], (ValueError, RuntimeError),
     r"Invalid beta parameter at index 1: 1.0"),
    ("group eps nan", _group("eps", NAN), ["Adam", "AdamW"], (ValueError, RuntimeError), r"Invalid epsilon value: nan"),
]


STEP_CASES = [(kind, row) for row in STEP_ROWS for kind in row[2]]


@pytest.mark.parametrize("kind,row", STEP_CASES, ids=[f"{k}-{r[0]}" for k, r in STEP_CASES])
def test_bad_step(kind, row):
    """The bad thing is in the second param group: the first (with `late`, whose state this
    step would create) must not move or allocate either."""
    _, mutate, _, exc, match = row
    net, opt = trained(kind)
    mutate(net, opt)
    refused(opt, net, opt.step, exc, match)


@pytest.mark.parametrize("kind", CLASSES)
def test_bad_grad_on_a_frozen_param_is_ignored(kind):
    """Frozen means grad=None in torch.optim terms: whatever its grad holds is never looked at."""
    net, opt = trained(kind, mask_only=True)
    opt.freeze("fc2")
    w, s = net.fc2.weight.detach().clone(), copy.deepcopy(opt.state[net.fc2.weight])
    net.fc2.weight.grad.data = torch.ones(8)  # the wrong shape
    net.fc2.bias.grad = torch.ones(2).to_sparse()
    opt.step()
    assert torch.equal(net.fc2.weight.detach(), w)
    for k, v in s.items():
        assert torch.equal(opt.state[net.fc2.weight][k], v)


# ---------------------------------------------------------------------------- load_state_dict


def _sd_rows(kind):
    first = "momentum_buffer" if kind == "SGD" else "exp_avg"
    rows = [
        ("not a dict", lambda sd: ["state"], (TypeError, ValueError), r"state_dict must be a dict"),
        ("missing state", lambda sd: sd.pop("state"), ValueError, r"state_dict has no 'state'"),
        ("missing param_groups", lambda sd: sd.pop("param_groups"), ValueError, r"state_dict has no 'param_groups'"),
        ("one group too many", lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])),
         ValueError, r"different number of parameter groups"),
        ("a group one param short", lambda sd: sd["param_groups"][0]["params"].pop(), ValueError,
         r"doesn't match the size of optimizer's group"),
        ("state for a param no group lists", lambda sd: sd["state"].__setitem__(99, copy.deepcopy(sd["state"][0])),
         ValueError, r"state for parameter ids \[99\] that no param group lists"),
        ("state tensor of the wrong shape", lambda sd: sd["state"][0].__setitem__(first, torch.zeros(5)),
         ValueError, rf"state\[0\]\['{first}'\] has shape \[5\] but its param .* has shape \[4, 3\]"),
        ("state entry not a dict", lambda sd: sd["state"].__setitem__(0, 5), ValueError,
         r"state\[0\] must be a dict"),
        ("group lr nan", lambda sd: sd["param_groups"][1].__setitem__("lr", NAN), ValueError,
         r"Invalid learning rate: nan"),
        ("frozen not a list", lambda sd: sd.__setitem__("frozen", "fc1.weight"), ValueError,
         r"state_dict\['frozen'\] must be a list of parameter names"),
        ("frozen holds an int", lambda sd: sd.__setitem__("frozen", [0]), ValueError,
         r"state_dict\['frozen'\] must be a list of parameter names"),
        ("frozen names an unknown param", lambda sd: sd.__setitem__("frozen", ["fc1.weight", "fc3.weight"]),
         ValueError, r"names parameters this optimizer does not have: \['fc3\.weight'\]"),
    ]
    if kind != "SGD":
        rows += [
            ("Adam state without exp_avg_sq", lambda sd: sd["state"][0].pop("exp_avg_sq"), ValueError,
             r"state\[0\] has exp_avg but no exp_avg_sq"),
            ("Adam state without step", lambda sd: sd["state"][0].pop("step"), ValueError,
             r"state\[0\] has exp_avg but no step"),
            ("Adam step not a number", lambda sd: sd["state"][0].__setitem__("step", "three"), ValueError,
             r"state\[0\]\['step'\] must be a number"),
        ]
    return rows


SD_CASES = [(kind, row) for kind in CLASSES for row in _sd_rows(kind)]


@pytest.mark.parametrize("kind,row", SD_CASES, ids=[f"{k}-{r[0]}" for k, r in SD_CASES])
def test_bad_load_state_dict(kind, row):
    """Into an optimizer with its own state and frozen set: nothing is partially loaded."""
    name, corrupt, exc, match = row
    src_net, src = trained(kind)
    src.freeze("fc1")
    sd = copy.deepcopy(src.state_dict())
    out = corrupt(sd)
    if name == "not a dict":
        sd = out
    net, opt = trained(kind)
    refused(opt, net, lambda: opt.load_state_dict(sd), exc, match)


@pytest.mark.parametrize("kind", CLASSES)
def test_good_state_dict_still_loads(kind):
    """The checks above do not refuse what torch.optim writes (the negative control)."""
    src_net, src = trained(kind)
    src.freeze("fc1")
    net, opt = trained(kind)
    opt.load_state_dict(copy.deepcopy(src.state_dict()))
    assert opt.frozen == src.frozen == ["fc1.weight", "fc1.bias", "fc20.bias"]
    assert len(opt.state) == len(src.state) == 6  # every param but `late`
    ref = BY_CLASS[kind].reference([{"params": g["params"]} for g in opt.param_groups])
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    ref.step()
    opt.load_state_dict(ref.state_dict())
    assert not math.isnan(float(opt.param_groups[0]["lr"]))


# ---------------------------------------------------------------------------- the frozen entry, clipping, bare calls

FROZEN_ENTRY_ROWS = [
    ("ids not a list", {"params": "0"}, r"state_dict\['frozen'\]\['params'\] must be a list of param ids"),
    ("ids missing", {"names": ["fc1.weight"]}, r"state_dict\['frozen'\]\['params'\] must be a list of param ids"),
    ("an id no group lists", {"params": [0, 99]}, r"lists param ids \[99\] that no param group lists"),
    ("a name listed twice", ["fc1.weight", "fc1.weight"], r"lists 'fc1.weight' 2 time\(s\), but 1 params"),
]


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("row", FROZEN_ENTRY_ROWS, ids=[r[0] for r in FROZEN_ENTRY_ROWS])
def test_bad_frozen_entry(kind, row):
    _, frozen, match = row
    src_net, src = trained(kind)
    sd = copy.deepcopy(src.state_dict())
    sd["frozen"] = frozen
    net, opt = trained(kind)
    refused(opt, net, lambda: opt.load_state_dict(sd), ValueError, match)


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("max_norm", [-1.0, NAN])
def test_bad_clip_grad_norm(kind, max_norm):
    net, opt = trained(kind, mask_only=True)
    refused(opt, net, lambda: opt.clip_grad_norm_(max_norm), ValueError, r"max_norm must be a number >= 0")


@pytest.mark.parametrize("kind", CLASSES)
def test_bare_is_frozen_and_single_group_freeze_to(kind):
    net, opt = trained(kind, groups=1)
    refused(opt, net, lambda: opt.is_frozen(), TypeError, r"is_frozen\(\) needs a target")
    refused(opt, net, lambda: opt.freeze_to(1), ValueError, r"single param group")
