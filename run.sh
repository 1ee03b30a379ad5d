#!/usr/bin/env bash
# Set up frozenopt from a clean clone and run it:
#   ./run.sh bench [frozenopt-bench args]   the main job: freezing recipes compared side by side
#   ./run.sh test  [pytest args]            the whole test suite
# The first run makes .venv (torch 2.13.0, the CPU build on this machine's
# disk, pinned so no CUDA build is fetched) and compiles the extension; later
# runs rebuild only when csrc/ or setup.py changed.
set -euo pipefail
cd "$(dirname "$0")"
venv=${FROZENOPT_VENV:-.venv}
torch_spec=${FROZENOPT_TORCH:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# lightning, transformers and accelerate: the examples' tests run them (torch stays pinned).
if ! "$py" -c "import torch, pybind11, ninja, pytest, hypothesis, matplotlib, lightning, transformers, accelerate" 2>/dev/null; then
  "$py" -m pip install -q --upgrade pip setuptools wheel
  "$py" -m pip install -q "$torch_spec" pybind11 ninja pytest hypothesis numpy matplotlib lightning transformers accelerate
fi
scripts/build.sh "$venv"

what=${1:-}
[ $# -gt 0 ] && shift
case "$what" in
  bench) exec "$venv/bin/frozenopt-bench" "$@" ;;
  test) exec "$py" -m pytest "$@" ;;
  *) echo "usage: ./run.sh bench|test [args]" >&2; exit 2 ;;
esac
