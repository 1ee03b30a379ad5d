"""Run each recipe in its own fresh process and compare the results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

from .progress import progress_bar
from .recipes import ALL_RECIPES, FROZENOPT_RECIPES, PROGRESS_TAG

# "Trained params agree with the reference recipe": torch.allclose with RTOL and an
# absolute tolerance of ATOL_FRACTION of the largest change any weight made in the
# reference run. Two correct AdamW implementations differ by rounding only, and on a
# whole training run that rounding is amplified: torch's own fused and for-loop AdamW
# end ~8e-5 apart after the default 27 steps (lr 1e-3, weights moved up to ~3e-2), so a
# fixed atol such as 1e-6 would call torch itself wrong. A real difference (optimizer
# state lost at a stage change, a different frozen set) is of the size of the update
# itself, so 5 % of the update separates the two by an order of magnitude either way.
RTOL = 1e-5
ATOL_FRACTION = 0.05


class BenchError(RuntimeError):
    pass


def _package_root() -> str:
    """The directory holding the ``frozenopt`` package this process imported.

    It goes first on the workers' PYTHONPATH so that they run the very same
    package as the parent (an uninstalled checkout works too).
    """
    pkg = sys.modules.get("frozenopt")
    where = getattr(pkg, "__file__", None)
    if where:
        return os.path.dirname(os.path.dirname(os.path.abspath(where)))
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.dirname(os.path.dirname(here))


def machine_info() -> Dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    try:
        import frozenopt

        info["frozenopt"] = getattr(frozenopt, "__version__", None)
    except Exception as exc:  # pragma: no cover
        info["frozenopt"] = f"import failed: {exc}"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=_package_root(), timeout=5)
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip()
    except Exception:
        pass
    return info


def _run_one(cfg: Dict[str, Any], bar, done_before: int) -> Dict[str, Any]:
    cfg_path = os.path.join(cfg["tmp_dir"], "config.json")
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    env = dict(os.environ)
    root = _package_root()
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
        other: List[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS_TAG):
                done = int(line.split()[1])
                bar.update(done - seen)
                seen = done
            else:
                other.append(line)
        rc = proc.wait()
    result: Optional[Dict[str, Any]] = None
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
                    names: Optional[List[str]] = None) -> Dict[str, Any]:
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
        raise BenchError(str(exc)) from None
    if len(frozen) == len(names):
        raise BenchError("--freeze covers every parameter: nothing would be trained")


def run_bench(args) -> Dict[str, Any]:
    """Run every requested recipe; return the full report dict (also written to disk)."""
    import torch

    recipes: List[str] = list(args.recipes)
    for r in recipes:
        if r not in ALL_RECIPES:
            raise BenchError(f"unknown recipe {r!r}; choose from {', '.join(ALL_RECIPES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.model == "minilm":
        from .models import check_minilm_available

        check_minilm_available()
    if any(r in FROZENOPT_RECIPES for r in recipes):
        try:
            import frozenopt

            frozenopt.AdamW  # noqa: B018
        except Exception as exc:
            raise BenchError(f"the frozenopt recipes need frozenopt.AdamW, which failed to load: "
                             f"{type(exc).__name__}: {exc}") from None

    if args.model == "builtin" and args.freeze:
        _check_targets(args)

    reference = args.reference or ("filtered" if args.schedule == "fixed" else "requires_grad")
    n_stages = 1 if args.schedule == "fixed" else 3
    per_recipe = (args.warmup + args.steps) * n_stages
    started = _dt.datetime.now(_dt.timezone.utc)

    tmp_root = tempfile.mkdtemp(prefix="frozenopt-bench-")
    atol, rule = None, "not computed"
    results: Dict[str, Dict[str, Any]] = {}
    weights: Dict[str, str] = {}
    bar = progress_bar(per_recipe * len(recipes), desc="frozenopt-bench", disable=args.quiet)
    try:
        for i, recipe in enumerate(recipes):
            work = os.path.join(tmp_root, recipe)
            os.makedirs(work, exist_ok=True)
            cfg = {
                "recipe": recipe,
                "model": args.model,
                "size": args.size,
                "device": args.device,
                "seed": args.seed,
                "steps": args.steps,
                "warmup": args.warmup,
                "schedule": args.schedule,
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
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"{recipe} ({i + 1}/{len(recipes)})")
            res = _run_one(cfg, bar, i * per_recipe)
            # keep the bar's total consistent even when a worker died early
            bar.n = (i + 1) * per_recipe
            if hasattr(bar, "refresh"):
                bar.refresh()
            results[recipe] = res
            if res.get("ok"):
                weights[recipe] = cfg["weights_path"]
        bar.close()

        # Cross-recipe comparison of the trained weights.
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
            elif recipe == reference:
                res["vs_reference"] = {"max_abs_diff": 0.0, "allclose": True, "bitwise_equal": True,
                                       "worst_param": None, "is_reference": True}
            else:
                res["vs_reference"] = None
    finally:
        if not args.keep_tmp:
            import shutil

            shutil.rmtree(tmp_root, ignore_errors=True)

    ok = [r for r in results.values() if r.get("ok")]
    first = ok[0] if ok else {}
    report = {
        "tool": "frozenopt-bench",
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["frozenopt-bench"] + list(args.argv)),
        "args": {k: v for k, v in vars(args).items() if k not in ("argv",)},
        "machine": machine_info(),
        "reference_recipe": reference,
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
