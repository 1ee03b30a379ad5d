"""The worker: ``python -m frozenopt.bench --worker CONFIG.json`` runs one recipe in a fresh process.

It reads its configuration from a JSON file, prints progress lines on stdout,
and writes its result JSON (and the final weights, for the cross-recipe
comparison) to the paths the configuration names.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from typing import Any

from .recipes import RECIPE_SPECS, Recipe, arithmetic, frozenopt_adamw, torch_adamw

PROGRESS_TAG = "@@frozenopt-bench-progress"


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
            key = (st.device.type, st.data_ptr())
            seen[key] = max(seen.get(key, 0), st.nbytes())
        except Exception:  # pragma: no cover - exotic tensor subclasses
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def state_tensors(opt) -> list[Any]:
    import torch

    return [v for st in opt.state.values() if isinstance(st, dict) for v in st.values() if isinstance(v, torch.Tensor)]


def grad_bytes(model) -> int:
    return tensor_bytes_unique(p.grad for p in model.parameters() if p.grad is not None)


def _peak_memory(device) -> tuple[int, str]:
    """(peak bytes, what was measured): CUDA allocations on a GPU, the process's VmHWM on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return peak_rss_bytes(), "VmHWM"


# -- the training loop ---------------------------------------------------------------------

class Clock:
    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def _head_state(opt, model) -> dict[str, Any]:
    """Whether the classifier's AdamW state exists, is nonzero, and its step count."""
    import torch

    st = opt.state.get(model.classifier.weight) if hasattr(opt.state, "get") else None
    if not st:
        return {"present": False, "nonzero": False, "step": None}
    ea, step = st.get("exp_avg"), st.get("step")
    if isinstance(step, torch.Tensor):
        step = float(step.item())
    return {"present": ea is not None, "nonzero": bool(ea is not None and bool(torch.count_nonzero(ea) > 0)),
            "step": step}


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
    spec = RECIPE_SPECS[recipe_name]
    if spec.frozenopt:
        opt = frozenopt_adamw(lin, cfg, mask_only=spec.mask_only)
        opt.freeze("bias")
    else:
        opt = torch_adamw(list(lin.parameters()), cfg, recipe_name)
    for _ in range(2):
        lin(torch.randn(2, 4, generator=g).to(device)).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _new_rows(model_info: dict[str, Any]):
    """The new-tokens scenario's NewRows, or None."""
    from .models import NewRows

    new = model_info.get("new_tokens")
    return NewRows(**new) if new else None


def _stages(cfg: dict[str, Any], model, model_info: dict[str, Any]) -> list[tuple[str, list[Any], list[str]]]:
    """(label, freeze targets, frozen param names) per stage: one for the fixed schedule and the
    new-tokens scenario, three for gradual."""
    from . import models
    from .targets import parse_target, resolve

    names = [n for n, _ in model.named_parameters()]
    if cfg["scenario"] == "new-tokens":
        # everything but the embedding (its old rows are frozen by the recipe) and the head
        rows = _new_rows(model_info)
        frozen = [n for n in names if n != rows.param and not n.startswith(models.HEAD + ".")]
        return [("new-tokens", frozen, frozen)]
    if cfg["schedule"] == "fixed":
        stages = [("fixed", [parse_target(t) for t in cfg.get("freeze") or models.default_freeze_targets(model)])]
    else:
        stages = models.gradual_stages(model, top=cfg.get("top", 2))
    return [(label, list(targets), resolve(names, targets) if targets else []) for label, targets in stages]


def _iteration(model, recipe: Recipe, batch, clock: Clock, measure_grads: bool) -> dict[str, Any]:
    """One forward, backward, step and zero_grad, timed; the grads' bytes are measured outside the times."""
    import torch.nn.functional as F

    from .load import cpu_sample, others_cpu_s

    cpu_before = cpu_sample()
    t0 = clock()
    loss = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]),
                           batch["labels"])
    loss.backward()
    t1 = clock()
    grads = grad_bytes(model) if measure_grads else None
    t2 = clock()
    recipe.step()
    t3 = clock()
    recipe.opt.zero_grad(set_to_none=True)
    t4 = clock()
    return {"loss": float(loss.detach()), "step_s": t3 - t2, "iter_s": (t4 - t0) - (t2 - t1), "wall_s": t4 - t0,
            "others_s": others_cpu_s(cpu_before, cpu_sample()), "grad_bytes": grads}


def frozen_elements(recipe: Recipe, frozen: list[str]) -> int:
    """Elements of the frozen params, and of the embedding's old rows in the new-tokens scenario."""
    n = sum(recipe.params[name].numel() for name in frozen)
    if recipe.rows is not None:
        weight = recipe.params[recipe.rows.param]
        n += recipe.rows.old * weight[0].numel()
    return n


def _embedding_state_rows(recipe: Recipe) -> int | None:
    """Rows of the AdamW state of the param that holds the new rows (new-tokens scenario)."""
    if recipe.rows_param is None:
        return None
    st = recipe.opt.state.get(recipe.rows_param) or {}
    exp_avg = st.get("exp_avg")
    return 0 if exp_avg is None else int(exp_avg.shape[0])


def _train_stage(recipe: Recipe, batches: list, cfg: dict[str, Any], clock: Clock, stage: tuple,
                 first: bool, losses: list[float], done: int, total: int) -> dict[str, Any]:
    """A stage: the recipe's change of frozen set, then warm-up and timed iterations."""
    label, targets, frozen = stage
    model = recipe.model
    before = _head_state(recipe.opt, model) if recipe.opt is not None else None
    t0 = clock()
    rebuilt = recipe.set_frozen(frozen, targets)
    transition_s = clock() - t0
    recipe.verify()
    after = _head_state(recipe.opt, model)
    warmup, its = int(cfg["warmup"]), []
    for i in range(warmup + int(cfg["steps"])):
        its.append(_iteration(model, recipe, batches[done + i], clock, measure_grads=i == 0))
        losses.append(its[-1]["loss"])
        print(f"{PROGRESS_TAG} {done + i + 1} {total}", flush=True)
    timed = its[warmup:]
    step_times, iter_times = [it["step_s"] for it in timed], [it["iter_s"] for it in timed]
    measured = [it for it in timed if it["others_s"] is not None]  # CPU time others took meanwhile
    timed_wall_s = sum(it["wall_s"] for it in measured)
    return {
        "stage": label,
        "frozen_targets": [getattr(t, "pattern", t) for t in targets],
        "frozen_params": len(frozen),
        "trainable_elements": sum(p.numel() for p in recipe.params.values()) - frozen_elements(recipe, frozen),
        "transition_s": transition_s,
        "rebuilt_optimizer": rebuilt,
        "head_state_before": before,
        "head_state_after": after,
        # "survived": the head's exp_avg is still there and nonzero after the change.
        "state_survived": None if first else bool(after["present"] and after["nonzero"]),
        "median_step_s": statistics.median(step_times) if step_times else None,
        "median_iter_s": statistics.median(iter_times) if iter_times else None,
        # the whole stage: its change plus every iteration, warm-up ones included
        "wall_s": transition_s + sum(it["iter_s"] for it in its),
        "step_times_s": step_times,
        "iter_times_s": iter_times,
        "others_cpu_s": sum(it["others_s"] for it in measured) if timed_wall_s else None,
        "timed_wall_s": timed_wall_s,
        "state_bytes": tensor_bytes_unique(state_tensors(recipe.opt)),
        "grad_bytes": its[0]["grad_bytes"],
    }


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from . import models

    t_start = time.perf_counter()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg["device"])
    name = cfg["recipe"]
    for module in RECIPE_SPECS[name].imports:  # count their import in the baseline, not in training
        importlib.import_module(module)
    _prewarm(name, cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline_rss = current_rss_bytes()

    model, model_info, tokenizer = models.build_model(cfg["model"], cfg["size"], cfg["seed"], cfg["scenario"])
    model.to(device)
    params = dict(model.named_parameters())
    stages = _stages(cfg, model, model_info)
    per_stage = int(cfg["warmup"]) + int(cfg["steps"])
    total = per_stage * len(stages)
    batches = models.make_batches(cfg["model"], model_info, tokenizer, total, cfg["seed"], device)

    recipe = Recipe(name, model, cfg, _new_rows(model_info))
    clock = Clock(device)
    model.train()
    torch.manual_seed(cfg["seed"] + 2)  # dropout masks: identical sequence in every recipe
    stage_results, losses = [], []
    for si, stage in enumerate(stages):
        stage_results.append(_train_stage(recipe, batches, cfg, clock, stage, si == 0, losses, si * per_stage,
                                          total))
        if cfg["check"] and cfg["schedule"] != "fixed" and si + 1 < len(stages):
            # Snapshot what was frozen in this stage, to check it did not move (read back
            # after the peak is recorded, so the check adds nothing to the peak).
            torch.save({n: params[n].detach().to("cpu") for n in stage[2]},
                       os.path.join(cfg["tmp_dir"], f"stage{si}.pt"))

    # ---- measurements end here: everything below may allocate freely ----
    result = _result(cfg, recipe, stages, stage_results, model_info, losses, baseline_rss, t_start)
    if cfg["check"]:
        result.update(_check_weights(cfg, recipe, stages))
    if RECIPE_SPECS[name].frozenopt:
        import frozenopt

        result["frozenopt_version"] = getattr(frozenopt, "__version__", None)
    return result


def _result(cfg: dict[str, Any], recipe: Recipe, stages: list, stage_results: list, model_info: dict,
            losses: list[float], baseline_rss: int, t_start: float) -> dict[str, Any]:
    """What a worker reports: the recipe's run, its peak memory and the state it ends with."""
    import torch

    device = torch.device(cfg["device"])
    peak, peak_kind = _peak_memory(device)
    st_tensors = state_tensors(recipe.opt)
    params = recipe.params
    fixed = cfg["schedule"] == "fixed"
    return {
        "recipe": recipe.name,
        "round": cfg["round"],
        "arithmetic": arithmetic(recipe.name, cfg),
        "schedule": cfg["schedule"],
        "ok": True,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model_info": model_info,
        "param_elements": sum(p.numel() for p in params.values()),
        "param_tensors": len(params),
        "frozen_names": stages[0][2] if fixed else None,
        "frozen_elements": frozen_elements(recipe, stages[0][2]),
        "warmup": int(cfg["warmup"]),
        "steps": int(cfg["steps"]),
        "median_step_s": stage_results[0]["median_step_s"] if fixed else None,
        "median_iter_s": stage_results[0]["median_iter_s"] if fixed else None,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "baseline_rss_bytes": baseline_rss,
        "state_bytes": tensor_bytes_unique(st_tensors),
        "state_tensors": len(st_tensors),
        "state_params": sum(1 for s in recipe.opt.state.values() if s),
        "embedding_state_rows": _embedding_state_rows(recipe),
        "grad_bytes": max(st["grad_bytes"] or 0 for st in stage_results),
        "final_head_state": _head_state(recipe.opt, recipe.model),
        "losses": losses,
        "stages": stage_results,
        "worker_wall_s": time.perf_counter() - t_start,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _check_weights(cfg: dict[str, Any], recipe: Recipe, stages) -> dict[str, Any]:
    """Saves the final weights (for the comparison between recipes) and measures frozen drift.

    Run once per recipe: every round trains the same weights from the same seed.
    """
    import torch

    from . import models

    final = recipe.weights()
    torch.save(final, cfg["weights_path"])

    # Frozen drift: compare against the initial weights, rebuilt from the same seed.
    init_model, _, _ = models.build_model(cfg["model"], cfg["size"], cfg["seed"], cfg["scenario"])
    init = {n: p.detach() for n, p in init_model.named_parameters()}
    if cfg["schedule"] == "fixed":
        checks = [("fixed", stages[0][2], final)]
    else:
        checks = [(label, frozen, torch.load(os.path.join(cfg["tmp_dir"], f"stage{si}.pt")))
                  for si, (label, _, frozen) in enumerate(stages[:-1])]
    bitwise, by_stage = True, {}
    for label, frozen, values in checks:
        changed = [n for n in frozen if not torch.equal(values[n], init[n])]
        bitwise = bitwise and not changed
        by_stage[label] = max((_max_abs_diff(values[n], init[n]) for n in changed), default=0.0)
    # How far training moved the weights at all: the scale for "agrees with the reference".
    max_update = max(_max_abs_diff(final[n], init[n]) for n in final)
    out = {
        "frozen_max_abs_change": max(by_stage.values(), default=0.0),
        "frozen_bitwise_unchanged": bitwise,
        "frozen_change_by_stage": by_stage,
        "max_update_abs": max_update,
    }
    if recipe.rows is not None:
        name, old = recipe.rows.param, recipe.rows.old
        out.update(
            old_rows_bitwise_unchanged=torch.equal(final[name][:old], init[name][:old]),
            old_rows_max_abs_change=_max_abs_diff(final[name][:old], init[name][:old]),
            new_rows_max_abs_change=_max_abs_diff(final[name][old:], init[name][old:]),
        )
    return out


def _max_abs_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def worker_main(config_path: str) -> int:
    with open(config_path) as fh:
        cfg = json.load(fh)
    try:
        result, rc = run_worker(cfg), 0
    except BaseException as exc:  # report any failure to the parent as JSON
        result = {"recipe": cfg.get("recipe"), "ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}
        traceback.print_exc()
        rc = 1
    with open(cfg["result_path"], "w") as fh:
        json.dump(result, fh)
    return rc
