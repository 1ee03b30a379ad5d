"""The GPU probe of scripts/gpu_check.sh: checks what needs a GPU and measures
the step against torch's fused optimizers, writing one JSON file.

    python scripts/gpu_probe.py --out probe.json   all checks, then the measurements
    python scripts/gpu_probe.py --tiny             a small run of the kernels for compute-sanitizer
    python scripts/gpu_probe.py --list             what it would check and measure (no GPU needed)

Each check and measurement is recorded as it finishes (the JSON is rewritten
each time, so a run cut short by a timeout still leaves what it did): its
status (pass, fail, error, skipped), what it found, and its seconds. A failing
check is recorded and the probe goes on. The kernel-level checks are the
check_* functions of tests/test_cuda_gpu.py; the optimizer-level ones are
here. Timings are medians of CUDA-event timings of single steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
from cuda_timing import captured, step_seconds  # noqa: E402  (benchmarks/)


class Skip(Exception):
    """A check that cannot run here (the reason is recorded)."""


class Recorder:
    def __init__(self, path):
        self.path = Path(path) if path else None
        self.data = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": {}, "checks": [],
                     "measurements": []}

    def flush(self):
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    def run(self, section, name, fn):
        import torch

        start = time.perf_counter()
        entry = {"name": name}
        try:
            found = fn()
            entry.update(status="pass", found=found)
        except Skip as why:
            entry.update(status="skipped", found=str(why))
        except AssertionError as failure:
            entry.update(status="fail", found=str(failure)[:2000] or traceback.format_exc(limit=3)[-2000:])
        except Exception as error:  # recorded, and the probe goes on
            entry.update(status="error", found=f"{type(error).__name__}: {str(error)[:1500]}",
                         where=traceback.format_exc(limit=4)[-1500:])
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.data[section].append(entry)
        self.flush()
        print(f"gpu_probe: {section[:-1]} {name}: {entry['status']} ({entry['seconds']} s)", flush=True)
        if entry["status"] != "pass":
            print(f"    {str(entry['found'])[:400]}", flush=True)
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return entry


# ----------------------------------------------------------------- helpers

def cuda():
    import torch

    return torch.device("cuda", torch.cuda.current_device())


def params_of(sizes, dtype=None, grads=True):
    import torch

    out = [torch.nn.Parameter(torch.randn(n, device=cuda(), dtype=dtype)) for n in sizes]
    if grads:
        for p in out:
            p.grad = torch.randn_like(p)
    return out


def capture_or_refusal(step, topic):
    """Capture ``step`` in a CUDA graph: (graph, the warnings that mention ``topic``), or
    (None, what the refusal said) when the capture raised an error that names ``topic``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            graph = captured(step)
        except Exception as error:
            assert topic in str(error), f"the capture failed for another reason: {error}"
            return None, f"capture refused: {type(error).__name__}: {str(error)[:300]}"
    return graph, [str(w.message)[:300] for w in caught if topic in str(w.message)]


def launches_of(fn):
    import test_cuda_gpu

    return len(test_cuda_gpu.frozenopt_kernels(fn))


def expected_launches(depth, sizes):
    from frozenopt import ops

    plan = ops.require_extension().cuda_plan
    budget = plan.device_budget(cuda().index)
    count = plan.count_launches(depth, sizes, budget)
    if depth >= 5:
        count += plan.count_step_launches(len(sizes), budget)
    return count


# ----------------------------------------------------------------- kernel-level checks (tests/test_cuda_gpu.py)

def kernel_checks():
    import test_cuda_gpu as t

    def every_dtype(check, kind):
        def run():
            for dtype in t.DTYPES:
                check(kind, dtype)
            return "every dtype"
        return run

    kinds = sorted(t.OP_KINDS)
    return ([("kernel_argument_budget", t.check_kernel_argument_budget)]
            + [(f"device_mask_{k}", every_dtype(t.check_device_mask, k)) for k in kinds]
            + [(f"several_launches_{k}", lambda k=k: f"{t.check_several_launches(k)} launches") for k in kinds]
            + [(f"side_stream_{k}", lambda k=k: t.check_side_stream(k)) for k in kinds]
            + [(f"vector_vs_elementwise_bitwise_{k}", every_dtype(t.check_vector_and_elementwise_paths, k))
               for k in ("sgd_momentum", "adamw_amsgrad")]
            + [("over_2_31_elements", t.check_over_2_31_elements)])


# ----------------------------------------------------------------- optimizer-level checks

def check_captured_float_lr():
    """A float lr is baked into a captured graph: a later lr change (a
    scheduler) must be honoured on replay, or the capture refused or warned about."""
    import torch

    import frozenopt

    p = torch.nn.Parameter(torch.zeros(1000, device=cuda()))
    p.grad = torch.ones_like(p)
    opt = frozenopt.SGD([p], lr=0.1)
    opt.prepare_capture()
    graph, said = capture_or_refusal(opt.step, "lr")
    if graph is None:
        return said
    opt.param_groups[0]["lr"] = 0.0
    before = p.detach().clone()
    graph.replay()
    torch.cuda.synchronize()
    if torch.equal(p.detach(), before):
        return "replay honours the new lr"
    assert said, "a float lr was baked into the captured graph silently: after lr = 0 the replay still moved p"
    return f"baked in, with a warning: {said[0]}"


def check_capture_without_mask_only():
    """mask_only=False leaves params frozen at capture time out of the graph
    for good: refused, warned about, or honoured after unfreeze."""
    import torch

    import frozenopt

    named = [(f"p{i}", p) for i, p in enumerate(params_of([1000, 1000]))]
    opt = frozenopt.AdamW(named, lr=0.1, mask_only=False)
    opt.freeze("p1")
    named[1][1].grad = None  # as after zero_grad(): autograd gives a frozen param no grad
    opt.prepare_capture()
    graph, said = capture_or_refusal(opt.step, "mask_only")
    if graph is None:
        return said
    opt.unfreeze("p1")
    p1 = named[1][1]
    if p1.grad is None:
        p1.grad = torch.ones_like(p1)
    before = p1.detach().clone()
    graph.replay()
    torch.cuda.synchronize()
    if not torch.equal(p1.detach(), before):
        return "a param unfrozen after the capture moves on replay"
    assert said, "capture with mask_only=False left a frozen param out of the graph silently"
    return f"warned: {said[0]}"


def check_zero_grad_after_capture():
    """zero_grad() (set_to_none) frees the grads a captured graph reads: refused or warned about."""
    import frozenopt

    named = [(f"p{i}", p) for i, p in enumerate(params_of([1000, 3000]))]
    opt = frozenopt.AdamW(named, lr=0.1, mask_only=True)
    opt.prepare_capture()
    captured(opt.step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt.zero_grad()
        except Exception as error:
            assert "captur" in str(error) or "graph" in str(error), f"zero_grad failed for another reason: {error}"
            return f"refused: {type(error).__name__}: {str(error)[:300]}"
    said = [str(w.message)[:300] for w in caught if "captur" in str(w.message) or "graph" in str(w.message)]
    assert said, "zero_grad() after a capture freed the graph's grads silently"
    return f"warned: {said[0]}"


def check_tensor_betas():
    """Adam with CUDA-tensor betas: steps like float betas, or refuses with a clear error."""
    import torch

    import frozenopt

    start = params_of([5000], grads=False)[0].detach()
    grad = torch.randn_like(start)
    results = []
    for betas in ((0.9, 0.999), (torch.tensor(0.9, device=cuda()), torch.tensor(0.999, device=cuda()))):
        p = torch.nn.Parameter(start.clone())
        p.grad = grad.clone()
        try:
            opt = frozenopt.Adam([p], lr=0.01, betas=betas)
            opt.step()
            opt.step()
        except (ValueError, TypeError) as error:
            assert "beta" in str(error).lower(), f"unclear error: {error}"
            return f"refused: {error}"
        results.append(p.detach())
    torch.testing.assert_close(results[1], results[0])
    return "tensor betas step like float betas"


def check_sgd_first_step_does_not_synchronise():
    import torch

    import frozenopt

    p = params_of([1000])[0]
    opt = frozenopt.SGD([p], lr=0.1, momentum=0.9)
    opt.grad_scale = torch.tensor(1.0, device=cuda())
    opt.found_inf = torch.tensor(0.0, device=cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    except RuntimeError as error:
        raise AssertionError(f"the first SGD step under AMP synchronised: {str(error)[:300]}") from None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "no synchronisation"


def check_amp_tensors_on_another_device():
    """found_inf/grad_scale and a tensor lr on another GPU than the params."""
    import torch

    import frozenopt

    if torch.cuda.device_count() < 2:
        raise Skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    p = torch.nn.Parameter(torch.randn(1000, device="cuda:1"))
    p.grad = torch.randn_like(p)
    opt = frozenopt.AdamW([p], lr=torch.tensor(0.01, device="cuda:0"))
    opt.grad_scale = torch.tensor(1.0, device="cuda:0")
    opt.found_inf = torch.tensor(0.0, device="cuda:0")
    before = p.detach().clone()
    opt.step()
    torch.cuda.synchronize()
    assert not torch.equal(p.detach(), before)
    return "stepped"


def check_freeze_is_ordered_after_a_queued_replay():
    """A replay queued on a side stream (behind a sleep), then freeze() on the
    default stream: the replay should step the param (it was queued first),
    and in any case step all of it and advance its step counter, or none."""
    import torch

    import frozenopt

    named = [(f"p{i}", p) for i, p in enumerate(params_of([4 * 65536 + 3, 1000]))]
    opt = frozenopt.AdamW(named, lr=0.1, mask_only=True)
    opt.prepare_capture()
    graph = captured(opt.step)
    torch.cuda.synchronize()
    p0 = named[0][1]
    before, step_before = p0.detach().clone(), opt.state[p0]["step"].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        graph.replay()
    opt.freeze("p0")
    torch.cuda.synchronize()
    moved = (p0.detach() != before).float().mean().item()
    advanced = bool(opt.state[p0]["step"] != step_before)
    assert (moved == 1.0 and advanced) or (moved == 0.0 and not advanced), (
        f"partly stepped: {moved:.1%} of p0 moved, step advanced: {advanced}")
    assert moved == 1.0, "freeze() on the default stream overtook a replay queued before it on a side stream"
    return "the queued replay stepped all of p0"


def check_compile():
    """torch.compile(opt.step) on CUDA params, against eager steps (the step has one graph
    break, before its ops, so fullgraph=True does not apply)."""
    import torch

    import frozenopt

    start = params_of([1000, 70000, 33], grads=False)
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    runs = []
    for compiled in (False, True):
        named = [(f"p{i}", torch.nn.Parameter(p.detach().clone())) for i, p in enumerate(start)]
        opt = frozenopt.AdamW(named, lr=0.01, weight_decay=0.1, mask_only=True)
        opt.freeze("p1")
        step = torch.compile(opt.step) if compiled else opt.step
        for g in grads:
            for (_, p), gi in zip(named, g):
                p.grad = gi.clone()
            step()
        runs.append([p.detach() for _, p in named])
    for eager, comp in zip(*runs):
        torch.testing.assert_close(comp, eager)
    assert torch.equal(runs[1][1], start[1].detach()), "the frozen param moved under torch.compile"
    return "compiled step matches eager"


OPTIMIZER_CHECKS = [
    ("captured_float_lr", check_captured_float_lr),
    ("capture_without_mask_only", check_capture_without_mask_only),
    ("zero_grad_after_capture", check_zero_grad_after_capture),
    ("cuda_tensor_betas", check_tensor_betas),
    ("sgd_first_amp_step_no_sync", check_sgd_first_step_does_not_synchronise),
    ("amp_tensors_on_another_gpu", check_amp_tensors_on_another_device),
    ("freeze_ordered_after_queued_replay", check_freeze_is_ordered_after_a_queued_replay),
]
LAST_CHECKS = [("compile", check_compile)]


# ----------------------------------------------------------------- measurements

def adamw(lib, params, **kw):
    import torch

    import frozenopt

    if lib == "frozenopt":
        return frozenopt.AdamW(params, lr=1e-3, weight_decay=0.01, **kw)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True, **kw)


def copy_seconds(n):
    """A device copy_ of n float32 elements: the bandwidth a step is held to."""
    import torch

    src = torch.randn(n, device=cuda())
    dst = torch.empty_like(src)
    return step_seconds(lambda: dst.copy_(src), steps=10, warmup=3)


def measure_adamw_1b():
    """AdamW, float32, ~1B params in 15 tensors of 2^26: frozenopt, torch fused
    and a device copy_ of the params (the bandwidth 28 B/element is held to)."""
    import torch

    sizes = [2**26] * 15
    n = sum(sizes)
    found = {"params": n}
    for lib in ("frozenopt", "torch_fused"):
        params = params_of(sizes)
        opt = adamw(lib, params)
        found[f"{lib}_s"] = step_seconds(opt.step, steps=10, warmup=3)
        if lib == "frozenopt":
            found["frozenopt_launches"] = launches_of(opt.step)
            found["planned_launches"] = expected_launches(5, sizes)
        del opt, params
        torch.cuda.empty_cache()
    found["copy_s"] = copy_seconds(n)
    copy_gbps = 8 * n / found["copy_s"] / 1e9
    ours_gbps = 28 * n / found["frozenopt_s"] / 1e9
    found.update(copy_GBps=round(copy_gbps, 1), frozenopt_GBps=round(ours_gbps, 1),
                 torch_fused_GBps=round(28 * n / found["torch_fused_s"] / 1e9, 1),
                 fraction_of_copy_bandwidth=round(ours_gbps / copy_gbps, 3),
                 speedup_vs_torch_fused=round(found["torch_fused_s"] / found["frozenopt_s"], 3))
    return found


def measure_many_small(frozen_fraction):
    """AdamW over 20,000 float32 tensors of 256, eager and captured. With a
    frozen fraction: frozenopt freezes it (eager: left out on the host;
    captured: mask_only, the graph covers all and the mask skips), torch fused
    holds only the rest."""
    import torch

    sizes = [256] * 20_000
    live = [n for i, n in enumerate(sizes) if frozen_fraction == 0 or i % 10 == 0]
    found = {"tensors": len(sizes), "unfrozen_tensors": len(live)}
    for mode in ("eager", "captured"):
        params = params_of(sizes)
        opt = adamw("frozenopt", params, mask_only=mode == "captured")
        if frozen_fraction:
            opt.freeze(*[p for i, p in enumerate(params) if i % 10])
        if mode == "eager":
            found["frozenopt_eager_s"] = step_seconds(opt.step)
            found["frozenopt_eager_launches"] = launches_of(opt.step)
            found["planned_eager_launches"] = expected_launches(5, live)
        else:
            opt.prepare_capture()
            graph = captured(opt.step)
            found["frozenopt_captured_s"] = step_seconds(graph.replay)
            found["frozenopt_captured_launches"] = launches_of(graph.replay)
            found["planned_captured_launches"] = expected_launches(5, sizes)
        del opt, params
        ref_params = params_of(live)
        ref = adamw("torch", ref_params, capturable=mode == "captured")
        if mode == "eager":
            found["torch_fused_eager_s"] = step_seconds(ref.step)
        else:
            graph = captured(ref.step)
            found["torch_fused_captured_s"] = step_seconds(graph.replay)
        del ref, ref_params
        torch.cuda.empty_cache()
    for mode in ("eager", "captured"):
        ratio = found[f"frozenopt_{mode}_s"] / found[f"torch_fused_{mode}_s"]
        found[f"{mode}_frozenopt_over_torch_fused"] = round(ratio, 3)
    return found


MEASUREMENTS = [
    ("adamw_fp32_1b_params", measure_adamw_1b),
    ("adamw_20000x256", lambda: measure_many_small(0.0)),
    ("adamw_20000x256_90pct_frozen", lambda: measure_many_small(0.9)),
]


# ----------------------------------------------------------------- main

def environment():
    import torch

    from frozenopt import ops

    plan = ops.require_extension().cuda_plan
    props = torch.cuda.get_device_properties(cuda())
    import test_cuda_gpu

    return {"device": props.name, "sm_count": props.multi_processor_count, "compute": f"{props.major}.{props.minor}",
            "memory_GiB": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "driver_version": test_cuda_gpu.driver_version(),
            "kernel_argument_budget": plan.device_budget(cuda().index),
            "large_args_built": plan.large_args_built}


def tiny():
    """frozenopt's kernels on small cases, every op and dtype, frozen entries,
    aligned and misaligned rows: what compute-sanitizer watches."""
    import test_cuda_gpu as t

    for kind in sorted(t.OP_KINDS):
        for dtype in t.DTYPES:
            t.check_device_mask(kind, dtype, sizes=[0, 1, 3, 64, 1000, 4099, 0, 33], frozen=[2, 5], steps=2)
    for kind in ("sgd_momentum", "adamw_amsgrad"):
        t.check_vector_and_elementwise_paths(kind, t.DTYPES[0])
    print("gpu_probe: tiny run done")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="the JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="a small run for compute-sanitizer")
    parser.add_argument("--list", action="store_true", help="list the checks and measurements, run nothing")
    args = parser.parse_args(argv)
    import torch

    sections = [("checks", kernel_checks()), ("checks", OPTIMIZER_CHECKS), ("measurements", MEASUREMENTS),
                ("checks", LAST_CHECKS)]
    if args.list:
        for section, items in sections:
            for name, _ in items:
                print(f"{section[:-1]}: {name}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_probe: no CUDA device here; nothing checked or measured")
        return 0
    if args.tiny:
        return tiny()
    record = Recorder(args.out)
    try:
        record.data["environment"] = environment()
    except Exception as error:
        record.data["environment"] = {"error": f"{type(error).__name__}: {error}"}
    record.flush()
    for section, items in sections:
        for name, fn in items:
            record.run(section, name, fn)
    record.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    record.flush()
    statuses = [e["status"] for e in record.data["checks"] + record.data["measurements"]]
    print(f"gpu_probe: {statuses.count('pass')} passed, {statuses.count('fail')} failed, "
          f"{statuses.count('error')} errors, {statuses.count('skipped')} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
