"""The traced (compiled) step over many param groups: recompiles and step time, on the CPU.

    python benchmarks/bench_traced_groups.py             # 24 groups, AdamW, mask_only
    python benchmarks/bench_traced_groups.py --groups 100 --repeats 9

Two ways to trace a step of the same optimizer, side by side in one run:
- "per group": one op call per param group with the group's values as float
  arguments (``frozenopt.ops.adam_``), the traced path before group tables;
- "grouped": ``opt.step`` itself, one ``adam_groups_`` call per device and state
  layout, each param reading its group's row of a table on the device.

Recompiles: after two warm-up steps, every step edits one group's weight decay
and betas (a new value each time, as a per-group schedule would); the figure is
the frames dynamo compiled during those steps (torch._dynamo's
CompileCounterWithBackend, backend aot_eager). dynamo stops compiling a frame
after ``recompile_limit`` versions and runs it uncompiled: such runs are said.

Step time: steady steps (no edits) of both compiled steps and of the eager
step, interleaved within each repeat in an order rotated from repeat to repeat;
medians over the repeats, and the ratio grouped / per group as the median of
the ratios within each repeat. The machine's load average is printed with them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import frozenopt
from frozenopt import ops
from frozenopt.bench.machine import load_average


def make_groups(groups: int, tensors: int, numel: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(numel, generator=gen)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(numel, generator=gen)
    per = tensors // groups
    return [dict(params=params[g * per:(g + 1) * per], lr=1e-3 * 0.9 ** g, weight_decay=0.01 * (g % 2))
            for g in range(groups)]


def per_group_step(opt: frozenopt.AdamW) -> None:
    """One op call per group, its values as float arguments (what dynamo guards on)."""
    for gi, group in enumerate(opt.param_groups):
        params = group["params"]
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = opt._state_lists(params, group)
        ops.adam_(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, opt._masks[gi],
                  lr=group["lr"], **opt._kwargs(group))


def contenders(args) -> dict:
    """name -> (optimizer, step function, compile counter or None), each over its own params."""
    out = {}
    for name in ("per group", "grouped", "eager"):
        opt = frozenopt.AdamW(make_groups(args.groups, args.tensors, args.numel), mask_only=True)
        opt.step()  # the state, made eagerly
        counter = None if name == "eager" else CompileCounterWithBackend("aot_eager")
        if name == "per group":
            fn = torch.compile(lambda opt=opt: per_group_step(opt), backend=counter)
        elif name == "grouped":
            fn = torch.compile(opt.step, backend=counter)
        else:
            fn = opt.step
        out[name] = (opt, fn, counter)
    return out


def count_recompiles(args) -> dict:
    torch._dynamo.reset()
    results = {}
    for name, (opt, fn, counter) in contenders(args).items():
        if counter is None:
            continue
        for _ in range(2):
            fn()
        warm = counter.frame_count
        for step in range(args.edit_steps):
            group = opt.param_groups[step % len(opt.param_groups)]
            group["weight_decay"] = 0.001 * (step + 1)
            group["betas"] = (0.9 - 0.001 * step, 0.999 - 0.0001 * step)
            fn()
        results[name] = counter.frame_count - warm
    limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
    return {"recompiles": results, "recompile_limit": limit}


def time_steps(args) -> dict:
    torch._dynamo.reset()
    runs = contenders(args)
    for _, fn, _ in runs.values():
        for _ in range(3):
            fn()
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios = []
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        measured = {}
        for name in order:
            fn = runs[name][1]
            start = time.perf_counter()
            for _ in range(args.inner):
                fn()
            measured[name] = (time.perf_counter() - start) / args.inner
        for name in names:
            times[name].append(measured[name])
        ratios.append(measured["grouped"] / measured["per group"])
    return {"ms": {n: 1e3 * statistics.median(v) for n, v in times.items()},
            "grouped / per group": statistics.median(ratios)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=24)
    ap.add_argument("--tensors", type=int, default=96, help="params in all (split evenly into the groups)")
    ap.add_argument("--numel", type=int, default=4096, help="elements per param")
    ap.add_argument("--edit-steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=20, help="steps per measurement")
    args = ap.parse_args(argv)
    if args.groups < 1 or args.tensors < args.groups or min(args.numel, args.edit_steps, args.repeats, args.inner) < 1:
        ap.error("--groups, --numel, --edit-steps, --repeats and --inner must be >= 1, and --tensors >= --groups")
    print(f"load average before: {load_average()}")
    print(f"AdamW, {args.groups} groups, {args.tensors} params of {args.numel} float32 elements, mask_only, CPU")
    rec = count_recompiles(args)
    print(f"frames compiled during {args.edit_steps} steps that each edit one group's weight_decay and betas "
          f"(dynamo recompile limit {rec['recompile_limit']}):")
    for name, frames in rec["recompiles"].items():
        print(f"  {name:>9}: {frames}")
    timing = time_steps(args)
    print(f"steady step time, median of {args.repeats} repeats of {args.inner} steps:")
    for name, ms in timing["ms"].items():
        print(f"  {name:>9}: {ms:.3f} ms")
    print(f"  grouped / per group: {timing['grouped / per group']:.3f}")
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
