"""Host-side launch arithmetic of the Triton launchers, in plain Python.

``triton.next_power_of_2`` and ``triton.cdiv`` are constexpr functions in Triton 3.6 and later: called
from host code they cost about 2 us each through their wrapper (measured on this project's CPU machine,
against 0.1 us for the plain arithmetic), and one fused training step computes a few dozen block sizes
and grids. Same results as Triton's for the non-negative integers the launchers pass.

``autocast_half`` gives the PRECISION of the SFG kernels' tl.dot under torch.autocast
(``kernels.sfg_interaction._mma``).
"""
import os

import torch


def next_pow2(n: int) -> int:
    """The smallest power of two >= n; 0 for n = 0 (as ``triton.next_power_of_2``)."""
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (as ``triton.cdiv``)."""
    return (int(a) + int(b) - 1) // int(b)


def autocast_half(t: torch.Tensor) -> str:
    """The half type a GEMM on tensors like ``t`` takes under ``torch.autocast`` on their device: "bf16"
    ("bf16_rne" under the Triton interpreter, whose own bf16 dot is wrong: it rounds the operands and
    multiplies in exact fp32, the same products), "fp16", or "" outside autocast (or for another dtype)."""
    kind = t.device.type
    if not torch.is_autocast_enabled(kind):
        return ""
    dtype = torch.get_autocast_dtype(kind)
    if dtype == torch.bfloat16:
        return "bf16_rne" if os.environ.get("TRITON_INTERPRET") == "1" else "bf16"
    return "fp16" if dtype == torch.float16 else ""
