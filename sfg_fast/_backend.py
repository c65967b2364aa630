"""Backend selection shared by every functional op.

Backends: ``"reference"`` (literal, materialises pairs; for tests), ``"torch"`` (factored plain
PyTorch, never materialises pairs), ``"triton"`` (fused Triton kernels), ``"cpu"`` and ``"cuda"``
(the compiled extension ``sfg_fast._C``). ``"auto"`` picks the fastest available backend for the
tensor's device; the environment variable ``SFG_FAST_BACKEND`` overrides ``"auto"``.
An explicitly requested backend that is unavailable raises, quoting why.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Dict, Optional

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch", "reference")
ENV_VAR = "SFG_FAST_BACKEND"

# Ops that each optional backend implements; filled in by the backend modules when they load.
_IMPLEMENTED: Dict[str, set] = {"triton": set(), "cuda": set(), "cpu": set()}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing Dynamo at import time (seconds).

    Dynamo runs a function carrying this mark eagerly while tracing and bakes in its result."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True   # the mark that decorator sets
    return fn


@functools.lru_cache(maxsize=None)
def _extension_status() -> Optional[str]:
    """None when sfg_fast._C imports, else the reason it does not."""
    try:
        from . import _C  # noqa: F401
    except Exception as exc:  # ImportError, or an ABI error from a stale build
        return f"sfg_fast._C is not built or failed to import ({type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=None)
def _triton_importable() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not installed ({type(exc).__name__}: {exc})"
    return None


def _triton_status() -> Optional[str]:
    why = _triton_importable()
    if why:
        return why
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device and TRITON_INTERPRET=1 is not set"
    return None


def unavailable_reason(backend: str, op: str = "", device: Optional[torch.device] = None) -> Optional[str]:
    """Return None if ``backend`` can run ``op`` on ``device``, else a sentence saying why not."""
    if backend in ("torch", "reference"):
        return None
    if backend == "triton":
        why = _triton_status()
        if why:
            return why
        if device is not None and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    elif backend in ("cpu", "cuda"):
        why = _extension_status()
        if why:
            return why
        if backend == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        if device is not None and device.type != backend:
            return f"tensors are on {device.type}, backend {backend!r} needs {backend} tensors"
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if op and op not in _IMPLEMENTED.get(backend, set()):
        return f"backend {backend!r} has no kernel for {op!r} yet"
    return None


def autocast_on(device_type: str) -> bool:
    """Whether torch.autocast is on for ``device_type`` (False for one autocast does not know: meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def env_backend() -> str:
    """``SFG_FAST_BACKEND``, stripped ("" when unset); a value that names no backend raises ValueError."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
    return env


def in_torch_func() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def kernels_invisible() -> Optional[str]:
    """Where the compiled kernels (the C++/CUDA extension, Triton) cannot run, why; else None. Inside a
    torch.func transform (vmap, grad, jacrev, ...) their autograd Functions get wrapped tensors they
    cannot read; while torch.jit.trace records, it does not see their calls, and the trace would replay
    uninitialised memory in their place. The factored torch ops work in both."""
    if in_torch_func():
        return "inside a torch.func transform (vmap, grad, jacrev, ...)"
    if torch.jit.is_tracing():
        return "while torch.jit.trace records (it cannot see the kernels' calls)"
    return None


def register(backend: str, op: str) -> None:
    """Called by backend modules to declare that they implement ``op``."""
    _IMPLEMENTED[backend].add(op)


# "auto" on CUDA, per op, from the H200 measurements at the Criteo shape (bench/results/nvidia-h200,
# 2026-11-28): the Triton kernels win the lookup (25 us vs 105 us forward) and the fused sparse update
# (optim picks it), while the factored torch path (cuBLAS) tied or beat them on the interaction ops
# (sfg_logits fwd+bwd 2.64 vs 2.90 ms, sfg_encode 0.62 vs 1.01 ms, pairwise_decode, BCE, cross layer),
# so auto takes torch there. backend="triton" still selects the kernels. Revisit with every GPU run.
_CUDA_AUTO_DEFAULT = ("triton", "cuda", "torch")
_CUDA_AUTO = {op: ("torch", "triton", "cuda")
              for op in ("sfg_logits", "sfg_interaction", "sfg_encode", "pairwise_decode", "bce_with_logits",
                         "generative_cross")}


def auto_order(op: str, device: torch.device):
    """Backends "auto" tries for ``op`` on ``device``, best first."""
    if device.type == "cuda":
        return _CUDA_AUTO.get(op, _CUDA_AUTO_DEFAULT)
    return ("cpu", "torch")


def resolve(backend: str, op: str, device: torch.device) -> str:
    """Map a requested backend to a concrete one for ``op`` on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = env_backend()
        if env and env != "auto":
            backend = env
        else:
            for candidate in auto_order(op, device):
                if unavailable_reason(candidate, op, device) is None:
                    return candidate
            return "torch"
    why = unavailable_reason(backend, op, device)
    if why is not None:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable for {op}: {why}")
    return backend


def module_backend(backend: str, op: str) -> str:
    """The backend a layer or model built with ``backend`` runs ``op`` on.

    The functional ops are strict: an explicit backend without a kernel for the op raises. A layer
    (``sfg_fast.nn``) or model built with ``backend="cpu"``, ``"cuda"`` or ``"triton"`` instead runs that
    backend's kernels for the ops it has and the ``"torch"`` backend for the rest (the same math on the
    same device), so every model trains on it (IPNN's products have no Triton kernel). When the backend
    itself cannot run (no extension, "cuda" without a GPU, no Triton) it stays as asked, so the op raises
    and says why.
    """
    if backend in ("cpu", "cuda", "triton", "auto"):
        return _module_backend_choice(backend, op)
    return backend


@_assume_constant_result
def _module_backend_choice(backend: str, op: str) -> str:
    """module_backend's choice for the extension's backends, run eagerly while compiling (loading the
    backends imports modules, which Dynamo cannot trace; the choice is baked into the graph). A layer
    left on "auto" under ``SFG_FAST_BACKEND=cpu`` (or ``cuda``, ``triton``) chooses as one built with that
    backend: the variable stands for the backend every layer is built with."""
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env not in ("cpu", "cuda", "triton"):
            return backend
        backend = env
    if unavailable_reason(backend) is None:      # (the extension built, and a GPU for "cuda")
        from .ops import load_backends
        load_backends()
        if op not in _IMPLEMENTED[backend]:
            return "torch"
    return backend


def status() -> Dict[str, Optional[str]]:
    """Availability of every concrete backend: None = available, else the reason."""
    out = {}
    for name in BACKENDS[1:]:
        out[name] = unavailable_reason(name)
    return out
