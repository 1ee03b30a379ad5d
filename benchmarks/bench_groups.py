"""Step time against the number of param groups: frozenopt against torch.optim fused, on the CPU.

    python benchmarks/bench_groups.py                 # the full run (a few minutes on 2 cores)
    python benchmarks/bench_groups.py --quick         # small sizes, a smoke run (seconds)
    python benchmarks/bench_groups.py --groups 1,465 --optimizers adamw --repeats 9

The params: a transformer-like stack of 64 blocks of width 160 (attention q/k/v/o
and a 4x MLP, with biases and two LayerNorms per block: 16 tensors a block) plus
embeddings, about 1,030 tensors and 20M params. The same params are split into
1, 24, 100 and 465 param groups of consecutive tensors, with the values
discriminative fine-tuning gives them: layer-wise lr decay (lr x 0.9 per block
from the top) and weight decay on every other group only.

frozenopt steps every group of one device and state layout in one launch, each
tensor with its group's values; torch.optim fused steps group by group.
Target: frozenopt with 465 groups within 1.2x of frozenopt with one group.

How it measures is bench_step.py's (its helpers are used here): every contender
steps the same params with grads set once; each is warmed up, then each repeat
measures every contender once, interleaved step by step in an order rotated
from repeat to repeat; the figures are medians over the repeats, and ratios are
the medians of ratios measured within one repeat. The results are printed as a
table and written as JSON to benchmarks/results/bench_groups.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_step import (
    OPTIMIZERS,
    Contender,
    add_timing_args,
    check_timing_args,
    comma_list,
    load_text,
    optimizer_classes,
    run_repeat,
    warm_up,
    write_report,
)

from frozenopt.bench.machine import load_average, machine_info

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_groups.json"

GROUP_COUNTS = [1, 24, 100, 465]
BOUND = 1.2  # frozenopt's time at the most groups / at one group
LR, LR_DECAY, WEIGHT_DECAY, MOMENTUM = 1e-3, 0.9, 0.01, 0.9
# (blocks, width) of the stack, full and quick.
SIZES = {"full": (64, 160), "quick": (32, 16)}


def make_params(blocks: int, width: int, seed: int = 0) -> list[tuple[int, torch.nn.Parameter]]:
    """(block, param) pairs of the stack, in model order, each param with a fixed random grad."""
    gen = torch.Generator().manual_seed(seed)
    vocab = 8 * width
    shapes = [(0, (vocab, width)), (0, (width,)), (0, (width,))]  # embeddings and their LayerNorm
    for b in range(1, blocks + 1):
        shapes += [(b, s) for s in [(width, width), (width,)] * 4]  # q, k, v, o
        shapes += [(b, (width,)), (b, (width,))]  # LayerNorm
        shapes += [(b, (4 * width, width)), (b, (4 * width,)), (b, (width, 4 * width)), (b, (width,))]  # MLP
        shapes += [(b, (width,)), (b, (width,))]  # LayerNorm
    params = []
    for block, shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append((block, p))
    return params


def param_groups(params: list[tuple[int, torch.nn.Parameter]], count: int) -> list[dict]:
    """count groups of consecutive params: lr decays by LR_DECAY per block below the top
    (from each group's first param), weight decay on even-numbered groups only."""
    top = params[-1][0]
    groups = []
    for i in range(count):
        chunk = params[i * len(params) // count:(i + 1) * len(params) // count]
        groups.append({"params": [p for _, p in chunk], "lr": LR * LR_DECAY ** (top - chunk[0][0]),
                       "weight_decay": WEIGHT_DECAY if i % 2 == 0 else 0.0})
    return groups


def build_contenders(kind: str, params, counts: list[int]) -> list[Contender]:
    fo_cls, torch_cls = optimizer_classes(kind)
    extra = {} if kind == "adamw" else {"momentum": MOMENTUM}
    contenders = []
    for count in counts:
        contenders.append(Contender(f"frozenopt_{count}", f"frozenopt, {count} groups",
                                    lambda c=count: fo_cls(param_groups(params, c), **extra)))
    for count in counts:
        contenders.append(Contender(f"torch_fused_{count}", f"torch fused=True, {count} groups",
                                    lambda c=count: torch_cls(param_groups(params, c), fused=True, **extra)))
    return contenders


def run_optimizer(kind: str, params, args) -> dict:
    contenders = build_contenders(kind, params, args.groups)
    for c in contenders:
        warm_up(c, args.min_measure_s, args.max_inner)
    # The target's two sides step as often per measurement (see bench_step.run_case).
    pair = contenders[:len(args.groups)]
    for c in pair:
        c.inner = max(x.inner for x in pair)
    for r in range(args.repeats):
        gc.collect()
        run_repeat(contenders, r % len(contenders))
    ref = contenders[0]
    by_name = {c.name: c for c in contenders}
    per_repeat = {c.name: [t / r for t, r in zip(c.times, ref.times)] for c in contenders[1:]}
    most = f"frozenopt_{args.groups[-1]}"
    value = statistics.median(per_repeat[most]) if most in per_repeat else 1.0
    result = {
        "optimizer": "AdamW" if kind == "adamw" else f"SGD(momentum={MOMENTUM})",
        "reference": ref.name,
        "contenders": {
            c.name: {"label": c.label, "median_ms": statistics.median(c.times) * 1e3, "min_ms": min(c.times) * 1e3,
                     "steps_per_measurement": c.inner, "times_ms": [t * 1e3 for t in c.times]}
            for c in contenders
        },
        # time(contender) / time(frozenopt with the fewest groups), median of the per-repeat ratios
        "ratio_to_reference": {name: {"median": statistics.median(v), "per_repeat": v}
                               for name, v in per_repeat.items()},
        # time(torch fused) / time(frozenopt) at each group count, median of the per-repeat ratios
        "torch_over_frozenopt": {
            str(count): statistics.median(t / f for t, f in zip(by_name[f"torch_fused_{count}"].times,
                                                                   by_name[f"frozenopt_{count}"].times))
            for count in args.groups},
        "target": {"text": f"frozenopt {args.groups[-1]} groups <= {BOUND}x frozenopt {args.groups[0]} group(s)",
                   "bound": BOUND, "value": value, "met": value <= BOUND},
    }
    for c in contenders:
        c.opt = None
    gc.collect()
    return result


def format_table(results: list[dict], groups: list[int]) -> str:
    lines = []
    header = f"{'optimizer':<19}{'groups':>7}{'frozenopt ms':>14}{'vs 1 group':>12}{'torch fused ms':>16}" \
             f"{'torch / frozenopt':>19}"
    lines += [header, "-" * len(header)]
    for res in results:
        c, ratios = res["contenders"], res["ratio_to_reference"]
        for i, count in enumerate(groups):
            fo, tf = c[f"frozenopt_{count}"], c[f"torch_fused_{count}"]
            rel = "ref" if i == 0 else f"{ratios[f'frozenopt_{count}']['median']:.2f}x"
            speedup = res["torch_over_frozenopt"][str(count)]
            lines.append(f"{res['optimizer'] if i == 0 else '':<19}{count:>7}{fo['median_ms']:>14.2f}{rel:>12}"
                         f"{tf['median_ms']:>16.2f}{speedup:>18.1f}x")
        t = res["target"]
        lines.append(f"{'':<19}target: {t['text']}: {t['value']:.2f}x -> {'MET' if t['met'] else 'NOT MET'}")
        lines.append("")
    lines.append("vs 1 group: frozenopt's time / its time with the fewest groups; torch / frozenopt: torch fused's")
    lines.append("time / frozenopt's at the same group count. Medians over the repeats of ratios within one repeat.")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_args(ap, DEFAULT_OUT)
    ap.add_argument("--groups", default=",".join(map(str, GROUP_COUNTS)),
                    help=f"comma-separated group counts, ascending (default {','.join(map(str, GROUP_COUNTS))})")
    args = ap.parse_args(argv)
    try:
        args.groups = [int(g) for g in args.groups.split(",") if g.strip()]
    except ValueError:
        ap.error(f"--groups takes comma-separated integers, got {args.groups!r}")
    args.optimizers = comma_list(args.optimizers)
    if not args.groups or args.groups != sorted(set(args.groups)) or args.groups[0] < 1:
        ap.error("--groups must be distinct positive counts in ascending order")
    bad = [o for o in args.optimizers if o not in OPTIMIZERS]
    if bad or not args.optimizers:
        ap.error(f"unknown or empty --optimizers: {bad}")
    check_timing_args(ap, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_info()
    blocks, width = SIZES["quick" if args.quick else "full"]
    params = make_params(blocks, width)
    if len(params) < args.groups[-1]:
        print(f"bench_groups: {args.groups[-1]} groups need at least as many params; the stack has {len(params)}",
              file=sys.stderr)
        return 2
    results = []
    for kind in args.optimizers:
        print(f"{kind} ...", end=" ", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        results.append(run_optimizer(kind, params, args))
        results[-1]["wall_s"] = time.perf_counter() - t0
        print(f"{results[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    machine["load_average_end"] = load_average()
    report = {
        "tool": "benchmarks/bench_groups.py",
        "quick": args.quick,
        "repeats": args.repeats,
        "groups": args.groups,
        "tensors": len(params),
        "elements": sum(p.numel() for _, p in params),
        "machine": machine,
        "wall_s": time.perf_counter() - started,
        "results": results,
        "all_targets_met": all(r["target"]["met"] for r in results),
    }
    write_report(report, args.out, argv)
    m = report["machine"]
    print(f"{report['tensors']:,} tensors, {report['elements'] / 1e6:.1f}M params; {m['cpu']} "
          f"({m['cpu_count']} logical CPUs, load average {load_text(m['load_average'])} at start, "
          f"{load_text(m['load_average_end'])} at end), "
          f"{m['torch_threads']} torch threads, torch {m['torch']}; {args.repeats} repeats"
          f"{' (QUICK: sizes too small for the target to mean anything)' if args.quick else ''}")
    print(format_table(results, args.groups))
    print(f"all targets met: {report['all_targets_met']}; JSON: {args.out}; {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
