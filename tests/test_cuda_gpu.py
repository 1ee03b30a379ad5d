"""frozenopt's CUDA kernels on a GPU. Skipped where CUDA is not available
(this repository's own machines have no GPU: test_cuda_kernels_cpu.py runs the
same kernel source on the CPU there); run as-is on a machine with one.
"""

from __future__ import annotations

import pytest
import torch

import frozenopt
from frozenopt import ops

_C = ops.require_extension()
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not _C.cuda_plan.built_with_cuda, reason="frozenopt was built without its CUDA kernels"),
]

DEVICE = "cuda"  # a module constant, so the test logic itself can be dry-run on "cpu"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)
SIZES = [0, 1, 3, 64, 1000, 2 * 65536 + 5, 4096, 0, 33]
STEPS = 6
ALWAYS = {2, 6}  # frozen throughout
SOMETIMES = {4, 5}  # frozen on steps 2 and 3


def frozen_at(step):
    return ALWAYS | (SOMETIMES if step in (2, 3) else set())


def names(indices):
    return [f"p{i}" for i in sorted(indices)]


def make(dtype, seed=0, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(DEVICE) for n in sizes]


def grads_for(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype).to(DEVICE) for p in params]


def tol(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-7, atol=1e-9),
            torch.float16: dict(rtol=1e-2, atol=2e-3), torch.bfloat16: dict(rtol=4e-2, atol=1.6e-2)}[dtype]


def run_parity(make_ours, make_ref, dtype, ref_dtype=None):
    """ours (frozenopt, freezing by name) and a torch.optim reference that gets grad=None for frozen params."""
    start = make(dtype)
    ours_p = [torch.nn.Parameter(p.clone()) for p in start]
    ref_p = [torch.nn.Parameter(p.clone().to(ref_dtype or dtype)) for p in start]
    ours = make_ours([(f"p{i}", p) for i, p in enumerate(ours_p)])
    ref = make_ref(ref_p)
    for step in range(STEPS):
        grads = grads_for(start, step)
        frozen = frozen_at(step)
        ours.unfreeze()
        ours.freeze(*names(frozen))
        for i, (p, r, g) in enumerate(zip(ours_p, ref_p, grads)):
            p.grad = g.clone()  # frozen params keep a grad (mask_only): it must be ignored
            r.grad = None if i in frozen else g.to(r.dtype)
        ours.step()
        ref.step()
    for i in ALWAYS:
        assert torch.equal(ours_p[i].detach(), start[i]), f"frozen param {i} moved"
    return ours, ref, ours_p, ref_p


SGD_CONFIGS = [dict(), dict(momentum=0.9), dict(momentum=0.9, dampening=0.3), dict(momentum=0.9, nesterov=True),
               dict(momentum=0.5, weight_decay=0.1), dict(momentum=0.9, maximize=True, weight_decay=0.01)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", SGD_CONFIGS, ids=lambda kw: ",".join(kw) or "plain")
def test_sgd_parity(dtype, kw):
    # Half types against torch.optim in float64 from the same start (torch's
    # own fused SGD with momentum rounds its half buffers differently).
    ref_dtype = torch.float64 if dtype in HALF else None
    impl = dict(foreach=False) if dtype in HALF else dict(fused=True)
    ours, ref, ours_p, ref_p = run_parity(
        lambda named: frozenopt.SGD(named, lr=0.05, mask_only=True, **kw),
        lambda params: torch.optim.SGD(params, lr=0.05, **kw, **impl), dtype, ref_dtype)
    t = tol(dtype) if dtype not in HALF else {torch.float16: dict(rtol=4e-3, atol=4e-3),
                                                torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}[dtype]
    for i, (p, r) in enumerate(zip(ours_p, ref_p)):
        torch.testing.assert_close(p.detach().to(r.dtype), r.detach(), **t, msg=f"param {i}")
        if kw.get("momentum") and i not in ALWAYS and p.numel():
            torch.testing.assert_close(ours.state[p]["momentum_buffer"].to(r.dtype),
                                       ref.state[r]["momentum_buffer"], **t)
    for i in ALWAYS:
        assert ours_p[i] not in ours.state or not ours.state[ours_p[i]], "a param frozen from the start has state"


ADAM_CONFIGS = [("adam", dict()), ("adam", dict(weight_decay=0.1)),
                ("adam", dict(amsgrad=True, maximize=True, weight_decay=0.05)),
                ("adamw", dict(weight_decay=0.1)), ("adamw", dict(amsgrad=True, betas=(0.8, 0.99), eps=1e-6))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,kw", ADAM_CONFIGS, ids=lambda x: x if isinstance(x, str) else ",".join(x) or "-")
def test_adam_parity_with_torch_fused(dtype, kind, kw):
    ours_cls = frozenopt.AdamW if kind == "adamw" else frozenopt.Adam
    ref_cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    ours, ref, ours_p, ref_p = run_parity(
        lambda named: ours_cls(named, lr=0.01, mask_only=True, **kw),
        lambda params: ref_cls(params, lr=0.01, fused=True, **kw), dtype)
    for i, (p, r) in enumerate(zip(ours_p, ref_p)):
        torch.testing.assert_close(p.detach(), r.detach(), **tol(dtype), msg=f"param {i}")
        if i in ALWAYS:
            continue
        s, rs = ours.state[p], ref.state[r]
        assert s["step"].device == p.device and s["step"].item() == rs["step"].item()
        torch.testing.assert_close(s["exp_avg"], rs["exp_avg"], **tol(dtype))
        torch.testing.assert_close(s["exp_avg_sq"], rs["exp_avg_sq"], **tol(dtype))
    for i in SOMETIMES:
        assert ours.state[ours_p[i]]["step"].item() == STEPS - 2


def test_frozen_params_and_state_are_bitwise_unchanged():
    params = [torch.nn.Parameter(p) for p in make(torch.float32, seed=3)]
    opt = frozenopt.AdamW([(f"p{i}", p) for i, p in enumerate(params)], lr=0.1, weight_decay=0.5, amsgrad=True,
                          mask_only=True)
    for step in range(2):  # every param gets state
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
    opt.freeze("p1", "p5", "p8")
    frozen = [1, 5, 8]
    before = {i: (params[i].detach().clone(), {k: v.clone() for k, v in opt.state[params[i]].items()})
              for i in frozen}
    for step in range(5):
        for p, g in zip(params, grads_for(params, 10 + step)):
            p.grad = g * (step - 2) if step != 3 else torch.full_like(g, float("inf"))
        opt.step()
    for i in frozen:
        assert torch.equal(params[i].detach(), before[i][0])
        for k, v in opt.state[params[i]].items():
            assert torch.equal(v, before[i][1][k]), f"state {k} of p{i}"


def _counting_kernels(fn):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA" and "frozenopt" in e.name]


@pytest.mark.parametrize("kind", ["sgd", "sgd_momentum", "adam", "adamw_amsgrad"])
def test_launches_per_step_match_the_planner(kind):
    # 300 params (200 small, 100 of 3 chunks), 30% frozen: the eager plan sends
    # only the unfrozen ones.
    sizes = [257] * 200 + [3 * 65536] * 100
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in sizes]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    opt = {"sgd": lambda: frozenopt.SGD(named, lr=0.1),
           "sgd_momentum": lambda: frozenopt.SGD(named, lr=0.1, momentum=0.9),
           "adam": lambda: frozenopt.Adam(named, lr=0.1),
           "adamw_amsgrad": lambda: frozenopt.AdamW(named, lr=0.1, amsgrad=True)}[kind]()
    frozen = list(range(0, 300, 3))
    opt.freeze(*names(frozen))
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()  # creates the state (and, for momentum, the first-step launch)
    live = [n for i, n in enumerate(sizes) if i not in frozen]
    depth = {"sgd": 2, "sgd_momentum": 3, "adam": 5, "adamw_amsgrad": 6}[kind]
    expected = _C.cuda_plan.count_launches(depth, live)
    if depth >= 5:
        expected += _C.cuda_plan.count_step_launches(len(live))
    names_seen = _counting_kernels(opt.step)
    assert len(names_seen) == expected, names_seen
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


@pytest.mark.parametrize("cls", [frozenopt.SGD, frozenopt.Adam, frozenopt.AdamW])
def test_found_inf_moves_nothing(cls):
    params = [torch.nn.Parameter(p) for p in make(torch.float32, seed=5)]
    kw = dict(momentum=0.9) if cls is frozenopt.SGD else {}
    opt = cls(params, lr=0.1, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    opt.found_inf = torch.ones((), device=DEVICE)
    opt.grad_scale = torch.tensor(1024.0, device=DEVICE)
    opt.step()
    del opt.found_inf, opt.grad_scale
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[p][k])


def test_grad_scaler_skips_an_overflowing_step():
    model = torch.nn.Linear(16, 4).cuda()
    opt = frozenopt.AdamW(model, lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    model(torch.randn(8, 16, device=DEVICE)).sum().backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    steps = [opt.state[p]["step"].clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(torch.randn(8, 16, device=DEVICE)).sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    for p, b, s in zip(model.parameters(), before, steps):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["step"], s)


@pytest.mark.parametrize("cls", [frozenopt.SGD, frozenopt.AdamW])
def test_cuda_graph_capture_follows_mask_only_freeze_and_unfreeze(cls):
    """step() captured once; freeze/unfreeze in mask_only mode after the capture
    take effect on replay, and match an eager optimizer with the same schedule."""
    kw = dict(momentum=0.9) if cls is frozenopt.SGD else dict(weight_decay=0.1)
    start = make(torch.float32, seed=6, sizes=[100, 70000, 5, 4096])
    graph_p = [torch.nn.Parameter(p.clone()) for p in start]
    eager_p = [torch.nn.Parameter(p.clone()) for p in start]
    graph_opt = cls([(f"p{i}", p) for i, p in enumerate(graph_p)], lr=0.05, mask_only=True, **kw)
    eager_opt = cls([(f"p{i}", p) for i, p in enumerate(eager_p)], lr=0.05, mask_only=True, **kw)
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


def test_non_dense_params_are_stepped_through_copies():
    base = torch.randn(64, 64, device=DEVICE)
    strided = torch.nn.Parameter(base[:, ::2])  # not dense: copied, stepped, written back
    ref = torch.nn.Parameter(strided.detach().clone())
    opt = frozenopt.Adam([strided], lr=0.1)
    ref_opt = torch.optim.Adam([ref], lr=0.1, fused=True)
    for step in range(3):
        g = torch.randn(64, 32, device=DEVICE)
        strided.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(strided.detach(), ref.detach())
