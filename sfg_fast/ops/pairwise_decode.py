"""Triton backend of ``functional.pairwise_decode``: the All-Predict-All score on dense Z and V.

``logit[b] = sum_{(i,j) in P} (a_i @ W_ij) . b_j`` by the GEMM-shaped kernels
(``sfg_fast.ops.sfg_gemm``): X = b times the dense decoder matrix, scored against Y = a in the
epilogue; backward: one elementwise pass (dT = g * a, dA = g * T) and two GEMMs (dB; the decoder
gradient, reduced to the kind's weight by autograd). SFG_FAST_GEMM_PATH=0 runs the per-field engine.
fp64 inputs fall back to the factored torch path (the kernels accumulate in fp32).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import factored
from .. import functional as _functional
from . import sfg_gemm as _gemm
from ._launch import autocast_half
from . import sfg_logits as ops_logits
from .sfg_logits import (DEFAULT_ALLOW_TF32, SfgInteractionFunction, _check_float, _Plan, decoder_operand,
                         has_fp64, result_dtype, triton)

__all__ = ["pairwise_decode"]


def pairwise_decode(Z, V, weight, kind, pairs, generated_side, symmetric, allow_tf32: Optional[bool] = None):
    """Triton implementation of ``functional.pairwise_decode`` (inputs already validated). Returns [B]."""
    for name, t in (("Z", Z), ("V", V), ("weight", weight)):
        _check_float(name, t)
    if has_fp64(Z, V, weight):
        # fp64 is for checking: the kernels accumulate in fp32, so run the exact factored path
        return factored.pairwise_decode(Z, V, weight, kind, pairs, generated_side, symmetric)
    if symmetric:
        left, right = Z, Z
    else:
        left, right = (Z, V) if generated_side == "left" else (V, Z)
    plan = _Plan(kind=kind, y_mode=2, gather=False,
                 allow_tf32=DEFAULT_ALLOW_TF32 if allow_tf32 is None else bool(allow_tf32), half=autocast_half(Z))
    like = torch.empty(0, dtype=torch.float32, device=Z.device)
    out_dtype = result_dtype(Z, V, weight)
    if ops_logits.GEMM_PATH:
        wd, plan = ops_logits.gemm_decoder(weight, kind, pairs, Z.shape[1], Z.shape[2], "left", like, plan)
        return _gemm.interaction(plan, out_dtype, right, None, None, left, None, None, wd)
    dec = decoder_operand(weight, kind, pairs, Z.shape[1], "left", like)
    return SfgInteractionFunction.apply(plan, out_dtype, right, None, None, left, None, None, dec)


if triton is not None:
    _functional.register_impl("triton", "pairwise_decode", pairwise_decode)
