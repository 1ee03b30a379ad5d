"""Terminal table, Markdown table and PNG chart for a ``frozenopt-bench`` report."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .recipes import RECIPE_SPECS

MiB = 1024.0 * 1024.0


# the stages of the gradual schedule, lightest first
STAGE_ALPHA = [0.45, 0.7, 1.0]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:.1f}"


def _kib(x: float | None) -> str:
    return "-" if x is None else f"{x / 1024:,.1f}"


def _drift(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0.0:
        return "0"
    return f"{x:.3g}"


def _agree(res: dict[str, Any]) -> str:
    vs = res.get("vs_reference")
    if vs is None:
        return "n/a"
    if vs.get("is_reference"):
        return "(reference)"
    if vs["bitwise_equal"]:
        return "yes (bitwise)"
    mark = "" if vs.get("same_arithmetic", True) else ", other arithmetic"
    return ("yes" if vs["allclose"] else "NO") + f" ({vs['max_abs_diff']:.2g}{mark})"


def _pct(x: float | None, ref: float | None) -> str:
    if x is None or not ref:
        return "-"
    return f"{(x - ref) / ref * 100:+.1f}%"


def _timed(median: float | None, spread: Sequence[float] | None) -> str:
    """'median (min-max of the rounds' medians)' in ms."""
    if median is None:
        return "-"
    if not spread or spread[0] == spread[2]:
        return _ms(median)
    return f"{_ms(median)} ({_ms(spread[0])}-{_ms(spread[2])})"


def _cores(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _timing(res: dict[str, Any]) -> str:
    if res.get("timing_suspect"):
        return "SUSPECT"
    out = res.get("busy_rounds_left_out")
    return f"ok, busy round {', '.join(map(str, out))} left out" if out else "ok"


def gradual(report: dict[str, Any]) -> bool:
    return report["args"]["schedule"] != "fixed"


def stage_names(report: dict[str, Any]) -> list[str]:
    ok = [r for r in report["recipes"].values() if r.get("ok")]
    return [st["stage"] for st in ok[0]["stages"]] if ok else []


def new_tokens(report: dict[str, Any]) -> bool:
    return report.get("scenario") == "new-tokens"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    ref_name = report["reference_recipe"]
    recipes = report["recipes"]
    ref = recipes.get(ref_name) if recipes.get(ref_name, {}).get("ok") else None
    width = len(summary_header(report))
    rows = []
    for name, res in recipes.items():
        if res.get("skipped"):
            rows.append([name, "skipped: " + res["skipped"]] + [""] * (width - 2))
            continue
        if not res.get("ok"):
            rows.append([name, "FAILED: " + str(res.get("error"))[:80]] + [""] * (width - 2))
            continue
        drift = _drift(res["frozen_max_abs_change"])
        if name == "full":
            drift += " *"
        if gradual(report):
            # one figure per stage: the stages train very different amounts of the model
            step = " / ".join(_ms(st["median_step_s"]) for st in res["stages"])
            it = " / ".join(_ms(st["median_iter_s"]) for st in res["stages"])
        else:
            step = _timed(res["median_step_s"], res["step_spread_s"])
            it = _timed(res["median_iter_s"], res["iter_spread_s"])
        row = [
            name,
            step,
            it,
            _cores(res["others_cores_max"]),
            _timing(res),
            _mib(res["peak_memory_bytes"]),
            _pct(res["peak_memory_bytes"], ref and ref["peak_memory_bytes"]),
        ]
        if new_tokens(report):  # state and grads of a few rows: KiB
            row += [_kib(res["state_bytes"]), str(res["embedding_state_rows"]), _kib(res["grad_bytes"]),
                    _drift(res.get("old_rows_max_abs_change")), _drift(res.get("new_rows_max_abs_change")), drift]
        else:
            row += [_mib(res["state_bytes"]), _mib(res["grad_bytes"]), drift]
        rows.append(row + [_agree(res)])
    return rows


def summary_header(report: dict[str, Any]) -> list[str]:
    ref = report["reference_recipe"]
    mem = "peak RSS MiB"
    if any(r.get("peak_memory_kind") == "cuda_max_memory_allocated" for r in report["recipes"].values()):
        mem = "peak CUDA MiB"
    if gradual(report):
        stages = "/".join(stage_names(report))
        step, it = f"step ms {stages}", f"iter ms {stages}"
    else:
        step, it = "step ms", "iter ms"
    head = ["recipe", step, it, "others' CPU", "timing", mem, f"vs {ref}"]
    if new_tokens(report):
        return head + ["state KiB", "state rows", "grads KiB", "old rows drift", "new rows moved", "rest drift",
                       f"= {ref}"]
    return head + ["state MiB", "grads MiB", "frozen drift", f"= {ref}"]


def stage_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, res in report["recipes"].items():
        if not res.get("ok"):
            continue
        for st in res["stages"]:
            surv = st["state_survived"]
            rows.append([
                name,
                st["stage"],
                f"{st['transition_s'] * 1e3:.2f}",
                "yes" if st["rebuilt_optimizer"] else "no",
                "-" if surv is None else ("kept" if surv else "LOST"),
                _timed(st["median_step_s"], st["step_spread_s"]),
                _timed(st["median_iter_s"], st["iter_spread_s"]),
                f"{st['wall_s']:.2f}",
                _mib(st["state_bytes"]),
                _mib(st["grad_bytes"]),
            ])
    return rows


STAGE_HEADER = ["recipe", "stage", "change ms", "rebuilt", "head state", "step ms", "iter ms",
                "stage s", "state MiB", "grads MiB"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            out.append(str(c).ljust(w) if i == 0 else str(c).rjust(w))
        return "  ".join(out).rstrip()
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def format_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def _load_line(report: dict[str, Any]) -> str:
    """What else the machine did while the recipes were timed, in one line."""
    loads = [r["others_cores"] for res in report["recipes"].values() if res.get("ok")
             for r in res["rounds"] if r["others_cores"] is not None]
    la = (report.get("load_average") or {}).get("start")
    start = f"; 1-minute load average {la[0]:.2f} when the run started" if la else ""
    if not loads:
        return f"load: not measured on this system{start}"
    return (f"load: other processes used {min(loads):.2f}-{max(loads):.2f} cores (median "
            f"{statistics.median(loads):.2f}) while recipes were timed{start}")


def describe_run(report: dict[str, Any]) -> str:
    m = report.get("model") or {}
    mach = report["machine"]
    args = report["args"]
    n = report.get("param_elements") or 0
    fz = report.get("frozen_elements") or 0
    threads = next((r.get("threads") for r in report["recipes"].values() if r.get("ok")), None)
    what = "frozen" if args["schedule"] == "fixed" else "frozen in stage 1"
    per_stage = " per stage" if gradual(report) else ""
    digits = 2 if new_tokens(report) else 0  # new tokens: 99.9x% frozen
    parts = [
        f"model: {m.get('name')} [{m.get('size')}], {n / 1e6:.1f}M params in "
        f"{report.get('param_tensors')} tensors, {fz / max(n, 1) * 100:.{digits}f}% {what}",
        f"data: batch {m.get('batch_size')} x seq {m.get('seq_len')}, seed {args['seed']}; "
        f"AdamW lr {args['lr']:g}, weight decay {args['weight_decay']:g}; torch recipes: "
        f"torch.optim.AdamW, {TORCH_IMPL[args['torch_impl']]}",
        f"schedule: {args['schedule']}; {args['rounds']} round{'s' if args['rounds'] != 1 else ''}, the "
        f"recipes taking turns, each run a "
        f"fresh process with {args['warmup']} warm-up + {args['steps']} timed steps{per_stage}",
        f"machine: {mach.get('cpu')}, {threads} torch threads on {mach.get('affinity_cpus') or mach.get('cpu_count')} "
        f"CPUs, device {args['device']}, torch {mach.get('torch')}, python {mach.get('python')}",
        _load_line(report),
    ]
    new = m.get("new_tokens")
    if new_tokens(report) and new:
        parts.insert(1, f"scenario new-tokens: {' and '.join(new['tokens'])} added as ids "
                        f"{', '.join(map(str, new['new_ids']))}; {new['param']} grew from {new['old']} rows; "
                        f"only its new rows and the classifier train")
    suspect = [n for n, r in report["recipes"].items() if r.get("ok") and r.get("timing_suspect")]
    if suspect:
        parts.append(f"WARNING: the timing of {', '.join(suspect)} is suspect (see 'timing' and the notes); "
                     f"memory and exactness figures are not affected")
    return "\n".join(parts)


TORCH_IMPL = {
    "fused": "fused=True",
    "foreach": "foreach=True",
    "forloop": "foreach=False (for-loop)",
    "default": "torch's default implementation (for-loop on CPU, foreach on CUDA)",
}

NOTES_TIMES = (
    "step/iter ms: medians of every timed step of the rounds used (warm-up excluded), in brackets the "
    "lowest and highest median of a single round; iter = forward + backward + step + zero_grad.\n"
    "others' CPU: cores other processes used, on average, while the recipe was timed (the worst of the rounds used). "
    "A round in which that exceeded {busy:.2f} (the CPUs its {threads} torch threads leave free + 0.25) is "
    "busy and left out of the times (the JSON keeps it); timing is SUSPECT when every round was busy, or "
    "when the medians of the rounds used differ by more than {spread:g}x.\n"
)

NOTES_FIXED = (
    "peak RSS: the worker process's VmHWM, largest over the rounds (includes the Python + torch runtime, "
    "~{base:.0f} MiB before the model is built).\n"
    "state/grads: bytes of optimizer state and of .grad tensors after backward.\n"
    "frozen drift: largest |change| of any frozen parameter over the run"
    " (* 'full' freezes nothing: the would-be frozen params moved this far).\n"
)

NOTES_GRADUAL = (
    "gradual unfreezing: stage head trains the pooler and classifier, top2 adds the top 2 encoder blocks, "
    "all trains everything. 'change ms' is the stage change (new optimizer, or unfreeze); 'head state' "
    "tells whether the classifier's AdamW state survived it.\n"
    "requires_grad keeps one optimizer over all params (torch skips params whose grad is None), so it "
    "needs no rebuild; filtered and lr0 must build a new optimizer at every stage.\n"
    "state/grads (top table): the largest over the stages. frozen drift: largest |change| of a "
    "param while it was frozen (* 'full' freezes nothing).\n"
)

NOTES_NEW_TOKENS = (
    "peak RSS: the worker process's VmHWM, largest over the rounds (includes the Python + torch runtime, "
    "~{base:.0f} MiB before the model is built).\n"
    "state: bytes of optimizer state; state rows: rows of the AdamW state that holds the new tokens' rows "
    "(the whole embedding's, a compact one, or PEFT's own small param's). grads: bytes of .grad tensors after "
    "backward.\n"
    "old rows drift: largest |change| of the embedding rows that existed before the tokens were added "
    "(0 = bitwise unchanged); new rows moved: largest |change| of the new rows (they must learn); rest drift: "
    "largest |change| of every other frozen param. PEFT's embedding is read as the model sees it (its layer "
    "swaps the new rows in).\n"
    "copy-back: the full AdamW step over the embedding, then the old rows copied back (in the step time). "
    "grad-hook: the old rows' grads zeroed by a hook, but AdamW's decoupled weight decay still shrinks "
    "those rows at every step (a zero grad is not a None grad).\n"
)

NOTES_AGREE = (
    "= {ref}: final weights of every parameter vs the '{ref}' run (torch.allclose rtol={rtol:g}, "
    "atol={atol:.2g}: {atol_rule}; max |diff| in brackets). Basis: runs of the same AdamW arithmetic "
    "that freeze the same params end bitwise equal; a lost optimizer state or another frozen set moves "
    "weights by the size of the updates themselves, which the tolerance catches.{other}"
)

NOTE_OTHER_ARITHMETIC = (
    "\nother arithmetic: the recipe runs another AdamW implementation than '{ref}' ({pairs}): rounding differs "
    "at every step and training amplifies it, so the difference is not a freezing error and may exceed the "
    "tolerance; compare like with like with --torch-impl fused."
)


def notes(report: dict[str, Any]) -> str:
    ok = {n: r for n, r in report["recipes"].items() if r.get("ok")}
    base = min((r["baseline_rss_bytes"] for r in ok.values()), default=0) / MiB
    ref = report["reference_recipe"]
    threads = next((r.get("threads") for r in ok.values()), None)
    out = NOTES_TIMES.format(busy=report["busy_limit_cores"], threads=threads, spread=report["spread_limit"])
    extra = NOTES_NEW_TOKENS if new_tokens(report) else NOTES_GRADUAL if gradual(report) else NOTES_FIXED
    out += extra.format(base=base)
    tol = {"atol_rule": "", **report["tolerance"]}
    if tol.get("atol") is None:
        tol["atol"] = float("nan")
    others = [f"{n}: {r['arithmetic']}" for n, r in ok.items()
              if r.get("vs_reference") and not r["vs_reference"].get("same_arithmetic", True)]
    other = ""
    if others and ref in ok:
        other = NOTE_OTHER_ARITHMETIC.format(ref=ref, pairs=f"{ref}: {ok[ref]['arithmetic']}; " + "; ".join(others))
    out += NOTES_AGREE.format(ref=ref, other=other, **tol)
    for n, r in ok.items():
        for why in r.get("timing_suspect_reasons", []):
            out += f"\nSUSPECT {n}: {why}"
    return out


def render_text(report: dict[str, Any]) -> str:
    out = [describe_run(report), "", format_table(summary_header(report), summary_rows(report))]
    if gradual(report):
        out += ["", format_table(STAGE_HEADER, stage_rows(report))]
    out += ["", notes(report)]
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    out = ["```", describe_run(report), "```", "",
           format_markdown(summary_header(report), summary_rows(report))]
    if gradual(report):
        out += ["", format_markdown(STAGE_HEADER, stage_rows(report))]
    out += ["", notes(report).replace("\n", "  \n"), ""]
    return "\n".join(out)


# -- chart ------------------------------------------------------------------------------------

def write_chart(report: dict[str, Any], path: str) -> str | None:
    """Write the PNG; return None on success or a reason why no chart was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib) - no chart written"

    recipes = [(n, r) for n, r in report["recipes"].items() if r.get("ok")]
    if not recipes:
        return "no recipe succeeded - no chart written"
    names = [n + ("  (SUSPECT)" if r.get("timing_suspect") else "") for n, r in recipes]
    stages = stage_names(report) if gradual(report) else ["fixed"]
    ncols = 4 if gradual(report) else 3
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, (0.55 + 0.25 * (len(stages) - 1)) * len(names) + 3.2),
                             sharey=True)
    per_stage = " per stage" if gradual(report) else ""
    _timed_panel(axes[0], recipes, stages, "step", f"optimizer step{per_stage}")
    _timed_panel(axes[1], recipes, stages, "iter", f"whole iteration{per_stage}")
    _memory_panel(axes[2], recipes)
    if gradual(report):
        _stage_time_panel(axes[3], recipes, stages)

    y = list(range(len(names)))
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names)
    for label, (_, r) in zip(axes[0].get_yticklabels(), recipes):
        if r.get("timing_suspect"):
            label.set_color("#c62828")
    axes[0].invert_yaxis()
    fig.suptitle(_chart_title(report, recipes), fontsize=10)
    foot = _chart_footer(report, recipes)
    suspect = any(r.get("timing_suspect") for _, r in recipes)
    fig.text(0.01, 0.01, foot, fontsize=8, va="bottom", ha="left", color="#c62828" if suspect else "black")
    fig.tight_layout(rect=(0, 0.03 + 0.025 * foot.count("\n"), 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return None


def _colors(recipes: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [RECIPE_SPECS[n].color if n in RECIPE_SPECS else "#777777" for n, _ in recipes]


def _timed_panel(ax, recipes: list[tuple[str, dict[str, Any]]], stages: list[str], key: str, title: str) -> None:
    """Medians as bars, the lowest and highest round median as a whisker; a bar per stage."""
    y = list(range(len(recipes)))
    colors = _colors(recipes)
    hatches = ["////" if r.get("timing_suspect") else None for _, r in recipes]
    height = 0.8 / len(stages)
    top = max(st[key + "_spread_s"][2] for _, r in recipes for st in r["stages"]) * 1e3
    for si, sname in enumerate(stages):
        ys = [yi - 0.4 + height * (si + 0.5) for yi in y]
        med = [r["stages"][si]["median_" + key + "_s"] * 1e3 for _, r in recipes]
        lo = [r["stages"][si][key + "_spread_s"][0] * 1e3 for _, r in recipes]
        hi = [r["stages"][si][key + "_spread_s"][2] * 1e3 for _, r in recipes]
        shade = STAGE_ALPHA[si % len(STAGE_ALPHA)] if len(stages) > 1 else 1.0
        ax.barh(ys, med, height=height * 0.92, color=colors, alpha=shade, edgecolor="black", linewidth=0.4)
        for yi, m, hatch in zip(ys, med, hatches):
            if hatch:
                ax.barh([yi], [m], height=height * 0.92, fill=False, hatch=hatch, edgecolor="#c62828", linewidth=0)
        ax.errorbar(med, ys, xerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
                    fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        fmt = "{:.2f}" if top < 10 else "{:.1f}"
        for yi, m, b in zip(ys, med, hi):
            label = fmt.format(m) + (f"  {sname}" if len(stages) > 1 else "")
            ax.text(b + top * 0.02, yi, label, va="center", fontsize=7 if len(stages) > 1 else 8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("ms: median of the rounds used; whisker: lowest to highest round median", fontsize=8)
    ax.set_xlim(0, top * (1.45 if len(stages) > 1 else 1.25) if top > 0 else 1)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(labelsize=9)


def _memory_panel(ax, recipes: list[tuple[str, dict[str, Any]]]) -> None:
    """Peak CUDA allocations, or the peak RSS split into the runtime before the model and the rest."""
    y = list(range(len(recipes)))
    colors = _colors(recipes)
    peak = [r["peak_memory_bytes"] / MiB for _, r in recipes]
    top = max(peak)
    if any(r.get("peak_memory_kind") == "cuda_max_memory_allocated" for _, r in recipes):
        ax.barh(y, peak, color=colors, edgecolor="black", linewidth=0.4)
        for yi, p in zip(y, peak):
            ax.text(p + top * 0.01, yi, f"{p:.0f}", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.22)
        ax.set_title("peak memory (CUDA allocated)", fontsize=10)
        ax.set_xlabel("MiB", fontsize=9)
    else:
        base = [r["baseline_rss_bytes"] / MiB for _, r in recipes]
        extra = [p - b for p, b in zip(peak, base)]
        ax.barh(y, base, color="#dddddd", edgecolor="black", linewidth=0.4, label="runtime before model")
        ax.barh(y, extra, left=base, color=colors, edgecolor="black", linewidth=0.4, label="model + training")
        for yi, p, e in zip(y, peak, extra):
            ax.text(p + top * 0.01, yi, f"{p:.0f} (+{e:.0f})", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.3)
        ax.set_title("peak RSS (process high-water mark)", fontsize=10)
        ax.set_xlabel("MiB  (grey: python + torch before the model)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(labelsize=9)


def _stage_time_panel(ax, recipes: list[tuple[str, dict[str, Any]]], stages: list[str]) -> None:
    """Gradual unfreezing: each recipe's time per stage, stacked, and whether its state survived."""
    y = list(range(len(recipes)))
    shades = ["#cfd8dc", "#90a4ae", "#546e7a"]
    left = [0.0] * len(recipes)
    for si, sname in enumerate(stages):
        vals = [r["stages"][si]["wall_s"] for _, r in recipes]
        ax.barh(y, vals, left=left, color=shades[si % len(shades)], edgecolor="black", linewidth=0.4, label=sname)
        left = [a + b for a, b in zip(left, vals)]
    top = max(left)
    for yi, (_, r) in zip(y, recipes):
        tag = "state kept" if all(st["state_survived"] for st in r["stages"][1:]) else "state LOST"
        ax.text(left[yi] + top * 0.01, yi, f"{left[yi]:.1f}s, {tag}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.6)
    ax.set_title("gradual unfreezing: time per stage (median round)", fontsize=10)
    ax.set_xlabel("s", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)


def _chart_title(report: dict[str, Any], recipes: list[tuple[str, dict[str, Any]]]) -> str:
    m = report.get("model") or {}
    n = report.get("param_elements") or 0
    fz = report.get("frozen_elements") or 0
    threads = next((r.get("threads") for _, r in recipes), None)
    args = report["args"]
    per_stage = " per stage" if gradual(report) else ""
    if new_tokens(report):
        # on a line of its own: the model's name is long
        frozen = f"\nnew tokens: only their {len(m['new_tokens']['new_ids'])} embedding rows + the classifier train"
    else:
        frozen = f"{fz / max(n, 1) * 100:.0f}% frozen{' at start' if gradual(report) else ''}"
    return (f"frozenopt-bench: {m.get('name')} [{m.get('size')}], {n / 1e6:.1f}M params, {frozen}; "
            f"{args['rounds']} rounds x {args['steps']} steps{per_stage}, {args['device']} x{threads} threads, "
            f"torch {report['machine'].get('torch')} (torch AdamW {TORCH_IMPL[args['torch_impl']]})")


def _chart_footer(report: dict[str, Any], recipes: list[tuple[str, dict[str, Any]]]) -> str:
    foot = _load_line(report)
    suspect = [n for n, r in recipes if r.get("timing_suspect")]
    if suspect:
        foot += (f"\nSUSPECT timing (red, hatched): {', '.join(suspect)}: other processes were busy in every "
                 f"round, or the rounds disagree")
    left_out = [f"{n} ({', '.join(map(str, r['busy_rounds_left_out']))})" for n, r in recipes
                if r.get("busy_rounds_left_out")]
    if left_out:
        foot += f"\nbusy rounds left out of the times: {', '.join(left_out)}"
    if gradual(report):
        foot += "\nstages: head = pooler + classifier trained; top2 = + top 2 blocks; all = everything"
    return foot
