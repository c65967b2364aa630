"""Triton launchers and autograd glue of the generative cross layer ``x + x_gen * (x @ W.T + b)``.

Registered as the ``"triton"`` implementation of ``functional.generative_cross``. Exact fp32 by
default (``allow_tf32=False``); fp16/bf16 inputs are computed in fp32 and stored in their dtype.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import factored, reference
from ._higher_order import create_graph_requested, recompute_grads
from ._launch import cdiv, next_pow2

try:  # the package works without Triton; this backend then simply does not register
    import triton

    from ..kernels.generative_cross import _generative_cross_bwd_kernel, _generative_cross_fwd_kernel
except ImportError:
    triton = None

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _blocks(batch: int, width: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K): tl.dot needs >= 16; the interpreter wants few, large programs."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        block_m = max(16, min(next_pow2(batch), 256))
        block_n = max(16, min(next_pow2(width), 128))
        block_k = max(16, min(next_pow2(max(batch, width)), 256))
        return block_m, block_n, block_k
    return 64, 64, 32


def _common_dtype(x, x_gen, weight, bias) -> torch.dtype:
    """The promoted dtype of the inputs (mixed dtypes arise under autocast); float64 is refused."""
    dtype = x.dtype
    for name, t in (("x", x), ("x_gen", x_gen), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"{name} dtype {t.dtype} is not supported by the triton generative_cross; "
                            f"expected one of {_SUPPORTED} (use backend='torch' for float64)")
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _rows_unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def generative_cross_fwd(x, x_gen, weight, bias=None, store_h: bool = False, precision: str = "ieee",
                         out: Optional[torch.Tensor] = None):
    """Returns ``(out [B, K], h [B, K] fp32 or None)`` with ``h = x @ W.T + b``.

    Mixed input dtypes are promoted to one (the output's). ``out``: optional ``[B, K]`` destination
    of that dtype with unit stride along K.
    """
    dtype = _common_dtype(x, x_gen, weight, bias)
    x, x_gen, weight = (_rows_unit_stride(t.to(dtype)) for t in (x, x_gen, weight))
    bias = bias.to(dtype) if bias is not None else None
    batch, width = x.shape
    if out is None:
        out = torch.empty(batch, width, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {x.dtype} tensor of shape {list(x.shape)} with unit stride "
                         f"along K, got {out.dtype} {list(out.shape)}")
    h = torch.empty(batch, width, dtype=torch.float32, device=x.device) if store_h else None
    if x.numel() == 0:
        return out, h
    block_m, block_n, block_k = _blocks(batch, width)
    grid = (cdiv(batch, block_m), cdiv(width, block_n))
    _generative_cross_fwd_kernel[grid](
        x, x_gen, weight, bias.contiguous() if bias is not None else x, out, h if h is not None else out,
        batch, width, x.stride(0), x_gen.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, STORE_H=store_h, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out, h


def generative_cross_bwd(grad_out, x, x_gen, weight, h, has_bias: bool, precision: str = "ieee"):
    """Returns fp32 ``(dx, dx_gen, dW, db or None)`` for ``out = x + x_gen * h``, from the saved fp32 h."""
    dtype = _common_dtype(x, x_gen, weight, None)
    grad_out, x, x_gen, weight = (_rows_unit_stride(t.to(dtype)) for t in (grad_out, x, x_gen, weight))
    batch, width = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    dx, dxg = torch.empty(batch, width, **f32), torch.empty(batch, width, **f32)
    dw = torch.empty(width, width, **f32)
    db = torch.empty(width, **f32) if has_bias else None
    if width == 0:
        return dx, dxg, dw, db
    if batch == 0:
        dw.zero_()
        if db is not None:
            db.zero_()
        return dx, dxg, dw, db
    block_m, block_n, block_k = _blocks(batch, width)
    tiles_n = cdiv(width, block_n)
    grid = (cdiv(batch, block_m) * tiles_n + tiles_n * tiles_n,)
    _generative_cross_bwd_kernel[grid](
        grad_out, x, x_gen, weight, h, dx, dxg, dw, db if db is not None else dw,
        batch, width, tiles_n, grad_out.stride(0), x.stride(0), x_gen.stride(0), weight.stride(0),
        HAS_BIAS=has_bias, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return dx, dxg, dw, db


class GenerativeCrossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_gen, weight, bias, precision):
        needs = any(ctx.needs_input_grad[:4])
        out, h = generative_cross_fwd(x, x_gen, weight, bias, store_h=needs, precision=precision)
        if needs:
            ctx.save_for_backward(x, x_gen, weight, h, bias)
        ctx.has_bias, ctx.precision = bias is not None, precision
        ctx.dtypes = (x.dtype, x_gen.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, x_gen, weight, h, bias = ctx.saved_tensors
        if create_graph_requested():   # higher-order gradients: the reference twin's graph
            grads = recompute_grads(reference.generative_cross, (x, x_gen, weight, bias), ctx.needs_input_grad[:4],
                                    grad_out)
            return (*grads, None)
        grads = generative_cross_bwd(grad_out, x, x_gen, weight, h, ctx.has_bias, ctx.precision)
        out = [g.to(dt) if (g is not None and need) else None
               for g, dt, need in zip(grads, ctx.dtypes, ctx.needs_input_grad[:4])]
        return (*out, None)


def generative_cross(x: torch.Tensor, x_gen: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, allow_tf32: bool = False) -> torch.Tensor:
    """Triton ``x + x_gen * (x @ weight.T + bias)`` (inputs validated by functional.generative_cross).

    ``allow_tf32=True`` lets tl.dot use TF32 tensor cores (about 1e-3 relative error); the default is
    exact IEEE fp32. Under ``torch.autocast`` this layer stays in fp32 (unlike the SFG interaction's GEMMs):
    its backward's weight-gradient tiles read operands transposed, which the matrix units would take 4 bytes
    at a time (the sm_90 PTX of bench/triton_aot.py shows it), so the half-rate GEMMs would not pay.
    """
    if any(t is not None and t.dtype == torch.float64 for t in (x, x_gen, weight, bias)):
        # fp64 is for checking: the kernels accumulate in fp32, so run the exact factored path (as the
        # other Triton ops do; a model's .double() ran every layer but this one)
        return factored.generative_cross(x, x_gen, weight, bias)
    return GenerativeCrossFunction.apply(x, x_gen, weight, bias, "tf32" if allow_tf32 else "ieee")


def _register() -> None:
    from ..functional import register_impl
    register_impl("triton", "generative_cross", generative_cross)


if triton is not None:
    _register()
