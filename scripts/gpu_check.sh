#!/usr/bin/env bash
# The prepared device check: everything frozenopt wants to know from a
# machine with an NVIDIA GPU, in one command, in under 8 minutes, written to a
# folder (at most 8 files). Made for a bare machine with no network that
# already holds Python, a CUDA build of torch, nvcc, pytest, compute-sanitizer:
#
#   OUT=<folder> scripts/gpu_check.sh        (default folder: build/gpu_check)
#
# Phases, each under a timeout (whatever a phase printed before its timeout
# is kept), each recorded in gpu_check.json:
#   env        nvidia-smi, Python, torch, CUDA, driver, SM count, setuptools,
#              ninja, nvcc, compute-sanitizer, ncu                  -> env.txt
#   build      setup.py build_ext --inplace for sm_90 only (no pip), MAX_JOBS=16,
#              ptxas -v (registers, spills, summarised at the end), then the
#              CUDA kernels checked to be registered                 -> build.log
#   tests      the CUDA column (-m cuda) of tests/test_cuda_gpu.py, test_parity.py, test_opcheck.py -> tests.log
#   probe      scripts/gpu_probe.py: every GPU check and the measurements
#                                                                    -> probe.json, probe.log
#   sanitizer  compute-sanitizer racecheck, then memcheck, on a tiny run of
#              the kernels (probe --tiny)                            -> sanitizer.log
# Without a GPU it runs env and the probe's listing, says so in one line and
# exits 0. Otherwise the exit status is 0 when every phase passed.
#
# Environment: OUT, PYTHON (default python3), GPU_CHECK_SECONDS (the whole
# run's budget, default 460), TORCH_CUDA_ARCH_LIST (default 9.0),
# GPU_CHECK_COMMIT (the commit to record when the tree has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
budget=${GPU_CHECK_SECONDS:-460}
# The commit checked: GPU_CHECK_COMMIT (a copy of the tree without .git), else git's HEAD.
commit=${GPU_CHECK_COMMIT:-$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)}
start=$(date +%s)
phases=()

elapsed() { echo $(( $(date +%s) - start )); }
say() { echo "gpu_check [$(elapsed)s]: $*"; }

# phase NAME CAP RESERVE LOG CMD...: runs CMD with its output in LOG, for at
# most CAP seconds and never into the last RESERVE seconds of the budget;
# records name, exit status, seconds and timeout in gpu_check.json.
phase() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local left=$(( budget - $(elapsed) - reserve ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    say "$name: skipped, no time left"
    phases+=("$name" skipped 0 0)
    write_summary
    return 99
  fi
  say "$name: up to ${limit}s"
  local t0=$(date +%s)
  # bash -c: CMD may be one of the functions below (exported); timeout
  # signals the whole process group it makes.
  timeout --kill-after=10 "$limit" bash -c '"$@"' phase "$@" >>"$out/$log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  local status=pass
  (( rc == 124 || rc == 137 )) && status=timeout
  (( rc != 0 && rc != 124 && rc != 137 )) && status=fail
  phases+=("$name" "$status" "$rc" "$took")
  say "$name: $status (exit $rc, ${took}s)"
  write_summary
  return $rc
}

write_summary() {
  "$py" scripts/gpu_check_report.py summary "$out/gpu_check.json" "$commit" \
    "$(elapsed)" ${phases[@]+"${phases[@]}"}
}

environment() {
  nvidia-smi || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null
  "$py" scripts/gpu_check_report.py env
  nvcc --version 2>/dev/null | tail -n 2
}

export py out
export -f environment
gpu=$("$py" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
phase env 30 0 env.txt environment
if [ "$gpu" != 1 ]; then
  phase probe-list 60 0 probe.log "$py" scripts/gpu_probe.py --list
  say "no GPU visible to $py (torch.cuda.is_available() is not True): ran env and the probe's listing only; nothing built, tested or measured"
  exit 0
fi

# The build: in place, for this machine's GPU only.
build() {
  export MAX_JOBS=16 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas -v"
  "$py" setup.py build_ext --inplace && "$py" scripts/check_cuda_build.py --from .
}
export -f build
if ! phase build 270 140 build.log build; then
  say "build failed: the later phases need it; see $out/build.log"
  exit 1
fi
"$py" scripts/gpu_check_report.py ptxas "$out/build.log" | tee -a "$out/build.log"

status=0
# The CUDA column of the device-parametrised tests (-m cuda) and the GPU-only cases.
phase tests 150 120 tests.log "$py" -m pytest -q -rfEs -p no:cacheprovider -m cuda tests/test_cuda_gpu.py tests/test_parity.py tests/test_opcheck.py tests/test_rows.py || status=1
phase probe 200 50 probe.log "$py" scripts/gpu_probe.py --out "$out/probe.json" || status=1
sanitize() {
  local failed=0
  for tool in racecheck memcheck; do
    echo "== compute-sanitizer --tool $tool (frozenopt's kernels only)"
    timeout 45 compute-sanitizer --tool "$tool" --kernel-name kns=frozenopt --error-exitcode 3 --print-limit 20 \
      "$py" scripts/gpu_probe.py --tiny
    local rc=$?
    echo "== $tool: exit $rc"
    (( rc == 0 )) || failed=1
  done
  return $failed
}
export -f sanitize
phase sanitizer 100 0 sanitizer.log sanitize || status=1
say "done: $(ls "$out" | tr '\n' ' ')"
exit $status
