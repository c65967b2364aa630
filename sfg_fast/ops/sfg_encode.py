"""Triton backend of ``functional.sfg_encode``: the SFG encoder alone, on a dense V.

``Z = gamma * act(V.reshape(B, N*D) @ weight.T + bias).reshape(B, N, D) (+ V)`` by the shared
interaction engine (``sfg_fast.ops.sfg_logits``) with no decoder: the forward kernel stores Z, the
backward recomputes H, then writes dV (pass 2) and dW/db block by block (pass 3, no atomics).
fp64 inputs fall back to the factored torch path (the kernels accumulate in fp32).
"""
from __future__ import annotations

from typing import Optional


from .. import factored
from .. import functional as _functional
from .sfg_logits import (DEFAULT_ALLOW_TF32, SfgInteractionFunction, _check_float, _Plan, has_fp64,
                         result_dtype, triton)

__all__ = ["sfg_encode"]


def sfg_encode(V, weight, bias, activation, gamma, residual, allow_tf32: Optional[bool] = None):
    """Triton implementation of ``functional.sfg_encode`` (inputs already validated). Returns [B, N, D]."""
    for name, t in (("V", V), ("weight", weight), ("bias", bias)):
        _check_float(name, t)
    if has_fp64(V, weight, bias):
        # fp64 is for checking: the kernels accumulate in fp32, so run the exact factored path
        return factored.sfg_encode(V, weight, bias, activation, gamma, residual)
    plan = _Plan(activation=activation, gamma=float(gamma), has_bias=bias is not None, residual=residual,
                 y_mode=0, kind="none", gather=False,
                 allow_tf32=DEFAULT_ALLOW_TF32 if allow_tf32 is None else bool(allow_tf32))
    out_dtype = result_dtype(V, weight)
    return SfgInteractionFunction.apply(plan, out_dtype, V, None, None, None, weight, bias, None)


if triton is not None:
    _functional.register_impl("triton", "sfg_encode", sfg_encode)
