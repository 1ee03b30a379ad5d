"""Many param groups, one launch: the eager step steps every group that shares a
device and a state layout in one fused launch, each tensor with its own group's
hyper-parameters.

Each test compares with torch.optim (fused=True where torch has it, within the
"fused" tolerance) and, bitwise, with frozenopt stepping each group through an
optimizer of its own (one launch per group: what the merged launch replaces).
The launch count is read from the profiler: one "step plan" event per launch.
"""

import copy

import pytest
import torch
from matrix import FLOATS, snapshot, tolerance
from torch import nn

import frozenopt

STEPS = 6
SIZES = [1, 7, 300, 0, 4099, 64, 33]  # vector body, scalar tail, one element, empty


def make_params(dtype=torch.float32, count=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(SIZES[i % len(SIZES)], generator=gen, dtype=torch.float64).to(dtype))
            for i in range(count)]


def clone_params(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def split(params, hypers):
    """Param groups over consecutive slices of params, one per hyper-parameter dict."""
    n = len(hypers)
    return [{"params": params[i * len(params) // n:(i + 1) * len(params) // n], **h} for i, h in enumerate(hypers)]


# Per-group values that the merged launch takes from each group's entry: lr, weight
# decay, betas, eps, momentum, dampening, nesterov and maximize all differ by group.
def sgd_hypers(n, momentum=True):
    rows = []
    for i in range(n):
        row = dict(lr=0.1 * 0.8 ** i, weight_decay=[0.0, 0.01, 0.1][i % 3], maximize=i % 4 == 1)
        if momentum:
            nesterov = i % 5 == 2
            row.update(momentum=[0.9, 0.5, 0.99][i % 3], dampening=0.0 if nesterov else [0.0, 0.3][i % 2],
                       nesterov=nesterov)
        rows.append(row)
    return rows


def adam_hypers(n, amsgrad=False):
    return [dict(lr=0.01 * 0.7 ** i, weight_decay=[0.0, 0.05, 0.3][i % 3], betas=[(0.9, 0.999), (0.8, 0.99)][i % 2],
                 eps=[1e-8, 1e-6, 1e-3][i % 3], maximize=i % 4 == 3, amsgrad=amsgrad) for i in range(n)]


CASES = {
    "SGD": lambda n: sgd_hypers(n),
    "SGD-no-momentum": lambda n: sgd_hypers(n, momentum=False),
    "Adam": lambda n: adam_hypers(n),
    "Adam-amsgrad": lambda n: adam_hypers(n, amsgrad=True),
    "AdamW": lambda n: adam_hypers(n),
}


def optimizer_class(case):
    return case.split("-")[0]


def set_grads(step, *param_lists, seed=1):
    gen = torch.Generator().manual_seed(seed + step)
    for ps in zip(*param_lists):
        g = torch.randn(ps[0].shape, generator=gen, dtype=torch.float64).to(ps[0].dtype)
        for p in ps:
            p.grad = g.clone()


def plan_launches(opt):
    """The number of step-plan launches one step() makes (profiler events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    return sum(1 for e in prof.events() if "(step plan)" in e.name)


def assert_bitwise(ours, theirs, opt_a, opts_b, where):
    state_b = {}
    for o in opts_b:
        state_b.update({id(p): s for p, s in o.state.items()})
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q), where
        mine, ref = opt_a.state.get(p, {}), state_b.get(id(q), {})
        assert mine.keys() == ref.keys(), where
        for key in ref:
            assert torch.equal(mine[key], ref[key]), (where, key)


def assert_close_to_torch(ours, reference, dtype, where):
    for p, q in zip(ours, reference):
        torch.testing.assert_close(p, q, **tolerance(dtype, "fused"), msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_many_groups_match_torch_fused_and_per_group_steps(case, dtype):
    name, hypers = optimizer_class(case), CASES[case](12)
    ours = make_params(dtype)
    alone, reference = clone_params(ours), clone_params(ours)
    merged = getattr(frozenopt, name)(split(ours, hypers))
    per_group = [getattr(frozenopt, name)([g]) for g in split(alone, hypers)]
    fused = getattr(torch.optim, name)(split(reference, hypers), fused=True)
    for step in range(STEPS):
        set_grads(step, ours, alone, reference)
        launches = plan_launches(merged)
        for opt in per_group:
            opt.step()
        fused.step()
        if step > 0:  # the first step makes the state, through the op
            assert launches == 1, (step, launches)
        assert_bitwise(ours, alone, merged, per_group, f"step {step}")
        assert_close_to_torch(ours, reference, dtype, f"step {step}")


def test_groups_of_several_dtypes_share_one_launch():
    params = make_params(torch.float32, 8) + make_params(torch.float64, 8, seed=3)
    alone, reference = clone_params(params), clone_params(params)
    hypers = adam_hypers(4)
    merged = frozenopt.AdamW(split(params, hypers))
    per_group = [frozenopt.AdamW([g]) for g in split(alone, hypers)]
    for step in range(4):
        set_grads(step, params, alone, reference)
        launches = plan_launches(merged)
        for opt in per_group:
            opt.step()
        assert step == 0 or launches == 1
        assert_bitwise(params, alone, merged, per_group, f"step {step}")


# Groups split by what decides their state layout; other flags differ per group in one launch.
@pytest.mark.parametrize("name, flags, launches", [
    ("SGD", [dict(momentum=0.9), dict(momentum=0.0), dict(momentum=0.5, nesterov=True), dict(momentum=0.0)], 2),
    ("SGD", [dict(momentum=0.9, maximize=True), dict(momentum=0.9, nesterov=True), dict(momentum=0.5)], 1),
    ("Adam", [dict(amsgrad=True), dict(amsgrad=False), dict(amsgrad=True, maximize=True)], 2),
    ("Adam", [dict(maximize=True), dict(decoupled_weight_decay=True, weight_decay=0.1), dict()], 1),
], ids=["sgd-momentum-split", "sgd-flags-merged", "adam-amsgrad-split", "adam-flags-merged"])
def test_flags_that_change_the_state_layout_split_the_launch(name, flags, launches):
    ours = make_params(count=12)
    alone, reference = clone_params(ours), clone_params(ours)
    hypers = [dict(lr=0.05 * (i + 1), **f) for i, f in enumerate(flags)]
    merged = getattr(frozenopt, name)(split(ours, hypers))
    per_group = [getattr(frozenopt, name)([g]) for g in split(alone, hypers)]
    # torch.optim.Adam takes decoupled_weight_decay too; no group sets it on SGD.
    fused = getattr(torch.optim, name)(split(reference, hypers), fused=True)
    for step in range(4):
        set_grads(step, ours, alone, reference)
        count = plan_launches(merged)
        for opt in per_group:
            opt.step()
        fused.step()
        if step > 0:
            assert count == launches, (step, count)
        assert_bitwise(ours, alone, merged, per_group, f"step {step}")
        assert_close_to_torch(ours, reference, torch.float32, f"step {step}")


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_schedulers_change_each_groups_lr_mid_run(name):
    ours = make_params(count=20)
    alone, reference = clone_params(ours), clone_params(ours)
    hypers = sgd_hypers(10) if name == "SGD" else adam_hypers(10)
    merged = getattr(frozenopt, name)(split(ours, hypers))
    per_group = [getattr(frozenopt, name)([g]) for g in split(alone, hypers)]
    fused = getattr(torch.optim, name)(split(reference, hypers), fused=True)

    def schedulers(opt):
        # A per-group lambda (layer-wise decay that warms up) and a cosine on top.
        n = len(opt.param_groups)
        lambdas = [lambda s, i=i: min(1.0, (s + 1) / 3) * 0.9 ** (i % 3) for i in range(n)] if n > 1 else \
            [lambda s: min(1.0, (s + 1) / 3)]
        return [torch.optim.lr_scheduler.LambdaLR(opt, lambdas),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS * 2)]

    mine = schedulers(merged)
    # Each lone group gets the lambda of its index in the merged optimizer.
    theirs_alone = []
    for i, opt in enumerate(per_group):
        lam = [lambda s, i=i: min(1.0, (s + 1) / 3) * 0.9 ** (i % 3)]
        theirs_alone += [torch.optim.lr_scheduler.LambdaLR(opt, lam),
                         torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS * 2)]
    theirs = schedulers(fused)
    for step in range(STEPS * 2):
        set_grads(step, ours, alone, reference)
        merged.step()
        for opt in per_group:
            opt.step()
        fused.step()
        for sched in mine + theirs_alone + theirs:
            sched.step()
        assert [g["lr"] for g in merged.param_groups] == [g["lr"] for g in fused.param_groups]
        assert_bitwise(ours, alone, merged, per_group, f"step {step}")
        assert_close_to_torch(ours, reference, torch.float32, f"step {step}")


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_groups_values_edited_between_steps_are_taken(name):
    ours = make_params(count=12)
    reference = clone_params(ours)
    hypers = sgd_hypers(6) if name == "SGD" else adam_hypers(6)
    merged = getattr(frozenopt, name)(split(ours, hypers))
    fused = getattr(torch.optim, name)(split(reference, hypers), fused=True)
    edits = {
        "SGD": [(2, dict(lr=0.5)), (4, dict(weight_decay=0.2, dampening=0.0)), (1, dict(momentum=0.1)),
                (0, dict(maximize=True)), (5, dict(nesterov=True, dampening=0.0))],
        "Adam": [(2, dict(lr=0.5)), (4, dict(betas=(0.5, 0.9))), (1, dict(eps=0.1, weight_decay=0.0)),
                 (0, dict(maximize=True)), (5, dict(lr=1e-5, weight_decay=0.5))],
    }[name]
    for step in range(len(edits) + 2):
        if 0 < step <= len(edits):
            gi, edit = edits[step - 1]
            for opt in (merged, fused):
                opt.param_groups[gi].update(edit)
        set_grads(step, ours, reference)
        before = [p.detach().clone() for p in merged.param_groups[edits[min(step, len(edits)) - 1][0]]["params"]]
        merged.step()
        fused.step()
        assert_close_to_torch(ours, reference, torch.float32, f"step {step}")
        if 0 < step <= len(edits):  # the edited group did move, with its new values
            after = merged.param_groups[edits[step - 1][0]]["params"]
            assert any(not torch.equal(a, b) for a, b in zip(after, before) if a.numel())


def test_tensor_lrs_changed_in_place_follow_torch():
    ours = make_params(count=12)
    reference = clone_params(ours)
    hypers = [dict(lr=torch.tensor(0.01 * (i + 1))) for i in range(4)]
    merged = frozenopt.Adam(split(ours, hypers))
    fused = torch.optim.Adam(split(reference, copy.deepcopy(hypers)), fused=True)
    for step in range(5):
        if step == 2:
            for opt in (merged, fused):
                opt.param_groups[1]["lr"].fill_(0.3)
                opt.param_groups[3]["lr"].mul_(0.1)
        set_grads(step, ours, reference)
        merged.step()
        fused.step()
        assert_close_to_torch(ours, reference, torch.float32, f"step {step}")


def test_groups_added_with_add_param_group_join_the_launch():
    ours = make_params(count=18)
    alone, reference = clone_params(ours), clone_params(ours)
    hypers = adam_hypers(6)
    groups, lone_groups, ref_groups = split(ours, hypers), split(alone, hypers), split(reference, hypers)
    merged = frozenopt.Adam(groups[:2])
    per_group = [frozenopt.Adam([g]) for g in lone_groups[:2]]
    fused = torch.optim.Adam(ref_groups[:2], fused=True)
    for step in range(6):
        if 1 <= step <= 4:  # a new group at each of these steps
            merged.add_param_group(groups[step + 1])
            per_group.append(frozenopt.Adam([lone_groups[step + 1]]))
            fused.add_param_group(ref_groups[step + 1])
        set_grads(step, ours, alone, reference)
        launches = plan_launches(merged)
        for opt in per_group:
            opt.step()
        fused.step()
        # A new group's params start with a fresh-state step through the op; the rest, one launch.
        assert launches == (0 if step == 0 else 1)
        assert_bitwise(ours, alone, merged, per_group, f"step {step}")
        assert_close_to_torch(ours, reference, torch.float32, f"step {step}")
    assert len(merged.param_groups) == 6


@pytest.mark.parametrize("mask_only", [False, True])
def test_frozen_params_across_groups_are_untouched(mask_only):
    ours = make_params(count=24)
    reference = clone_params(ours)
    hypers = sgd_hypers(8)
    merged = frozenopt.SGD(split(ours, hypers), mask_only=mask_only)
    fused = torch.optim.SGD(split(reference, hypers), fused=True)
    frozen_at = {2: [1, 5, 9, 22], 3: [1, 5, 9, 22], 4: [9, 13, 14], 5: []}
    for step in range(7):
        merged.unfreeze()
        want = frozen_at.get(step, [])
        if want:
            merged.freeze(*(ours[i] for i in want))
        set_grads(step, ours, reference)
        for i in want:  # ours keep a grad: frozen means "as if it were None", whatever it holds
            reference[i].grad = None
        before = {i: (ours[i].detach().clone(), copy.deepcopy(merged.state.get(ours[i], {}))) for i in want}
        merged.step()
        fused.step()
        for i, (value, state) in before.items():
            assert torch.equal(ours[i], value)
            for key, t in state.items():
                assert torch.equal(merged.state[ours[i]][key], t)
        assert_close_to_torch(ours, reference, torch.float32, f"step {step}")


def test_a_bad_value_in_one_group_moves_no_group():
    ours = make_params(count=12)
    opt = frozenopt.AdamW(split(ours, adam_hypers(6)))
    set_grads(0, ours)
    opt.step()
    opt.step()
    for edit, message in [(dict(lr=-1.0), "Invalid learning rate"), (dict(betas=(0.9, 1.5)), "Invalid beta"),
                          (dict(eps=-1.0), "Invalid epsilon"), (dict(weight_decay=float("nan")), "weight_decay")]:
        saved = dict(opt.param_groups[4])
        opt.param_groups[4].update(edit)
        before = snapshot(opt)
        with pytest.raises(ValueError, match=message):
            opt.step()
        after = snapshot(opt)
        for p, q in zip(before["values"], after["values"]):
            assert torch.equal(p, q)
        for i in before["state"]:
            for key, (value, _) in before["state"][i].items():
                assert torch.equal(value, after["state"][i][key][0])
        opt.param_groups[4].clear()
        opt.param_groups[4].update(saved)
    opt.step()  # the group put back steps again


def test_released_state_is_freed_when_its_plan_steps_other_groups_too():
    """freeze(..., release_state=True) frees the state tensors of one group even though
    the plan that held them also steps the other groups."""
    import gc
    import weakref

    ours = make_params(count=12)
    opt = frozenopt.AdamW(split(ours, adam_hypers(3)))
    for step in range(3):
        set_grads(step, ours)
        opt.step()
    first = opt.param_groups[0]["params"]
    refs = [weakref.ref(t) for p in first for t in opt.state[p].values()]
    opt.freeze(*first, release_state=True)
    gc.collect()
    assert all(r() is None for r in refs), "released state tensors are still alive"
    before = [p.detach().clone() for p in ours]
    set_grads(3, ours)
    assert plan_launches(opt) == 1  # the other groups, still in one launch
    assert all(torch.equal(p, b) for p, b in zip(first, before))
    assert not any(torch.equal(p, b) for p, b in zip(ours[4:], before[4:]) if p.numel())
