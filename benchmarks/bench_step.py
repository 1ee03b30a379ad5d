"""Optimizer step time on the CPU: frozenopt against torch.optim's fused and foreach paths.

    python benchmarks/bench_step.py                 # the full run (a few minutes on 2 cores)
    python benchmarks/bench_step.py --quick         # small sizes, a smoke run (seconds)
    python benchmarks/bench_step.py --cases b,c --repeats 9

Cases (each for AdamW and for SGD with momentum=0.9):
  a  ~50M params in 80 large tensors       target: frozenopt at least 1.0x torch fused
  b  20,000 tensors of 256 elements         target: frozenopt at least 10x torch fused
  c  the same 20,000 with 90% frozen        target: frozenopt stepping all 20,000 with 90% frozen
     (every tenth tensor left unfrozen)     within 1.2x of frozenopt holding only the unfrozen 10%
  d  64 conv weights 128x128x3x3 in         target: frozenopt at least 1.0x torch fused
     channels_last (grads and state too)    (stepped in place, no copies)
  e  20,000 tensors of 256 elements: the    target: the check at most 10% of frozenopt's step
     per-step check that the optimizer's
     groups, state and requires_grad are
     still what its plan was built from

How it measures. Every contender of a case steps the same param and grad tensors
(grads are set once; every step reuses them, as the task defines it). Each
contender is warmed up first (state allocation and first steps are not timed),
and a number of steps per measurement is chosen so one measurement lasts about
--min-measure-ms. Each repeat then measures every contender once, interleaved
step by step (step A, step B, step C, step A, ...; a contender that needs fewer
steps drops out of the later rounds) in an order rotated from repeat to
repeat, so load on the machine hits all of them alike. The figures are medians
over the repeats: the step time of each contender, and the ratio of two
contenders measured in the same repeat (paired, which cancels most machine
noise).

In case c frozenopt is built with ``mask_only=True`` and the frozen params keep
their grads, the harder case for a masked step: the grads are there, and the
step must not read them. (With the default ``mask_only=False``, freeze() drops
the grads of frozen params instead.) The optimizers that hold only the unfrozen
10% are built over the very same 2,000 tensors.

The results are printed as a table and written as JSON to
benchmarks/results/bench_step.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import frozenopt
from frozenopt.bench.machine import load_average, machine_info

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_step.json"

LR = 1e-3
MOMENTUM = 0.9

# (tensor count, elements per tensor, frozen fraction) per case, full and quick.
SIZES = {
    "a": {"full": (80, 625_000), "quick": (4, 20_000)},
    "b": {"full": (20_000, 256), "quick": (300, 256)},
    "c": {"full": (20_000, 256), "quick": (300, 256)},
    "d": {"full": (64, 128 * 128 * 9), "quick": (4, 32 * 32 * 9)},
    "e": {"full": (20_000, 256), "quick": (300, 256)},
}
FROZEN_FRACTION = 0.9
KEEP_EVERY = 10  # case c: tensor i stays unfrozen when i % KEEP_EVERY == 0

def case_title(case: str, count: int, numel: int) -> str:
    if case == "a":
        return f"{count * numel / 1e6:.3g}M params in {count} large tensors"
    if case == "d":
        return f"{count} channels_last conv weights of {numel:,} elements"
    title = f"{count:,} tensors of {numel:,} elements"
    return title + (f", {FROZEN_FRACTION:.0%} frozen" if case == "c" else "")


@dataclass
class Target:
    """A goal for one case: numerator time / denominator time compared with a bound."""

    text: str
    numerator: str
    denominator: str
    kind: str  # "speedup_at_least": denominator/numerator >= bound; "slowdown_at_most": numerator/denominator <= bound
    bound: float

    def value(self, ratios: dict[str, float]) -> float:
        r = ratios[self.denominator]  # time(denominator) / time(numerator), see ratio_to_reference
        return r if self.kind == "speedup_at_least" else 1.0 / r

    def met(self, value: float) -> bool:
        return value >= self.bound if self.kind == "speedup_at_least" else value <= self.bound


@dataclass
class Contender:
    name: str
    label: str
    make: Callable[[], torch.optim.Optimizer]
    opt: torch.optim.Optimizer | None = None
    inner: int = 1
    times: list[float] = field(default_factory=list)  # seconds per step, one per repeat


# ---------------------------------------------------------------- set-up

def make_params(count: int, numel: int, seed: int) -> list[torch.nn.Parameter]:
    """count float32 params of numel elements, each with a fixed random grad."""
    gen = torch.Generator().manual_seed(seed)
    shape = (numel // 1000, 1000) if numel % 1000 == 0 and numel >= 100_000 else (numel,)
    params = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        p.grad = torch.randn(shape, generator=gen)
        params.append(p)
    return params


def make_channels_last(count: int, numel: int, seed: int) -> list[torch.nn.Parameter]:
    """count conv weights (c, c, 3, 3) in channels_last, with grads laid out alike (as autograd makes them)."""
    gen = torch.Generator().manual_seed(seed)
    c = round((numel // 9) ** 0.5)
    params = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(c, c, 3, 3, generator=gen).to(memory_format=torch.channels_last))
        p.grad = torch.randn(c, c, 3, 3, generator=gen).to(memory_format=torch.channels_last)
        params.append(p)
    return params


class SyncCheck:
    """Steps nothing: runs only the check frozenopt makes at the start of each step()."""

    def __init__(self, opt):
        self.opt = opt

    def step(self):
        self.opt._sync()


OPTIMIZERS = ("adamw", "sgd")  # what --optimizers takes


def optimizer_classes(kind: str):
    """(frozenopt class, torch.optim class) for "adamw" or "sgd"."""
    return (frozenopt.AdamW, torch.optim.AdamW) if kind == "adamw" else (frozenopt.SGD, torch.optim.SGD)


def optimizer_factories(kind: str):
    """(frozenopt class, torch class) and this file's kwargs for "adamw" or "sgd"."""
    return optimizer_classes(kind), dict(lr=LR) if kind == "adamw" else dict(lr=LR, momentum=MOMENTUM)


def build_contenders(case: str, kind: str, params: list[torch.nn.Parameter]) -> tuple[list[Contender], Target]:
    (fo_cls, torch_cls), kw = optimizer_factories(kind)
    if case == "e":
        opt = fo_cls(params, **kw)
        contenders = [
            Contender("sync_check", "frozenopt's per-step check", lambda: SyncCheck(opt)),
            Contender("frozenopt", "the whole frozenopt step", lambda: opt),
        ]
        return contenders, Target("check <= 0.1x step", "sync_check", "frozenopt", "slowdown_at_most", 0.1)
    if case in ("a", "b", "d"):
        contenders = [
            Contender("frozenopt", "frozenopt", lambda: fo_cls(params, **kw)),
            Contender("torch_fused", "torch fused=True", lambda: torch_cls(params, fused=True, **kw)),
            Contender("torch_foreach", "torch foreach=True", lambda: torch_cls(params, foreach=True, **kw)),
        ]
        bound = 10.0 if case == "b" else 1.0
        target = Target(f"frozenopt >= {bound:g}x torch fused", "frozenopt", "torch_fused", "speedup_at_least",
                        bound)
        return contenders, target

    unfrozen = [p for i, p in enumerate(params) if i % KEEP_EVERY == 0]
    frozen = [p for i, p in enumerate(params) if i % KEEP_EVERY != 0]

    def fo_frozen():
        opt = fo_cls(params, mask_only=True, **kw)
        opt.freeze(*frozen)
        return opt

    contenders = [
        Contender("frozenopt_90pct_frozen", f"frozenopt, all {len(params)}, 90% frozen", fo_frozen),
        Contender("frozenopt_only_unfrozen", f"frozenopt holding only the {len(unfrozen)}",
                  lambda: fo_cls(unfrozen, **kw)),
        Contender("torch_fused_only_unfrozen", f"torch fused holding only the {len(unfrozen)}",
                  lambda: torch_cls(unfrozen, fused=True, **kw)),
        Contender("torch_foreach_only_unfrozen", f"torch foreach holding only the {len(unfrozen)}",
                  lambda: torch_cls(unfrozen, foreach=True, **kw)),
    ]
    target = Target("frozenopt 90% frozen <= 1.2x frozenopt holding only the 10%", "frozenopt_90pct_frozen",
                    "frozenopt_only_unfrozen", "slowdown_at_most", 1.2)
    return contenders, target


# ---------------------------------------------------------------- timing

def time_step(opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def warm_up(c: Contender, min_measure_s: float, max_inner: int) -> None:
    """Builds the optimizer, steps it past its first steps, and sets how many steps one measurement takes."""
    c.opt = c.make()
    c.opt.step()  # allocates state (frozenopt builds its plan on the next step)
    one = time_step(c.opt)
    if one < min_measure_s / 3:
        one = min(one, time_step(c.opt), time_step(c.opt))
    c.inner = max(1, min(max_inner, math.ceil(min_measure_s / max(one, 1e-6))))


def run_repeat(contenders: list[Contender], shift: int) -> None:
    """One measurement of every contender, interleaved step by step.

    Round j steps every contender that takes more than j steps per
    measurement, in an order rotated by `shift`; so the fast contenders'
    steps are spread over the same stretch of time (and the same machine
    load) rather than run one block after the other.
    """
    order = contenders[shift:] + contenders[:shift]
    spent = {c.name: 0.0 for c in contenders}
    for j in range(max(c.inner for c in contenders)):
        for c in order:
            if j < c.inner:
                spent[c.name] += time_step(c.opt)
    for c in contenders:
        c.times.append(spent[c.name] / c.inner)


def run_case(case: str, kind: str, args) -> dict:
    count, numel = SIZES[case]["quick" if args.quick else "full"]
    params = (make_channels_last if case == "d" else make_params)(count, numel, seed=0)
    contenders, target = build_contenders(case, kind, params)
    for c in contenders:
        warm_up(c, args.min_measure_s, args.max_inner)
    # When the two sides of the target run at similar speeds, they take the
    # same number of steps per measurement: with interleaved rounds, a
    # contender with more steps would run its extra ones back to back, with
    # caches warm from its own data (a bias when that data fits in cache).
    pair = [c for c in contenders if c.name in (target.numerator, target.denominator)]
    most, least = max(c.inner for c in pair), min(c.inner for c in pair)
    if most <= 4 * least:
        for c in pair:
            c.inner = most
    for r in range(args.repeats):
        gc.collect()
        run_repeat(contenders, r % len(contenders))

    ref = contenders[0]
    per_repeat = {
        c.name: [c_t / ref_t for c_t, ref_t in zip(c.times, ref.times)] for c in contenders[1:]
    }
    ratios = {name: statistics.median(v) for name, v in per_repeat.items()}
    value = target.value(ratios)
    result = {
        "case": case,
        "title": case_title(case, count, numel),
        "optimizer": "AdamW" if kind == "adamw" else "SGD(momentum=0.9)",
        "tensors": count,
        "elements_per_tensor": numel,
        "elements": count * numel,
        "frozen_fraction": FROZEN_FRACTION if case == "c" else 0.0,
        "stepped_elements": (count // KEEP_EVERY if case == "c" else count) * numel,
        "reference": ref.name,
        "contenders": {
            c.name: {
                "label": c.label,
                "median_ms": statistics.median(c.times) * 1e3,
                "min_ms": min(c.times) * 1e3,
                "steps_per_measurement": c.inner,
                "times_ms": [t * 1e3 for t in c.times],
            }
            for c in contenders
        },
        # time(contender) / time(reference), median of the per-repeat ratios
        "ratio_to_reference": {name: {"median": ratios[name], "per_repeat": v} for name, v in per_repeat.items()},
        "target": {
            "text": target.text,
            "kind": target.kind,
            "bound": target.bound,
            "value": value,
            "met": target.met(value),
        },
    }
    for c in contenders:  # free the state before the next case
        c.opt = None
    del params, contenders
    gc.collect()
    return result


# ---------------------------------------------------------------- report

def format_table(results: list[dict]) -> str:
    lines = []
    header = f"{'case':<5}{'optimizer':<19}{'contender':<44}{'ms/step':>10}{'vs first':>11}"
    lines.append(header)
    lines.append("-" * len(header))
    for res in results:
        first = True
        for name, c in res["contenders"].items():
            ratio = res["ratio_to_reference"].get(name)
            if ratio is None:
                rel = "ref"
            elif res["case"] in ("c", "e"):
                rel = f"{1.0 / ratio['median']:.2f}x"  # time(first) / time(this)
            else:
                rel = f"{ratio['median']:.1f}x"  # time(this) / time(first): the first's speed-up
            lines.append(f"{res['case'] if first else '':<5}{res['optimizer'] if first else '':<19}"
                         f"{c['label']:<44}{c['median_ms']:>10.2f}{rel:>11}")
            first = False
        t = res["target"]
        shown = f"{t['value']:.2f}x" if t["kind"] == "slowdown_at_most" else f"{t['value']:.1f}x"
        lines.append(f"{'':<5}target: {t['text']}: {shown} -> {'MET' if t['met'] else 'NOT MET'}")
        lines.append("")
    lines.append("vs first: for a, b and d, time of that contender / time of frozenopt (frozenopt's speed-up);")
    lines.append("for c, time of frozenopt with 90% frozen / time of that contender (lower is better for frozenopt);")
    lines.append("for e, time of the check / time of the whole step.")
    lines.append("Each figure is the median over the repeats of ratios measured within one repeat.")
    return "\n".join(lines)


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped, lower-cased entries of a comma-separated option."""
    return [x.strip().lower() for x in text.split(",") if x.strip()]


def load_text(load: list[float] | None) -> str:
    """A load average triple as "0.1/0.2/0.3" ("?" where unknown)."""
    return "/".join(f"{x:.1f}" for x in load) if load else "?"


def add_timing_args(ap: argparse.ArgumentParser, default_out: Path) -> None:
    """The options of every benchmark timed with these helpers: repeats, size, output, measurement, threads,
    and which optimizers (--optimizers, a subset of OPTIMIZERS)."""
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per contender (default 7)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run, figures not meaningful")
    ap.add_argument("--out", type=Path, default=default_out, help=f"JSON output (default {default_out})")
    ap.add_argument("--min-measure-ms", type=float, default=None,
                    help="least time per measurement (default 200, 5 with --quick)")
    ap.add_argument("--max-inner", type=int, default=200, help="most steps per measurement (default 200)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for every contender (default: torch's own choice)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of adamw,sgd")


def check_timing_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses bad timing options and fills in the measurement time (min_measure_s)."""
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.min_measure_ms is None:
        args.min_measure_ms = 5.0 if args.quick else 200.0
    args.min_measure_s = args.min_measure_ms / 1e3


def write_report(report: dict, out: Path, argv) -> None:
    """Writes the report as JSON, with the command line that made it."""
    report["command"] = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_args(ap, DEFAULT_OUT)
    ap.add_argument("--cases", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e (default all)")
    args = ap.parse_args(argv)
    args.cases = comma_list(args.cases)
    args.optimizers = comma_list(args.optimizers)
    bad = [c for c in args.cases if c not in SIZES] + [o for o in args.optimizers if o not in OPTIMIZERS]
    if bad or not args.cases or not args.optimizers:
        ap.error(f"unknown or empty --cases/--optimizers: {bad}")
    check_timing_args(ap, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_info()
    results = []
    for case in args.cases:
        for kind in args.optimizers:
            count, numel = SIZES[case]["quick" if args.quick else "full"]
            print(f"case {case} ({case_title(case, count, numel)}), {kind} ...", end=" ", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            results.append(run_case(case, kind, args))
            results[-1]["wall_s"] = time.perf_counter() - t0
            print(f"{results[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    machine["load_average_end"] = load_average()
    report = {
        "tool": "benchmarks/bench_step.py",
        "quick": args.quick,
        "repeats": args.repeats,
        "machine": machine,
        "wall_s": time.perf_counter() - started,
        "results": results,
        "all_targets_met": all(r["target"]["met"] for r in results),
    }
    write_report(report, args.out, argv)
    m = report["machine"]
    print(f"{m['cpu']} ({m['cpu_count']} logical CPUs, load average {load_text(m['load_average'])} at start), "
          f"{m['torch_threads']} torch threads, torch {m['torch']}, "
          f"CPU capability {m['cpu_capability']}; {args.repeats} repeats"
          f"{' (QUICK: sizes too small for the targets to mean anything)' if args.quick else ''}")
    print(format_table(results))
    busy = m["load_average"] and m["load_average"][0] > (m["cpu_count"] or 1)
    if busy and m["torch_threads"] > 1:
        print(f"note: the load average ({m['load_average'][0]:.1f}) exceeds the {m['cpu_count']} CPUs. "
              "Contenders that open many short parallel regions (torch fused: one per tensor) wait for "
              "descheduled worker threads and slow down far more than the others; --threads 1 gives a "
              "comparison free of that effect.")
    print(f"all targets met: {report['all_targets_met']}; JSON: {args.out}; {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
