"""DCNv2 cross layer with a generated gate: ``out = x + x_gen * h``, ``h = x @ W.T + b`` ([B, K] x [K, K]).

Forward is one GEMM with the bias/gate/residual epilogue (h is also written when backward needs it).
Backward is one launch with two kinds of programs, all independent (no atomics, deterministic):
    dx / dx_gen tiles:  dx = go + (go * x_gen) @ W      dx_gen = go * h
    dW / db tiles:      dW = (go * x_gen).T @ x         db = sum_b (go * x_gen)
``go * x_gen`` (= dh) is formed in the GEMM prologue, never stored. tl.dot in exact IEEE fp32 unless
INPUT_PRECISION="tf32" (``sfg_interaction._mma``); fp32 accumulation throughout.
"""
import triton
import triton.language as tl

from .sfg_interaction import _mma


@triton.jit
def _generative_cross_fwd_kernel(x_ptr, xg_ptr, w_ptr, b_ptr, out_ptr, h_ptr,
                                 batch, width,
                                 stride_x, stride_xg, stride_w, stride_out,
                                 HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each program owns a [BLOCK_M samples, BLOCK_N outputs] tile and runs the K loop of x @ W.T."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < batch
    mask_n = offs_n < width
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < width
        a = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + offs_n[None, :] * stride_w + offs_k[:, None],          # W.T tile [K, N]
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc = _mma(a, wt, acc, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    xg = tl.load(xg_ptr + offs_m[:, None] * stride_xg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out = x + xg * acc
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + offs_m[:, None] * width + offs_n[None, :], acc, mask=mask)


@triton.jit
def _generative_cross_bwd_kernel(go_ptr, x_ptr, xg_ptr, w_ptr, h_ptr,
                                 dx_ptr, dxg_ptr, dw_ptr, db_ptr,
                                 batch, width, num_dx_tiles_n,
                                 stride_go, stride_x, stride_xg, stride_w,
                                 HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Programs [0, tiles_m * num_dx_tiles_n) own a [BLOCK_M, BLOCK_N] tile of dx and dx_gen;
    the rest own a [BLOCK_N, BLOCK_N] tile of dW (rows o, columns i), looping over the whole batch,
    plus db for the tiles of the first column. dx/dx_gen/dW/db are fp32 buffers (h is fp32)."""
    pid = tl.program_id(0)
    num_dx_programs = tl.cdiv(batch, BLOCK_M) * num_dx_tiles_n
    if pid < num_dx_programs:
        pid_m = pid // num_dx_tiles_n
        pid_n = pid - pid_m * num_dx_tiles_n
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)   # input features i
        mask_m = offs_m < batch
        mask_n = offs_n < width
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, width, BLOCK_K):                                 # output features o
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < width
            mk = mask_m[:, None] & mask_k[None, :]
            go = tl.load(go_ptr + offs_m[:, None] * stride_go + offs_k[None, :], mask=mk, other=0.0).to(tl.float32)
            xg = tl.load(xg_ptr + offs_m[:, None] * stride_xg + offs_k[None, :], mask=mk, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            acc = _mma(go * xg, w, acc, INPUT_PRECISION)
        mask = mask_m[:, None] & mask_n[None, :]
        go = tl.load(go_ptr + offs_m[:, None] * stride_go + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs_m[:, None] * width + offs_n[None, :], mask=mask, other=0.0)
        tl.store(dx_ptr + offs_m[:, None] * width + offs_n[None, :], go + acc, mask=mask)
        tl.store(dxg_ptr + offs_m[:, None] * width + offs_n[None, :], go * h, mask=mask)
    else:
        tile = pid - num_dx_programs
        num_w_tiles = tl.cdiv(width, BLOCK_N)
        pid_o = tile // num_w_tiles
        pid_i = tile - pid_o * num_w_tiles
        offs_o = (pid_o * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_i = (pid_i * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_o = offs_o < width
        mask_i = offs_i < width
        acc = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for m0 in range(0, batch, BLOCK_K):
            offs_m = m0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_m = offs_m < batch
            mo = mask_m[:, None] & mask_o[None, :]
            go = tl.load(go_ptr + offs_m[:, None] * stride_go + offs_o[None, :], mask=mo, other=0.0).to(tl.float32)
            xg = tl.load(xg_ptr + offs_m[:, None] * stride_xg + offs_o[None, :], mask=mo, other=0.0).to(tl.float32)
            dh = go * xg                                                     # [BLOCK_K samples, BLOCK_N o]
            x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_i[None, :],
                        mask=mask_m[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
            acc = _mma(tl.trans(dh), x, acc, INPUT_PRECISION)
            if HAS_BIAS:
                db += tl.sum(dh, axis=0)
        tl.store(dw_ptr + offs_o[:, None] * width + offs_i[None, :], acc,
                 mask=mask_o[:, None] & mask_i[None, :])
        if HAS_BIAS:
            if pid_i == 0:
                tl.store(db_ptr + offs_o, db, mask=mask_o)
