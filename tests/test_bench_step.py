"""benchmarks/bench_step.py runs end to end (--quick) and writes its JSON. No timing asserts."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_step_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench_step.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--quick", "--repeats", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "target:" in proc.stdout
    report = json.loads(out.read_text())
    for key in ("tool", "command", "quick", "repeats", "machine", "results", "all_targets_met", "wall_s"):
        assert key in report, key
    assert report["quick"] is True and report["repeats"] == 2
    got = {(r["case"], r["optimizer"]) for r in report["results"]}
    assert got == {(c, o) for c in "abcde" for o in ("AdamW", "SGD(momentum=0.9)")}
    for r in report["results"]:
        for key in ("title", "tensors", "elements", "frozen_fraction", "reference", "contenders",
                    "ratio_to_reference", "target"):
            assert key in r, key
        names = list(r["contenders"])
        assert names[0] == r["reference"]
        if r["case"] == "c":
            assert {"frozenopt_only_unfrozen", "torch_fused_only_unfrozen"} <= set(names)
        elif r["case"] == "e":
            assert names == ["sync_check", "frozenopt"]
        else:
            assert {"torch_fused", "torch_foreach"} <= set(names)
        for c in r["contenders"].values():
            assert len(c["times_ms"]) == 2 and c["median_ms"] > 0
        assert set(r["ratio_to_reference"]) == set(names[1:])
        assert set(r["target"]) >= {"text", "bound", "value", "met"}
        assert isinstance(r["target"]["met"], bool)
