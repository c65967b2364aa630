"""GEMM-shaped SFG interaction (the fast path of sfg_logits): tiles over the flattened width W = N*D.

The per-field engine (kernels.sfg_interaction) walks N x N blocks of D x D, which leaves the matrix
units idle at D = 16. Here a sample's fields are one row of W columns and the two linear maps are
dense W x W matrices, so every pass is an ordinary tiled GEMM:

    H = X @ We^T + b          X = gathered V [B, W] (prologue: column c reads field c // D)
    T = X @ Wd                Wd[k*D + p, o*D + q] = Blk(o, k)[p, q] (all decoder kinds, built by
                              the launcher, so the decoder's gradient flows back through autograd)
    Y = gamma * act(H) (+ X)  logit = sum_c Y * T     (epilogue; per column tile, summed after)

Backward (g = dlogit [B]):  dH = g * T * gamma * act'(H),  dT = g * Y,  G = [dH | dT]  [B, 2W]
    dX = G @ [We ; Wd^T] (+ g * T when X feeds Y)         one GEMM, K = 2W
    [dWe ; dWd^T] = G^T @ X                                one GEMM, K = B
The same kernels run the encoder alone (sfg_encode: Z out, dZ in) and the decoder alone on dense
operands (pairwise_decode: Y given, dY out). Where torch.mm runs the GEMMs (cuBLAS for the exact fp32
path on a GPU), _sfg_epilogue_kernel is the forward's epilogue and _sfg_gemm_grad_kernel the backward's
elementwise middle, as here. Row offsets into the table and every row * stride
product are int64.
"""
import triton
import triton.language as tl

from .sfg_interaction import _activate, _activate_grad, _mma


@triton.jit
def _x_tile(x_ptr, ids_ptr, offsets_ptr, rows, mask_m, cols, mask_c, D,
            stride_ib, stride_in, stride_x0, stride_x1, stride_x2, GATHER: tl.constexpr):
    """X[rows, cols] of the [B, W] view; column c is column c % D of field c // D.

    GATHER: the field's table row offsets[f] + ids[b, f] of a [V, D] table (strides x0, -, x2);
    else a dense [B, N, D] tensor with strides (x0, x1, x2)."""
    field = (cols // D).to(tl.int64)
    within = cols - field * D
    mask = mask_m[:, None] & mask_c[None, :]
    if GATHER:
        local = tl.load(ids_ptr + rows[:, None] * stride_ib + field[None, :] * stride_in, mask=mask, other=0)
        base = tl.load(offsets_ptr + field, mask=mask_c, other=0)
        row_offs = (base[None, :] + local.to(tl.int64)) * stride_x0    # int64: tables above 2^31 elements
    else:
        row_offs = rows[:, None] * stride_x0 + field[None, :] * stride_x1
    return tl.load(x_ptr + row_offs + within[None, :] * stride_x2, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _sfg_gemm_fwd_kernel(
        x_ptr, ids_ptr, offsets_ptr, y_ptr, enc_w_ptr, enc_b_ptr, dec_ptr,
        part_ptr, xs_ptr, h_ptr, t_ptr, z_ptr,
        B, W, D, gamma,
        stride_ib, stride_in, stride_x0, stride_x1, stride_x2, stride_y0, stride_y1, stride_y2,
        stride_w0, stride_w1, stride_d0, stride_d1,
        ACT: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATHER: tl.constexpr,
        HAS_ENC: tl.constexpr, HAS_DEC: tl.constexpr, STORE: tl.constexpr, STORE_Z: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Program (m, n): samples [m*BM, +BM) x output columns [n*BN, +BN).

    HAS_ENC: H = X @ We^T (+ b), Y = gamma * act(H) (+ X); else Y is the dense input y.
    HAS_DEC: T = X @ Wd and the partial logit part[b, n] = sum over the tile's columns of Y * T.
    STORE (for backward): H and T as [B, W] fp32, and the gathered X (programs n = 0, GATHER only).
    STORE_Z: Y as [B, W] fp32 (the encoder-only op).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < B
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols_n < W
    cn = cols_n.to(tl.int64)
    acc_h = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, W, BLOCK_K):
        cols_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = cols_k < W
        ck = cols_k.to(tl.int64)
        x = _x_tile(x_ptr, ids_ptr, offsets_ptr, rows, mask_m, cols_k, mask_k, D,
                    stride_ib, stride_in, stride_x0, stride_x1, stride_x2, GATHER)
        if STORE and GATHER:
            tl.store(xs_ptr + rows[:, None] * W + ck[None, :], x,
                     mask=mask_m[:, None] & mask_k[None, :] & (pid_n == 0))
        mask_kn = mask_k[:, None] & mask_n[None, :]
        if HAS_ENC:
            # [k, n] = We[n, k]: X @ We^T
            we = tl.load(enc_w_ptr + cn[None, :] * stride_w0 + ck[:, None] * stride_w1, mask=mask_kn, other=0.0)
            acc_h = _mma(x, we, acc_h, PRECISION)
        if HAS_DEC:
            wd = tl.load(dec_ptr + ck[:, None] * stride_d0 + cn[None, :] * stride_d1, mask=mask_kn, other=0.0)
            acc_t = _mma(x, wd, acc_t, PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    offs = rows[:, None] * W + cn[None, :]
    if HAS_ENC:
        h = acc_h
        if HAS_BIAS:
            h += tl.load(enc_b_ptr + cn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y = gamma * _activate(h, ACT)
        if RESIDUAL:
            y += _x_tile(x_ptr, ids_ptr, offsets_ptr, rows, mask_m, cols_n, mask_n, D,
                         stride_ib, stride_in, stride_x0, stride_x1, stride_x2, GATHER)
        if STORE:
            tl.store(h_ptr + offs, h, mask=mask)
        if STORE_Z:
            tl.store(z_ptr + offs, y, mask=mask)
    else:
        y = _x_tile(y_ptr, ids_ptr, offsets_ptr, rows, mask_m, cols_n, mask_n, D,
                    stride_ib, stride_in, stride_y0, stride_y1, stride_y2, False)
    if HAS_DEC:
        y = tl.where(mask, y, 0.0)        # act(0) need not be 0 (sigmoid): padded columns add nothing
        tl.store(part_ptr + rows * tl.num_programs(1) + pid_n.to(tl.int64), tl.sum(y * acc_t, axis=1),
                 mask=mask_m)
        if STORE:
            tl.store(t_ptr + offs, acc_t, mask=mask)


@triton.jit
def _sfg_epilogue_kernel(
        h_ptr, t_ptr, x_ptr, part_ptr, z_ptr, B, W, gamma,
        stride_x0, stride_x1,
        ACT: tl.constexpr, RESIDUAL: tl.constexpr, HAS_ENC: tl.constexpr, HAS_DEC: tl.constexpr,
        STORE_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward's epilogue when the GEMMs ran elsewhere (torch.mm: cuBLAS's fp32 GEMM outruns
    tl.dot's exact-fp32 path several times): H = X @ We^T + b and T = X @ Wd are given as [B, W] fp32.

    HAS_ENC: Y = gamma * act(H) (+ X); STORE_Z writes it (the encoder-only op). Else Y is ``x`` itself
    (the dense Y of the decoder-only op). HAS_DEC: part[b, n] = sum over the tile's columns of Y * T,
    the layout _sfg_gemm_fwd_kernel writes, for _sfg_logit_reduce_kernel. x: [B, W], strides (x0, x1)."""
    pid_n = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < B
    mask = mask_m[:, None] & (cols < W)[None, :]
    offs = rows[:, None] * W + cols[None, :]
    if HAS_ENC:
        y = gamma * _activate(tl.load(h_ptr + offs, mask=mask, other=0.0), ACT)
        if RESIDUAL:
            y += tl.load(x_ptr + rows[:, None] * stride_x0 + cols[None, :] * stride_x1, mask=mask,
                         other=0.0).to(tl.float32)
        if STORE_Z:
            tl.store(z_ptr + offs, y, mask=mask)
    else:
        y = tl.load(x_ptr + rows[:, None] * stride_x0 + cols[None, :] * stride_x1, mask=mask,
                    other=0.0).to(tl.float32)
    if HAS_DEC:
        y = tl.where(mask, y, 0.0)        # act(0) need not be 0 (sigmoid): padded columns add nothing
        t = tl.load(t_ptr + offs, mask=mask, other=0.0)
        tl.store(part_ptr + rows * tl.num_programs(1) + pid_n.to(tl.int64), tl.sum(y * t, axis=1), mask=mask_m)


@triton.jit
def _sfg_logit_reduce_kernel(part_ptr, labels_ptr, logit_ptr, loss_ptr, dlogit_ptr, B, P,
                             HAS_LABELS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """logit[b] = sum_p part[b, p] (fixed order: deterministic), then optionally the per-sample
    BCE-with-logits loss and dloss/dlogit = sigmoid(logit) - label."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = rows < B
    p = tl.arange(0, BLOCK_P).to(tl.int64)
    part = tl.load(part_ptr + rows[:, None] * P + p[None, :], mask=mask_b[:, None] & (p[None, :] < P), other=0.0)
    logit = tl.sum(part, axis=1)
    tl.store(logit_ptr + rows, logit, mask=mask_b)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=mask_b, other=0.0).to(tl.float32)
        t = tl.exp(-tl.abs(logit))
        # log1p(t) without log1p: log(1 + t) rounds to 0 once t < eps, the series does not
        softplus = tl.where(t < 1e-4, t * (1.0 - 0.5 * t), tl.log(1.0 + t))
        tl.store(loss_ptr + rows, tl.maximum(logit, 0.0) - logit * label + softplus, mask=mask_b)
        prob = tl.where(logit >= 0, 1.0 / (1.0 + t), t / (1.0 + t))
        tl.store(dlogit_ptr + rows, prob - label, mask=mask_b)


@triton.jit
def _sfg_gemm_grad_kernel(
        h_ptr, t_ptr, xy_ptr, dlogit_ptr, dz_ptr, g_ptr, dy_ptr, gt_ptr, x_ptr, xt_ptr, B, W, gamma,
        stride_a0, stride_a1, stride_z0, stride_z1, stride_x0, stride_x1,
        ACT: tl.constexpr, RESIDUAL: tl.constexpr, HAS_ENC: tl.constexpr, HAS_DEC: tl.constexpr,
        STORE_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The elementwise middle of the backward; G is [B, KG] fp32 with KG = W * (HAS_ENC + HAS_DEC).

    fused (enc + dec, g = dlogit):  G[:, :W] = dH = g * T * gamma * act'(H),  G[:, W:] = dT = g * Y
    encoder only (dZ given):        G = dH = dZ * gamma * act'(H)
    decoder only (dense Y):         G = dT = g * Y,  dY = g * T  ([B, W] fp32)
    xy: the [B, W] X (fused, for the residual Y) or the dense Y (decoder only), strides (a0, a1).

    STORE_T: also G^T [KG, B] and X^T [W, B] (x: the [B, W] X, strides (x0, x1)), both in fp32: the
    operands of the weight-gradient GEMM G^T @ X (K = B) stored K-contiguous, the only layout the TF32
    matrix units (wgmma) read without a transpose. Read from the [B, ...] tensors, that GEMM's tiles
    load 4 bytes per copy instead of 16 (bench/triton_aot.py's PTX shows it)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < B
    mask = mask_m[:, None] & (cols < W)[None, :]
    offs = rows[:, None] * W + cols[None, :]
    # every product below has an int64 tensor factor: a product of the int arguments alone (W * B) is
    # formed in i32 and would wrap before any widening
    out = rows[:, None] * (HAS_ENC + HAS_DEC) * W + cols[None, :]      # G [B, KG], KG = W * (HAS_ENC + HAS_DEC)
    out_t = cols[None, :] * B + rows[:, None]                          # [KG, B] / [W, B] (STORE_T)
    out_t_dec = (cols[None, :] + W) * B + rows[:, None]                # G^T's second half (dT): rows W + c
    if HAS_DEC:
        g = tl.load(dlogit_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        t = tl.load(t_ptr + offs, mask=mask, other=0.0)
    if HAS_ENC:
        h = tl.load(h_ptr + offs, mask=mask, other=0.0)
        if HAS_DEC:
            upstream = g * t
        else:
            upstream = tl.load(dz_ptr + rows[:, None] * stride_z0 + cols[None, :] * stride_z1,
                               mask=mask, other=0.0).to(tl.float32)
        dh = upstream * gamma * _activate_grad(h, ACT)
        tl.store(g_ptr + out, dh, mask=mask)
        if STORE_T:
            tl.store(gt_ptr + out_t, dh, mask=mask)
        if HAS_DEC:
            y = gamma * _activate(h, ACT)
            if RESIDUAL:
                y += tl.load(xy_ptr + rows[:, None] * stride_a0 + cols[None, :] * stride_a1,
                             mask=mask, other=0.0).to(tl.float32)
            tl.store(g_ptr + (out + W), g * y, mask=mask)
            if STORE_T:
                tl.store(gt_ptr + out_t_dec, g * y, mask=mask)
    else:
        y = tl.load(xy_ptr + rows[:, None] * stride_a0 + cols[None, :] * stride_a1, mask=mask, other=0.0)
        tl.store(g_ptr + out, g * y.to(tl.float32), mask=mask)
        if STORE_T:
            tl.store(gt_ptr + out_t, g * y.to(tl.float32), mask=mask)
        tl.store(dy_ptr + offs, g * t, mask=mask)
    if STORE_T:
        x = tl.load(x_ptr + rows[:, None] * stride_x0 + cols[None, :] * stride_x1, mask=mask, other=0.0)
        tl.store(xt_ptr + out_t, x.to(tl.float32), mask=mask)


@triton.jit
def _matmul_kernel(
        a_ptr, b_ptr, c_ptr, M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        s_ptr, e_ptr, stride_em, stride_en,
        ids_ptr, offsets_ptr, D, stride_ib, stride_in,
        ADD: tl.constexpr, SCATTER: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """C = A @ B (fp32 accumulate), + s[m] * E[m, n] (ADD = 1) or + E[m, n] (ADD = 2).

    SCATTER: C is the dense [V, D] table gradient and row m, column n of the product belongs to
    table row offsets[n // D] + ids[m, n // D], column n % D: atomically added there (the
    non-deterministic path; duplicates of hot ids meet in the atomics).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = rk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(a, b, acc, PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    if ADD != 0:
        e = tl.load(e_ptr + rm[:, None] * stride_em + rn[None, :] * stride_en, mask=mask, other=0.0).to(tl.float32)
        if ADD == 1:
            e = tl.load(s_ptr + rm, mask=mask_m, other=0.0).to(tl.float32)[:, None] * e
        acc += e
    if SCATTER:
        field = rn // D
        local = tl.load(ids_ptr + rm[:, None] * stride_ib + field[None, :] * stride_in, mask=mask, other=0)
        row = tl.load(offsets_ptr + field, mask=mask_n, other=0)[None, :] + local.to(tl.int64)
        tl.atomic_add(c_ptr + row * stride_cm + (rn - field * D)[None, :] * stride_cn, acc, mask=mask, sem="relaxed")
    else:
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc, mask=mask)


@triton.jit
def _pair_inside(o, k, PAIRS: tl.constexpr, SWAP: tl.constexpr):
    """Whether block (o, k) scores a pair of P (PAIRS: 0 upper i < j, 1 offdiag i != j, 2 all); the pair
    (i, j) is (o, k), or (k, o) with SWAP (the decoder's right orientation)."""
    if SWAP:
        i, j = k, o
    else:
        i, j = o, k
    if PAIRS == 0:
        return i < j
    elif PAIRS == 1:
        return i != j
    else:
        return i == i


@triton.jit
def _decoder_matrix_kernel(w_ptr, out_ptr, D, W, stride_o, stride_k, stride_p, stride_q,
                           KIND: tl.constexpr, PAIRS: tl.constexpr, SWAP: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (o, k) writes block (o, k) of Wd^T [W, W] (row-major), the decoder operand of the GEMMs:

        Wd^T[o*D + q, k*D + p] = Blk(o, k)[p, q] for pairs in P, else 0

    with Blk(o, k) = w[o, k] * I (KIND 1, scalar), diag(w[o, k, :]) (2, vector) or w[o, k] (3, matrix),
    ``w`` read through the strides of the weight's Blk-oriented view (o, k, p, q): the mask and the
    orientation cost no tensor of their own. fp32 out."""
    o = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    q = tl.arange(0, BLOCK_D).to(tl.int64)[:, None]
    p = tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
    valid = (q < D) & (p < D)
    base = w_ptr + o * stride_o + k * stride_k
    if KIND == 3:
        blk = tl.load(base + p * stride_p + q * stride_q, mask=valid, other=0.0).to(tl.float32)
    else:
        if KIND == 2:
            v = tl.load(base + p * stride_p, mask=p < D, other=0.0).to(tl.float32)
        else:
            v = tl.load(base).to(tl.float32)
        blk = tl.where(p == q, v, 0.0)
    blk = tl.where(_pair_inside(o, k, PAIRS, SWAP), blk, 0.0)
    tl.store(out_ptr + (o * D + q) * W + k * D + p, blk, mask=valid)


@triton.jit
def _decoder_matrix_bwd_kernel(g_ptr, dw_ptr, D, stride_g0, stride_g1, stride_o, stride_k, stride_p, stride_q,
                               KIND: tl.constexpr, PAIRS: tl.constexpr, SWAP: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    """The gradient of _decoder_matrix_kernel: from G = dL/dWd^T [W, W] (strides g0, g1), program (o, k)
    writes the decoder weight's gradient at (o, k) through the same oriented strides, 0 outside P:
    scalar sum_p G[o*D + p, k*D + p]; vector G[o*D + p, k*D + p] for each p; matrix G[o*D + q, k*D + p]."""
    o = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    q = tl.arange(0, BLOCK_D).to(tl.int64)[:, None]
    p = tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
    valid = (q < D) & (p < D)
    if KIND == 1:
        valid = valid & (p == q)      # only the block's diagonal is read
    g = tl.load(g_ptr + (o * D + q) * stride_g0 + (k * D + p) * stride_g1, mask=valid, other=0.0).to(tl.float32)
    g = tl.where(_pair_inside(o, k, PAIRS, SWAP), g, 0.0)
    base = dw_ptr + o * stride_o + k * stride_k
    if KIND == 3:
        tl.store(base + p * stride_p + q * stride_q, g.to(dw_ptr.dtype.element_ty), mask=valid)
    elif KIND == 2:
        diag = tl.sum(tl.where(p == q, g, 0.0), axis=0)          # [BLOCK_D]: G's diagonal, p by p
        offs = tl.arange(0, BLOCK_D).to(tl.int64)
        tl.store(base + offs * stride_p, diag.to(dw_ptr.dtype.element_ty), mask=offs < D)
    else:
        tl.store(base, tl.sum(tl.sum(g, axis=1), axis=0).to(dw_ptr.dtype.element_ty))
