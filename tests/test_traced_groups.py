"""The traced step over many param groups: one ``*_groups_`` op call per device and
state layout, each param reading its group's values from a table on the device.

Compiled steps (``torch.compile``) are compared bitwise with eager steps of a twin
optimizer, and within the "fused" tolerance with torch.optim's fused optimizers.
Editing a group's values (weight decay, betas, momentum, eps, lr, flags) or the
frozen set between compiled steps must compile nothing again: counted with dynamo's
CompileCounterWithBackend (one per frame compiled). The op calls per step are
counted from profiler events of the compiled graph.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from matrix import tolerance
from test_groups import adam_hypers, clone_params, make_params, set_grads, sgd_hypers, split
from torch._dynamo.testing import CompileCounterWithBackend

import frozenopt
from frozenopt.optim import base as optim_mod

BACKEND = "aot_eager"
STEPS = 5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def hypers_of(name, n):
    return sgd_hypers(n) if name == "SGD" else adam_hypers(n)


def compiled_step(opt):
    counter = CompileCounterWithBackend(BACKEND)
    return torch.compile(opt.step, backend=counter), counter


def op_calls(step):
    """The frozenopt op calls of one step(): profiler events of the ops, not counting
    those nested in one (the dispatcher's layers record the op again)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()

    def nested(e):
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("frozenopt::"):
                return True
            parent = parent.cpu_parent
        return False

    return sorted(e.name for e in prof.events() if e.name.startswith("frozenopt::") and not nested(e))


def assert_same(ours, theirs, where):
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q), where


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_compiled_step_of_many_groups_matches_eager_and_torch_fused(name):
    hypers = hypers_of(name, 8)
    ours = make_params(count=24)
    eager_params, reference = clone_params(ours), clone_params(ours)
    traced = getattr(frozenopt, name)(split(ours, hypers), mask_only=True)
    eager = getattr(frozenopt, name)(split(eager_params, hypers), mask_only=True)
    fused = getattr(torch.optim, name)(split(reference, hypers), fused=True)
    step, counter = compiled_step(traced)
    for i in range(STEPS):
        set_grads(i, ours, eager_params, reference)
        step()
        eager.step()
        fused.step()
        assert_same(ours, eager_params, f"step {i}")
        for p, q in zip(ours, reference):
            torch.testing.assert_close(p, q, **tolerance(torch.float32, "fused"))
    for p, q in zip(ours, eager_params):
        for key, value in eager.state[q].items():
            assert torch.equal(traced.state[p][key], value), key


# Values of one group edited between compiled steps: (step, group, edit).
EDITS = {
    "SGD": [(1, 2, dict(weight_decay=0.3)), (2, 0, dict(momentum=0.2)), (3, 4, dict(dampening=0.7)),
            (4, 1, dict(lr=0.5, maximize=True)), (5, 3, dict(nesterov=True, dampening=0.0, momentum=0.6))],
    "Adam": [(1, 2, dict(weight_decay=0.3)), (2, 0, dict(betas=(0.5, 0.9))), (3, 4, dict(eps=0.1)),
             (4, 1, dict(lr=0.5, maximize=True)), (5, 3, dict(weight_decay=0.0, betas=(0.0, 0.5)))],
}


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_editing_a_groups_values_between_compiled_steps_compiles_nothing(name):
    hypers = hypers_of(name, 6)
    ours = make_params(count=18)
    eager_params = clone_params(ours)
    traced = getattr(frozenopt, name)(split(ours, hypers), mask_only=True)
    eager = getattr(frozenopt, name)(split(eager_params, hypers), mask_only=True)
    step, counter = compiled_step(traced)
    edits = {s: (gi, edit) for s, gi, edit in EDITS[name]}
    frames = []
    for i in range(len(EDITS[name]) + 2):
        if i in edits:
            gi, edit = edits[i]
            for opt in (traced, eager):
                opt.param_groups[gi].update(edit)
        set_grads(i, ours, eager_params)
        step()
        eager.step()
        frames.append(counter.frame_count)
        assert_same(ours, eager_params, f"step {i}")
    assert frames[1:] == [frames[1]] * (len(frames) - 1), frames  # after the first step's: none


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_freezing_between_compiled_steps_compiles_nothing(name):
    hypers = hypers_of(name, 4)
    ours = make_params(count=12)
    eager_params = clone_params(ours)
    traced = getattr(frozenopt, name)(split(ours, hypers), mask_only=True)
    eager = getattr(frozenopt, name)(split(eager_params, hypers), mask_only=True)
    step, counter = compiled_step(traced)
    toggles = {1: ("freeze", [0, 5, 11]), 2: ("freeze", [6]), 3: ("unfreeze", [0, 6]), 4: ("unfreeze", [5, 11])}
    frames = []
    for i in range(6):
        if i in toggles:
            what, indices = toggles[i]
            getattr(traced, what)(*[ours[k] for k in indices])
            getattr(eager, what)(*[eager_params[k] for k in indices])
        set_grads(i, ours, eager_params)
        frozen_before = {k: ours[k].detach().clone() for k in range(len(ours)) if traced.is_frozen(ours[k])}
        step()
        eager.step()
        frames.append(counter.frame_count)
        assert_same(ours, eager_params, f"step {i}")
        for k, value in frozen_before.items():
            assert torch.equal(ours[k], value), (i, k)
    assert frames[1:] == [frames[1]] * (len(frames) - 1), frames


@pytest.mark.parametrize("name, flags, calls", [
    ("SGD", [dict(momentum=0.9), dict(momentum=0.5, nesterov=True), dict(momentum=0.7, maximize=True)],
     ["frozenopt::sgd_groups_"]),
    ("SGD", [dict(momentum=0.9), dict(momentum=0.0), dict(momentum=0.0, weight_decay=0.1)],
     ["frozenopt::sgd_groups_"] * 2),
    ("Adam", [dict(amsgrad=True), dict(amsgrad=False), dict(amsgrad=True, maximize=True)],
     ["frozenopt::adam_groups_"] * 2),
    ("AdamW", [dict(weight_decay=w, betas=(b, 0.99)) for w, b in [(0.0, 0.9), (0.1, 0.8), (0.3, 0.5)] * 8],
     ["frozenopt::adam_groups_"]),
], ids=["sgd-one-layout", "sgd-momentum-split", "adam-amsgrad-split", "adamw-24-groups"])
def test_one_op_call_per_device_and_state_layout(name, flags, calls):
    hypers = [dict(lr=0.01 * (i + 1), **f) for i, f in enumerate(flags)]
    ours = make_params(count=2 * len(flags))
    eager_params = clone_params(ours)
    traced = getattr(frozenopt, name)(split(ours, hypers), mask_only=True)
    eager = getattr(frozenopt, name)(split(eager_params, hypers), mask_only=True)
    step, _ = compiled_step(traced)
    for i in range(4):
        set_grads(i, ours, eager_params)
        names = op_calls(step)
        eager.step()
        if i > 1:  # the first steps compile (and SGD's first momentum step takes a call of its own)
            assert names == calls, (i, names)
        assert_same(ours, eager_params, f"step {i}")


def test_compiled_step_reads_a_tensor_lr_changed_in_place():
    hypers = [dict(lr=torch.tensor(0.01 * (i + 1))) for i in range(3)]
    ours = make_params(count=9)
    reference = clone_params(ours)
    traced = frozenopt.Adam(split(ours, hypers), mask_only=True)
    fused = torch.optim.Adam(split(reference, [dict(lr=torch.tensor(0.01 * (i + 1))) for i in range(3)]), fused=True)
    step, counter = compiled_step(traced)
    frames = []
    for i in range(4):
        if i == 2:
            for opt in (traced, fused):
                opt.param_groups[1]["lr"].fill_(0.3)
        set_grads(i, ours, reference)
        step()
        fused.step()
        frames.append(counter.frame_count)
        for p, q in zip(ours, reference):
            torch.testing.assert_close(p, q, **tolerance(torch.float32, "fused"))
    assert frames[1:] == [frames[1]] * 3, frames


# ---------------------------------------------------------------- the capture path (CPU stand-in)


def test_capture_reads_the_table_that_prepare_capture_rewrites(monkeypatch):
    """While capturing, the step cannot write the table: prepare_capture() does, in
    place, and a step captured before reads what it holds now."""
    hypers = adam_hypers(3)
    ours = make_params(count=6)
    eager_params = clone_params(ours)
    traced = frozenopt.Adam(split(ours, hypers), mask_only=True)
    eager = frozenopt.Adam(split(eager_params, hypers), mask_only=True)
    traced.prepare_capture()
    eager.prepare_capture()
    table = traced._group_tables[torch.device("cpu"), False].tensor
    for i in range(3):
        if i == 1:
            for opt in (traced, eager):
                opt.param_groups[2]["weight_decay"] = 0.4
            traced.prepare_capture()
            assert traced._group_tables[torch.device("cpu"), False].tensor is table, "the table was replaced"
        set_grads(i, ours, eager_params)
        monkeypatch.setattr(optim_mod, "_is_capturing", lambda device: True)
        with pytest.warns(UserWarning) if i == 0 else _no_warning():
            traced.step()
        monkeypatch.setattr(optim_mod, "_is_capturing", lambda device: False)
        eager.step()
        assert_same(ours, eager_params, f"step {i}")


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_values_changed_since_the_table_was_written_refuse_a_capture(monkeypatch):
    ours = make_params(count=6)
    opt = frozenopt.Adam(split(ours, adam_hypers(3)), mask_only=True)
    opt.prepare_capture()
    opt.param_groups[1]["weight_decay"] = 0.25
    set_grads(0, ours)
    before = [p.detach().clone() for p in ours]
    steps = [opt.state[p]["step"].item() for p in ours]
    monkeypatch.setattr(optim_mod, "_is_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="prepare_capture"):
        opt.step()
    assert_same(ours, before, "a refused capture moved a param")
    assert [opt.state[p]["step"].item() for p in ours] == steps


# ---------------------------------------------------------------- the ops' own checks


def groups_sample(amsgrad=False):
    params = [torch.randn(n) for n in (5, 3, 70)]
    grads = [torch.randn_like(p) for p in params]
    zeros = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.zeros(()) for _ in params]
    table = torch.tensor([[0.1, 0.9, 0.999, 0.0, 1e-8, float(amsgrad), 0.0, 0.0],
                          [0.01, 0.8, 0.99, 0.1, 1e-6, float(amsgrad), 1.0, 1.0]], dtype=torch.float64)
    index = torch.tensor([0, 1, 0], dtype=torch.int32)
    return params, grads, zeros, steps, table, index


@pytest.mark.parametrize("bad, match", [
    (dict(index=torch.tensor([0, 2, 0], dtype=torch.int32)), r"tensor_group\[1\] is 2 but group_table has 2 rows"),
    (dict(index=torch.tensor([0, -1, 0], dtype=torch.int32)), r"tensor_group\[1\] is -1"),
    (dict(index=torch.tensor([0, 1], dtype=torch.int32)), "one entry per param"),
    (dict(index=torch.tensor([0, 1, 0])), "tensor_group must be int32"),
    (dict(table=torch.zeros(2, 7, dtype=torch.float64)), r"group_table must be float64 of shape \[groups, 8\]"),
    (dict(table=torch.zeros(2, 8)), "group_table must be float64"),
    (dict(row=(1, 2, 1.5)), "Invalid beta parameter at index 1"),
    (dict(row=(0, 0, -1.0)), "Invalid learning rate"),
    (dict(row=(1, 5, 1.0)), "group_table row 1 has amsgrad 1 but the op was called with amsgrad=False"),
])
def test_groups_op_refuses_bad_tables_and_moves_nothing(bad, match):
    params, grads, (m, v, _), steps, table, index = groups_sample()
    index = bad.get("index", index)
    table = bad.get("table", table)
    if "row" in bad:
        r, c, value = bad["row"]
        table[r, c] = value
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.frozenopt.adam_groups_(params, grads, m, v, [], steps, None, table, index, amsgrad=False)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(s.item() == 0 for s in steps)


def test_groups_op_equals_one_op_call_per_group():
    params, grads, (m, v, vmax), steps, table, index = groups_sample(amsgrad=True)
    alone = [p.clone() for p in params]
    alone_state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    alone_steps = [torch.zeros(()) for _ in params]
    torch.ops.frozenopt.adam_groups_(params, grads, m, v, vmax, steps, None, table, index, amsgrad=True)
    for i in range(len(params)):
        row = table[index[i]].tolist()
        torch.ops.frozenopt.adam_(
            [alone[i]], [grads[i]], [alone_state[0][i]], [alone_state[1][i]], [alone_state[2][i]], [alone_steps[i]],
            None, lr=row[0], beta1=row[1], beta2=row[2], weight_decay=row[3], eps=row[4], amsgrad=True,
            maximize=bool(row[6]), decoupled_weight_decay=bool(row[7]))
    assert_same(params, alone, "params")
    assert_same(m + v + vmax, alone_state[0] + alone_state[1] + alone_state[2], "state")
