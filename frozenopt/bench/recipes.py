"""The freezing recipes and the worker that runs one of them in a fresh process.

Each recipe fine-tunes the same model (same seed, same data, same frozen set)
with AdamW; only the way "frozen" is expressed differs:

- ``full``          torch.optim.AdamW on everything, nothing frozen (the reference cost);
- ``requires_grad`` frozen params get requires_grad=False, every param goes to torch AdamW;
- ``filtered``      requires_grad=False and only the trainable params go to torch AdamW;
- ``lr0``           a second param group with lr=0 holds the frozen params (grads still computed);
- ``frozenopt``     frozenopt.AdamW(model) + opt.freeze(...);
- ``frozenopt-mask`` the same with mask_only=True (autograd still computes frozen grads).

The worker is ``python -m frozenopt.bench --worker CONFIG.json``: it reads its
configuration from a JSON file, prints progress lines on stdout, and writes
its result JSON (and the final weights, for the cross-recipe comparison) to
the paths the configuration names.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

RECIPES = ["full", "requires_grad", "filtered", "lr0", "frozenopt", "frozenopt-mask"]
# Not run by default: what a user gets from torch.optim.AdamW without asking for fused=True.
EXTRA_RECIPES = ["filtered-default"]
ALL_RECIPES = RECIPES + EXTRA_RECIPES
FROZENOPT_RECIPES = ("frozenopt", "frozenopt-mask")
PROGRESS_TAG = "@@frozenopt-bench-progress"

RECIPE_HELP = {
    "full": "torch AdamW, nothing frozen (reference cost)",
    "requires_grad": "requires_grad=False, all params in torch AdamW",
    "filtered": "requires_grad=False, only trainable params in torch AdamW",
    "lr0": "frozen params in an lr=0 param group of torch AdamW",
    "frozenopt": "frozenopt.AdamW + freeze()",
    "frozenopt-mask": "frozenopt.AdamW(mask_only=True) + freeze()",
    "filtered-default": "as filtered, with torch AdamW's default implementation whatever --torch-impl "
                        "says (the for-loop one on CPU; not run by default)",
}


# -- memory --------------------------------------------------------------------------------

def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (VmHWM), in bytes."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


def current_rss_bytes() -> int:
    rss = _status_bytes("VmRSS")
    return rss if rss is not None else peak_rss_bytes()


def tensor_bytes_unique(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        try:
            st = t.untyped_storage()
            seen[(st.device.type, st.data_ptr())] = max(seen.get((st.device.type, st.data_ptr()), 0),
                                                        st.nbytes())
        except Exception:  # pragma: no cover - exotic tensor subclasses
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def state_tensors(opt) -> list[Any]:
    import torch

    out = []
    for st in opt.state.values():
        if isinstance(st, dict):
            out.extend(v for v in st.values() if isinstance(v, torch.Tensor))
    return out


def grad_bytes(model) -> int:
    return tensor_bytes_unique(p.grad for p in model.parameters() if p.grad is not None)


# -- optimizers ------------------------------------------------------------------------------

def torch_impl(recipe: str, cfg: dict[str, Any]) -> str:
    """The torch.optim.AdamW implementation a torch recipe uses."""
    return "default" if recipe == "filtered-default" else cfg["torch_impl"]


def arithmetic(recipe: str, cfg: dict[str, Any]) -> str:
    """Which AdamW arithmetic a recipe runs: results are bitwise comparable only within one.

    frozenopt follows torch's fused kernels; torch's default is its for-loop code
    on CPU and its foreach code on CUDA.
    """
    if recipe in FROZENOPT_RECIPES:
        return "fused"
    impl = torch_impl(recipe, cfg)
    if impl == "default":
        return "foreach" if cfg["device"].startswith("cuda") else "forloop"
    return impl


def _torch_adamw(groups, cfg, recipe: str):
    import torch

    kw = dict(lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg["weight_decay"])
    impl = torch_impl(recipe, cfg)
    if impl == "foreach":
        kw["foreach"] = True
    elif impl == "fused":
        kw["fused"] = True
    elif impl == "forloop":
        kw["foreach"] = False
    return torch.optim.AdamW(groups, **kw)


def _frozenopt_adamw(model, cfg, mask_only: bool):
    import frozenopt  # noqa: F401  (imported here: torch recipes must not need it)

    return frozenopt.AdamW(model, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=cfg["weight_decay"], mask_only=mask_only)


class Recipe:
    """Builds and re-targets the optimizer for one recipe.

    ``set_frozen(names, targets)`` is called once before training and again at
    every stage change of the gradual schedule. It returns True when it had to
    build a new optimizer (which loses the optimizer state).
    """

    def __init__(self, name: str, model, cfg: dict[str, Any]):
        self.name = name
        self.model = model
        self.cfg = cfg
        self.params = dict(model.named_parameters())
        self.opt = None
        self.frozen: list[str] = []
        self.targets: list[Any] = []

    def _set_requires_grad(self, frozen: set) -> None:
        for n, p in self.params.items():
            p.requires_grad_(n not in frozen)

    def set_frozen(self, frozen_names: Sequence[str], targets: Sequence[Any]) -> bool:
        frozen = set(frozen_names)
        r = self.name
        rebuilt = False
        if r == "full":
            if self.opt is None:
                self.opt = _torch_adamw(list(self.params.values()), self.cfg, r)
                rebuilt = True
            frozen = set()
        elif r == "requires_grad":
            # Every param is in the optimizer; torch skips params whose grad is None,
            # so a stage change only flips requires_grad and keeps the optimizer.
            self._set_requires_grad(frozen)
            if self.opt is None:
                self.opt = _torch_adamw(list(self.params.values()), self.cfg, r)
                rebuilt = True
        elif r in ("filtered", "filtered-default"):
            self._set_requires_grad(frozen)
            self.opt = _torch_adamw([p for n, p in self.params.items() if n not in frozen], self.cfg, r)
            rebuilt = True
        elif r == "lr0":
            train = [p for n, p in self.params.items() if n not in frozen]
            still = [p for n, p in self.params.items() if n in frozen]
            groups = [{"params": train}]
            if still:
                groups.append({"params": still, "lr": 0.0})
            self.opt = _torch_adamw(groups, self.cfg, r)
            rebuilt = True
        elif r in FROZENOPT_RECIPES:
            if self.opt is None:
                self.opt = _frozenopt_adamw(self.model, self.cfg, mask_only=(r == "frozenopt-mask"))
                rebuilt = True
                if targets:
                    self.opt.freeze(*targets)
            else:
                if not frozen:
                    self.opt.unfreeze()  # no argument: everything
                else:
                    # Unfreeze by the targets that left the frozen list (module names such
                    # as "encoder.layer.6"), as a user would; fall back to exact names.
                    gone = [t for t in self.targets if not any(t is u or t == u for u in targets)]
                    newly = set(self.frozen) - frozen
                    if gone and set(self.opt.unfreeze(*gone)) == newly:
                        pass
                    elif newly:
                        self.opt.unfreeze(*sorted(newly))
                    added = frozen - set(self.opt.frozen)
                    if added:
                        self.opt.freeze(*sorted(added))
        else:
            raise ValueError(f"unknown recipe {r!r}")
        self.frozen = sorted(frozen)
        self.targets = list(targets)
        return rebuilt

    def verify(self) -> None:
        """Check (outside the timed region) that frozenopt froze exactly the expected set."""
        r = self.name
        frozen = set(self.frozen)
        if r in FROZENOPT_RECIPES:
            got = sorted(self.opt.frozen)
            want = sorted(frozen)
            if got != want:
                extra = sorted(set(got) - set(want))[:5]
                missing = sorted(set(want) - set(got))[:5]
                raise RuntimeError(
                    f"frozenopt's frozen set differs from the expected one: "
                    f"{len(got)} frozen vs {len(want)} expected; extra {extra}, missing {missing}")
            if r == "frozenopt":
                wrong = [n for n in frozen if self.params[n].requires_grad]
                if wrong:
                    raise RuntimeError(f"freeze() left requires_grad=True on {wrong[:5]}")
            else:
                wrong = [n for n, p in self.params.items() if not p.requires_grad]
                if wrong:
                    raise RuntimeError(f"mask_only freeze() turned requires_grad off on {wrong[:5]}")


# -- the training loop ---------------------------------------------------------------------

class Clock:
    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def _progress(done: int, total: int) -> None:
    print(f"{PROGRESS_TAG} {done} {total}", flush=True)


def _head_state(opt, model) -> dict[str, Any]:
    """Whether the classifier's AdamW state exists, is nonzero, and its step count."""
    import torch

    p = model.classifier.weight
    st = opt.state.get(p) if hasattr(opt.state, "get") else None
    if not st:
        return {"present": False, "nonzero": False, "step": None}
    ea = st.get("exp_avg")
    step = st.get("step")
    if isinstance(step, torch.Tensor):
        step = float(step.item())
    return {
        "present": ea is not None,
        "nonzero": bool(ea is not None and bool(torch.count_nonzero(ea) > 0)),
        "step": step,
    }


def _prewarm(recipe_name: str, cfg: dict[str, Any], device) -> None:
    """Pay one-time costs (lazy imports, extension load, first dispatch) before measuring.

    The first torch.optim optimizer built in a process takes about a second of
    lazy imports; without this the first stage's optimizer construction would
    be charged with it.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(1234)
    lin = nn.Linear(4, 4).to(device)
    if recipe_name in FROZENOPT_RECIPES:
        opt = _frozenopt_adamw(lin, cfg, mask_only=(recipe_name == "frozenopt-mask"))
        opt.freeze("bias")
    else:
        opt = _torch_adamw(list(lin.parameters()), cfg, recipe_name)
    for _ in range(2):
        lin(torch.randn(2, 4, generator=g).to(device)).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del opt, lin


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from . import models
    from .load import cpu_sample, others_cpu_s
    from .targets import parse_target, resolve

    t_start = time.perf_counter()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg["device"])
    recipe_name = cfg["recipe"]
    if recipe_name in FROZENOPT_RECIPES:
        import frozenopt  # noqa: F401  (count its import in the baseline, not in training)
    _prewarm(recipe_name, cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline_rss = current_rss_bytes()

    model, model_info, tokenizer = models.build_model(cfg["model"], cfg["size"], cfg["seed"])
    model.to(device)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())

    schedule = cfg["schedule"]
    warmup, steps = int(cfg["warmup"]), int(cfg["steps"])
    if schedule == "fixed":
        raw = cfg.get("freeze") or models.default_freeze_targets(model)
        targets = [parse_target(t) for t in raw]
        stages = [("fixed", targets)]
    else:
        stages = [(label, list(t)) for label, t in models.gradual_stages(model, top=cfg.get("top", 2))]
    stage_frozen = [resolve(names, t) if t else [] for _, t in stages]

    iters_per_stage = warmup + steps
    total_iters = iters_per_stage * len(stages)
    batches = models.make_batches(cfg["model"], model_info, tokenizer, total_iters, cfg["seed"], device)

    recipe = Recipe(recipe_name, model, cfg)
    clock = Clock(device)
    model.train()
    torch.manual_seed(cfg["seed"] + 2)  # dropout masks: identical sequence in every recipe

    stage_results = []
    losses: list[float] = []
    snapshot_dir = cfg["tmp_dir"]
    done = 0
    grad_b = None
    for si, ((label, targets), frozen) in enumerate(zip(stages, stage_frozen)):
        before = _head_state(recipe.opt, model) if recipe.opt is not None else None
        t0 = clock()
        rebuilt = recipe.set_frozen(frozen, targets)
        transition_s = clock() - t0
        recipe.verify()
        after = _head_state(recipe.opt, model)
        step_times, iter_times, all_iters = [], [], []
        others_s, timed_wall_s = 0.0, 0.0  # CPU time others took during the timed iterations
        stage_grad_b = None
        for it in range(iters_per_stage):
            batch = batches[done]
            cpu_before = cpu_sample()
            t0 = clock()
            logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            loss = F.cross_entropy(logits, batch["labels"])
            loss.backward()
            t1 = clock()
            if it == 0:
                stage_grad_b = grad_bytes(model)
            t1b = clock()
            recipe.opt.step()
            t2 = clock()
            recipe.opt.zero_grad(set_to_none=True)
            t3 = clock()
            others = others_cpu_s(cpu_before, cpu_sample())
            losses.append(float(loss.detach()))
            all_iters.append((t3 - t0) - (t1b - t1))
            if it >= warmup:
                step_times.append(t2 - t1b)
                iter_times.append((t3 - t0) - (t1b - t1))
                if others is not None:
                    others_s += others
                    timed_wall_s += t3 - t0
            done += 1
            _progress(done, total_iters)
        grad_b = max(grad_b or 0, stage_grad_b or 0)
        st_tensors = state_tensors(recipe.opt)
        stage_results.append({
            "stage": label,
            "frozen_targets": [getattr(t, "pattern", t) for t in targets],
            "frozen_params": len(frozen),
            "trainable_elements": sum(p.numel() for n, p in params.items() if n not in set(frozen)),
            "transition_s": transition_s,
            "rebuilt_optimizer": rebuilt,
            "head_state_before": before,
            "head_state_after": after,
            # "survived": the head's exp_avg is still there and nonzero after the change.
            "state_survived": (None if si == 0 else bool(after["present"] and after["nonzero"])),
            "median_step_s": statistics.median(step_times) if step_times else None,
            "median_iter_s": statistics.median(iter_times) if iter_times else None,
            # the whole stage: its change plus every iteration, warm-up ones included
            "wall_s": transition_s + sum(all_iters),
            "step_times_s": step_times,
            "iter_times_s": iter_times,
            "others_cpu_s": others_s if timed_wall_s else None,
            "timed_wall_s": timed_wall_s,
            "state_bytes": tensor_bytes_unique(st_tensors),
            "grad_bytes": stage_grad_b,
        })
        if cfg["check"] and schedule != "fixed" and si + 1 < len(stages):
            # Snapshot what was frozen in this stage, to check it did not move (read back
            # after the peak is recorded, so the check adds nothing to the peak).
            torch.save({n: params[n].detach().to("cpu") for n in frozen},
                       os.path.join(snapshot_dir, f"stage{si}.pt"))

    # ---- measurements end here: everything below may allocate freely ----
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        peak_kind = "cuda_max_memory_allocated"
    else:
        peak = peak_rss_bytes()
        peak_kind = "VmHWM"
    st_tensors = state_tensors(recipe.opt)
    state_b = tensor_bytes_unique(st_tensors)
    n_state_tensors = len(st_tensors)
    n_state_params = sum(1 for s in recipe.opt.state.values() if s)
    final_head = _head_state(recipe.opt, model)

    result = {
        "recipe": recipe_name,
        "round": cfg["round"],
        "arithmetic": arithmetic(recipe_name, cfg),
        "schedule": schedule,
        "ok": True,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model_info": model_info,
        "param_elements": sum(p.numel() for p in model.parameters()),
        "param_tensors": len(names),
        "frozen_names": stage_frozen[0] if schedule == "fixed" else None,
        "frozen_elements": sum(params[n].numel() for n in stage_frozen[0]),
        "warmup": warmup,
        "steps": steps,
        "median_step_s": statistics.median(stage_results[0]["step_times_s"]) if schedule == "fixed" else None,
        "median_iter_s": statistics.median(stage_results[0]["iter_times_s"]) if schedule == "fixed" else None,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "baseline_rss_bytes": baseline_rss,
        "state_bytes": state_b,
        "state_tensors": n_state_tensors,
        "state_params": n_state_params,
        "grad_bytes": grad_b,
        "final_head_state": final_head,
        "losses": losses,
        "stages": stage_results,
        "worker_wall_s": time.perf_counter() - t_start,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if cfg["check"]:
        result.update(_check_weights(cfg, model, stages, stage_frozen))
    if recipe_name in FROZENOPT_RECIPES:
        import frozenopt

        result["frozenopt_version"] = getattr(frozenopt, "__version__", None)
    return result


def _check_weights(cfg: dict[str, Any], model, stages, stage_frozen) -> dict[str, Any]:
    """Saves the final weights (for the comparison between recipes) and measures frozen drift.

    Run once per recipe: every round trains the same weights from the same seed.
    """
    import torch

    from . import models

    final = {n: p.detach().to("cpu") for n, p in model.named_parameters()}
    torch.save(final, cfg["weights_path"])

    # Frozen drift: compare against the initial weights, rebuilt from the same seed.
    init_model, _, _ = models.build_model(cfg["model"], cfg["size"], cfg["seed"])
    init = dict(init_model.named_parameters())
    drift_checks = []
    if cfg["schedule"] == "fixed":
        drift_checks.append(("fixed", stage_frozen[0], final))
    else:
        for si in range(len(stages) - 1):
            snap = torch.load(os.path.join(cfg["tmp_dir"], f"stage{si}.pt"))
            drift_checks.append((stages[si][0], stage_frozen[si], snap))
    drift_max = 0.0
    drift_bitwise = True
    drift_by_stage = {}
    for label, frozen, values in drift_checks:
        d = 0.0
        for n in frozen:
            a, b = values[n], init[n].detach()
            if not torch.equal(a, b):
                drift_bitwise = False
                d = max(d, float((a.double() - b.double()).abs().max()))
        drift_by_stage[label] = d
        drift_max = max(drift_max, d)
    # How far training moved the weights at all: the scale for "agrees with the reference".
    max_update = max(float((final[n].double() - init[n].detach().double()).abs().max())
                     for n in final)
    return {
        "frozen_max_abs_change": drift_max,
        "frozen_bitwise_unchanged": drift_bitwise,
        "frozen_change_by_stage": drift_by_stage,
        "max_update_abs": max_update,
    }


def worker_main(config_path: str) -> int:
    with open(config_path) as fh:
        cfg = json.load(fh)
    try:
        result = run_worker(cfg)
    except BaseException as exc:  # report any failure to the parent as JSON
        result = {
            "recipe": cfg.get("recipe"),
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
        with open(cfg["result_path"], "w") as fh:
            json.dump(result, fh)
        traceback.print_exc()
        return 1
    with open(cfg["result_path"], "w") as fh:
        json.dump(result, fh)
    return 0
