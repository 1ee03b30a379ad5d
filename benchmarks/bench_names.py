"""Cost of the freezing API by name on a 20,000-param optimizer: the cached name index (and, for
is_frozen(p), the cached positions of the params) against rebuilding them at every call (what
each call did before they were cached).

    python benchmarks/bench_names.py                # 20,000 params, 9 repeats
    python benchmarks/bench_names.py --params 2000 --repeats 3

Calls measured: is_frozen(p) (the target is 0.1 ms), is_frozen("blocks.1999"), frozen, and a
freeze + unfreeze pair of one block of 10 params. Each repeat times every call both ways,
interleaved, with enough calls per measurement to last about --min-measure-ms; the figures
are medians over the repeats, per call, and the paired ratio rebuilt / cached. Written as
JSON to benchmarks/results/bench_names.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import frozenopt

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_names.json"
TARGET_MS = 0.1  # is_frozen(p), cached


def build(count: int) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    per_block = 10
    named = [(f"blocks.{b}.sub.p{k}", torch.nn.Parameter(torch.zeros(1)))
             for b in range(count // per_block) for k in range(per_block)]
    return frozenopt.AdamW(named), [p for _, p in named]


def per_call_ms(call, cached: bool, opt, min_measure_s: float) -> float:
    """Seconds per call: enough calls to last min_measure_s, the index dropped before each if not cached."""
    n, spent = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(n):
            if not cached:
                opt._invalidate_names()
                opt._positions = None
            call()
        spent = time.perf_counter() - start
        if spent >= min_measure_s:
            return spent / n * 1e3
        n *= 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--min-measure-ms", type=float, default=200.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    opt, params = build(args.params)
    probe = params[len(params) // 2]
    last_block = f"blocks.{args.params // 10 - 1}"
    opt.freeze("blocks.0")
    calls = {
        "is_frozen(p)": lambda: opt.is_frozen(probe),
        f"is_frozen('{last_block}')": lambda: opt.is_frozen(last_block),
        "frozen": lambda: opt.frozen,
        "freeze + unfreeze of 10 params": lambda: (opt.freeze("blocks.1"), opt.unfreeze("blocks.1")),
    }
    times = {name: {"cached": [], "rebuilt": []} for name in calls}
    ratios = {name: [] for name in calls}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for name, call in calls.items():
            cached = per_call_ms(call, True, opt, args.min_measure_ms / 1e3)
            rebuilt = per_call_ms(call, False, opt, args.min_measure_ms / 1e3)
            times[name]["cached"].append(cached)
            times[name]["rebuilt"].append(rebuilt)
            ratios[name].append(rebuilt / cached)

    results = []
    print(f"{args.params:,} params, medians of {args.repeats} repeats, load average {os.getloadavg()[0]:.2f}")
    print(f"{'call':<34} {'cached ms':>12} {'rebuilt ms':>12} {'rebuilt/cached':>15}")
    for name in calls:
        row = {"call": name, "cached_ms": statistics.median(times[name]["cached"]),
               "rebuilt_ms": statistics.median(times[name]["rebuilt"]),
               "ratio": statistics.median(ratios[name]), "times_ms": times[name]}
        results.append(row)
        print(f"{name:<34} {row['cached_ms']:>12.4f} {row['rebuilt_ms']:>12.3f} {row['ratio']:>14.0f}x")
    met = results[0]["cached_ms"] < TARGET_MS
    print(f"target: is_frozen(p) under {TARGET_MS} ms: {results[0]['cached_ms']:.4f} ms, "
          f"{'met' if met else 'NOT met'}")
    report = {"tool": "bench_names", "command": " ".join(sys.argv), "params": args.params,
              "repeats": args.repeats, "torch": torch.__version__, "load_average": os.getloadavg(),
              "results": results, "target_ms": TARGET_MS, "target_met": met,
              "wall_s": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
