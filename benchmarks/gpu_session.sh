#!/usr/bin/env bash
# Everything we want from one call on a lent GPU machine (10 minutes at most): install lkconv (building lkconv._C),
# run the GPU tests, then benchmark. The machine has torch, triton and nvcc but no network, so nothing is
# downloaded. Logs and results go to $OUT (./out when unset); the benchmark's short table is printed last.
# - GPU_TESTS_TIMEOUT (default 200 s) caps the tests; the benchmark gets what is left of SESSION_SECONDS (default
#   570) and, when time runs out, is interrupted with SIGINT and writes what it measured so far.
# - BENCH_ARGS overrides the benchmark's options (default: the quick preset).
# - LKCONV_GIT_COMMIT names the commit when the tree was copied without .git.
# Plots are redrawn where matplotlib is: fetch $OUT and run `python -m benchmarks report DIR`.
# Usage: LKCONV_GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_session.sh
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

echo "== install (log: $OUT/install.log)"
if ! MAX_JOBS="${MAX_JOBS:-16}" "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e . \
        >"$OUT/install.log" 2>&1; then
    tail -n 30 "$OUT/install.log"
    echo "install failed: nothing else can run" >&2
    exit 1
fi
grep "lkconv:" "$OUT/install.log" || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
echo "install took ${SECONDS}s"

echo "== GPU tests (log: $OUT/gpu_tests.log)"
tests_status=0
timeout "${GPU_TESTS_TIMEOUT:-200}" "$PYTHON" -m pytest -q -m gpu tests/ >"$OUT/gpu_tests.log" 2>&1 || tests_status=$?
tail -n 25 "$OUT/gpu_tests.log"
case "$tests_status" in
    0) echo "GPU tests passed" ;;
    5) echo "GPU tests: none collected (exit 5)" ;;
    124) echo "GPU tests TIMED OUT after ${GPU_TESTS_TIMEOUT:-200}s, see $OUT/gpu_tests.log" ;;
    *) echo "GPU tests FAILED (exit $tests_status), see $OUT/gpu_tests.log" ;;
esac
echo "tests done at ${SECONDS}s"

left=$(( ${SESSION_SECONDS:-570} - SECONDS ))
echo "== benchmark, ${left}s left (results: $OUT/results.{csv,json,md}, log: $OUT/bench.log)"
bench_status=0
# shellcheck disable=SC2086 # BENCH_ARGS is a list of options
timeout -s INT "$left" "$PYTHON" -m benchmarks ${BENCH_ARGS:---preset quick} --strict --no-plots --out "$OUT" \
    2>&1 | tee "$OUT/bench.log" || bench_status=$?

if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ]; then
    exit 1
fi
