"""Freezing rows: step time and optimizer state against the trainable rows held as their own param.

    python benchmarks/bench_rows.py                 # the full run (about a minute on 2 cores)
    python benchmarks/bench_rows.py --quick         # small sizes, a smoke run (seconds)
    python benchmarks/bench_rows.py --layouts block --optimizers adamw --repeats 9

The param: an embedding of 50,000 x 1,024 float32 with 1% of its rows trainable
(500 rows), its grad set once for the whole table, as autograd gives it. Two
layouts of the trainable rows: ``block``, the last 500 rows (tokens added to a
vocabulary), and ``scattered``, every 100th row.

Contenders, each over its own copy of the values:
- frozenopt, the whole embedding with the other 49,500 rows frozen (``freeze(rows=...)``
  before the first step: state only for the 500 rows);
- frozenopt and torch fused holding only the 500 rows as a param of their own: the
  floor, what the step costs when the rows are all there is;
- torch fused stepping the whole embedding, then copying the old rows back: today's
  exact workaround.
Target: frozenopt's rows within 1.2x of frozenopt holding the rows as their own param
(block layout): the step's work scales with the trainable rows, not the tensor.

Timing is bench_step.py's (its helpers are used here): warm-up, interleaved repeats,
medians of per-repeat ratios. The results are printed as a table and written as
JSON to benchmarks/results/bench_rows.json (or --out).
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
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_rows.json"

BOUND = 1.2  # frozenopt's rows / frozenopt holding the rows as their own param
SIZES = {"full": (50_000, 1_024), "quick": (2_000, 64)}
TRAINABLE_EVERY = 100  # 1% of the rows train
LAYOUTS = ("block", "scattered")


def trainable_rows(layout: str, rows: int) -> torch.Tensor:
    count = rows // TRAINABLE_EVERY
    if layout == "block":
        return torch.arange(rows - count, rows)
    return torch.arange(0, rows, TRAINABLE_EVERY)


class CopyBack:
    """torch fused over the whole table, then the frozen rows copied back: exact, at a whole step's cost."""

    def __init__(self, table: torch.nn.Parameter, frozen: torch.Tensor, torch_cls, kw: dict) -> None:
        self.table, self.frozen = table, frozen
        self.opt = torch_cls([table], fused=True, **kw)
        self.saved = table.detach()[frozen].clone()
        self.state = self.opt.state

    def step(self) -> None:
        self.opt.step()
        self.table.detach()[self.frozen] = self.saved


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def build_contenders(kind: str, layout: str, rows: int, width: int) -> tuple[list[Contender], int]:
    fo_cls, torch_cls = optimizer_classes(kind)
    kw = {"weight_decay": 0.01} if kind == "adamw" else {"momentum": 0.9, "weight_decay": 0.01}
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(rows, width, generator=gen) * 0.02
    grad = torch.randn(rows, width, generator=gen) * 1e-3
    train = trainable_rows(layout, rows)
    frozen = torch.ones(rows, dtype=torch.bool)
    frozen[train] = False

    def table() -> torch.nn.Parameter:
        p = torch.nn.Parameter(values.clone())
        p.grad = grad.clone()
        return p

    def own_rows() -> torch.nn.Parameter:
        p = torch.nn.Parameter(values[train].clone())
        p.grad = grad[train].clone()
        return p

    def fo_rows():
        opt = fo_cls([table()], **kw)
        opt.freeze(opt.param_groups[0]["params"][0], rows=frozen)
        return opt

    contenders = [
        Contender("frozenopt_rows", f"frozenopt, {rows:,} rows, {len(train)} trainable", fo_rows),
        Contender("frozenopt_own_param", f"frozenopt, the {len(train)} rows as a param",
                  lambda: fo_cls([own_rows()], **kw)),
        Contender("torch_fused_own_param", f"torch fused, the {len(train)} rows as a param",
                  lambda: torch_cls([own_rows()], fused=True, **kw)),
        Contender("torch_fused_copy_back", f"torch fused, all {rows:,} rows + copy-back",
                  lambda: CopyBack(table(), frozen, torch_cls, kw)),
    ]
    return contenders, len(train)


def run(kind: str, layout: str, args) -> dict:
    rows, width = SIZES["quick" if args.quick else "full"]
    contenders, trainable = build_contenders(kind, layout, rows, width)
    for c in contenders:
        warm_up(c, args.min_measure_s, args.max_inner)
    pair = contenders[:2]
    for c in pair:  # the target's two sides step as often per measurement (see bench_step.run_case)
        c.inner = max(x.inner for x in pair)
    for r in range(args.repeats):
        gc.collect()
        run_repeat(contenders, r % len(contenders))
    ref = contenders[0]
    per_repeat = {c.name: [t / r for t, r in zip(c.times, ref.times)] for c in contenders[1:]}
    # time(frozenopt rows) / time(frozenopt own param)
    value = statistics.median(1.0 / x for x in per_repeat["frozenopt_own_param"])
    result = {
        "optimizer": "AdamW" if kind == "adamw" else "SGD(momentum=0.9)",
        "layout": layout,
        "rows": rows,
        "width": width,
        "trainable_rows": trainable,
        "contenders": {
            c.name: {"label": c.label, "median_ms": statistics.median(c.times) * 1e3,
                     "min_ms": min(c.times) * 1e3, "steps_per_measurement": c.inner,
                     "times_ms": [t * 1e3 for t in c.times], "state_bytes": state_bytes(c.opt)}
            for c in contenders
        },
        # time(contender) / time(frozenopt rows), median of the per-repeat ratios
        "ratio_to_frozenopt_rows": {name: statistics.median(v) for name, v in per_repeat.items()},
        "target": {"text": f"frozenopt rows <= {BOUND}x frozenopt holding the rows as their own param",
                   "bound": BOUND, "value": value, "met": value <= BOUND, "applies": layout == "block"},
    }
    for c in contenders:
        c.opt = None
    gc.collect()
    return result


def format_table(results: list[dict]) -> str:
    header = f"{'optimizer':<19}{'layout':<11}{'contender':<44}{'ms/step':>9}{'vs rows':>9}{'state MB':>10}"
    lines = [header, "-" * len(header)]
    for res in results:
        for i, (name, c) in enumerate(res["contenders"].items()):
            ratio = res["ratio_to_frozenopt_rows"].get(name)
            rel = "ref" if ratio is None else f"{ratio:.2f}x"
            lines.append(f"{res['optimizer'] if i == 0 else '':<19}{res['layout'] if i == 0 else '':<11}"
                         f"{c['label']:<44}{c['median_ms']:>9.2f}{rel:>9}{c['state_bytes'] / 2**20:>10.2f}")
        t = res["target"]
        verdict = ("MET" if t["met"] else "NOT MET") if t["applies"] else "(shown; the target is for block)"
        lines.append(f"{'':<30}frozenopt rows / own param: {t['value']:.2f}x {verdict}")
        lines.append("")
    lines.append("vs rows: time of that contender / time of frozenopt's rows, median over the repeats of ratios")
    lines.append("within one repeat (above 1: frozenopt's rows are faster).")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_args(ap, DEFAULT_OUT)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of block,scattered")
    args = ap.parse_args(argv)
    args.layouts = comma_list(args.layouts)
    args.optimizers = comma_list(args.optimizers)
    bad = [x for x in args.layouts if x not in LAYOUTS] + [o for o in args.optimizers if o not in OPTIMIZERS]
    if bad or not args.layouts or not args.optimizers:
        ap.error(f"unknown or empty --layouts/--optimizers: {bad}")
    check_timing_args(ap, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_info()
    results = []
    for kind in args.optimizers:
        for layout in args.layouts:
            print(f"{kind}, {layout} ...", end=" ", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            results.append(run(kind, layout, args))
            results[-1]["wall_s"] = time.perf_counter() - t0
            print(f"{results[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    machine["load_average_end"] = load_average()
    applies = [r for r in results if r["target"]["applies"]]
    report = {"tool": "benchmarks/bench_rows.py", "quick": args.quick, "repeats": args.repeats,
              "machine": machine, "wall_s": time.perf_counter() - started, "results": results,
              "all_targets_met": all(r["target"]["met"] for r in applies)}
    write_report(report, args.out, argv)
    m = report["machine"]
    print(f"{m['cpu']} ({m['cpu_count']} logical CPUs, load average {load_text(m['load_average'])} at start, "
          f"{load_text(m['load_average_end'])} at end), "
          f"{m['torch_threads']} torch threads, torch {m['torch']}; {args.repeats} repeats"
          f"{' (QUICK: sizes too small for the target to mean anything)' if args.quick else ''}")
    print(format_table(results))
    print(f"all targets met: {report['all_targets_met']}; JSON: {args.out}; {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
