#!/usr/bin/env bash
# Everything we want from one call on a lent GPU machine (under 10 minutes), most important first. Each phase has its
# own time limit (SIGINT, then SIGKILL 15 s later): a phase that hangs ends at its cap, the ones after it get what is
# left, and an interrupted benchmark keeps the units it finished:
#   1. install lkconv (builds lkconv._C; pip -v, so nvcc's errors reach the log, and a warning when the cuda backend
#      is missing; if the build fails, once more without it, so the triton half still runs), then compile the Triton
#      kernels the session launches on every core;
#   2. the op benchmark at the issues' shapes (every pass, fp32 and bf16, NCHW and channels_last, lkconv's triton and
#      cuda backends against PyTorch NCHW and channels_last, each lkconv result checked against PyTorch fp32);
#   3. the rest of the quick preset (the paper's Table 1, RepLKNet-31B);
#   4. the GPU tests, compute-sanitizer runs excepted;
#   5. the CPU suite's awkward grid with the triton kernels compiled, then the compute-sanitizer tests.
# The machine has torch, triton and nvcc but no network, so nothing is downloaded. $OUT (./out when unset) gets
# session.log (every phase's output), op/results.{json,csv,md} and rest/results.{json,csv,md}: 7 files, within the
# device tool's 8. Only a compact op table, the tests' summary and the phases' status go to stdout, at the end, within
# the 12,000 characters the device tool's reply keeps.
# - SESSION_SECONDS (default 540, which leaves the summary time inside a 590 s call) is the whole budget. Each phase
#   gets what is left, capped: OP_SECONDS (200), REST_SECONDS (120), TEST_SECONDS (200), GRID_SECONDS (60); the
#   sanitizer tests get the rest. Nothing is held back for a later phase, so a slow install or benchmark shortens the
#   phases after it, never the ones before.
# - LKCONV_GIT_COMMIT names the commit, and "-dirty" a changed tree, when the tree was copied without .git.
# - Each test may take TEST_TIMEOUT seconds (default 120) where pytest-timeout is installed, so that one hung test
#   does not take its phase's whole time.
# Plots are drawn where matplotlib is: fetch $OUT and run `python -m benchmarks report DIR --out ANOTHER` (per folder).
# Usage: LKCONV_GIT_COMMIT=$(git describe --always --dirty --abbrev=40) bash benchmarks/gpu_session.sh
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/out}"
PYTHON="${PYTHON:-python3}"
SESSION_SECONDS="${SESSION_SECONDS:-540}"
mkdir -p "$OUT/op" "$OUT/rest"
LOG="$OUT/session.log"
SUMMARY="$(mktemp -d)"  # the tails printed at the end; not under $OUT, which returns at most 8 files
trap 'rm -rf "$SUMMARY"' EXIT
export PYTHONUNBUFFERED=1
: >"$LOG"

# run_phase NAME SECONDS COMMAND...: runs COMMAND under a time limit with its output appended to the log; skipped
# when less than 10 s are left. Records "NAME: status" for the summary.
run_phase() {
    local name=$1 seconds=$2
    shift 2
    if [ "$seconds" -lt 10 ]; then
        echo "$name: skipped (${seconds}s left)" | tee -a "$SUMMARY/status" >>"$LOG"
        return 0
    fi
    echo "== $name (up to ${seconds}s, started at ${SECONDS}s)" >>"$LOG"
    local status=0
    timeout -s INT -k 15 "$seconds" "$@" >>"$LOG" 2>&1 || status=$?
    case "$status" in
        0) echo "$name: ok (done at ${SECONDS}s)" ;;
        124 | 130 | 137) echo "$name: TIMED OUT after ${seconds}s (exit $status)" ;;
        *) echo "$name: FAILED (exit $status)" ;;
    esac | tee -a "$SUMMARY/status" >>"$LOG"
    return "$status"
}

left() { echo $((SESSION_SECONDS - SECONDS)); }
# capped SECONDS: what is left of the session, at most SECONDS.
capped() { local rest; rest=$(left); echo $((rest < $1 ? rest : $1)); }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$LOG" 2>&1 || echo "(no nvidia-smi)" >>"$LOG"
install=("$PYTHON" -m pip install -v --no-index --no-build-isolation --no-deps -e .)
install_status=0
if ! run_phase install 300 env MAX_JOBS="${MAX_JOBS:-16}" "${install[@]}"; then
    install_status=1
    tail -n 30 "$LOG"
    if ! run_phase "install without lkconv._C" "$(capped 120)" env LKCONV_SKIP_CUDA_BUILD=1 "${install[@]}"; then
        echo "install failed: nothing else can run" >&2
        exit 1
    fi
fi
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$SUMMARY/status" >>"$LOG"
import lkconv
from lkconv.backends import cuda_backend

print("backends:", lkconv.available_backends())
if "cuda" not in lkconv.available_backends():
    print("WARNING: no cuda backend:", cuda_backend.unavailable_reason(), "(the install's nvcc lines are in the log)")
EOF

# Every later phase then finds its Triton kernels compiled (about a second each, over a hundred, otherwise one at a
# time inside the tests and benchmarks). Not fatal: whatever it missed compiles on first use.
run_phase "precompile" "$(capped 120)" "$PYTHON" -m benchmarks precompile || true

bench_status=0
run_phase "op benchmark" "$(capped "${OP_SECONDS:-200}")" \
    "$PYTHON" -m benchmarks --preset quick --suites op --backends triton cuda --strict --no-plots --out "$OUT/op" \
    || bench_status=1
run_phase "table1 and model benchmarks" "$(capped "${REST_SECONDS:-120}")" \
    "$PYTHON" -m benchmarks --preset quick --suites table1 model --strict --no-plots --out "$OUT/rest" \
    || bench_status=1

tests_status=0
# A hung test fails alone where pytest-timeout is installed (the sanitizer's slow runs are left unlimited).
per_test=()
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout="${TEST_TIMEOUT:-120}")
run_phase "GPU tests" "$(capped "${TEST_SECONDS:-200}")" \
    "$PYTHON" -m pytest -q -m "gpu and not sanitizer" -rfE --durations=25 -p no:cacheprovider "${per_test[@]}" tests/ \
    || tests_status=1
# The CPU suite's awkward grid (stride 2, dilation, multipliers, even and non-square kernels, sliced and channels_last
# inputs) with the triton backend compiled instead of interpreted, then compute-sanitizer.
run_phase "awkward grid, compiled triton" "$(capped "${GRID_SECONDS:-60}")" \
    "$PYTHON" -m pytest -q -rfE -p no:cacheprovider "${per_test[@]}" tests/test_numerics.py \
    -k "float64_reference and triton" \
    || tests_status=1
run_phase "sanitizer tests" "$(left)" \
    "$PYTHON" -m pytest -q -m sanitizer -rfE -p no:cacheprovider tests/ || tests_status=1

# What the device tool's reply keeps (its last 12,000 characters): the op table, the tests' summary, each phase's
# status. The phases' own output is in session.log.
echo
"$PYTHON" - "$OUT/op" <<'EOF' || true
import sys
from pathlib import Path

from lkconv.benchmarks import report

rows, _ = report.load(Path(sys.argv[1]))
print(report.compact_table(rows))
EOF
echo
grep -E "^(FAILED|ERROR) |passed|failed" "$LOG" | tail -n 20 | cut -c 1-160
echo
cat "$SUMMARY/status"
echo "session took ${SECONDS}s"
[ "$install_status" -eq 0 ] && [ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
