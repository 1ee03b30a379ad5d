"""Terminal table, Markdown table and PNG chart for a ``frozenopt-bench`` report."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

MiB = 1024.0 * 1024.0

COLORS = {
    "full": "#9e9e9e",
    "requires_grad": "#5b8def",
    "filtered": "#2e5fb8",
    "filtered-fused": "#1b3a70",
    "lr0": "#e39b3b",
    "frozenopt": "#1f9e6e",
    "frozenopt-mask": "#7cc9a5",
}


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _mib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / MiB:.1f}"


def _drift(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x == 0.0:
        return "0"
    return f"{x:.3g}"


def _agree(res: Dict[str, Any]) -> str:
    vs = res.get("vs_reference")
    if vs is None:
        return "n/a"
    if vs.get("is_reference"):
        return "(reference)"
    if vs["bitwise_equal"]:
        return "yes (bitwise)"
    return ("yes" if vs["allclose"] else "NO") + f" ({vs['max_abs_diff']:.2g})"


def _pct(x: Optional[float], ref: Optional[float]) -> str:
    if x is None or not ref:
        return "-"
    return f"{(x - ref) / ref * 100:+.1f}%"


def summary_rows(report: Dict[str, Any]) -> List[List[str]]:
    ref_name = report["reference_recipe"]
    recipes = report["recipes"]
    ref = recipes.get(ref_name) if recipes.get(ref_name, {}).get("ok") else None
    fixed = report["args"]["schedule"] == "fixed"
    rows = []
    for name, res in recipes.items():
        if not res.get("ok"):
            rows.append([name, "FAILED: " + str(res.get("error"))[:80]] + [""] * 8)
            continue
        drift = _drift(res["frozen_max_abs_change"])
        if name == "full":
            drift += " *"
        rows.append([
            name,
            _ms(res["median_step_s"]),
            _ms(res["median_iter_s"]),
            _mib(res["peak_memory_bytes"]),
            _pct(res["peak_memory_bytes"], ref and ref["peak_memory_bytes"]),
            _mib(res["state_bytes"]),
            _mib(res["grad_bytes"]),
            drift,
            _agree(res),
        ])
    return rows


def summary_header(report: Dict[str, Any]) -> List[str]:
    ref = report["reference_recipe"]
    mem = "peak RSS MiB"
    if any(r.get("peak_memory_kind") == "cuda_max_memory_allocated" for r in report["recipes"].values()):
        mem = "peak CUDA MiB"
    return ["recipe", "step ms", "iter ms", mem, f"vs {ref}", "state MiB", "grads MiB",
            "frozen drift", f"= {ref}"]


def stage_rows(report: Dict[str, Any]) -> List[List[str]]:
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
                _ms(st["median_step_s"]),
                _ms(st["median_iter_s"]),
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


def describe_run(report: Dict[str, Any]) -> str:
    m = report.get("model") or {}
    mach = report["machine"]
    args = report["args"]
    n = report.get("param_elements") or 0
    fz = report.get("frozen_elements") or 0
    threads = next((r.get("threads") for r in report["recipes"].values() if r.get("ok")), None)
    what = "frozen" if args["schedule"] == "fixed" else "frozen in stage 1"
    parts = [
        f"model: {m.get('name')} [{m.get('size')}], {n / 1e6:.1f}M params in "
        f"{report.get('param_tensors')} tensors, {fz / max(n, 1) * 100:.0f}% {what}",
        f"data: batch {m.get('batch_size')} x seq {m.get('seq_len')}, seed {args['seed']}; "
        f"AdamW lr {args['lr']:g}, weight decay {args['weight_decay']:g}; torch optimizer impl: "
        f"{args['torch_impl']}",
        f"schedule: {args['schedule']}, {args['warmup']} warm-up + {args['steps']} timed steps"
        + (" per stage" if args["schedule"] != "fixed" else "") + ", one fresh process per recipe",
        f"machine: {mach.get('cpu')}, {threads} torch threads, device {args['device']}, "
        f"torch {mach.get('torch')}, python {mach.get('python')}",
    ]
    return "\n".join(parts)


NOTES_FIXED = (
    "step/iter ms: medians over the timed steps (warm-up excluded); iter = forward + backward + "
    "step + zero_grad.\n"
    "peak RSS: the worker process's VmHWM (includes the Python + torch runtime, ~{base:.0f} MiB "
    "before the model is built).\n"
    "state/grads: bytes of optimizer state and of .grad tensors after backward.\n"
    "frozen drift: largest |change| of any frozen parameter over the run"
    " (* 'full' freezes nothing: the would-be frozen params moved this far).\n"
    "= {ref}: final weights of every parameter vs the '{ref}' run (torch.allclose rtol={rtol:g}, "
    "atol={atol:.2g}: {atol_rule}; max |diff| in brackets)."
)

NOTES_GRADUAL = (
    "gradual unfreezing: head only -> top 2 blocks -> everything. 'change ms' is the stage change "
    "(new optimizer, or unfreeze); 'head state' tells whether the classifier's AdamW state survived "
    "it.\n"
    "requires_grad keeps one optimizer over all params (torch skips params whose grad is None), so it "
    "needs no rebuild; filtered and lr0 must build a new optimizer at every stage.\n"
    "state/grads (top table): the largest over the stages. frozen drift: largest |change| of a "
    "param while it was frozen (* 'full' freezes nothing). = {ref}: final weights vs "
    "'{ref}' (the torch recipe that keeps its state), torch.allclose rtol={rtol:g}, "
    "atol={atol:.2g}: {atol_rule}."
)


def notes(report: Dict[str, Any]) -> str:
    ok = [r for r in report["recipes"].values() if r.get("ok")]
    base = min((r["baseline_rss_bytes"] for r in ok), default=0) / MiB
    tmpl = NOTES_FIXED if report["args"]["schedule"] == "fixed" else NOTES_GRADUAL
    tol = {"atol_rule": "", **report["tolerance"]}
    if tol.get("atol") is None:
        tol["atol"] = float("nan")
    return tmpl.format(base=base, ref=report["reference_recipe"], **tol)


def render_text(report: Dict[str, Any]) -> str:
    out = [describe_run(report), "", format_table(summary_header(report), summary_rows(report))]
    if report["args"]["schedule"] != "fixed":
        out += ["", format_table(STAGE_HEADER, stage_rows(report))]
    out += ["", notes(report)]
    return "\n".join(out)


def render_markdown(report: Dict[str, Any]) -> str:
    out = ["```", describe_run(report), "```", "",
           format_markdown(summary_header(report), summary_rows(report))]
    if report["args"]["schedule"] != "fixed":
        out += ["", format_markdown(STAGE_HEADER, stage_rows(report))]
    out += ["", notes(report).replace("\n", "  \n"), ""]
    return "\n".join(out)


# -- chart ------------------------------------------------------------------------------------

def write_chart(report: Dict[str, Any], path: str) -> Optional[str]:
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
    names = [n for n, _ in recipes]
    colors = [COLORS.get(n, "#777777") for n in names]
    gradual = report["args"]["schedule"] != "fixed"
    ncols = 4 if gradual else 3
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 0.55 * len(names) + 2.6), sharey=True)
    y = list(range(len(names)))

    def bars(ax, values, title, unit, fmt="{:.1f}"):
        ax.barh(y, values, color=colors, edgecolor="black", linewidth=0.4)
        top = max(values) if values else 1
        for yi, v in zip(y, values):
            ax.text(v + top * 0.01, yi, fmt.format(v), va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(unit, fontsize=9)
        ax.set_xlim(0, top * 1.22 if top > 0 else 1)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=9)

    step = [r["median_step_s"] * 1e3 for _, r in recipes]
    it = [r["median_iter_s"] * 1e3 for _, r in recipes]
    fmt_step = "{:.2f}" if max(step) < 10 else "{:.1f}"
    bars(axes[0], step, "optimizer step (median)", "ms", fmt_step)
    bars(axes[1], it, "whole iteration (median)", "ms", "{:.1f}" if max(it) >= 10 else "{:.2f}")

    ax = axes[2]
    cuda = any(r.get("peak_memory_kind") == "cuda_max_memory_allocated" for _, r in recipes)
    peak = [r["peak_memory_bytes"] / MiB for _, r in recipes]
    if cuda:
        bars(ax, peak, "peak memory (CUDA allocated)", "MiB")
    else:
        base = [r["baseline_rss_bytes"] / MiB for _, r in recipes]
        extra = [p - b for p, b in zip(peak, base)]
        ax.barh(y, base, color="#dddddd", edgecolor="black", linewidth=0.4, label="runtime before model")
        ax.barh(y, extra, left=base, color=colors, edgecolor="black", linewidth=0.4,
                label="model + training")
        top = max(peak)
        for yi, p, e in zip(y, peak, extra):
            ax.text(p + top * 0.01, yi, f"{p:.0f} (+{e:.0f})", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.3)
        ax.set_title("peak RSS (process high-water mark)", fontsize=10)
        ax.set_xlabel("MiB  (grey: python + torch before the model)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=9)

    if gradual:
        ax = axes[3]
        stage_names = [st["stage"] for st in recipes[0][1]["stages"]]
        shades = ["#cfd8dc", "#90a4ae", "#546e7a"]
        left = [0.0] * len(names)
        for si, sname in enumerate(stage_names):
            vals = [r["stages"][si]["wall_s"] for _, r in recipes]
            ax.barh(y, vals, left=left, color=shades[si % len(shades)], edgecolor="black",
                    linewidth=0.4, label=sname)
            left = [a + b for a, b in zip(left, vals)]
        top = max(left)
        for yi, (_, r) in zip(y, recipes):
            kept = [st["state_survived"] for st in r["stages"][1:]]
            tag = "state kept" if all(kept) else "state LOST"
            ax.text(left[yi] + top * 0.01, yi, f"{left[yi]:.1f}s, {tag}", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.6)
        ax.set_title("gradual unfreezing: time per stage", fontsize=10)
        ax.set_xlabel("s", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)

    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names)
    axes[0].invert_yaxis()
    m = report.get("model") or {}
    n = report.get("param_elements") or 0
    fz = report.get("frozen_elements") or 0
    threads = next((r.get("threads") for _, r in recipes), None)
    fig.suptitle(
        f"frozenopt-bench: {m.get('name')} [{m.get('size')}], {n / 1e6:.1f}M params, "
        f"{fz / max(n, 1) * 100:.0f}% frozen{' at start' if gradual else ''}; "
        f"{report['args']['steps']} steps{' per stage' if gradual else ''}, "
        f"{report['args']['device']} x{threads} threads, torch {report['machine'].get('torch')}",
        fontsize=10.5)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return None
