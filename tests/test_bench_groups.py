"""benchmarks/bench_groups.py runs end to end (--quick) and writes its JSON. No timing asserts."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_groups_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench_groups.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_groups.py"), "--quick", "--repeats", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "target:" in proc.stdout
    report = json.loads(out.read_text())
    assert report["groups"] == [1, 24, 100, 465] and report["tensors"] >= 465
    assert [r["optimizer"] for r in report["results"]] == ["AdamW", "SGD(momentum=0.9)"]
    for r in report["results"]:
        names = list(r["contenders"])
        assert names == [f"frozenopt_{n}" for n in report["groups"]] + [f"torch_fused_{n}" for n in report["groups"]]
        assert set(r["ratio_to_reference"]) == set(names[1:])
        assert set(r["torch_over_frozenopt"]) == {str(n) for n in report["groups"]}
        for c in r["contenders"].values():
            assert len(c["times_ms"]) == 2 and c["median_ms"] > 0
        assert set(r["target"]) >= {"text", "bound", "value", "met"}


def test_bench_groups_refuses_more_groups_than_params(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_groups.py"), "--quick", "--groups", "1,5000",
         "--out", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2 and "need at least as many params" in proc.stderr
