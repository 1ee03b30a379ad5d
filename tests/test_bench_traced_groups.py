"""benchmarks/bench_traced_groups.py runs end to end on tiny sizes. No timing asserts."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_traced_groups_runs_and_counts_recompiles():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_traced_groups.py"), "--groups", "3", "--tensors", "6",
         "--numel", "16", "--edit-steps", "3", "--repeats", "1", "--inner", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    frames = {line.split(":")[0].strip(): int(line.split(":")[1]) for line in lines
              if line.strip().startswith(("per group:", "grouped:")) and "ms" not in line}
    assert frames["grouped"] == 0, proc.stdout  # editing the groups' values compiles nothing again
    assert frames["per group"] > 0, proc.stdout  # what the float arguments cost
    assert "grouped / per group:" in proc.stdout and "load average after" in proc.stdout
