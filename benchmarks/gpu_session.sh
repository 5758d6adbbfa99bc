#!/usr/bin/env bash
# Everything we want from one call on a lent GPU machine: install lkconv, run the GPU tests, then benchmark.
# The machine has torch and triton but no network, so nothing is downloaded. Logs and results go to $OUT
# (./out when unset); the benchmark's short table is the last thing printed. The tests get at most
# GPU_TESTS_TIMEOUT seconds (default 240) so that the benchmark still runs within one call.
# BENCH_ARGS overrides the benchmark's options (default: the quick preset). Plots need matplotlib, which the
# GPU machine lacks: fetch $OUT and run `python -m benchmarks report DIR` here to draw them.
# Usage: bash benchmarks/gpu_session.sh
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

echo "== install (log: $OUT/install.log)"
if ! python -m pip install --no-index --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1; then
    tail -n 30 "$OUT/install.log"
    echo "install failed: nothing else can run" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

echo "== GPU tests (log: $OUT/gpu_tests.log)"
tests_status=0
timeout "${GPU_TESTS_TIMEOUT:-240}" python -m pytest -q -m gpu tests/ >"$OUT/gpu_tests.log" 2>&1 || tests_status=$?
tail -n 25 "$OUT/gpu_tests.log"
case "$tests_status" in
    0) echo "GPU tests passed" ;;
    5) echo "GPU tests: none collected (exit 5)" ;;
    124) echo "GPU tests TIMED OUT after ${GPU_TESTS_TIMEOUT:-240}s, see $OUT/gpu_tests.log" ;;
    *) echo "GPU tests FAILED (exit $tests_status), see $OUT/gpu_tests.log" ;;
esac

echo "== benchmark (results: $OUT/results.{csv,json,md}, log: $OUT/bench.log)"
bench_status=0
# shellcheck disable=SC2086 # BENCH_ARGS is a list of options
python -m benchmarks ${BENCH_ARGS:---preset quick} --strict --out "$OUT" 2>&1 | tee "$OUT/bench.log" || bench_status=$?

if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ]; then
    exit 1
fi
