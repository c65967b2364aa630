"""Launchers of the GEMM-shaped SFG interaction (``sfg_fast.kernels.sfg_gemm``).

The fast path of the Triton ``sfg_logits`` when an encoder generates the scored side from the
gathered V (``symmetric=False``, the configuration of every SFG model here). The forward is one
kernel (gather -> encoder GEMM and decoder GEMM sharing each A tile -> bias/act/gamma/residual ->
row dot) plus a tiny reduce (+ fused BCE); the backward is one elementwise pass and two GEMMs.

Saved for backward: X (the gathered V), H and T, each [B, N*D] fp32 -- O(B*N*D), about 10 MB each at
the Criteo shape, in exchange for no recomputation. The decoder is handed to the kernels as the
dense [N*D, N*D] matrix ``decoder_matrix`` builds with differentiable torch ops, so its gradient
reaches the scalar / vector / matrix weight (masked to P) through autograd.

Block sizes: ``SFG_FAST_GEMM_BLOCKS="BM,BN,BK,warps,stages"`` overrides the GPU defaults (for
tuning sweeps); under the Triton interpreter blocks are as large as the problem allows.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

try:
    import triton
    from ..kernels import sfg_gemm as G
    from ..kernels import sfg_interaction as K
except Exception:  # triton missing: sfg_logits reports the backend as unavailable
    triton = None
    G = K = None

POISON_VALUE: Optional[float] = None   # tests set NaN: an element a kernel fails to write shows up


def _empty(*shape, **kwargs) -> torch.Tensor:
    out = torch.empty(*shape, **kwargs)
    if POISON_VALUE is not None:
        out.fill_(POISON_VALUE)
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def gemm_blocks(m: int, n: int, k: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an [m, k] @ [k, n] pass."""
    if _interpreting():
        # each program costs milliseconds in the interpreter: few, large ones (tl.dot needs >= 16)
        return _pow2(m, 16, 64), _pow2(n, 16, 64), _pow2(k, 16, 64), 4, 1
    override = os.environ.get("SFG_FAST_GEMM_BLOCKS")
    if override:
        bm, bn, bk, warps, stages = (int(v) for v in override.split(","))
        return bm, bn, bk, warps, stages
    return 64, 64, 32, 4, 3


def decoder_matrix(dec: Optional[torch.Tensor], kind: str, n: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """Wd [N*D, N*D] with Wd[k*D + p, o*D + q] = Blk(o, k)[p, q] from the decoder in Blk orientation
    (``[N, N]`` scalar/identity, ``[N, N, D]`` vector, ``[N, N, D, D]`` matrix). Differentiable."""
    if kind == "matrix":
        blocks = dec
    else:
        eye = torch.eye(d, dtype=dec.dtype, device=dec.device)
        blocks = torch.diag_embed(dec) if kind == "vector" else dec[:, :, None, None] * eye
    return blocks.to(like.dtype).permute(1, 2, 0, 3).reshape(n * d, n * d)


def _matmul(a, b, c, scale=None, addend=None, ids=None, offsets=None, d=1, precision="ieee"):
    """c = a @ b (+ scale[:, None] * addend); with ids/offsets, c is the table gradient and the
    product is atomically scattered into it (see the kernel)."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return c
    bm, bn, bk, warps, stages = gemm_blocks(m, n, k)
    scatter = ids is not None
    dummy = a
    G._matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        scale if scale is not None else dummy, addend if addend is not None else dummy,
        addend.stride(0) if addend is not None else 0, addend.stride(1) if addend is not None else 0,
        ids if scatter else dummy, offsets if scatter else dummy, d,
        ids.stride(0) if scatter else 0, ids.stride(1) if scatter else 0,
        ADD_SCALED=addend is not None, SCATTER=scatter,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, num_warps=warps, num_stages=stages)
    return c


def forward(plan, table, ids, offsets, enc_w, enc_b, wd, labels=None, store=False):
    """(logit [B] fp32, loss or None, dlogit or None, saved (X, H, T) or None)."""
    batch, n = ids.shape
    d = table.shape[1]
    width = n * d
    device = table.device
    f32 = dict(dtype=torch.float32, device=device)
    bm, bn, bk, warps, stages = gemm_blocks(batch, width, width)
    tiles_n = triton.cdiv(width, bn)
    logit = _empty(batch, **f32)
    loss = _empty(batch, **f32) if labels is not None else None
    dlogit = _empty(batch, **f32) if labels is not None else None
    saved = (_empty(batch, width, **f32), _empty(batch, width, **f32), _empty(batch, width, **f32)) if store else None
    if batch == 0:
        return logit, loss, dlogit, saved
    part = _empty(batch, tiles_n, **f32)
    dummy = part
    x_buf, h_buf, t_buf = saved if store else (dummy, dummy, dummy)
    G._sfg_gemm_fwd_kernel[(triton.cdiv(batch, bm), tiles_n)](
        table, ids, offsets, enc_w, enc_b if enc_b is not None else dummy, wd,
        part, x_buf, h_buf, t_buf,
        batch, width, d, float(plan.gamma),
        ids.stride(0), ids.stride(1), table.stride(0), table.stride(1),
        enc_w.stride(0), enc_w.stride(1), wd.stride(0), wd.stride(1),
        ACT=K.ACT_CODES[plan.activation], HAS_BIAS=enc_b is not None, RESIDUAL=plan.residual, STORE=store,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=plan.precision, num_warps=warps, num_stages=stages)
    block_b = 16 if _interpreting() else 128
    G._sfg_logit_reduce_kernel[(triton.cdiv(batch, block_b),)](
        part, labels if labels is not None else dummy, logit, loss if loss is not None else dummy,
        dlogit if dlogit is not None else dummy, batch, tiles_n,
        HAS_LABELS=labels is not None, BLOCK_B=block_b, BLOCK_P=triton.next_power_of_2(tiles_n))
    return logit, loss, dlogit, saved


def backward(plan, table, ids, offsets, enc_w, wd, saved, dlogit, need_table=True, need_w=True,
             need_b=True, need_wd=True):
    """(d_table [V, D] dense or None, d_enc_w [W, W], d_enc_b [W], d_wd [W, W]), fp32."""
    x_buf, h_buf, t_buf = saved
    batch, width = x_buf.shape
    d = table.shape[1]
    device = table.device
    f32 = dict(dtype=torch.float32, device=device)
    grads = _empty(batch, 2 * width, **f32)
    if batch > 0:
        bm = 16 if _interpreting() else 32
        bn = _pow2(width, 16, 64) if _interpreting() else 128
        G._sfg_gemm_grad_kernel[(triton.cdiv(batch, bm), triton.cdiv(width, bn))](
            h_buf, t_buf, x_buf, dlogit, grads, batch, width, float(plan.gamma),
            ACT=K.ACT_CODES[plan.activation], RESIDUAL=plan.residual, BLOCK_M=bm, BLOCK_N=bn)
    d_table = None
    if need_table:
        # dX = G @ [We ; Wd^T] (+ g * T when X also feeds Y directly)
        stacked = torch.cat([enc_w.to(torch.float32), wd.to(torch.float32).t()], dim=0)
        extra = dict(scale=dlogit, addend=t_buf) if plan.residual else {}
        if torch.are_deterministic_algorithms_enabled():
            dx = _matmul(grads, stacked, _empty(batch, width, **f32), precision=plan.precision, **extra)
            from .sfg_logits import _table_grad_deterministic
            d_table = _table_grad_deterministic(dx.view(batch, -1, d), ids, offsets, table.shape[0])
        else:
            d_table = torch.zeros(table.shape[0], d, **f32)
            _matmul(grads, stacked, d_table, ids=ids, offsets=offsets, d=d, precision=plan.precision, **extra)
    d_w = d_b = d_wd = None
    if need_w or need_wd:
        # [dWe ; dWd^T] = G^T @ X: one GEMM over the batch (no atomics)
        both = _matmul(grads.t(), x_buf, _empty(2 * width, width, **f32), precision=plan.precision)
        d_w = both[:width] if need_w else None
        d_wd = both[width:].t() if need_wd else None
    if need_b:
        d_b = grads[:, :width].sum(dim=0)
    return d_table, d_w, d_b, d_wd


class SfgGemmFunction(torch.autograd.Function):
    """logit [B] from (table, ids, offsets, enc_w, enc_b, wd); gradients for table, enc_w, enc_b, wd."""

    @staticmethod
    def forward(ctx, plan, out_dtype, table, ids, offsets, enc_w, enc_b, wd):
        logit, _, _, saved = forward(plan, table, ids, offsets, enc_w, enc_b, wd, store=any(ctx.needs_input_grad))
        ctx.plan = plan
        ctx.bias_dtype = enc_b.dtype if enc_b is not None else None
        if saved is not None:
            ctx.save_for_backward(table, ids, offsets, enc_w, wd, *saved)
        return logit.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        table, ids, offsets, enc_w, wd, x_buf, h_buf, t_buf = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_table, d_w, d_b, d_wd = backward(
            ctx.plan, table, ids, offsets, enc_w, wd, (x_buf, h_buf, t_buf), grad.contiguous().to(torch.float32),
            need_table=need[2], need_w=need[5], need_b=need[6] and ctx.bias_dtype is not None, need_wd=need[7])

        def cast(g, dtype, wanted):
            return g.to(dtype) if (wanted and g is not None) else None
        return (None, None, cast(d_table, table.dtype, need[2]), None, None, cast(d_w, enc_w.dtype, need[5]),
                cast(d_b, ctx.bias_dtype, need[6]), cast(d_wd, wd.dtype, need[7]))
