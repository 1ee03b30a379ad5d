#!/usr/bin/env bash
# The long differential fuzz run of tests/test_fuzz.py:
#   scripts/fuzz.sh [EXAMPLES] [PROCESSES]     default 10000 examples over 2 processes
# Each process runs hypothesis's "fuzz-long" profile with its own seed and
# EXAMPLES/PROCESSES examples; every example is a random model, optimizer and
# 20-200 operations checked against torch.optim after every operation. Prints
# the number of examples that ran to the end, the result and the wall time;
# logs are in $FROZENOPT_FUZZ_LOGS (default build/fuzz). Exit status 0 only
# when every process passed. The processes take turns over the CPU kernel
# builds through ATEN_CPU_CAPABILITY (FROZENOPT_FUZZ_CAPS, default
# "auto avx512 default"; auto = the build frozenopt picks, AVX2 on x86-64).
set -uo pipefail
cd "$(dirname "$0")/.."
examples=${1:-10000}
procs=${2:-2}
py=${FROZENOPT_VENV:-.venv}/bin/python
logs=${FROZENOPT_FUZZ_LOGS:-build/fuzz}
mkdir -p "$logs"
rm -f "$logs"/count.* "$logs"/run.*.log
per=$(( (examples + procs - 1) / procs ))
start=$(date +%s)
seed0=${FROZENOPT_FUZZ_SEED:-$start}
echo "fuzz: $examples examples in $procs processes ($per each), seeds $seed0.., commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- frozenopt csrc || echo '+local changes')"
read -r -a caps <<<"${FROZENOPT_FUZZ_CAPS:-auto avx512 default}"
pids=()
for ((i = 0; i < procs; i++)); do
  cap=${caps[$((i % ${#caps[@]}))]}
  echo "  process $i: seed $((seed0 + i)), ATEN_CPU_CAPABILITY=$cap"
  ( [ "$cap" = auto ] && unset ATEN_CPU_CAPABILITY || export ATEN_CPU_CAPABILITY=$cap
  exec env FROZENOPT_FUZZ_PROFILE=fuzz-long FROZENOPT_FUZZ_EXAMPLES=$per FROZENOPT_FUZZ_COUNT="$logs/count.$i" \
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
    "$py" -m pytest tests/test_fuzz.py::test_differential_fuzz -q -p no:cacheprovider \
    --hypothesis-seed=$((seed0 + i)) --hypothesis-show-statistics >"$logs/run.$i.log" 2>&1 ) &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    status=1
    echo "process $i FAILED; its log: $logs/run.$i.log" >&2
    grep -E "^E |Falsifying|at op|reproduce_failure" "$logs/run.$i.log" | head -20 >&2
  fi
done
end=$(date +%s)
count=$(cat "$logs"/count.* 2>/dev/null | wc -l)
ops=$(cat "$logs"/count.* 2>/dev/null | awk '{s += $1} END {print s + 0}')
result=$([ $status -eq 0 ] && echo PASSED || echo FAILED)
echo "fuzz: $count examples ($ops operations) ran to the end; result $result; wall time $((end - start)) s"
exit $status
