#!/usr/bin/env bash
# CI check of the source distribution: `python -m build --sdist`, a wheel built
# from that sdist alone, the wheel installed into a throwaway venv that shares
# the given venv's torch, then imported from a folder holding a directory named
# frozenopt (a clone's name), and one step run.
#   scripts/sdist_check.sh [VENV]   (default .venv, as ./run.sh makes it)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
py="$(cd "$venv" && pwd)/bin/python"
# Looked up by its installed metadata: with an editable install in compat mode the
# checkout's own build/ folder would pass for an importable "build".
"$py" -c "from importlib.metadata import version; version('build')" 2>/dev/null || "$py" -m pip install -q "build>=1"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m build --sdist --no-isolation -o "$work/dist" . >/dev/null
sdist=$(ls "$work"/dist/frozenopt-*.tar.gz)
echo "sdist_check: $(basename "$sdist"), $(tar tzf "$sdist" | grep -c '^[^/]*/csrc/.*[^/]$') files under csrc/" >&2
# The wheel from the unpacked sdist only: whatever MANIFEST.in leaves out fails here.
tar xzf "$sdist" -C "$work"
MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" "$work"/frozenopt-*/
"$py" -m venv --system-site-packages --without-pip "$work/venv"
site_of() { "$1" -c "import site; print(site.getsitepackages()[0])"; }
throwaway_site=$(site_of "$work/venv/bin/python")
# The throwaway venv sees $venv's packages (torch) through a .pth, and its own frozenopt first.
site_of "$py" >"$throwaway_site/base.pth"
"$py" -m pip install -q --no-deps --target "$throwaway_site" "$work"/dist/frozenopt-*.whl
mkdir -p "$work/clone-parent/frozenopt"
cd "$work/clone-parent"
"$work/venv/bin/python" -c '
import frozenopt, torch
assert "site-packages" in frozenopt.__file__, frozenopt.__file__
w = torch.nn.Parameter(torch.ones(3))
opt = frozenopt.AdamW([w], lr=0.1)
w.grad = torch.ones(3)
opt.step()
assert not torch.equal(w.detach(), torch.ones(3))
print(f"sdist_check: the wheel built from the sdist imports from {frozenopt.__file__} and steps: OK")'
