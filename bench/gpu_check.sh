#!/usr/bin/env bash
# The one prepared GPU check: device facts, the GPU test suite, the CUDA extension (built in the
# background while the tests run, then its own tests), then the Criteo-shape benchmarks.
# About 5-7 minutes on an H100/H200.
# Usage: bash bench/gpu_check.sh [gpu_check.py options, e.g. --vocab-scale 0.1 --sections lookup]
# Env: GPU_TESTS_TIMEOUT (s, default 150), GPU_TEST_WORKERS (pytest-xdist workers, default 8),
#      SFG_FAST_GPU_BUILD_EXT=0 (skip the extension), GPU_CHECK_TIMEOUT (s for the benchmarks, default: what
#      is left of the deadline),
#      GPU_CHECK_DEADLINE (s for the whole script, default 540): every step's timeout is cut to what is
#      left of it, so the script ends inside one device command's limit. CUBLAS_WORKSPACE_CONFIG defaults to
#      :4096:8, as the training job sets it (deterministic runs may then use cuBLAS: sfg_fast/_cublas.py).
# Logs and results go to $OUT when set, else bench/results/gpu-latest/; this script's own output is
# also kept there (run.txt), since a remote runner may return only its tail.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-bench/results/gpu-latest}
mkdir -p "$LOGS"
exec > >(tee -a "$LOGS/run.txt") 2>&1
T0=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE:-540}
# within(S): S, or the seconds left before the deadline (minus a margin for what follows) when fewer
within() { local left=$(( DEADLINE - ($(date +%s) - T0) - ${2:-20} )); [ "$left" -lt 1 ] && left=1;
           [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
# as the training job arranges: cuBLAS repeats bit for bit, so deterministic runs (and tests) may use it
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>&1
"$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| cuda', torch.version.cuda)" 2>&1
# the tree's commit: the device copy of a working tree may carry a stale .git, so the caller's SHA wins
echo "git ${SFG_FAST_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null)}"
# sfg_fast.kernels is mapped onto kernels/ by setup.py, so the package must be installed (editable,
# offline, no dependencies, no extension build: a few seconds).
if ! "$PYTHON" -c "import sfg_fast.kernels" >/dev/null 2>&1; then
  SFG_FAST_BUILD_EXT=0 "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check \
    -q -e . || echo "gpu_check: editable install failed; the Triton backend may be unavailable" >&2
fi
BUILD_PID=
if [ "${SFG_FAST_GPU_BUILD_EXT:-1}" = 1 ]; then
  ( b0=$(date +%s); SFG_FAST_BUILD_EXT=1 MAX_JOBS=6 TORCH_CUDA_ARCH_LIST="9.0" timeout -k 10 "$(within 240 200)" \
      "$PYTHON" setup.py build_ext --inplace >"$LOGS/build.log" 2>&1
    echo "build rc=$? in $(( $(date +%s) - b0 )) s" >>"$LOGS/build.log" ) &
  BUILD_PID=$!
fi
XDIST=()
if "$PYTHON" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n "${GPU_TEST_WORKERS:-8}"); fi
# -v: each test's result is logged as it ends, so a run cut off by its timeout still names what passed
# and failed; a per-test limit (pytest-timeout, where installed) keeps one hung test from taking the rest
PER_TEST=()
if "$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1; then PER_TEST=(--timeout "${GPU_TEST_TIMEOUT_EACH:-90}"); fi
start=$(date +%s)
timeout -k 10 "$(within "${GPU_TESTS_TIMEOUT:-150}" 200)" "$PYTHON" -m pytest -m "gpu or interpreter" -v -rfE \
  --durations=8 -p no:cacheprovider "${XDIST[@]}" "${PER_TEST[@]}" >"$LOGS/tests.log" 2>&1
tests_rc=$?
tests_note="rc=$tests_rc in $(( $(date +%s) - start )) s (124 = timed out); $(tail -1 "$LOGS/tests.log")"
echo "gpu tests: $tests_note"
if [ "$tests_rc" = 124 ]; then    # no summary: the per-test lines
  grep -cE " PASSED " "$LOGS/tests.log" | sed 's/^/passed before the timeout: /'
  grep -E " (FAILED|ERROR) " "$LOGS/tests.log" | head -20
else
  grep -E "^(FAILED|ERROR) " "$LOGS/tests.log" | head -20
fi
grep -A9 -E "slowest [0-9]+ durations" "$LOGS/tests.log" | tail -8
if [ -n "$BUILD_PID" ]; then
  wait "$BUILD_PID"
  build_rc=$(grep -oE "^build rc=[0-9]+" "$LOGS/build.log" | tail -1 | cut -d= -f2)
  grep -iE "error|warning: could not" "$LOGS/build.log" | head -5
  tail -1 "$LOGS/build.log"
  "$PYTHON" -c "from sfg_fast import _C; print('sfg_fast._C WITH_CUDA =', _C.WITH_CUDA)" 2>&1 | tail -1
  timeout -k 10 "$(within 60 150)" "$PYTHON" -m pytest tests/test_cuda_ext.py -v -p no:cacheprovider -rs \
    >"$LOGS/ext_tests.log" 2>&1
  rc=$?
  ext_rc=$rc
  echo "cuda ext tests: rc=$rc"
  grep -E "(FAILED|ERROR|Fatal|line [0-9]+ in test_)" "$LOGS/ext_tests.log" | head -10
  tail -2 "$LOGS/ext_tests.log"
  if [ "$rc" = 139 ] && command -v cuda-gdb >/dev/null; then   # a crash: where, natively
    last=$(grep -oE "test_cuda_ext.py::[a-z_0-9]+" "$LOGS/ext_tests.log" | tail -1)
    timeout -k 10 "$(within 60 150)" cuda-gdb -batch -ex run -ex bt --args "$PYTHON" -m pytest -q -p no:cacheprovider "tests/$last" \
      >"$LOGS/ext_gdb.log" 2>&1
    grep -E "^#[0-9]+" "$LOGS/ext_gdb.log" | head -25
  fi
  # the CPU kernels of the same build, argument checks included
  timeout -k 10 "$(within 60 150)" "$PYTHON" -m pytest tests/test_cpu_ext.py -q -p no:cacheprovider -k "rejects or bounds" \
    2>&1 | tail -2
fi
EXTRA=(--pre "gpu_tests=$tests_note")
if [ -n "${ext_rc:-}" ]; then
  EXTRA+=(--pre "cuda_ext_tests=rc=$ext_rc")
  [ "$ext_rc" != 0 ] && EXTRA+=(--skip-ext-cuda)
fi
# (by default whatever the deadline leaves: a fixed cap would end the benchmarks with time unused)
check_s=$(within "${GPU_CHECK_TIMEOUT:-$DEADLINE}" 10)
# the benchmarks' own budget ends early enough for the last provider and the summary to finish
timeout -k 10 "$check_s" "$PYTHON" bench/gpu_check.py --skip-tests --out "$LOGS" --budget $(( check_s > 90 ? check_s - 60 : check_s / 2 )) \
  "${EXTRA[@]}" "$@"
rc=$?
echo "gpu_check.py: rc=$rc (1 = some rows failed, 124 = timed out) after $(( $(date +%s) - T0 )) s in all"
# the logs travel as one archive (few files to copy back from a remote machine)
(cd "$LOGS" && ls ./*.log >/dev/null 2>&1 && tar czf logs.tgz ./*.log && rm -f ./*.log)
# the benchmarks' status, else a failed (or timed-out) GPU test run or CUDA-extension test run: a red test
# must not end the check green
if [ "$rc" = 0 ] && [ "${tests_rc:-0}" != 0 ]; then
  echo "gpu_check.sh: the GPU tests failed (rc=$tests_rc): exit 2"; rc=2
fi
if [ "$rc" = 0 ] && [ -n "${build_rc:-}" ] && [ "$build_rc" != 0 ]; then
  # (a failed build skips the extension's tests and rows: nothing else would say so)
  echo "gpu_check.sh: the CUDA extension did not build (rc=$build_rc): exit 2"; rc=2
fi
if [ "$rc" = 0 ] && [ -n "${ext_rc:-}" ] && [ "$ext_rc" != 0 ]; then
  echo "gpu_check.sh: the CUDA-extension tests failed (rc=$ext_rc): exit 2"; rc=2
fi
exit $rc
