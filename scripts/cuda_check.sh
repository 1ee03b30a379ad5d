#!/usr/bin/env bash
# CI check of the CUDA build, on a machine without a GPU:
#   1. a second venv (.venv-cuda) with torch 2.14.1, the CUDA 13.0 build on
#      this machine's disk (pinned: never an unpinned torch);
#   2. frozenopt built with its CUDA kernels (FORCE_CUDA=1) against
#      /usr/local/cuda, from a copy of the sources in build/cuda-src, installed
#      non-editable into .venv-cuda, so the checkout's CPU build is untouched;
#   3. the build imported, its CUDA kernels checked to be registered for the
#      CUDA dispatch key;
#   4. the test suite run against that build, from a copy of the checkout
#      without frozenopt/ (so the checkout's package does not shadow the
#      installed one). The GPU tests skip themselves; the rest runs on the CPU.
# Environment: FROZENOPT_CUDA_VENV (default .venv-cuda), CUDA_HOME (default
# /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 8.0;9.0 here, for speed),
# FROZENOPT_CUDA_CHECK_PYTEST (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$(date +%s)
venv=${FROZENOPT_CUDA_VENV:-.venv-cuda}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
say() { echo "cuda_check [$(( $(date +%s) - start ))s]: $*" >&2; }

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_check: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi

# 1. The environment.
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$(cd "$venv" && pwd)/bin/python"
if ! "$py" -c "import torch, pybind11, ninja, pytest, hypothesis, numpy, expecttest, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  say "installing torch==2.14.1 (CUDA 13.0 build) and the test tools into $venv"
  {
    "$py" -m pip install -q --upgrade pip setuptools wheel
    "$py" -m pip install -q torch==2.14.1 pybind11 ninja pytest hypothesis numpy expecttest
  } 2>&1 | { grep -vE "Location '.*' is ignored" || true; } >&2
  "$py" -c "import torch" || { echo "cuda_check: installing torch==2.14.1 into $venv failed" >&2; exit 1; }
fi
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$py" -c "import torch, sys; sys.exit(torch.version.cuda is None)" || { echo "cuda_check: $venv's torch is not a CUDA build" >&2; exit 1; }

# 2. The build, from a synchronised copy of the sources (unchanged files keep
# their times, so ninja recompiles only what changed).
say "syncing the sources into build/cuda-src"
"$py" scripts/copy_tree.py sources "$root" "$root/build/cuda-src"
say "building frozenopt with CUDA (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0})"
(
  cd build/cuda-src
  CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}" \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" \
  FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} \
    "$py" -m pip install -q --no-build-isolation --no-deps --force-reinstall . 2>&1 \
    | { grep -vE "Location '.*' is ignored" || true; } >&2
) || { echo "cuda_check: the CUDA build failed" >&2; exit 1; }

# 3. Import it from outside the checkout and check the registrations.
say "checking the installed build"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && "$py" "$root/scripts/check_cuda_build.py" --not-from "$root")

# 4. The test suite against the installed CUDA build, from a copy of the
# checkout without frozenopt/ (tests read README.md, examples/, benchmarks/
# beside them; the package itself must come from .venv-cuda).
say "running the test suite against it"
"$py" scripts/copy_tree.py tests "$root" "$work/tree"
status=0
(cd "$work/tree" && FROZENOPT_SHIM_BUILD="$root/build/cuda_shim" \
  "$py" -m pytest -q -p no:cacheprovider ${FROZENOPT_CUDA_CHECK_PYTEST:-} tests) || status=$?
say "done (pytest exit $status)"
exit $status
