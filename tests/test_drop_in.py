"""What torch.optim lets user and library code do to an optimizer between steps, done to frozenopt.

torch.optim reads param_groups, state and the params' grads afresh at every
step; code in the wild relies on that (PEFT and Lightning flip requires_grad,
users replace or move state, edit param groups, copy optimizers). Each test
does one such thing to a frozenopt optimizer and to a torch.optim twin on
cloned params, and compares them after every step.
"""

import copy
import gc
import pickle
from collections import defaultdict

import pytest
import torch
from matrix import BY_CLASS, CLASSES
from torch import nn

import frozenopt


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


class Twin:
    """A frozenopt optimizer on ``model`` and a torch.optim one on a deep copy of it."""

    def __init__(self, name, model=None, *, mask_only=False, **kw):
        kw = {**BY_CLASS[name].kwargs, **kw}
        self.model = model if model is not None else make_model()
        self.ref_model = copy.deepcopy(self.model)
        self.opt = getattr(frozenopt, name)(self.model, mask_only=mask_only, **kw)
        self.ref = getattr(torch.optim, name)(self.ref_model.parameters(), **kw)
        self.generator = torch.Generator().manual_seed(1)

    def backward(self):
        x = torch.randn(4, 5, generator=self.generator, dtype=next(self.model.parameters()).dtype)
        for model in (self.model, self.ref_model):
            model.zero_grad(set_to_none=True)
            model(x).square().sum().backward()

    def step(self, n=1):
        for _ in range(n):
            self.backward()
            self.opt.step()
            self.ref.step()
            self.check()

    def check(self):
        for p, q in zip(self.model.parameters(), self.ref_model.parameters()):
            torch.testing.assert_close(p, q)
            mine, theirs = self.opt.state.get(p, {}), self.ref.state.get(q, {})
            assert sorted(k for k, v in mine.items() if v is not None) == \
                sorted(k for k, v in theirs.items() if v is not None)
            for key, value in theirs.items():
                if value is not None:
                    torch.testing.assert_close(mine[key].to(value.dtype), value)


# ------------------------------------------------------------- requires_grad

@pytest.mark.parametrize("name", CLASSES)
def test_default_mode_follows_requires_grad_both_ways(name):
    model = make_model()
    model[0].requires_grad_(False)  # frozen from the start
    twin = Twin(name, model)
    twin.step(2)
    assert twin.opt.frozen == ["0.weight", "0.bias"]
    for layer in (model[0], twin.ref_model[0]):  # the user's own toggle: now it trains
        layer.requires_grad_(True)
    twin.step(3)
    assert twin.opt.frozen == [] and twin.opt.state_dict()["frozen"]["names"] == []
    for layer in (model[2], twin.ref_model[2]):  # and this one stops
        layer.requires_grad_(False)
    before = {k: v.clone() for k, v in twin.opt.state[model[2].weight].items()}
    twin.step(3)
    assert twin.opt.frozen == ["2.weight", "2.bias"]
    assert twin.opt.is_frozen("2") and not twin.opt.is_frozen("0")
    for key, value in twin.opt.state[model[2].weight].items():
        assert torch.equal(value, before[key]), key  # its state is kept, untouched


def test_lightning_finetuning_callbacks_helpers_are_followed():
    finetuning = pytest.importorskip("lightning.pytorch.callbacks.finetuning")
    twin = Twin("AdamW")
    for model in (twin.model, twin.ref_model):
        finetuning.BaseFinetuning.freeze(model[0])
    twin.step(2)
    assert twin.opt.frozen == ["0.weight", "0.bias"]
    for model in (twin.model, twin.ref_model):
        finetuning.BaseFinetuning.make_trainable(model[0])
    twin.step(2)
    assert twin.opt.frozen == []


def test_mask_only_ignores_requires_grad_flips():
    model = make_model()
    opt = frozenopt.Adam(model, lr=0.1, mask_only=True)
    opt.freeze("0")
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    assert opt.frozen == ["0.weight", "0.bias"]
    model[0].requires_grad_(True)
    assert opt.frozen == ["0.weight", "0.bias"]


# ------------------------------------------------------------------ state edits

@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_replaced_adam_state_entries_are_used(name):
    twin = Twin(name)
    twin.step(3)  # the step plan is built and cached
    p, q = twin.model[0].weight, twin.ref_model[0].weight
    for opt, t in ((twin.opt, p), (twin.ref, q)):
        opt.state[t]["exp_avg"] = torch.full_like(t, 0.5)
        opt.state[t]["step"] = torch.tensor(0.0)  # bias correction starts again
    twin.step(3)
    assert twin.opt.state[p]["step"].item() == 3


def test_replaced_momentum_buffer_is_used():
    twin = Twin("SGD")
    twin.step(3)
    for opt, t in ((twin.opt, twin.model[2].bias), (twin.ref, twin.ref_model[2].bias)):
        opt.state[t]["momentum_buffer"] = torch.ones_like(t)
    twin.step(3)


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("how", ["del", "clear", "new_dict"])
def test_dropped_state_starts_again(name, how):
    twin = Twin(name)
    twin.step(3)
    for opt, t in ((twin.opt, twin.model[0].weight), (twin.ref, twin.ref_model[0].weight)):
        if how == "del":
            del opt.state[t]
        elif how == "clear":
            opt.state.clear()
        else:
            opt.state = defaultdict(dict)
    twin.step(3)


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("what", ["state", "param", "both"])
def test_moving_tensors_with_data_assignment_is_safe_and_exact(name, what):
    """``t.data = t.data.clone()``: the "move optimizer state" idiom re-seats the storage
    under the optimizer's cached plan, which must notice and never write the old memory."""
    twin = Twin(name)
    twin.step(2)
    for _ in range(3):
        for opt, model in ((twin.opt, twin.model), (twin.ref, twin.ref_model)):
            for t in model.parameters():
                if what in ("state", "both"):
                    for value in opt.state[t].values():
                        if isinstance(value, torch.Tensor):
                            value.data = value.data.clone()
                if what in ("param", "both"):
                    t.data = t.data.clone()
        gc.collect()
        junk = [torch.full((64,), float("nan")) for _ in range(200)]  # reuse the freed memory
        twin.step()
        del junk


def test_a_state_tensor_reseated_to_the_wrong_size_is_a_clear_error():
    model = make_model()
    opt = frozenopt.Adam(model, lr=0.1)
    for _ in range(2):
        model(torch.randn(2, 5)).sum().backward()
        opt.step()
    exp_avg = opt.state[model[0].weight]["exp_avg"]
    exp_avg.data = exp_avg.data.flatten()[:5]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\]"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---------------------------------------------------------------- group edits

@pytest.mark.parametrize("name", CLASSES)
def test_removing_and_swapping_params_in_a_group(name):
    twin = Twin(name)
    twin.step(2)
    for opt in (twin.opt, twin.ref):
        params = opt.param_groups[0]["params"]
        params.pop(1)  # 0.bias leaves the optimizer
        params[0], params[1] = params[1], params[0]  # order changes too
        if "param_names" in opt.param_groups[0]:
            del opt.param_groups[0]["param_names"][1]
            names = opt.param_groups[0]["param_names"]
            names[0], names[1] = names[1], names[0]
    bias = twin.model[0].bias.detach().clone()
    twin.step(3)
    assert torch.equal(twin.model[0].bias, bias)


@pytest.mark.parametrize("name", CLASSES)
def test_groups_deleted_and_appended_directly(name):
    twin = Twin(name)
    twin.step(2)
    for opt, model in ((twin.opt, twin.model), (twin.ref, twin.ref_model)):
        group = opt.param_groups[0]
        group["params"] = [model[0].weight, model[0].bias]
        group.pop("param_names", None)
        # appended as a dict, not through add_param_group: every key given by hand
        opt.param_groups.append({**{k: v for k, v in group.items() if k != "param_names"},
                                 "params": [model[2].weight, model[2].bias], "lr": 0.05})
    twin.step(2)
    for opt in (twin.opt, twin.ref):
        del opt.param_groups[0]
    twin.step(2)


@pytest.mark.parametrize("mask_only", [False, True])
def test_is_frozen_of_a_param_follows_group_edits(mask_only):
    # is_frozen(p) answers from p itself when p is where the optimizer last saw it:
    # every other edit must still give what a full look at the groups would.
    model = make_model()
    opt = frozenopt.AdamW(model, mask_only=mask_only)
    opt.freeze("0.weight")
    w0, b0, w2, b2 = model[0].weight, model[0].bias, model[2].weight, model[2].bias
    assert opt.is_frozen(w0) and not opt.is_frozen(b0)
    group = opt.param_groups[0]
    params, names = group["params"], group["param_names"]
    del params[1], names[1]  # 0.bias taken out is no param of the optimizer any more
    with pytest.raises(ValueError, match="is not a parameter of this optimizer"):
        opt.is_frozen(b0)
    params[0], params[1] = params[1], params[0]  # moved: found again where it is now
    names[0], names[1] = names[1], names[0]
    assert opt.is_frozen(w0) and not opt.is_frozen(w2)
    extra = nn.Parameter(torch.zeros(3), requires_grad=False)
    params.append(extra)  # new to the optimizer: frozen because it does not require grad
    names.append("extra")
    assert opt.is_frozen(extra)
    if not mask_only:  # the default mode follows requires_grad at once
        b2.requires_grad_(False)
        assert opt.is_frozen(b2)


def test_a_group_appended_without_its_hyper_parameters_is_refused_clearly():
    model = make_model()
    opt = frozenopt.SGD([model[0].weight], lr=0.1)
    opt.param_groups.append({"params": [model[2].weight]})
    with pytest.raises(ValueError, match=r"param group 1 has no 'lr'.*add_param_group"):
        opt.step()


def test_a_param_listed_in_two_groups_by_an_edit_is_refused_clearly():
    model = make_model()
    opt = frozenopt.SGD([{"params": [model[0].weight]}, {"params": [model[2].weight]}], lr=0.1)
    opt.param_groups[1]["params"].append(model[0].weight)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.step()


# ------------------------------------------------------------ copies, pickles

@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("mask_only", [False, True])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_and_pickles_work(name, mask_only, how):
    model = make_model()
    opt = BY_CLASS[name].make(model, mask_only=mask_only)
    opt.freeze("0")
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert copied.mask_only == mask_only and copied.frozen == ["0.weight", "0.bias"]
    params = copied.param_groups[0]["params"]
    assert not any(p is q for p, q in zip(params, model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    for p in params:
        p.grad = torch.ones_like(p)
    frozen_before = params[0].detach().clone()
    copied.step()
    assert torch.equal(params[0], frozen_before) and not torch.equal(params[2], before[2])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the original untouched
    copied.unfreeze()
    copied.step()
    assert not torch.equal(params[0], frozen_before) and copied.frozen == []


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_results_do_not_depend_on_threads_or_on_other_params(name, dtype):
    """An element's arithmetic (vector body or scalar tail) depends on its own tensor only."""
    def run(threads, others, frozen_others):
        torch.manual_seed(0)
        target = nn.Parameter(torch.randn(200_003, dtype=dtype))
        extra = [nn.Parameter(torch.randn(n, dtype=dtype)) for n in others]
        opt = BY_CLASS[name].make([*extra, target])
        if frozen_others:
            opt.freeze(*extra[::2])
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for step in range(3):
                for k, p in enumerate((target, *extra)):  # the target's grads whatever the others are
                    gen = torch.Generator().manual_seed(100 * step + k)
                    p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
                opt.step()
        finally:
            torch.set_num_threads(previous)
        return target.detach().clone()

    alone = run(1, [], False)
    for threads, others, frozen in [(2, [], False), (2, [37, 101, 5], False), (2, [37, 70_001, 9], True),
                                    (1, [3, 65], False)]:
        assert torch.equal(run(threads, others, frozen), alone), (threads, others, frozen)


# ------------------------------------------------------------------ aliases

@pytest.mark.parametrize("name", CLASSES)
def test_params_sharing_storage_in_different_layouts_both_update(name):
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    ours = [nn.Parameter(base.clone())]
    ours.append(nn.Parameter(ours[0].data.t()))  # a view of the same storage
    ours.append(nn.Parameter(torch.randn(3)))
    theirs = [nn.Parameter(base.clone())]
    theirs.append(nn.Parameter(theirs[0].data.t()))
    theirs.append(nn.Parameter(ours[2].detach().clone()))
    opt = BY_CLASS[name].make(ours)
    ref = BY_CLASS[name].reference(theirs)
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q)


@pytest.mark.parametrize("name", CLASSES)
def test_channels_last_and_transposed_params_are_stepped_in_place(name):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    lin = nn.Linear(6, 5)
    lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t())  # a transposed layout
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 6, 6))
    ref_model, ref_lin = copy.deepcopy(model), copy.deepcopy(lin)
    opt = BY_CLASS[name].make([*model.parameters(), *lin.parameters()])
    ref = BY_CLASS[name].reference([*ref_model.parameters(), *ref_lin.parameters()])
    x, y = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last), torch.randn(2, 6)
    for step in range(4):
        for m, linear in ((model, lin), (ref_model, ref_lin)):
            m.zero_grad(set_to_none=True)
            linear.zero_grad(set_to_none=True)
            (m(x).sum() + linear(y).square().sum()).backward()
        assert conv.weight.grad.stride() == conv.weight.stride()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        ref.step()
        if step > 0:  # after the first step, the cached plan steps them where they lie
            copies = [e.key for e in prof.key_averages() if e.key in ("aten::copy_", "aten::contiguous", "aten::clone")]
            assert copies == [], copies
        for p, q in zip([*model.parameters(), *lin.parameters()], [*ref_model.parameters(), *ref_lin.parameters()]):
            torch.testing.assert_close(p, q)
    assert opt.state[conv.weight].get("exp_avg", opt.state[conv.weight].get("momentum_buffer")).stride() == \
        conv.weight.stride()


# ------------------------------------------------------------ other torch inputs

@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_follow_torch(name, dtype):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(n, dtype=dtype)) for n in (1, 7, 300)]
    ours.append(nn.Parameter(torch.randn(4, 6, dtype=dtype).t()))
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = BY_CLASS[name].make(ours)
    ref = BY_CLASS[name].reference(theirs)
    opt.freeze(ours[1])
    frozen = ours[1].detach().clone()
    for _step in range(4):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        theirs[1].grad = None
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q)
    assert torch.equal(ours[1], frozen)


def test_betas_as_a_two_element_tensor_and_as_tensors():
    for betas in (torch.tensor([0.8, 0.99]), (torch.tensor(0.8), torch.tensor(0.99))):
        p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
        opt, ref = frozenopt.Adam([p], lr=0.1, betas=betas), torch.optim.Adam([q], lr=0.1, betas=(0.8, 0.99))
        for _ in range(3):
            p.grad, q.grad = torch.arange(3.0), torch.arange(3.0)
            opt.step()
            ref.step()
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="both floats or both Tensors"):
        frozenopt.Adam([p], betas=(0.9, torch.tensor(0.99)))
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        frozenopt.Adam([p], betas=torch.tensor([0.9, 1.0]))


def test_betas_on_another_device_are_not_read_at_construction():
    """Tensor betas on a GPU are checked on the device by the kernels, not read on the host
    (that would synchronise); "meta" stands in for the GPU here."""
    p = nn.Parameter(torch.ones(3))
    betas = (torch.tensor(0.9, device="meta"), torch.tensor(0.99, device="meta"))
    opt = frozenopt.AdamW([p], betas=betas)
    assert opt.param_groups[0]["betas"] is betas
