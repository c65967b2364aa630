"""Whether cuBLAS repeats its GEMMs bit for bit in this process.

cuBLAS is deterministic (for one stream, on one GPU model) under ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` or
``:16:8``, and PyTorch reads that setting once, when it first sets up cuBLAS (after CUDA starts); a value set
later does not count. So the setting is known to hold only if it was in the environment before CUDA started.
``sfg_fast.ops.sfg_gemm``'s "auto" hands exact-fp32 GEMMs to cuBLAS in deterministic mode only then (else the
Triton GEMMs, which always repeat, run); the training job fixes the setting before it touches the GPU.
Both kinds repeat, but they round differently: a run and its resumption started the same way (both from the
command line, say) take the same GEMMs, while a process that started CUDA before building the Trainer takes
the Triton ones.
"""
from __future__ import annotations

import os

import torch

DETERMINISTIC_CONFIGS = (":4096:8", ":16:8")

# set when the setting was seen in place before CUDA started (at import, or by fix_workspace)
_FIXED = os.environ.get("CUBLAS_WORKSPACE_CONFIG") in DETERMINISTIC_CONFIGS and not torch.cuda.is_initialized()


def fix_workspace() -> bool:
    """Set ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless the environment already names a value (a value the
    user chose is kept). Returns whether cuBLAS's GEMMs are known to repeat in this process: the value is
    a deterministic one and CUDA had not started yet (once it has, cuBLAS may or may not have read it)."""
    global _FIXED
    started = torch.cuda.is_initialized()
    if os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8") in DETERMINISTIC_CONFIGS and not started:
        _FIXED = True
    return _FIXED


def workspace_fixed() -> bool:
    """Whether cuBLAS's GEMMs are known to repeat bit for bit in this process (see the module notes)."""
    return _FIXED
