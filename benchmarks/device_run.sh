#!/usr/bin/env bash
# One call on the GPU machine: build with the CUDA kernels, run the whole test suite (CUDA
# tests included), the sanitizers on the CUDA tests, then the benchmarks named in $BENCH.
# Logs land in $OUT (or ./device_logs). Usage: benchmarks/device_run.sh [stage ...]
# stages: build tests sanitize bench (default: all)
set -uo pipefail
OUT=${OUT:-$PWD/device_logs}
mkdir -p "$OUT"
stages=${*:-build tests sanitize bench}
export PYTHONUNBUFFERED=1 PYRAMID_KV_CUDA=ON
# The image sets CXX to /opt/gcc, which links libstdc++ statically: a module built with it
# crashes when its C++ streams meet torch's. Build with the system g++ like torch itself.
export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
# Models and data travel in .shared/ (carried; ../shared does not reach the GPU machine).
[[ -d .shared ]] && export PYRAMID_KV_SHARED=${PYRAMID_KV_SHARED:-$PWD/.shared}
log() { echo "== $* ($(date +%T))"; }

if [[ " $stages " == *" build "* ]]; then
  log build
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  python3 -m pyramid_kv info
fi
if [[ " $stages " == *" tests "* ]]; then
  log tests
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -rs -p timeout --timeout 150 tests ${PYTEST_ARGS:-} \
    2>&1 | tee "$OUT/tests.log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -25
fi
if [[ " $stages " == *" sanitize "* ]]; then
  # memcheck: every kernel test but the large ones; racecheck (slow): the shared-memory kernels
  # on one case per strategy / path (synccheck, if asked for, on the same cases).
  kernels="tests/test_select.py tests/test_compact.py tests/test_ensemble_scores.py tests/test_merge.py tests/test_merged_attention.py tests/test_errors.py tests/test_opcheck.py"
  race="(strategies and dtype0) or unstaged or tensor_core or inplace_many_tiles or row_sizes or merged_race"
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    log "compute-sanitizer $tool"
    if [[ $tool == memcheck ]]; then sel="not large and not torch_compile"; else sel="$race"; fi
    PYRAMID_KV_EXAMPLES=3 timeout ${SANITIZE_TIMEOUT:-240} compute-sanitizer --tool $tool \
      --error-exitcode 99 --print-limit 20 python3 -m pytest -q -m cuda -k "$sel" $kernels \
      > "$OUT/sanitize_$tool.log" 2>&1
    echo "exit $? ($tool)"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitize_$tool.log" | tail -3
  done
fi
if [[ " $stages " == *" bench "* ]]; then
  for b in ${BENCH:-}; do
    log "bench $b"
    timeout ${BENCH_TIMEOUT:-180} python3 "benchmarks/bench_$b.py" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/bench_$b.log" | tail -${BENCH_TAIL:-30}
  done
  tar czf "$OUT/results.tgz" benchmarks/results/*.json 2>/dev/null || true  # $OUT keeps <= 8 files
fi
log done
