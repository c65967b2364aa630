#!/usr/bin/env bash
# Set up .venv with sfg_fast and everything its tests and main job need, on a fresh CPU machine.
# torch==2.13.0 is installed FIRST: any requirement naming torch without this exact pin would
# otherwise pull a multi-GB CUDA build. Re-running is cheap (pip skips what is installed).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q torch==2.13.0
$PIP install -q -r requirements.txt
# MovieLens-100K ships inside recbole; only its data files are used, so skip its large dependency list.
$PIP install -q --no-deps recbole==1.2.1
# TorchRec (sharded embeddings; optional for users, exercised by the tests). Versions move in lock-step
# with torch 2.13; torchrec names the CUDA fbgemm package, hence --no-deps after fbgemm-gpu-cpu.
# Set SFG_FAST_NO_TORCHREC=1 to skip.
if [ "${SFG_FAST_NO_TORCHREC:-0}" != "1" ]; then
    $PIP install -q fbgemm-gpu-cpu==1.8.0
    $PIP install -q --no-deps torchrec==1.8.0
    $PIP install -q tensordict==0.15.3 torchmetrics==1.9.0 tqdm pyre-extensions==0.0.32
fi
# The oldest Triton a GPU machine may carry (torch 2.11 + triton 3.6): kept apart from the venv's own,
# only for tests/test_triton_aot.py, which compiles the table kernels with it for sm_90 (no GPU needed).
# Set SFG_FAST_NO_COMPAT_TRITON=1 to skip.
if [ "${SFG_FAST_NO_COMPAT_TRITON:-0}" != "1" ] && [ ! -d .venv/compat/triton-3.6.0/triton ]; then
    $PIP install -q --no-deps --target .venv/compat/triton-3.6.0 triton==3.6.0
fi
# --no-build-isolation: build against the torch installed above (an isolated build would fetch another).
$PIP install -q --no-build-isolation -e .
.venv/bin/python -m sfg_fast.info
