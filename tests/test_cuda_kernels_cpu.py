"""frozenopt's CUDA kernels, run on the CPU.

csrc/cuda/kernels.cuh (the kernels and the launchers the CUDA ops call: step
launch, dtype groups, the planner) is compiled with g++ under
tests/cuda_shim/host_shim.h, which runs the blocks of each launch one by one
and, within a block, its threads as fibers, so __syncthreads is a real
barrier. The results are compared with torch.optim. The same source is also
built with ThreadSanitizer in the shim's real-threads mode
(tests/cuda_shim/race_check.cpp), where a missing barrier or a race between
the threads of a block is reported. What this cannot show: races between
blocks, the GPU memory model, the kernel-argument limit of a real launch, or
nvcc's code generation; test_cuda_gpu.py covers those where a GPU exists.

The shim module and the race check are built at test time into
build/cuda_shim/<hash of their sources> (reused while the sources are unchanged).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matrix import DTYPES, FLOATS, HALF, KERNEL_SWEEP, config_params, random_tensors, tolerance

from frozenopt import ops

TESTS = Path(__file__).resolve().parent
CSRC = Path(os.environ.get("FROZENOPT_CSRC", TESTS.parent / "csrc"))
SHIM_DIR = TESTS / "cuda_shim"
KERNEL_SOURCES = [SHIM_DIR / "host_shim.h", CSRC / "update_math.h", CSRC / "cuda" / "kernels.cuh",
                  CSRC / "multi_tensor" / "kernel_args.h", CSRC / "multi_tensor" / "launch_plan.h"]
SHIM_SOURCES = [SHIM_DIR / "shim.cpp"] + KERNEL_SOURCES
RACE_SOURCES = [SHIM_DIR / "race_check.cpp"] + KERNEL_SOURCES
CHUNK = 65536
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
FORK_OK = hasattr(os, "fork") and sys.platform.startswith("linux")


def build_dir(sources, *extra):
    """build/cuda_shim/<hash of the sources, torch's version and extra>, made if missing."""
    key = hashlib.sha256(torch.__version__.encode())
    for item in extra:
        key.update(item.encode())
    for path in sources:
        key.update(path.read_bytes())
    build = Path(os.environ.get("FROZENOPT_SHIM_BUILD", TESTS.parent / "build" / "cuda_shim")) / key.hexdigest()[:16]
    build.mkdir(parents=True, exist_ok=True)
    return build


@pytest.fixture(scope="session")
def shim():
    from torch.utils.cpp_extension import load

    build = build_dir(SHIM_SOURCES)
    return load(name="frozenopt_cuda_shim", sources=[str(SHIM_DIR / "shim.cpp")],
                extra_include_paths=[str(CSRC), str(SHIM_DIR)], extra_cflags=["-O2", "-std=c++20"],
                build_directory=str(build), verbose=False)


# ----------------------------------------------------------------- helpers

def scalar(value, default):
    """The kernels' ScalarArg: (address, is_double, host value). A tensor is read
    through its address, the way a CUDA tensor is read on the device."""
    if value is None:
        return (0, 0, float(default))
    if isinstance(value, torch.Tensor):
        assert value.dtype in (torch.float32, torch.float64)
        return (value.data_ptr(), int(value.dtype == torch.float64), 0.0)
    return (0, 0, float(value))


def mask_arg(mask):
    return 0 if mask is None else mask.data_ptr()


def run_sgd(shim, params, grads, bufs, mask, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
            nesterov=False, maximize=False, first_step=False, grad_scale=None, found_inf=None, **limits):
    rows = [[p.data_ptr(), g.data_ptr()] + ([b.data_ptr()] if momentum else [])
            for p, g, b in zip(params, grads, bufs if momentum else [None] * len(params))]
    return shim.sgd(rows, [p.numel() for p in params], [DTYPE_CODE[p.dtype] for p in params], mask_arg(mask),
                    scalar(found_inf, 0.0), scalar(grad_scale, 1.0), scalar(lr, 0.0), momentum, dampening,
                    weight_decay, nesterov, maximize, first_step, **limits)


def run_adam(shim, params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, mask, *, lr, beta1=0.9, beta2=0.999,
             eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False, grad_scale=None,
             found_inf=None, **limits):
    rows = []
    for i, p in enumerate(params):
        row = [p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
               steps[i].data_ptr()]
        if amsgrad:
            row.append(max_sqs[i].data_ptr())
        rows.append(row)
    return shim.adam(rows, [p.numel() for p in params], [DTYPE_CODE[p.dtype] for p in params], mask_arg(mask),
                     scalar(found_inf, 0.0), scalar(grad_scale, 1.0), scalar(lr, 0.0), beta1, beta2, eps,
                     weight_decay, amsgrad, maximize, decoupled, **limits)


# Sizes that cover: empty (first, middle and last), one element, sizes that
# are not a multiple of the vector width (scalar path), aligned ones (vector
# path), several chunks with a ragged last chunk.
SIZES = [0, 1, 3, 64, 0, 1000, 2 * CHUNK + 5, 4096, 0]


def make_params(dtype, sizes=SIZES, seed=0):
    return random_tensors(sizes, dtype, seed)


def zero_state(params):
    """Two zero state tensors per param (momentum buffers or exp_avg; exp_avg_sq) and a zero step count each."""
    return [[torch.zeros_like(p) for p in params] for _ in range(2)], [torch.zeros(()) for _ in params]


def make_grads(params, step, seed=1):
    return random_tensors([p.numel() for p in params], params[0].dtype, seed * 1000 + step)


def reference_params(params):
    """torch.optim's copies: the same dtype for float32/64; float64 for the half
    types (torch.optim's own half paths round differently, and its fused CPU SGD
    with momentum on half params is off by a whole update in torch 2.13)."""
    return [(p.double() if p.dtype in HALF else p.clone()).requires_grad_() for p in params]


def assert_close(actual, expected, dtype, msg=""):
    """Against torch.optim's for-loop implementation (in float64 for the half types)."""
    torch.testing.assert_close(actual.to(expected.dtype), expected.detach(), **tolerance(dtype), msg=msg)


# Steps 0..5; ALWAYS frozen from the start, SOMETIMES frozen on steps 2 and 3
# (it resumes its state on step 4), as the reference sees with grad=None.
STEPS = 6
ALWAYS = {2, 7}
SOMETIMES = {5, 6}


def frozen_at(step):
    return ALWAYS | (SOMETIMES if step in (2, 3) else set())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [c for c in config_params(KERNEL_SWEEP) if c.values[0].name == "SGD"])
def test_sgd_kernel_matches_torch(shim, dtype, cfg):
    kw = dict(cfg.kwargs)
    lr = kw.pop("lr")
    params = make_params(dtype)
    ref_params = reference_params(params)
    ref = cfg.reference(ref_params, foreach=False)
    frozen_start = [p.clone() for p in params]
    momentum = kw.get("momentum", 0.0)
    bufs = [torch.zeros_like(p) for p in params]
    mask = torch.zeros(len(params), dtype=torch.uint8)
    for step in range(STEPS):
        grads = make_grads(params, step)
        grads_before = [g.clone() for g in grads]
        mask.zero_()
        mask[list(frozen_at(step))] = 1
        run_sgd(shim, params, grads, bufs, mask, lr=lr, first_step=step == 0, **kw)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_before)), "a kernel wrote into a grad"
        for i, (rp, g) in enumerate(zip(ref_params, grads)):
            rp.grad = None if i in frozen_at(step) else g.to(rp.dtype)
        ref.step()
    for i, (p, rp) in enumerate(zip(params, ref_params)):
        assert_close(p, rp, dtype, msg=f"param {i}")
        if momentum and i not in ALWAYS and p.numel():
            assert_close(bufs[i], ref.state[rp]["momentum_buffer"], dtype)
    for i in ALWAYS:
        assert torch.equal(params[i], frozen_start[i])
        assert torch.equal(bufs[i], torch.zeros_like(bufs[i]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [c for c in config_params(KERNEL_SWEEP) if c.values[0].name != "SGD"])
def test_adam_kernel_matches_torch(shim, dtype, cfg):
    decoupled = cfg.name == "AdamW"
    kw = {"weight_decay": 0.01 if decoupled else 0.0, **cfg.kwargs}
    lr = kw.pop("lr")
    params = make_params(dtype)
    ref_params = reference_params(params)
    ref = cfg.reference(ref_params, foreach=False)
    half = dtype in HALF
    if half:
        # Adam's state in half precision has an error of its own, which torch's
        # fused CPU Adam (float math, like ours) shows too: we are held to it.
        fused_params = [p.clone().requires_grad_() for p in params]
        fused = cfg.reference(fused_params, fused=True)
    frozen_start = [p.clone() for p in params]
    amsgrad = kw.get("amsgrad", False)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    mask = torch.zeros(len(params), dtype=torch.bool)
    beta1, beta2 = kw.get("betas", (0.9, 0.999))
    for step in range(STEPS):
        grads = make_grads(params, step)
        mask.zero_()
        mask[list(frozen_at(step))] = True
        run_adam(shim, params, grads, m, v, vmax, steps, mask, lr=lr, beta1=beta1, beta2=beta2,
                 eps=kw.get("eps", 1e-8), weight_decay=kw.get("weight_decay", 0.0), amsgrad=amsgrad,
                 maximize=kw.get("maximize", False), decoupled=decoupled)
        for i, (rp, g) in enumerate(zip(ref_params, grads)):
            rp.grad = None if i in frozen_at(step) else g.to(rp.dtype)
        ref.step()
        if half:
            for i, (fp, g) in enumerate(zip(fused_params, grads)):
                fp.grad = None if i in frozen_at(step) else g.clone()
            fused.step()
    for i, (p, rp) in enumerate(zip(params, ref_params)):
        if i in ALWAYS:
            continue
        state = ref.state[rp]
        assert steps[i].item() == float(state["step"]), f"step of param {i}"
        if not half:
            assert_close(p, rp, dtype, msg=f"param {i}")
            assert_close(m[i], state["exp_avg"], dtype)
            assert_close(v[i], state["exp_avg_sq"], dtype)
            if amsgrad:
                assert_close(vmax[i], state["max_exp_avg_sq"], dtype)
            continue
        if not p.numel():
            continue
        ours = (p.double() - rp.detach()).abs().max().item()
        theirs = (fused_params[i].detach().double() - rp.detach()).abs().max().item()
        assert ours <= 1.25 * theirs + 1e-3, f"param {i}: error {ours} vs torch fused's {theirs}"
        tol = tolerance(dtype, "fused")
        fstate = fused.state[fused_params[i]]
        torch.testing.assert_close(p, fused_params[i].detach(), **tol)
        torch.testing.assert_close(m[i], fstate["exp_avg"], **tol)
        torch.testing.assert_close(v[i], fstate["exp_avg_sq"], **tol)
        if amsgrad:
            torch.testing.assert_close(vmax[i], fstate["max_exp_avg_sq"], **tol)
    for i in SOMETIMES:
        assert steps[i].item() == STEPS - 2  # frozen for two steps: its step did not advance then
    for i in ALWAYS:
        assert torch.equal(params[i], frozen_start[i])
        assert steps[i].item() == 0
        assert not m[i].any() and not v[i].any() and not vmax[i].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_match_frozenopts_cpu_ops(shim, dtype):
    """The shared update math gives the CUDA kernels and the CPU kernels the same result."""
    params = make_params(dtype, seed=3)
    cpu_params = [p.clone() for p in params]
    m, v, vmax = ([torch.zeros_like(p) for p in params] for _ in range(3))
    cm, cv, cvmax = ([torch.zeros_like(p) for p in params] for _ in range(3))
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    csteps = [torch.zeros((), dtype=torch.float32) for _ in params]
    mask = torch.zeros(len(params), dtype=torch.uint8)
    mask[[1, 5]] = 1
    for step in range(3):
        grads = make_grads(params, step, seed=4)
        run_adam(shim, params, grads, m, v, vmax, steps, mask, lr=0.01, weight_decay=0.1, amsgrad=True,
                 decoupled=True)
        ops.adam_(cpu_params, grads, cm, cv, cvmax, csteps, mask, lr=0.01, beta1=0.9, beta2=0.999,
                  weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=False, decoupled_weight_decay=True)
    # The same formulas in the same precision; only FMA contraction (the CPU
    # kernels are built with -mfma) may differ, by an ulp that a half type can
    # carry into the next steps.
    tol = tolerance(dtype, "kernels")
    for a, b in zip(params + m + v + vmax, cpu_params + cm + cv + cvmax):
        torch.testing.assert_close(a, b, **tol)
    assert [s.item() for s in steps] == [s.item() for s in csteps]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_kernel_matches_frozenopts_cpu_op(shim, dtype):
    params = make_params(dtype, seed=6)
    cpu_params = [p.clone() for p in params]
    bufs, cbufs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    mask = torch.zeros(len(params), dtype=torch.uint8)
    mask[[1, 5]] = 1
    kw = dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=True)
    for step in range(3):
        grads = make_grads(params, step, seed=7)
        run_sgd(shim, params, grads, bufs, mask, lr=0.05, first_step=step == 0, **kw)
        ops.sgd_(cpu_params, grads, cbufs, mask, lr=0.05, is_first_step=step == 0, **kw)
    tol = tolerance(dtype, "kernels")
    for a, b in zip(params + bufs, cpu_params + cbufs):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["sgd_momentum", "adam_amsgrad"])
@pytest.mark.parametrize("tail", [0, 3], ids=["whole", "ragged"])
def test_vector_and_elementwise_paths_agree_bitwise(shim, dtype, kind, tail):
    """Aligned rows take the packed-load path (and, with a ragged tail, the
    element-wise path for the last few elements); the same data one element
    off alignment takes the element-wise path throughout. Same math, same bits."""
    n = CHUNK + 1024 + tail
    base = make_params(dtype, [n + 1], seed=5)[0]
    grads = [make_grads([base], step)[0] for step in range(2)]

    def run(offset):
        storage = [torch.zeros(n + 1, dtype=dtype) for _ in range(5)]
        p, g, m, v, vmax = (s[offset:offset + n] for s in storage)
        p.copy_(base[:n])
        step = torch.zeros((), dtype=torch.float32)
        for i in range(2):
            g.copy_(grads[i][:n])
            if kind == "adam_amsgrad":
                run_adam(shim, [p], [g], [m], [v], [vmax], [step], None, lr=0.01, amsgrad=True, weight_decay=0.1)
            else:
                run_sgd(shim, [p], [g], [m], None, lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.1,
                        first_step=i == 0)
        return p, m, v, vmax

    aligned, misaligned = run(0), run(1)
    # A pack of 4 elements is one access aligned to its size, at most 16 bytes
    # (float64: two 16-byte halves, so 16-byte alignment, not 32).
    pack = min(4 * base.element_size(), 16)
    assert shim.pack_alignment(DTYPE_CODE[dtype]) == pack
    assert aligned[0].data_ptr() % pack == 0 and misaligned[0].data_ptr() % pack != 0
    for a, b in zip(aligned, misaligned):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["sgd_momentum", "adam"])
def test_both_kernel_argument_budgets_give_the_same_bits(shim, kind):
    """The 4 KB kernels (chosen at run time where the driver or the device
    cannot take 32 KB) take more launches for the same work, and give the same
    result; each launch count is the planner's for its budget."""
    sizes = [300] * 150 + [0] + [2 * CHUNK + 9] * 3
    plan = ops.require_extension().cuda_plan
    depth = 3 if kind == "sgd_momentum" else 5

    def run(small_budget):
        params = make_params(torch.float32, sizes, seed=11)
        states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        steps = [torch.zeros(()) for _ in params]
        mask = torch.zeros(len(sizes), dtype=torch.uint8)
        mask[::7] = 1
        grads = make_grads(params, 0)
        shim.reset_stats()
        if kind == "adam":
            launches = run_adam(shim, params, grads, states[0], states[1], [], steps, mask, lr=0.01,
                                small_budget=small_budget)
        else:
            launches = run_sgd(shim, params, grads, states[0], mask, lr=0.01, momentum=0.9, first_step=True,
                               small_budget=small_budget)
        assert shim.stats()["launches"] == launches
        return params + states[0] + states[1] + steps, launches

    large, launches_large = run(False)
    small, launches_small = run(True)
    for budget, launches in (("large", launches_large), ("small", launches_small)):
        expected = plan.count_launches(depth, sizes, budget)
        if kind == "adam":
            expected += plan.count_step_launches(len(sizes), budget)
        assert launches == expected, budget
    assert launches_small > launches_large
    for a, b in zip(large, small):
        assert torch.equal(a, b)


def test_found_inf_moves_nothing(shim):
    params = make_params(torch.float32)
    before = [p.clone() for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.full((), 3.0) for _ in params]
    grads = make_grads(params, 0)
    found_inf = torch.ones((), dtype=torch.float32)
    run_adam(shim, params, grads, m, v, [], steps, None, lr=0.1, found_inf=found_inf)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(s.item() == 3.0 for s in steps) and not any(t.any() for t in m + v)
    bufs = [torch.zeros_like(p) for p in params]
    run_sgd(shim, params, grads, bufs, None, lr=0.1, momentum=0.9, first_step=True, found_inf=found_inf)
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not any(b.any() for b in bufs)
    # found_inf == 0 read from "device" memory: the step happens.
    found_inf.zero_()
    run_adam(shim, params, grads, m, v, [], steps, None, lr=0.1, found_inf=found_inf)
    assert all(s.item() == 4.0 for s in steps)
    assert not torch.equal(params[3], before[3])


@pytest.mark.parametrize("lr_dtype", FLOATS, ids=str)
def test_lr_and_grad_scale_read_from_device_memory(shim, lr_dtype):
    params = make_params(torch.float64, [100, 7])
    expected = [p.clone() for p in params]
    grads = make_grads(params, 0)
    lr = torch.tensor(0.25, dtype=lr_dtype)
    grad_scale = torch.tensor(4.0)
    run_sgd(shim, params, [g * 4 for g in grads], [], None, lr=lr, grad_scale=grad_scale)
    for p, e, g in zip(params, expected, grads):
        torch.testing.assert_close(p, e - 0.25 * g)
    # The lr tensor is read when the kernel runs, not when the launch is built.
    lr.fill_(0.0)
    before = [p.clone() for p in params]
    run_sgd(shim, params, grads, [], None, lr=lr)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_mixed_dtypes_keep_tensor_ids(shim):
    """One op over params of several dtypes: one launch group per dtype, and the
    mask is still indexed by list position."""
    dtypes = [torch.float32, torch.float16, torch.float64, torch.float32, torch.bfloat16, torch.float16]
    params = [torch.randn(300, dtype=torch.float64).to(d) for d in dtypes]
    before = [p.clone() for p in params]
    grads = [torch.ones_like(p) for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    mask = torch.tensor([0, 1, 0, 1, 0, 0], dtype=torch.uint8)
    shim.reset_stats()
    launches = run_adam(shim, params, grads, m, v, [], steps, mask, lr=0.1)
    assert launches == shim.stats()["launches"] == 1 + 4  # the step launch, then one per dtype
    for i, (p, b) in enumerate(zip(params, before)):
        if mask[i]:
            assert torch.equal(p, b) and steps[i].item() == 0
        else:
            assert not torch.equal(p, b) and steps[i].item() == 1


def test_many_launches_give_the_same_bits_as_one(shim):
    """Tiny per-launch limits force carried-over slots, launches that end on a
    tensor boundary, and empty tensors at launch ends."""
    sizes = [0, 5, 3 * CHUNK + 17, 0, 8, CHUNK, 1, 0, 2 * CHUNK, 0]

    def run(**limits):
        params = make_params(torch.float32, sizes, seed=9)
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        steps = [torch.zeros(()) for _ in params]
        mask = torch.zeros(len(sizes), dtype=torch.uint8)
        mask[6] = 1
        total = 0
        for step in range(2):
            total += run_adam(shim, params, make_grads(params, step), m, v, [], steps, mask, lr=0.01, **limits)
        return params + m + v + steps, total

    one, launches_one = run()
    many, launches_many = run(max_tensors=2, max_blocks=3, max_steps=3)
    assert launches_one == 2 * 2  # (step launch + one Adam launch) per step
    plan = ops.require_extension().cuda_plan
    expected = len(plan.plan(5, sizes, max_tensors=2, max_blocks=3)) + 4  # 10 steps / 3 per launch
    assert launches_many == 2 * expected
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_block_count_and_barriers(shim):
    """Each chunk is one block of 512 threads; every block passes its one barrier."""
    params = make_params(torch.float32, [0, 10, CHUNK, CHUNK + 1, 0])
    grads = make_grads(params, 0)
    shim.reset_stats()
    run_sgd(shim, params, grads, [], None, lr=0.1)
    stats = shim.stats()
    assert stats["launches"] == 1 and stats["grids"] == [4]
    assert stats["blocks"] == 4 and stats["threads"] == 4 * 512 and stats["barriers"] == 4


def test_offsets_past_2_31_elements_are_64_bit(shim):
    """The last chunks of a tensor of 2^31 + 70,000 float32 elements: the
    metadata points 'before' a small buffer, so only the chunks at element
    offsets >= 2^31 have memory behind them, and only their blocks are run.
    A 32-bit offset would land far outside the buffer."""
    numel = 2**31 + 70_000
    first_chunk = (2**31) // CHUNK  # 32768: starts exactly at 2^31
    live = numel - first_chunk * CHUNK
    plan = ops.require_extension().cuda_plan.plan(2, [numel], budget="large")
    run_blocks = [(li, bi) for li, launch in enumerate(plan) for bi, (slot, chunk) in enumerate(launch["blocks"])
                  if chunk >= first_chunk]
    assert len(run_blocks) == 2
    p_live = torch.randn(live)
    g_live = torch.randn(live)
    expected = p_live - 0.5 * g_live
    elem = 4
    fake_p = p_live.data_ptr() - first_chunk * CHUNK * elem
    fake_g = g_live.data_ptr() - first_chunk * CHUNK * elem
    shim.set_block_filter(run_blocks)
    try:
        launches = shim.sgd([[fake_p, fake_g]], [numel], [0], 0, (0, 0, 0.0), (0, 0, 1.0), (0, 0, 0.5), 0.0, 0.0,
                            0.0, False, False, False)
    finally:
        shim.set_block_filter(None)
    assert launches == len(plan)
    torch.testing.assert_close(p_live, expected)


@pytest.mark.skipif(not FORK_OK, reason="needs fork")
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_frozen_tensors_are_not_loaded(shim, kind):
    """Frozen tensors point at memory that may not be read or written: the run
    survives only if their blocks return before any load or store. Runs in a
    forked child, so a fault fails this test, not the session."""
    poisoned = shim.poisoned_page()
    params = make_params(torch.float32, [100, 5000, 7, CHUNK + 3])
    grads = make_grads(params, 0)
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    mask = torch.tensor([0, 1, 0, 1], dtype=torch.uint8)
    numels = [p.numel() for p in params]
    if kind == "sgd":
        rows = [[p.data_ptr(), g.data_ptr(), b.data_ptr()] for p, g, b in zip(params, grads, states[0])]
    else:
        rows = [[p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), s.data_ptr()]
                for p, g, m, v, s in zip(params, grads, states[0], states[1], steps)]
    for i in (1, 3):
        rows[i] = [poisoned] * len(rows[i])  # every row, the step counter too
    # Everything is prepared before the fork: the child makes no torch calls
    # (another thread of the parent may hold a lock it would wait on forever).
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            if kind == "sgd":
                shim.sgd(rows, numels, [0] * 4, mask.data_ptr(), (0, 0, 0.0), (0, 0, 1.0), (0, 0, 0.1), 0.9, 0.0,
                         0.0, False, False, True)
            else:
                shim.adam(rows, numels, [0] * 4, mask.data_ptr(), (0, 0, 0.0), (0, 0, 1.0), (0, 0, 0.1), 0.9,
                          0.999, 1e-8, 0.0, False, False, False)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child died: status {status}"


# ----------------------------------------------------------------- real threads, ThreadSanitizer

TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"}


@pytest.fixture(scope="session")
def race_check():
    """tests/cuda_shim/race_check.cpp (the kernels with each block's threads as
    real threads and __syncthreads a real barrier) built with ThreadSanitizer,
    into build/cuda_shim/<hash>/ and reused while its sources are unchanged."""
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX", "g++")
    flags = ["-std=c++20", "-O1", "-g", "-fsanitize=thread", "-DFROZENOPT_SHIM_THREADS"]
    build = build_dir(RACE_SOURCES, cxx, *flags)
    exe = build / "race_check"
    if exe.exists():
        return exe
    probe = build / "probe.cpp"
    probe.write_text("#include <thread>\nint main() { std::thread t([] {}); t.join(); }\n")
    tried = subprocess.run([cxx, *flags, str(probe), "-o", str(build / "probe")], capture_output=True, text=True)
    if tried.returncode != 0:
        pytest.skip(f"{cxx} cannot build with -fsanitize=thread here: {tried.stderr.strip()[-300:]}")
    includes = [f"-I{p}" for p in [CSRC, SHIM_DIR, *include_paths()]]
    built = subprocess.run([cxx, *flags, *includes, str(SHIM_DIR / "race_check.cpp"), "-o", str(exe) + ".tmp"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    os.replace(str(exe) + ".tmp", exe)
    return exe


def test_kernels_are_race_free_with_real_threads(race_check):
    """Every dtype, SGD with and without momentum, Adam with and without
    amsgrad, a frozen tensor among unfrozen ones, aligned and misaligned rows,
    ragged tails, several launches per op: ThreadSanitizer reports nothing and
    every result equals a plain loop over the same math bit for bit."""
    run = subprocess.run([race_check], capture_output=True, text=True, timeout=1800, env={**os.environ, **TSAN_ENV})
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "32 cases, 0 failed" in run.stdout
    launches, blocks, barriers = (int(run.stdout.split(word)[0].split()[-1]) for word in
                                  (" launches", " blocks", " barriers"))
    assert launches > 64 and barriers > 0 and blocks > launches  # several launches per op


def test_thread_sanitizer_reports_a_missing_barrier(race_check):
    """The check can fail: with __syncthreads made a no-op, the block's threads
    read what thread 0 writes without ordering, and ThreadSanitizer says so."""
    run = subprocess.run([race_check, "--drop-barriers"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **TSAN_ENV})
    assert run.returncode == 66 and "WARNING: ThreadSanitizer: data race" in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_group_table_gives_each_tensor_its_groups_values(shim, kind):
    """A step plan's launch over several param groups: each tensor reads its group's
    entry of the table (its lr, by value or from device memory, and its
    hyper-parameters). Bitwise the same as one launch per group with the op's own
    arguments, also when tiny launch limits carry slots over between launches."""
    sizes = [5, 3 * CHUNK + 17, 0, 64, 1000, 1, 4096, 33]
    group_of = [0, 1, 2, 1, 0, 2, 2, 1]
    lrs = [0.1, torch.tensor(0.05), torch.tensor(0.2, dtype=torch.float64)]
    if kind == "sgd":
        hypers = [dict(momentum=0.9, weight_decay=0.01), dict(momentum=0.5, dampening=0.3, maximize=True),
                  dict(momentum=0.9, weight_decay=0.1, nesterov=True)]
    else:
        hypers = [dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True),
                  dict(beta1=0.8, beta2=0.99, eps=1e-3, maximize=True),
                  dict(beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.2)]
    merged, alone = make_params(torch.float32, sizes), make_params(torch.float32, sizes)
    (bufs_m, sqs_m), steps_m = zero_state(merged)
    (bufs_a, sqs_a), steps_a = zero_state(alone)
    for step in range(3):
        grads = make_grads(merged, step)
        for g in range(3):
            ids = [i for i, k in enumerate(group_of) if k == g]
            pick = lambda xs, ids=ids: [xs[i] for i in ids]  # noqa: E731
            if kind == "sgd":
                run_sgd(shim, pick(alone), pick(grads), pick(bufs_a), None, lr=lrs[g], first_step=False,
                        **hypers[g])
            else:
                run_adam(shim, pick(alone), pick(grads), pick(bufs_a), pick(sqs_a), [], pick(steps_a), None,
                         lr=lrs[g], **hypers[g])
        numels, dtypes = [p.numel() for p in merged], [DTYPE_CODE[p.dtype] for p in merged]
        limits = dict(max_tensors=3, max_blocks=2)
        if kind == "sgd":
            rows = [[p.data_ptr(), g.data_ptr(), b.data_ptr()] for p, g, b in zip(merged, grads, bufs_m)]
            table = [(scalar(lrs[g], 0.0), h["momentum"], h.get("dampening", 0.0), h.get("weight_decay", 0.0),
                      h.get("nesterov", False), h.get("maximize", False)) for g, h in enumerate(hypers)]
            shim.sgd_table(rows, numels, dtypes, 0, (0, 0, 0.0), (0, 0, 1.0), table, group_of, **limits)
        else:
            rows = [[p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), s.data_ptr()]
                    for p, g, m, v, s in zip(merged, grads, bufs_m, sqs_m, steps_m)]
            table = [(scalar(lrs[g], 0.0), h["beta1"], h["beta2"], h["eps"], h.get("weight_decay", 0.0), False,
                      h.get("maximize", False), h.get("decoupled", False)) for g, h in enumerate(hypers)]
            shim.adam_table(rows, numels, dtypes, 0, (0, 0, 0.0), (0, 0, 1.0), table, group_of, **limits)
        for i, (p, q) in enumerate(zip(merged, alone)):
            assert torch.equal(p, q), (step, i)
            assert torch.equal(bufs_m[i], bufs_a[i]) and torch.equal(sqs_m[i], sqs_a[i]), (step, i)
            assert torch.equal(steps_m[i], steps_a[i]), (step, i)
        assert all(torch.isfinite(p).all() for p in merged)  # the op's own lr (NaN) was never read


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_row_table_gives_each_tensor_its_groups_row(shim, kind):
    """A *_groups_ op's launch: each tensor reads its group's row of the float64 table
    (lr first, flags as 0 or 1). Bitwise the same as one launch per group with the op's
    own arguments, across tiny launch limits; a tensor whose group has no row is
    skipped (nothing of it written, its step not counted), and a row cannot turn on
    state the op was not given (its momentum is ignored in a launch without buffers)."""
    sizes = [5, 3 * CHUNK + 17, 0, 64, 1000, 1, 4096, 33, 7]
    group_of = [0, 1, 2, 1, 0, 2, 2, 1, 3]  # the last tensor names a row the table lacks
    lrs = [0.1, 0.05, 0.2]
    if kind == "sgd":
        hypers = [dict(momentum=0.9, weight_decay=0.01), dict(momentum=0.5, dampening=0.3, maximize=True),
                  dict(momentum=0.9, weight_decay=0.1, nesterov=True)]
        table = [[lrs[g], h["momentum"], h.get("dampening", 0.0), h.get("weight_decay", 0.0),
                  float(h.get("nesterov", False)), float(h.get("maximize", False))] for g, h in enumerate(hypers)]
    else:
        hypers = [dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True),
                  dict(beta1=0.8, beta2=0.99, eps=1e-3, maximize=True),
                  dict(beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.2)]
        table = [[lrs[g], h["beta1"], h["beta2"], h.get("weight_decay", 0.0), h["eps"], 0.0,
                  float(h.get("maximize", False)), float(h.get("decoupled", False))] for g, h in enumerate(hypers)]
    merged, alone = make_params(torch.float32, sizes), make_params(torch.float32, sizes)
    untouched = merged[-1].clone()
    (bufs_m, sqs_m), steps_m = zero_state(merged)
    (bufs_a, sqs_a), steps_a = zero_state(alone)
    for step in range(3):
        grads = make_grads(merged, step)
        for g in range(3):
            ids = [i for i, k in enumerate(group_of) if k == g]
            pick = lambda xs, ids=ids: [xs[i] for i in ids]  # noqa: E731
            if kind == "sgd":
                run_sgd(shim, pick(alone), pick(grads), pick(bufs_a), None, lr=lrs[g], first_step=step == 0,
                        **hypers[g])
            else:
                run_adam(shim, pick(alone), pick(grads), pick(bufs_a), pick(sqs_a), [], pick(steps_a), None,
                         lr=lrs[g], **hypers[g])
        numels, dtypes = [p.numel() for p in merged], [DTYPE_CODE[p.dtype] for p in merged]
        limits = dict(max_tensors=3, max_blocks=2)
        if kind == "sgd":
            rows = [[p.data_ptr(), g.data_ptr(), b.data_ptr()] for p, g, b in zip(merged, grads, bufs_m)]
            shim.sgd_rows(rows, numels, dtypes, 0, (0, 0, 0.0), (0, 0, 1.0), table, group_of, momentum=True,
                          first_step=step == 0, **limits)
        else:
            rows = [[p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), s.data_ptr()]
                    for p, g, m, v, s in zip(merged, grads, bufs_m, sqs_m, steps_m)]
            shim.adam_rows(rows, numels, dtypes, 0, (0, 0, 0.0), (0, 0, 1.0), table, group_of, amsgrad=False,
                           **limits)
        for i, (p, q) in enumerate(zip(merged[:-1], alone[:-1])):
            assert torch.equal(p, q), (step, i)
            assert torch.equal(bufs_m[i], bufs_a[i]) and torch.equal(sqs_m[i], sqs_a[i]), (step, i)
            assert torch.equal(steps_m[i], steps_a[i]), (step, i)
        assert torch.equal(merged[-1], untouched) and not bufs_m[-1].any() and steps_m[-1].item() == 0
    if kind == "sgd":  # the same rows in a launch without momentum buffers: plain SGD
        grads = make_grads(merged, 9)
        before = [p.clone() for p in merged]
        rows = [[p.data_ptr(), g.data_ptr()] for p, g in zip(merged, grads)]
        shim.sgd_rows(rows, numels, dtypes, 0, (0, 0, 0.0), (0, 0, 1.0), table, group_of, momentum=False,
                      first_step=False)
        for i in range(len(sizes) - 1):
            h = hypers[group_of[i]]
            g = -grads[i] if h.get("maximize") else grads[i]
            expected = before[i] - lrs[group_of[i]] * (g + h.get("weight_decay", 0.0) * before[i])
            torch.testing.assert_close(merged[i], expected, rtol=1e-6, atol=1e-7)
