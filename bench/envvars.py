"""``env_var``: an environment variable set for one block (torch-free: bench/triton_aot.py uses it before
it may import torch, bench/gpu_check.py around timed rows)."""
from __future__ import annotations

import contextlib
import os
from typing import Optional


@contextlib.contextmanager
def env_var(name: str, value: Optional[str]):
    """Environment variable ``name`` set to ``value`` (None: unset) for the block, restored after."""
    saved = os.environ.get(name)
    try:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved
