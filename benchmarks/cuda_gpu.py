"""GPU section of the benchmarks: frozenopt's CUDA step against torch.optim's
fused=True CUDA step, side by side in one run (median of CUDA-event timings),
with the achieved bandwidth from the bytes-moved model (cuda_bytes.py).
Runs only where CUDA is available; elsewhere it says so and exits 0.

    python benchmarks/cuda_gpu.py [--steps 50] [--dtype float32]

Cases: ~50M params in 80 tensors; 20,000 tensors of 256 elements; the latter
with 90% of the tensors frozen (frozenopt with freeze() against torch.optim
holding only the unfrozen 10%); and a captured CUDA graph of the step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_bytes import ELEMENT_SIZES, OPTIMIZERS  # noqa: E402
from cuda_timing import captured, step_seconds  # noqa: E402

CASES = {
    "large-tensors": [625_000] * 80,
    "many-small": [256] * 20_000,
}


def make_params(sizes, dtype):
    params = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def build(kind, lib, params, named=False):
    import frozenopt

    src = [(f"p{i}", p) for i, p in enumerate(params)] if named else params
    if kind.startswith("sgd"):
        kw = dict(lr=1e-3, momentum=0.9 if kind == "sgd_momentum" else 0.0)
        return frozenopt.SGD(src, **kw) if lib == "frozenopt" else torch.optim.SGD(src, fused=True, **kw)
    cls = {"adam": "Adam", "adamw": "AdamW"}[kind]
    return getattr(frozenopt, cls)(src, lr=1e-3) if lib == "frozenopt" else getattr(torch.optim, cls)(
        src, lr=1e-3, fused=True)


def run(args):
    dtype = getattr(torch, args.dtype)
    esize = ELEMENT_SIZES[args.dtype]
    rows = []
    for kind in ("sgd_momentum", "adamw"):
        _, reads, writes, _, _ = OPTIMIZERS[kind]
        for case, sizes in CASES.items():
            ours = build(kind, "frozenopt", make_params(sizes, dtype))
            theirs = build(kind, "torch", make_params(sizes, dtype))
            t_ours, t_theirs = step_seconds(ours.step, args.steps), step_seconds(theirs.step, args.steps)
            moved = (reads + writes) * esize * sum(sizes)
            rows.append(dict(optimizer=kind, case=case, frozenopt_s=t_ours, torch_fused_s=t_theirs,
                             speedup=t_theirs / t_ours, frozenopt_GBps=moved / t_ours / 1e9))
        # 90% frozen: frozenopt freezes by name; the reference holds only the 10%.
        sizes = CASES["many-small"]
        params = make_params(sizes, dtype)
        ours = build(kind, "frozenopt", params, named=True)
        ours.freeze(*[f"p{i}" for i in range(len(sizes)) if i % 10])
        for p in params:
            if p.grad is None and p.requires_grad:
                p.grad = torch.randn_like(p)
        only = build(kind, "torch", make_params(sizes[: len(sizes) // 10], dtype))
        t_ours, t_only = step_seconds(ours.step, args.steps), step_seconds(only.step, args.steps)
        rows.append(dict(optimizer=kind, case="many-small, 90% frozen", frozenopt_s=t_ours, torch_fused_s=t_only,
                         speedup=t_only / t_ours, frozenopt_GBps=None))
        # The step captured in a CUDA graph, with a mask_only optimizer.
        opt = build(kind, "frozenopt", make_params(CASES["large-tensors"], dtype))
        opt.prepare_capture()
        graph = captured(opt.step)
        t_graph = step_seconds(graph.replay, args.steps)
        moved = (reads + writes) * esize * sum(CASES["large-tensors"])
        rows.append(dict(optimizer=kind, case="large-tensors, CUDA graph", frozenopt_s=t_graph, torch_fused_s=None,
                         speedup=None, frozenopt_GBps=moved / t_graph / 1e9))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dtype", default="float32", choices=sorted(ELEMENT_SIZES))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_gpu: no CUDA device here; nothing measured (cuda_bytes.py models the kernels without one)")
        return 0
    from frozenopt import ops

    if not ops.require_extension().cuda_plan.built_with_cuda:
        print("cuda_gpu: frozenopt was built without its CUDA kernels (see docs/cuda.md)")
        return 1
    rows = run(args)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, median of {args.steps} steps")
    print(f"{'optimizer':<13} {'case':<28} {'frozenopt ms':>12} {'torch fused ms':>15} {'speedup':>8} {'GB/s':>7}")
    for r in rows:
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        print(f"{r['optimizer']:<13} {r['case']:<28} {fmt(r['frozenopt_s'] and r['frozenopt_s'] * 1e3, '12.3f'):>12} "
              f"{fmt(r['torch_fused_s'] and r['torch_fused_s'] * 1e3, '15.3f'):>15} {fmt(r['speedup'], '8.2f'):>8} "
              f"{fmt(r['frozenopt_GBps'], '7.1f'):>7}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cuda_gpu_{args.dtype}.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
