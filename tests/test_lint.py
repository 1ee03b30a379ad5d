"""The code's habits, checked by the test command: ruff (ruff.toml) on the Python
code, clang-format (.clang-format) on the C++/CUDA sources. ./run.sh installs
both at pinned versions (their rules change between releases)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name):
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed here (./run.sh installs it)")
    return path


def _tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return out.stdout.split()


def test_ruff_passes():
    out = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cpp_sources_are_clang_formatted():
    files = _tracked("*.cpp", "*.h", "*.cu", "*.cuh")
    assert files, "no C++ sources found"
    out = subprocess.run([_tool("clang-format"), "--dry-run", "--Werror", *files], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-4000:]
