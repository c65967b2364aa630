"""Test configuration: Triton interpreter on CPU-only machines, and marker -> skip rules.

TRITON_INTERPRET=1 must be in the environment before any @triton.jit decorator runs, so it is set
here, at conftest import, before any test module imports a kernel. Nothing here initialises CUDA.
"""
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _has_cuda_extension() -> bool:
    try:
        from sfg_fast import _C  # noqa: F401
    except Exception:
        return False
    return HAS_CUDA and bool(getattr(_C, "WITH_CUDA", False))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_ext = pytest.mark.skip(reason="needs sfg_fast._C built with CUDA and a CUDA device")
    skip_interp = pytest.mark.skip(reason="triton is not installed")
    skip_perf = pytest.mark.skip(reason="performance measurement: set SFG_FAST_PERF=1 (timings live in bench/)")
    skip_slow = pytest.mark.skip(reason="SFG_FAST_SKIP_SLOW=1")
    has_ext = None
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "cuda_ext" in item.keywords:
            if has_ext is None:
                has_ext = _has_cuda_extension()
            if not has_ext:
                item.add_marker(skip_ext)
        if "interpreter" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_interp)
        if "perf" in item.keywords and os.environ.get("SFG_FAST_PERF") != "1":
            item.add_marker(skip_perf)
        if "slow" in item.keywords and os.environ.get("SFG_FAST_SKIP_SLOW") == "1":
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
