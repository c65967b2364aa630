#!/usr/bin/env bash
# The one prepared GPU check (device, GPU tests, Criteo-shape benchmarks); about 4-6 minutes on an H100.
# Usage: bash bench/gpu_check.sh [gpu_check.py options, e.g. --vocab-scale 0.1 --skip-tests]
# Results go to $OUT when set, else bench/results/<device>/.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# sfg_fast.kernels is mapped onto kernels/ by setup.py, so the package must be installed (editable,
# offline, no dependencies, no extension build: a few seconds).
if ! "$PYTHON" -c "import sfg_fast.kernels" >/dev/null 2>&1; then
  SFG_FAST_BUILD_EXT=0 "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -q -e . \
    || echo "gpu_check: editable install failed; the Triton backend may be unavailable" >&2
fi
unset TRITON_INTERPRET
exec timeout "${GPU_CHECK_TIMEOUT:-345}" "$PYTHON" bench/gpu_check.py "$@"
