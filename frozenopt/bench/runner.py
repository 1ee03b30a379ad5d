"""Run each recipe in its own fresh process and compare the results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from .load import BUSY_CORES, spare_cores
from .machine import load_average, machine_info, package_root
from .progress import progress_bar
from .recipes import RECIPE_SPECS, scenario_recipes
from .worker import PROGRESS_TAG

# "Trained params agree with the reference recipe": torch.allclose with RTOL and an
# absolute tolerance of ATOL_FRACTION of the largest change any weight made in the
# reference run. Runs of the same AdamW arithmetic (frozenopt and torch's fused=True)
# that freeze the same params end bitwise equal. Other arithmetic (torch's for-loop code)
# differs by rounding that training amplifies: 8e-5 after 27 steps of the default model
# (weights moved up to ~3e-2), so a fixed atol such as 1e-6 would call torch itself
# wrong. A real difference (optimizer state lost at a stage change, another frozen set)
# is of the size of the update itself, which 5 % of the update catches.
RTOL = 1e-5
ATOL_FRACTION = 0.05
# A recipe whose rounds' median times differ by more than this factor is flagged even when
# no other process was seen: something unmeasured (memory bandwidth, clock) moved them.
SPREAD_LIMIT = 1.5


class BenchError(RuntimeError):
    pass


def _run_one(cfg: dict[str, Any], bar) -> dict[str, Any]:
    cfg_path = os.path.join(cfg["tmp_dir"], "config.json")
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    env = dict(os.environ)
    # The package this process runs goes first, so the workers run the very same one.
    root = package_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    err_path = os.path.join(cfg["tmp_dir"], "stderr.txt")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "frozenopt.bench", "--worker", cfg_path],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, bufsize=1,
        )
        seen = 0
        other: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS_TAG):
                done = int(line.split()[1])
                bar.update(done - seen)
                seen = done
            else:
                other.append(line)
        rc = proc.wait()
    result: dict[str, Any] | None = None
    if os.path.exists(cfg["result_path"]):
        with open(cfg["result_path"]) as fh:
            result = json.load(fh)
    if rc != 0 or result is None or not result.get("ok"):
        with open(err_path) as fh:
            tail = fh.read()[-4000:]
        msg = (result or {}).get("error") or f"worker exited with code {rc}"
        return {"recipe": cfg["recipe"], "ok": False, "error": msg, "stderr_tail": tail,
                "stdout_tail": "".join(other)[-2000:]}
    return result


def compare_weights(path_a: str, path_b: str, atol: float, rtol: float = RTOL,
                    names: list[str] | None = None) -> dict[str, Any]:
    import torch

    a = torch.load(path_a)
    b = torch.load(path_b)
    keys = names if names is not None else list(a)
    max_abs = 0.0
    close = True
    bitwise = True
    worst = None
    for k in keys:
        x, y = a[k], b[k]
        if torch.equal(x, y):
            continue
        bitwise = False
        d = float((x.double() - y.double()).abs().max())
        if d > max_abs:
            max_abs, worst = d, k
        if not torch.allclose(x, y, rtol=rtol, atol=atol):
            close = False
    return {"max_abs_diff": max_abs, "allclose": close, "bitwise_equal": bitwise, "worst_param": worst}


def _check_targets(args) -> None:
    """Fail fast on a --freeze target that matches nothing (model built on the meta device)."""
    import torch

    from .models import SIZES, EncoderClassifier
    from .targets import parse_target, resolve

    with torch.device("meta"):
        model = EncoderClassifier(SIZES[args.size])
    names = [n for n, _ in model.named_parameters()]
    try:
        frozen = resolve(names, [parse_target(t) for t in args.freeze])
    except (ValueError, TypeError) as exc:
        raise BenchError(f"--freeze: {exc}") from None
    if len(frozen) == len(names):
        raise BenchError("--freeze covers every parameter: nothing would be trained")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def round_order(recipes: list[str], round_index: int, rounds: int) -> list[str]:
    """The recipes of one round, rotated so that each round starts at a different one."""
    k = (round_index * len(recipes)) // max(rounds, 1)
    return recipes[k:] + recipes[:k]


def _spread(values: list[float]) -> list[float]:
    """[min, median, max]."""
    return [min(values), statistics.median(values), max(values)]


def _others_cores(stages: list[dict[str, Any]]) -> float | None:
    """Cores other processes used, on average, while one run's iterations were timed."""
    if any(st["others_cpu_s"] is None for st in stages):
        return None
    wall = sum(st["timed_wall_s"] for st in stages)
    return sum(st["others_cpu_s"] for st in stages) / wall if wall else None


def merge_rounds(runs: list[dict[str, Any]], busy_limit: float) -> dict[str, Any]:
    """One recipe's runs (one per round, the first with the weight checks) as one result.

    A round in which other processes used more than ``busy_limit`` cores while
    the recipe was timed is busy: its times are kept in the JSON but left out of
    the figures, which pool every timed step of the other rounds (medians), with
    the medians of the single rounds as the spread. The timing is suspect when
    every round was busy, or when the rounds used disagree by more than
    SPREAD_LIMIT times.
    """
    merged = dict(runs[0])
    merged["rounds"] = [_round_record(run, busy_limit) for run in runs]
    for key in ("round", "position", "load_average_start", "started_utc", "finished_utc", "worker_wall_s"):
        del merged[key]
    quiet = [run for run, r in zip(runs, merged["rounds"]) if not r["busy"]]
    used = quiet or runs
    merged["rounds_used"] = [run["round"] + 1 for run in used]
    merged["peak_memory_bytes"] = max(run["peak_memory_bytes"] for run in runs)
    stages = [_pooled_stage(first, [run["stages"][si] for run in used]) for si, first in enumerate(runs[0]["stages"])]
    merged["stages"] = stages
    if merged["schedule"] == "fixed":
        for key in ("median_step_s", "median_iter_s", "step_spread_s", "iter_spread_s"):
            merged[key] = stages[0][key]
    # the load under the figures shown: in the rounds used
    loads = [r["others_cores"] for r in merged["rounds"] if r["others_cores"] is not None and r["round"] in
             merged["rounds_used"]]
    merged["others_cores_max"] = max(loads) if loads else None
    busy = [r for r in merged["rounds"] if r["busy"]]
    merged["busy_rounds_left_out"] = [r["round"] for r in busy] if quiet else []
    reasons = _suspect_reasons(busy if not quiet else [], stages, merged["schedule"])
    merged["timing_suspect"] = bool(reasons)
    merged["timing_suspect_reasons"] = reasons
    return merged


def _round_record(run: dict[str, Any], busy_limit: float) -> dict[str, Any]:
    """What one round of a recipe keeps in the merged result."""
    others = _others_cores(run["stages"])
    return {
        "round": run["round"] + 1,
        "position": run["position"],
        "load_average_start": run["load_average_start"],
        "started_utc": run["started_utc"],
        "finished_utc": run["finished_utc"],
        "others_cores": others,
        "busy": others is not None and others > busy_limit,
        "median_step_s": [st["median_step_s"] for st in run["stages"]],
        "median_iter_s": [st["median_iter_s"] for st in run["stages"]],
        "peak_memory_bytes": run["peak_memory_bytes"],
        "worker_wall_s": run["worker_wall_s"],
    }


def _pooled_stage(first: dict[str, Any], per_round: list[dict[str, Any]]) -> dict[str, Any]:
    """One stage over the rounds used: every timed step pooled, the rounds' medians as the spread;
    the rest as the first round (the one with the checks) measured it."""
    steps = [t for st in per_round for t in st["step_times_s"]]
    iters = [t for st in per_round for t in st["iter_times_s"]]
    stage = {
        **first,
        "step_times_s": steps,
        "iter_times_s": iters,
        "median_step_s": statistics.median(steps),
        "median_iter_s": statistics.median(iters),
        "step_spread_s": _spread([st["median_step_s"] for st in per_round]),
        "iter_spread_s": _spread([st["median_iter_s"] for st in per_round]),
        "transition_s": statistics.median(st["transition_s"] for st in per_round),
        "wall_s": statistics.median(st["wall_s"] for st in per_round),
    }
    del stage["others_cpu_s"], stage["timed_wall_s"]  # per round: in the merged result's "rounds"
    return stage


def _suspect_reasons(all_busy: list[dict[str, Any]], stages: list[dict[str, Any]], schedule: str) -> list[str]:
    """Why a recipe's timing is suspect: every round busy, or rounds used that disagree."""
    reasons = []
    if all_busy:
        reasons.append("every round was busy: other processes used "
                       + ", ".join(f"{r['others_cores']:.2f}" for r in all_busy) + " cores while it was timed")
    for st in stages:
        for what, key in (("step", "step_spread_s"), ("iteration", "iter_spread_s")):
            lo, _, hi = st[key]
            if lo > 0 and hi / lo > SPREAD_LIMIT:
                where = "" if schedule == "fixed" else f" in stage {st['stage']}"
                reasons.append(f"{what} medians of the rounds used{where} range {lo * 1e3:.3g}-{hi * 1e3:.3g} ms")
    return reasons


def _check_args(args) -> None:
    """What must hold before any worker starts."""
    import torch

    known = scenario_recipes(args.scenario)
    for r in args.recipes:
        if r not in known:
            raise BenchError(f"unknown recipe {r!r} for --scenario {args.scenario}; choose from {', '.join(known)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.model == "minilm":
        from .models import check_minilm_available

        check_minilm_available()
    if any(RECIPE_SPECS[r].frozenopt for r in args.recipes):
        try:
            import frozenopt

            frozenopt.AdamW  # noqa: B018
        except Exception as exc:
            raise BenchError(f"the frozenopt recipes need frozenopt.AdamW, which failed to load: "
                             f"{type(exc).__name__}: {exc}") from None
    if args.model == "builtin" and args.freeze:
        _check_targets(args)


def _skipped(args) -> dict[str, dict[str, Any]]:
    """The requested recipes that cannot run here (a library they wrap is missing), with why."""
    out = {}
    for r in args.recipes:
        spec = RECIPE_SPECS[r]
        why = spec.missing() if spec.missing else None
        if why:
            out[r] = {"recipe": r, "ok": False, "skipped": why}
    return out


def _worker_config(args, recipe: str, rd: int, work: str) -> dict[str, Any]:
    return {
        "recipe": recipe,
        "round": rd,
        "check": rd == 0,  # weights and drift: the same in every round
        "model": args.model,
        "size": args.size,
        "device": args.device,
        "seed": args.seed,
        "steps": args.steps,
        "warmup": args.warmup,
        "schedule": args.schedule,
        "scenario": args.scenario,
        "freeze": args.freeze,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "torch_impl": args.torch_impl,
        "threads": args.threads,
        "top": 2,
        "tmp_dir": work,
        "result_path": os.path.join(work, "result.json"),
        "weights_path": os.path.join(work, "weights.pt"),
    }


def _run_rounds(args, recipes: list[str], tmp_root: str,
                per_run: int) -> tuple[dict[str, list], dict[str, dict], dict[str, str]]:
    """Every recipe, round after round, each run in a fresh worker: (runs, failures, weights files)."""
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in recipes}
    failed: dict[str, dict[str, Any]] = {}
    weights: dict[str, str] = {}
    bar = progress_bar(per_run * len(recipes) * args.rounds, desc="frozenopt-bench", disable=args.quiet)
    done = 0
    for rd in range(args.rounds):
        for position, recipe in enumerate(round_order(recipes, rd, args.rounds)):
            if recipe in failed:
                continue
            work = os.path.join(tmp_root, recipe, f"round{rd + 1}")
            os.makedirs(work, exist_ok=True)
            cfg = _worker_config(args, recipe, rd, work)
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"round {rd + 1}/{args.rounds}: {recipe}")
            load_before, began = load_average(), _now()
            res = _run_one(cfg, bar)
            done += per_run
            bar.n = done  # keep the bar's total consistent even when a worker died early
            if hasattr(bar, "refresh"):
                bar.refresh()
            if not res.get("ok"):
                failed[recipe] = res
                continue
            res.update(position=position + 1, load_average_start=load_before, started_utc=began,
                       finished_utc=_now())
            runs[recipe].append(res)
            if rd == 0:
                weights[recipe] = cfg["weights_path"]
    bar.close()
    return runs, failed, weights


def _compare_to_reference(args, results: dict[str, dict], weights: dict[str, str], reference: str):
    """Adds ``vs_reference`` to every recipe that ran; returns (atol, the rule that set it)."""
    ref_res = results.get(reference, {})
    if args.atol is not None:
        atol, rule = args.atol, "given by --atol"
    elif ref_res.get("ok"):
        atol = ATOL_FRACTION * ref_res["max_update_abs"]
        rule = (f"{ATOL_FRACTION:.0%} of the largest weight change in the {reference} run, "
                f"{ref_res['max_update_abs']:.3g}")
    else:
        atol, rule = None, "no reference run"
    for recipe, res in results.items():
        if not res.get("ok"):
            continue
        if reference in weights and recipe != reference and atol is not None:
            res["vs_reference"] = compare_weights(weights[recipe], weights[reference], atol=atol)
            res["vs_reference"]["same_arithmetic"] = res["arithmetic"] == ref_res["arithmetic"]
        elif recipe == reference:
            res["vs_reference"] = {"max_abs_diff": 0.0, "allclose": True, "bitwise_equal": True,
                                   "worst_param": None, "is_reference": True}
        else:
            res["vs_reference"] = None
    return atol, rule


def run_bench(args) -> dict[str, Any]:
    """Run every requested recipe; return the full report dict (also written to disk)."""
    import torch

    _check_args(args)
    skipped = _skipped(args)
    to_run = [r for r in args.recipes if r not in skipped]
    per_run = (args.warmup + args.steps) * (1 if args.schedule == "fixed" else 3)
    threads = args.threads or torch.get_num_threads()
    busy_limit = spare_cores(threads) + BUSY_CORES
    started = _now()
    load_start = load_average()
    tmp_root = tempfile.mkdtemp(prefix="frozenopt-bench-")
    try:
        runs, failed, weights = _run_rounds(args, to_run, tmp_root, per_run)
        results = {r: skipped.get(r) or failed.get(r) or merge_rounds(runs[r], busy_limit) for r in args.recipes}
        atol, rule = _compare_to_reference(args, results, weights, args.reference)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp_root, ignore_errors=True)

    first = next((r for r in results.values() if r.get("ok")), {})
    report = {
        "tool": "frozenopt-bench",
        "started_utc": started,
        "finished_utc": _now(),
        "command": " ".join(["frozenopt-bench"] + list(args.argv)),
        "args": {k: v for k, v in vars(args).items() if k not in ("argv",)},
        "machine": machine_info(),
        # 1/5/15-minute load averages before the first worker and after the last one
        # (the run itself adds about one per torch thread).
        "load_average": {"start": load_start, "end": load_average()},
        # A round is busy when other processes used more than this many cores on average
        # while the recipe was timed (CPUs left free by its torch threads + BUSY_CORES); busy
        # rounds are left out of the figures, and a recipe with no other round, or whose
        # rounds differ by more than SPREAD_LIMIT times, is suspect.
        "busy_limit_cores": busy_limit,
        "spread_limit": SPREAD_LIMIT,
        "scenario": args.scenario,
        "reference_recipe": args.reference,
        "tolerance": {"rtol": RTOL, "atol": atol, "atol_rule": rule},
        "model": first.get("model_info"),
        "param_elements": first.get("param_elements"),
        "param_tensors": first.get("param_tensors"),
        "frozen_elements": first.get("frozen_elements"),
        "frozen_names": first.get("frozen_names"),
        "recipes": results,
    }
    if args.keep_tmp:
        report["tmp_dir"] = tmp_root
    return report
