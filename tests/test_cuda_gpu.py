"""frozenopt on a GPU only: what has no CPU counterpart. Skipped where CUDA is
not available (this repository's own machines have no GPU:
test_cuda_kernels_cpu.py runs the same kernel source on the CPU there); run
as-is on a machine with one. The parity tests against torch.optim run on a GPU
as the CUDA column of tests/test_parity.py (``pytest -m cuda`` runs both).

Here: launch counts against the planner, no host synchronisation, CUDA-graph
capture, and the ops called directly with a device-side mask, as a captured or
compiled step calls them, so that the kernels' own skip of frozen tensors is
what is tested: every dtype, several launches per op, a side stream, a tensor
of more than 2^31 elements. The check_* functions are also run, and timed, by
scripts/gpu_probe.py.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from matrix import DTYPES, config, random_tensors, requires_cuda, tolerance

import frozenopt
from frozenopt import ops

_C = ops.require_extension()
pytestmark = [pytest.mark.cuda, requires_cuda]

DEVICE = "cuda"  # a module constant, so the test logic itself can be dry-run on "cpu"


def make(dtype, seed=0, sizes=(0, 1, 3, 64, 1000, 2 * 65536 + 5, 4096, 0, 33)):
    return random_tensors(sizes, dtype, seed, DEVICE)


def grads_for(params, step):
    return [g.to(DEVICE) for g in random_tensors([p.numel() for p in params], params[0].dtype, 1000 + step)]


def names(indices):
    return [f"p{i}" for i in sorted(indices)]


def frozenopt_kernels(fn):
    """The names of frozenopt's kernels that running fn() launched, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA" and "frozenopt" in e.name]


@pytest.mark.parametrize("kind", ["sgd", "sgd_momentum", "adam", "adamw_amsgrad"])
def test_launches_per_step_match_the_planner(kind):  # kind: a config of tests/matrix.py
    # 300 params (200 small, 100 of 3 chunks), 30% frozen: the eager plan sends
    # only the unfrozen ones.
    sizes = [257] * 200 + [3 * 65536] * 100
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in sizes]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    opt = config(kind).make(named, lr=0.1)
    frozen = list(range(0, 300, 3))
    opt.freeze(*names(frozen))
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()  # creates the state (and, for momentum, the first-step launch)
    live = [n for i, n in enumerate(sizes) if i not in frozen]
    depth = {"sgd": 2, "sgd_momentum": 3, "adam": 5, "adamw_amsgrad": 6}[kind]
    budget = _C.cuda_plan.device_budget(torch.cuda.current_device())
    expected = _C.cuda_plan.count_launches(depth, live, budget)
    if depth >= 5:
        expected += _C.cuda_plan.count_step_launches(len(live), budget)
    names_seen = frozenopt_kernels(opt.step)
    assert len(names_seen) == expected, names_seen
    if budget == "large":
        assert expected == (1 if depth < 5 else 2)  # 200 tensors, 800 chunks: one launch (+ the step launch)


def test_step_does_not_synchronise():
    params = [torch.nn.Parameter(p) for p in make(torch.float32, seed=4) if p.numel()]
    opt = frozenopt.Adam(params, lr=torch.tensor(0.01, device=DEVICE))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.grad_scale = torch.tensor(2.0, device=DEVICE)
    opt.found_inf = torch.tensor(0.0, device=DEVICE)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        del opt.grad_scale, opt.found_inf


@pytest.mark.parametrize("kind", ["sgd_momentum", "adamw_weight_decay"])
def test_cuda_graph_capture_follows_mask_only_freeze_and_unfreeze(kind):
    """step() captured once; freeze/unfreeze in mask_only mode after the capture
    take effect on replay, and match an eager optimizer with the same schedule."""
    start = make(torch.float32, seed=6, sizes=[100, 70000, 5, 4096])
    graph_p = [torch.nn.Parameter(p.clone()) for p in start]
    eager_p = [torch.nn.Parameter(p.clone()) for p in start]
    graph_opt = config(kind).make([(f"p{i}", p) for i, p in enumerate(graph_p)], lr=0.05, mask_only=True)
    eager_opt = config(kind).make([(f"p{i}", p) for i, p in enumerate(eager_p)], lr=0.05, mask_only=True)
    for opt in (graph_opt, eager_opt):
        opt.freeze("p1")  # frozen since construction: no state until prepare_capture
    static_grads = [torch.zeros_like(p) for p in graph_p]
    for p, g in zip(graph_p, static_grads):
        p.grad = g
    graph_opt.prepare_capture()
    eager_opt.prepare_capture()  # same state layout, so the two runs are comparable

    def set_grads(step):
        for g, e, new in zip(static_grads, eager_p, grads_for(start, step)):
            g.copy_(new)
            e.grad = new.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch.cuda.graphs asks
        set_grads(0)
        graph_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    eager_opt.step()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()

    schedule = [(), (), ("unfreeze", "p1"), (), ("freeze", "p0"), ("freeze", "p3"), ("unfreeze", "p0")]
    for step, change in enumerate(schedule, start=1):
        if change:
            for opt in (graph_opt, eager_opt):
                getattr(opt, change[0])(change[1])
        frozen_before = {i: graph_p[i].detach().clone() for i in range(4) if graph_opt.is_frozen(f"p{i}")}
        set_grads(step)
        graph.replay()
        eager_opt.step()
        torch.cuda.synchronize()
        for i, before in frozen_before.items():
            assert torch.equal(graph_p[i].detach(), before), f"frozen p{i} moved on replay {step}"
        for i, (g, e) in enumerate(zip(graph_p, eager_p)):
            torch.testing.assert_close(g.detach(), e.detach(), rtol=1e-6, atol=1e-7, msg=f"p{i} at {step}")
    assert not torch.equal(graph_p[1].detach(), start[1]), "p1 never moved after its unfreeze"


# ----------------------------------------------------------------- the kernel-argument budget

def driver_version():
    """cuDriverGetVersion, e.g. 13000 for a CUDA 13.0 driver."""
    version = ctypes.c_int(0)
    assert ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0
    return version.value


def check_kernel_argument_budget():
    device = torch.cuda.current_device()
    major = torch.cuda.get_device_properties(device).major
    budget = _C.cuda_plan.device_budget(device)
    assert budget == _C.cuda_plan.budget_for(driver_version(), major)
    return budget


def test_kernel_argument_budget_follows_the_driver_and_the_device():
    check_kernel_argument_budget()


# ----------------------------------------------------------------- the device-side mask, through the ops

OP_KINDS = {"sgd": 2, "sgd_momentum": 3, "adam": 5, "adamw_amsgrad": 6}  # name: planner depth
MASK_SIZES = [0, 1, 3, 64, 1000, 2 * 65536 + 5, 4096, 0, 33, 65536]
MASK_FROZEN = [2, 5, 7, 9]  # a ragged one, a multi-chunk one, an empty one, a whole chunk


def op_state(kind, params):
    """(state lists, step counters) for the op, zero-filled, on the params' device."""
    count = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw_amsgrad": 3}[kind]
    return [[torch.zeros_like(p) for p in params] for _ in range(count)], [
        torch.zeros((), device=p.device) for p in params]


def run_op(kind, params, grads, states, steps, mask, step):
    """One call of the op over the whole list, frozen entries included (the mask decides)."""
    if kind.startswith("sgd"):
        momentum = kind == "sgd_momentum"
        ops.sgd_(params, grads, states[0] if momentum else [], mask, lr=0.05, momentum=0.9 if momentum else 0.0,
                 dampening=0.1 if momentum else 0.0, weight_decay=0.01, nesterov=False, maximize=False,
                 is_first_step=step == 0)
    else:
        amsgrad = kind == "adamw_amsgrad"
        ops.adam_(params, grads, states[0], states[1], states[2] if amsgrad else [], steps, mask, lr=0.01,
                  beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=amsgrad, maximize=False,
                  decoupled_weight_decay=amsgrad)


def run_against_cpu(kind, dtype, sizes, frozen, steps=3, seed=0, before_step=None):
    """The op on DEVICE and frozenopt's CPU op (itself tested against
    torch.optim) from the same start, with the same mask; checks that frozen
    tensors and their state are bitwise untouched and the rest agree.
    before_step(step, lists) may replace the DEVICE call. Returns the DEVICE lists."""
    start = make(dtype, seed, sizes)
    mask_cpu = torch.zeros(len(sizes), dtype=torch.bool)
    mask_cpu[frozen] = True
    runs = {}
    for device in (DEVICE, "cpu"):
        params = [p.clone().to(device) for p in start]
        states, counters = op_state(kind, params)
        runs[device] = (params, states, counters, mask_cpu.to(device))
    for step in range(steps):
        grads = grads_for(start, step)
        for device, (params, states, counters, mask) in runs.items():
            g = [x.to(device) for x in grads]
            if device == DEVICE and before_step is not None:
                before_step(step, (params, g, states, counters, mask))
            else:
                run_op(kind, params, g, states, counters, mask, step)
    torch.cuda.synchronize()
    (params, states, counters, _), (cparams, cstates, ccounters, _) = runs[DEVICE], runs["cpu"]
    t = tolerance(dtype, "kernels")
    for i in range(len(sizes)):
        rows = [params[i]] + [s[i] for s in states]
        if i in frozen:
            assert torch.equal(params[i].cpu(), start[i].cpu()), f"frozen param {i} moved"
            assert all(not r.any() for r in rows[1:]), f"the state of frozen param {i} was written"
            assert counters[i].item() == 0, f"the step of frozen param {i} advanced"
            continue
        for r, c in zip(rows, [cparams[i]] + [s[i] for s in cstates]):
            torch.testing.assert_close(r.cpu(), c, **t, msg=f"param {i}")
        assert counters[i].item() == ccounters[i].item()
    return runs[DEVICE]


def check_device_mask(kind, dtype, sizes=MASK_SIZES, frozen=MASK_FROZEN, steps=3):
    run_against_cpu(kind, dtype, sizes, frozen, steps=steps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", sorted(OP_KINDS))
def test_device_mask_skips_frozen_tensors(kind, dtype):
    check_device_mask(kind, dtype)


def check_several_launches(kind):
    """More tensors than one launch's metadata holds, and tensors longer than
    a launch's blocks: the launch count is the planner's for this device's
    budget, and every launch honours the mask. Returns the launch count."""
    budget = _C.cuda_plan.device_budget(torch.cuda.current_device())
    depth = OP_KINDS[kind]
    max_tensors = _C.cuda_plan.limits(depth, budget)[0]
    sizes = [33, 0, 70] * ((max_tensors + 60) // 2) + [3 * 65536 + 7] * 4
    frozen = list(range(0, len(sizes), 4))
    expected = _C.cuda_plan.count_launches(depth, sizes, budget)
    if depth >= 5:
        expected += _C.cuda_plan.count_step_launches(len(sizes), budget)
    launched = []

    def profiled(step, lists):
        params, grads, states, counters, mask = lists
        names = frozenopt_kernels(lambda: run_op(kind, params, grads, states, counters, mask, step))
        launched.append(len(names))

    run_against_cpu(kind, torch.float32, sizes, frozen, steps=2, seed=7, before_step=profiled)
    assert launched == [expected] * 2, (launched, expected)
    assert _C.cuda_plan.count_launches(depth, sizes, budget) >= 2
    return expected


@pytest.mark.parametrize("kind", sorted(OP_KINDS))
def test_several_launches_per_op_honour_the_mask(kind):
    check_several_launches(kind)


def check_side_stream(kind):
    """The op runs on the current stream, whatever it is: grads written on a
    side stream after a long sleep there must be what the op reads."""
    side = torch.cuda.Stream()

    def on_side_stream(step, lists):
        params, grads, states, counters, mask = lists
        fresh = [g.clone() for g in grads]
        for g in grads:
            g.zero_()
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(20_000_000)  # tens of milliseconds on the side stream only
            for g, f in zip(grads, fresh):
                g.copy_(f)
            run_op(kind, params, grads, states, counters, mask, step)
        assert torch.cuda.current_stream().query(), "the op queued work on the default stream"
        side.synchronize()

    run_against_cpu(kind, torch.float32, MASK_SIZES, MASK_FROZEN, steps=2, seed=3, before_step=on_side_stream)


@pytest.mark.parametrize("kind", sorted(OP_KINDS))
def test_ops_run_on_a_side_stream(kind):
    check_side_stream(kind)


BIG = 2**31 + 3


def check_over_2_31_elements():
    """SGD over a float16 tensor of 2^31 + 3 elements beside a frozen small
    one: every element moves, those past 2^31 too (64-bit offsets)."""
    p = torch.zeros(BIG, dtype=torch.float16, device=DEVICE)
    g = torch.ones_like(p)
    small, small_g = torch.ones(5, dtype=torch.float16, device=DEVICE), torch.ones(5, dtype=torch.float16,
                                                                                       device=DEVICE)
    mask = torch.tensor([False, True], device=DEVICE)
    ops.sgd_([p, small], [g, small_g], [], mask, lr=0.5, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, maximize=False, is_first_step=True)
    assert bool((p[2**31:] == -0.5).all()), "elements past 2^31 did not move"
    assert bool((p == -0.5).all()), "not every element moved by -lr * grad"
    assert bool((small == 1).all()), "the frozen tensor moved"


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 24 * 2**30,
                    reason="needs 24 GB of GPU memory")
def test_a_tensor_of_more_than_2_31_elements():
    check_over_2_31_elements()


def check_vector_and_elementwise_paths(kind, dtype):
    """The same data in rows aligned for packed loads and one element off
    (element-wise loads), with a ragged tail: the same bits."""
    n = 65536 + 1027
    start = make(dtype, 5, [n])[0]

    def run(offset):
        storage = torch.zeros(n + 1, dtype=dtype, device=DEVICE)
        params = [storage[offset:offset + n]]
        params[0].copy_(start)
        states, counters = op_state(kind, params)
        states = [[torch.zeros(n + 1, dtype=dtype, device=DEVICE)[offset:offset + n]] for _ in states]
        for step in range(2):
            grads = [torch.zeros(n + 1, dtype=dtype, device=DEVICE)[offset:offset + n].copy_(
                grads_for([start], step)[0])]
            run_op(kind, params, grads, states, counters, None, step)
        return [params[0]] + [s[0] for s in states]

    aligned, misaligned = run(0), run(1)
    for a, b in zip(aligned, misaligned):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["sgd_momentum", "adamw_amsgrad"])
def test_vector_and_elementwise_paths_agree_bitwise(kind, dtype):
    check_vector_and_elementwise_paths(kind, dtype)
