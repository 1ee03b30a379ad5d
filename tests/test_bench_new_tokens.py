"""frozenopt-bench --scenario new-tokens on the tiny built-in model: two tokens added, only their
embedding rows and the classifier train, under frozenopt's row freezing and today's workarounds."""

from __future__ import annotations

import json
import sys
import types

import pytest

from frozenopt.bench import report
from frozenopt.bench.__main__ import main
from frozenopt.bench.recipes import peft_tokens_missing, scenario_recipes

RECIPES = ["frozenopt-rows", "copy-back", "grad-hook", "peft-tokens"]
VOCAB, HIDDEN = 1000, 64  # the tiny model's vocabulary before the two tokens, and its width
STEPS = 2


def _run(out, *extra):
    rc = main(["--scenario", "new-tokens", "--size", "tiny", "--steps", str(STEPS), "--warmup", "1",
               "--rounds", "1", "--quiet", "--no-chart", "--out", str(out), "--name", "run", *extra])
    with open(out / "run.json") as fh:
        return rc, json.load(fh)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bench"))


def _ran(rep, name):
    res = rep["recipes"][name]
    if res.get("skipped"):
        pytest.skip(f"{name} skipped here: {res['skipped']}")
    assert res["ok"], (res.get("error"), res.get("stderr_tail"))
    return res


def test_every_recipe_runs_or_is_skipped_with_its_reason(bench):
    rc, rep = bench
    assert rc == 0
    assert scenario_recipes("new-tokens", default_only=True) == RECIPES
    assert list(rep["recipes"]) == RECIPES
    assert rep["scenario"] == "new-tokens" and rep["reference_recipe"] == "copy-back"
    new = rep["model"]["new_tokens"]
    assert new == {"param": "embeddings.word.weight", "old": VOCAB, "new_ids": [VOCAB, VOCAB + 1],
                   "tokens": ["<good>", "<bad>"]}
    for name, res in rep["recipes"].items():
        assert res.get("ok") or (name == "peft-tokens" and res["skipped"] == peft_tokens_missing()), name
    # every recipe trains the same thing: the first loss, before any step, is the same everywhere
    assert len({res["losses"][0] for res in rep["recipes"].values() if res.get("ok")}) == 1


@pytest.mark.parametrize("name", ["frozenopt-rows", "copy-back", "peft-tokens"])
def test_old_rows_bitwise_unchanged_and_new_rows_learn(bench, name):
    res = _ran(bench[1], name)
    assert res["old_rows_bitwise_unchanged"] is True and res["old_rows_max_abs_change"] == 0.0
    assert res["new_rows_max_abs_change"] > 0
    assert res["frozen_bitwise_unchanged"] is True  # the rest of the model, frozen whole


def test_grad_hook_lets_weight_decay_move_the_old_rows(bench):
    res = _ran(bench[1], "grad-hook")
    assert res["old_rows_bitwise_unchanged"] is False
    # AdamW shrinks every row by lr * weight_decay per step: a zero grad is not a None grad
    assert 0 < res["old_rows_max_abs_change"] < 1e-3
    assert res["new_rows_max_abs_change"] > 0


def test_state_rows_and_bytes(bench):
    rep = bench[1]
    full = _ran(rep, "copy-back")
    assert full["embedding_state_rows"] == VOCAB + 2
    assert _ran(rep, "grad-hook")["state_bytes"] == full["state_bytes"]
    # two AdamW moments of fp32 over the whole embedding
    assert full["state_bytes"] >= 2 * 4 * (VOCAB + 2) * HIDDEN
    rows = _ran(rep, "frozenopt-rows")
    assert rows["embedding_state_rows"] == 2
    assert rows["state_bytes"] < full["state_bytes"] / 50


def test_frozenopt_rows_trains_what_copy_back_trains(bench):
    # same AdamW arithmetic, the same rows trained: the same weights, bit for bit
    vs = _ran(bench[1], "frozenopt-rows")["vs_reference"]
    assert vs["same_arithmetic"] and vs["bitwise_equal"], vs


def test_peft_tokens_state_is_its_own_small_param(bench):
    res = _ran(bench[1], "peft-tokens")
    assert res["embedding_state_rows"] == 2
    assert res["vs_reference"]["allclose"], res["vs_reference"]


def test_report_has_the_scenario_columns(bench):
    rep = bench[1]
    header = report.summary_header(rep)
    assert header[7:] == ["state KiB", "state rows", "grads KiB", "old rows drift", "new rows moved", "rest drift",
                          "= copy-back"]
    rows = {row[0]: dict(zip(header, row)) for row in report.summary_rows(rep)}
    assert rows["copy-back"]["state rows"] == str(VOCAB + 2) and rows["copy-back"]["old rows drift"] == "0"
    assert rows["grad-hook"]["old rows drift"] != "0"
    text = report.render_text(rep)
    assert "embeddings.word.weight grew from 1000 rows" in text
    assert "a zero grad is not a None grad" in text


def test_missing_peft_is_skipped_with_a_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import now fails
    rc, rep = _run(tmp_path, "--recipes", "copy-back", "peft-tokens")
    assert rc == 0
    assert rep["recipes"]["peft-tokens"] == {"recipe": "peft-tokens", "ok": False,
                                             "skipped": "peft is not installed (pip install peft)"}
    assert rep["recipes"]["copy-back"]["ok"]
    md = (tmp_path / "run.md").read_text()
    assert "| peft-tokens | skipped: peft is not installed (pip install peft) |" in md


def test_old_peft_without_trainable_tokens_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", types.SimpleNamespace(__version__="0.10.0"))
    assert peft_tokens_missing().startswith("peft 0.10.0 has no trainable-tokens layer")


@pytest.mark.parametrize("extra", [["--freeze", "encoder"], ["--schedule", "gradual"], ["--recipes", "filtered"]])
def test_layer_options_do_not_apply(tmp_path, extra):
    with pytest.raises(SystemExit):
        main(["--scenario", "new-tokens", "--size", "tiny", "--out", str(tmp_path), *extra])
    assert not list(tmp_path.iterdir())
