"""The two copies of the checkout that scripts/cuda_check.sh works from.

    python scripts/copy_tree.py sources SRC DST
        A synchronised copy of what the build needs (setup.py, pyproject.toml,
        README.md, csrc/, frozenopt/): changed files are copied, unchanged ones
        keep their times (so ninja recompiles only what changed), and files
        gone from SRC go from DST too.

    python scripts/copy_tree.py tests SRC DST
        A copy of the checkout without frozenopt/ (nor build outputs or
        virtual environments), so tests run from it import the installed
        package, not the checkout's.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
from pathlib import Path

BUILD_INPUTS = ["setup.py", "pyproject.toml", "README.md", "csrc", "frozenopt"]
NOT_FOR_TESTS = {"frozenopt", "build", ".git", ".pytest_cache", ".hypothesis", "__pycache__"}


def _is_output(path: Path) -> bool:
    return "__pycache__" in path.parts or path.suffix == ".so"


def sync_sources(src: Path, dst: Path) -> None:
    keep = set()
    for name in BUILD_INPUTS:
        root = src / name
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(src)
            if _is_output(rel):
                continue
            keep.add(rel)
            out = dst / rel
            if not out.exists() or not filecmp.cmp(f, out, shallow=False):
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)
    for name in BUILD_INPUTS:
        root = dst / name
        if not root.exists():
            continue
        for f in [root] if root.is_file() else list(root.rglob("*")):
            if f.is_file() and not _is_output(f) and f.relative_to(dst) not in keep:
                f.unlink()


def copy_for_tests(src: Path, dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name in NOT_FOR_TESTS or entry.name.startswith(".venv") or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name, ignore=ignore, symlinks=True)
        elif entry.is_file():
            shutil.copy2(entry, dst / entry.name)


def main(argv: list[str]) -> int:
    modes = {"sources": sync_sources, "tests": copy_for_tests}
    if len(argv) != 3 or argv[0] not in modes:
        print(__doc__, file=sys.stderr)
        return 2
    modes[argv[0]](Path(argv[1]), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
