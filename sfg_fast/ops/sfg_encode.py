"""Triton backend of ``functional.sfg_encode``: the SFG encoder alone, on a dense V.

``Z = gamma * act(V.reshape(B, N*D) @ weight.T + bias).reshape(B, N, D) (+ V)`` by the GEMM-shaped
kernels (``sfg_fast.ops.sfg_gemm``) with no decoder: one GEMM with the bias/act/gamma/residual
epilogue (H kept for backward), then dH elementwise, dV = dH @ W (+ dZ) and dW = dH^T V as GEMMs.
SFG_FAST_GEMM_PATH=0 runs the per-field engine.
fp64 inputs fall back to the factored torch path (the kernels accumulate in fp32).
"""
from __future__ import annotations

from typing import Optional


from .. import factored
from .. import functional as _functional
from . import sfg_gemm as _gemm
from ._launch import autocast_half
from . import sfg_logits as ops_logits
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
                 allow_tf32=DEFAULT_ALLOW_TF32 if allow_tf32 is None else bool(allow_tf32), half=autocast_half(V))
    out_dtype = result_dtype(V, weight)
    if ops_logits.GEMM_PATH:
        return _gemm.interaction(plan, out_dtype, V, None, None, None, weight, bias, None)
    return SfgInteractionFunction.apply(plan, out_dtype, V, None, None, None, weight, bias, None)


if triton is not None:
    _functional.register_impl("triton", "sfg_encode", sfg_encode)
