"""Fused SFG interaction: gather -> encoder GEMM -> decoder -> row-wise dot (-> BCE), and its backward.

Notation: a sample's fields are cut into N blocks of D columns.
X is the operand the decoder mixes (the raw V, gathered from the table, or a dense [B, N, D] tensor)
and Y the operand it is scored against:

    Y_o   = gamma * act( sum_k X_k @ We[o, k]^T + b_o ) (+ X_o)      encoder (We[o, k] = D x D block)
    T_o   = sum_k X_k @ Blk(o, k)                                    decoder, Blk = [D_in, D_out] block
    logit = sum_o < Y_o, T_o >

Blk(o, k) is ``r[o, k] * I`` (scalar / identity), ``diag(u[o, k])`` (vector) or a dense D x D block
(matrix); the launcher passes the decoder weight as a strided view so that the left/right
orientation of the pair is a choice of strides, not a copy. Because both GEMMs walk the same
(o, k) blocks of X, one K-loop feeds both accumulators from one loaded A tile.

Every program owns BLOCK_B samples (forward, dX pass) or one (o, k) weight block (weight-gradient
pass, looping over the batch, so weight gradients need no atomics and are deterministic).
Row offsets into the table and all row * stride products are int64 (tables above 2^31 elements).
"""
import triton
import triton.language as tl

# activation codes shared with the launcher
ACT_CODES = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3, "silu": 4, "gelu": 5}
# decoder codes: 0 = no decoder (encoder only), 1 = scalar/identity, 2 = vector, 3 = matrix
KIND_CODES = {"none": 0, "identity": 1, "scalar": 1, "vector": 2, "matrix": 3}


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bfloat16 value (ties to even), kept in fp32: the interpreter's own fp32 -> bf16
    cast truncates and its bf16 dot is wrong, so its stand-in for a bf16 dot rounds here and multiplies in
    exact fp32 (the products of two bf16 values are exact in fp32, as in the matrix units). Finite values
    and infinities map as the hardware conversion maps them; a NaN stays a NaN (the rounding add would
    carry some payloads into infinity or past the sign bit)."""
    u = x.to(tl.uint32, bitcast=True)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return tl.where(x != x, x, u.to(tl.float32, bitcast=True))


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32. PRECISION: "ieee" exact fp32, "tf32" TF32 matrix units,
    "bf16" / "fp16" operands rounded to that half type (what a GEMM under torch.autocast computes, at
    the matrix units' half rate), "bf16_rne" the interpreter's stand-in for "bf16"."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PRECISION == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif PRECISION == "bf16_rne":
        return tl.dot(_round_bf16(a.to(tl.float32)), _round_bf16(b.to(tl.float32)), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def _tanh(x):
    # libdevice tanh is not available under the interpreter; (1 - t) / (1 + t) with t = exp(-2|x|)
    # loses relative precision near 0 (1 - t cancels), so small |x| uses the odd Taylor series.
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    big = (1.0 - t) / (1.0 + t)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    r = tl.where(ax < 0.1, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def _activate(h, ACT: tl.constexpr):
    if ACT == 0:
        out = h
    elif ACT == 1:
        out = tl.maximum(h, 0.0)
    elif ACT == 2:
        out = _tanh(h)
    elif ACT == 3:
        out = tl.sigmoid(h)
    elif ACT == 4:
        out = h * tl.sigmoid(h)
    else:
        out = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    return out


@triton.jit
def _activate_grad(h, ACT: tl.constexpr):
    """d act(h) / dh, matching torch's conventions (relu'(0) = 0, exact erf GELU)."""
    if ACT == 0:
        out = h * 0.0 + 1.0
    elif ACT == 1:
        out = tl.where(h > 0, 1.0, 0.0)
    elif ACT == 2:
        t = _tanh(h)
        out = 1.0 - t * t
    elif ACT == 3:
        s = tl.sigmoid(h)
        out = s * (1.0 - s)
    elif ACT == 4:
        s = tl.sigmoid(h)
        out = s * (1.0 + h * (1.0 - s))
    else:
        out = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    return out


@triton.jit
def _field_ptrs(x_ptr, ids_ptr, offsets_ptr, rows, mask_b, field, cols,
                stride_ib, stride_in, stride_xb, stride_xn, stride_xd, GATHER: tl.constexpr):
    """Pointers to field ``field`` of X for the samples ``rows``: a table gather or a dense read."""
    # every stride product in int64: a transposed table or a strided V puts field * stride past 2^31
    field64 = tl.cast(field, tl.int64)
    lanes = cols[None, :].to(tl.int64) * stride_xd
    if GATHER:
        local = tl.load(ids_ptr + rows * stride_ib + field64 * stride_in, mask=mask_b, other=0)
        table_row = tl.load(offsets_ptr + field64) + local.to(tl.int64)   # int64: tables > 2^31 elements
        ptrs = x_ptr + table_row[:, None] * stride_xb + lanes
    else:
        ptrs = x_ptr + rows[:, None] * stride_xb + field64 * stride_xn + lanes
    return ptrs


@triton.jit
def _load_field(x_ptr, ids_ptr, offsets_ptr, rows, mask_b, field, cols, mask_d,
                stride_ib, stride_in, stride_xb, stride_xn, stride_xd, GATHER: tl.constexpr):
    ptrs = _field_ptrs(x_ptr, ids_ptr, offsets_ptr, rows, mask_b, field, cols,
                       stride_ib, stride_in, stride_xb, stride_xn, stride_xd, GATHER)
    # bf16/fp16 tables are widened at load: accumulation is always fp32
    return tl.load(ptrs, mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _encoder_block(enc_w_ptr, o, k, D, rows_q, cols_p, mask_q, mask_p, stride_w0, stride_w1):
    """We[o*D + q, k*D + p] laid out as [q, p] (rows_q index the output, cols_p the input)."""
    r = (o * D + rows_q).to(tl.int64)
    c = (k * D + cols_p).to(tl.int64)
    return tl.load(enc_w_ptr + r[:, None] * stride_w0 + c[None, :] * stride_w1,
                   mask=mask_q[:, None] & mask_p[None, :], other=0.0).to(tl.float32)


@triton.jit
def _decoder_block(dec_ptr, o, k, rows_p, cols_q, mask_p, mask_q, stride_d0, stride_d1, stride_d2, stride_d3):
    """Blk(o, k)[p, q] = dec[o, k, p, q] for the matrix decoder (any strides).

    Every offset is int64: a matrix decoder holds (N*D)^2 elements, past 2^31 from N = 363 at D = 128.
    """
    base = dec_ptr + tl.cast(o, tl.int64) * stride_d0 + tl.cast(k, tl.int64) * stride_d1
    return tl.load(base + rows_p[:, None].to(tl.int64) * stride_d2 + cols_q[None, :].to(tl.int64) * stride_d3,
                   mask=mask_p[:, None] & mask_q[None, :], other=0.0).to(tl.float32)


@triton.jit
def _field_accumulators(x_ptr, ids_ptr, offsets_ptr, enc_w_ptr, dec_ptr, rows, mask_b, o, N, D,
                        d_row, d_col, mask_row, mask_col,
                        stride_ib, stride_in, stride_xb, stride_xn, stride_xd,
                        stride_w0, stride_w1, stride_d0, stride_d1, stride_d2, stride_d3,
                        HAS_ENC: tl.constexpr, KIND: tl.constexpr, GATHER: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """(pre-activation H_o, decoder mix T_o) for output field o: one pass over the input fields k.

    The loop body is written out rather than calling the small helpers above: under the
    interpreter every nested jit call costs about a millisecond, and this is the hot loop.
    """
    acc_h = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    mask_x = mask_b[:, None] & mask_col[None, :]
    # stride products in int64 (field * stride and lane * stride pass 2^31 on strided inputs)
    o64 = tl.cast(o, tl.int64)
    col64 = d_col.to(tl.int64)
    row64 = d_row.to(tl.int64)
    w_rows = o64 * D + col64                       # output columns q of We for field o
    x_lanes = col64[None, :] * stride_xd
    for k in range(0, N):
        k64 = tl.cast(k, tl.int64)
        if GATHER:
            local = tl.load(ids_ptr + rows * stride_ib + k64 * stride_in, mask=mask_b, other=0)
            table_row = tl.load(offsets_ptr + k64) + local.to(tl.int64)   # int64: tables > 2^31 elements
            x_ptrs = x_ptr + table_row[:, None] * stride_xb + x_lanes
        else:
            x_ptrs = x_ptr + rows[:, None] * stride_xb + k64 * stride_xn + x_lanes
        x = tl.load(x_ptrs, mask=mask_x, other=0.0).to(tl.float32)
        if HAS_ENC:
            # [p, q] = We[o*D + q, k*D + p]: the transposed block, so X_k @ w is X_k @ We[o, k]^T
            w_cols = k64 * D + row64
            w = tl.load(enc_w_ptr + w_cols[:, None] * stride_w1 + w_rows[None, :] * stride_w0,
                        mask=mask_row[:, None] & mask_col[None, :], other=0.0).to(tl.float32)
            acc_h = _mma(x, w, acc_h, PRECISION)
        if KIND == 1:
            r = tl.load(dec_ptr + o64 * stride_d0 + k64 * stride_d1).to(tl.float32)
            acc_t += r * x
        elif KIND == 2:
            u = tl.load(dec_ptr + o64 * stride_d0 + k64 * stride_d1 + col64 * stride_d2,
                        mask=mask_col, other=0.0).to(tl.float32)
            acc_t += u[None, :] * x
        elif KIND == 3:
            blk = tl.load(dec_ptr + o64 * stride_d0 + k64 * stride_d1 + row64[:, None] * stride_d2
                          + col64[None, :] * stride_d3,
                          mask=mask_row[:, None] & mask_col[None, :], other=0.0).to(tl.float32)
            acc_t = _mma(x, blk, acc_t, PRECISION)
    return acc_h, acc_t


@triton.jit
def _sfg_interaction_fwd_kernel(
        x_ptr, ids_ptr, offsets_ptr, y_ptr, enc_w_ptr, enc_b_ptr, dec_ptr,
        labels_ptr, logit_ptr, loss_ptr, dlogit_ptr, z_ptr,
        B, N, D, gamma,
        stride_ib, stride_in, stride_xb, stride_xn, stride_xd,
        stride_yb, stride_yn, stride_yd,
        stride_w0, stride_w1, stride_d0, stride_d1, stride_d2, stride_d3,
        ACT: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, Y_MODE: tl.constexpr,
        KIND: tl.constexpr, GATHER: tl.constexpr, STORE_Z: tl.constexpr, HAS_LABELS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Forward. Y_MODE: 0 = Y is the encoder output, 1 = Y is X itself (no encoder), 2 = dense Y.

    Writes logit [B] (KIND > 0), Z = Y as contiguous [B, N, D] (STORE_Z), and with labels the
    per-sample BCE-with-logits loss and dloss/dlogit = sigmoid(logit) - y.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = rows < B
    d = tl.arange(0, BLOCK_D).to(tl.int64)          # int64 lanes: every offset below is int64
    mask_d = d < D
    mask_bd = mask_b[:, None] & mask_d[None, :]
    logit = tl.zeros([BLOCK_B], dtype=tl.float32)
    for o in range(0, N):
        o64 = tl.cast(o, tl.int64)
        acc_h, acc_t = _field_accumulators(
            x_ptr, ids_ptr, offsets_ptr, enc_w_ptr, dec_ptr, rows, mask_b, o, N, D, d, d, mask_d, mask_d,
            stride_ib, stride_in, stride_xb, stride_xn, stride_xd,
            stride_w0, stride_w1, stride_d0, stride_d1, stride_d2, stride_d3,
            Y_MODE == 0, KIND, GATHER, BLOCK_B, BLOCK_D, PRECISION)
        if Y_MODE == 0:
            h = acc_h
            if HAS_BIAS:
                h += tl.load(enc_b_ptr + o64 * D + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            y = gamma * _activate(h, ACT)
            if RESIDUAL:
                y += _load_field(x_ptr, ids_ptr, offsets_ptr, rows, mask_b, o, d, mask_d,
                                 stride_ib, stride_in, stride_xb, stride_xn, stride_xd, GATHER)
            # padded columns: act(0) need not be 0 (sigmoid), so zero them before the row-dot
            y = tl.where(mask_bd, y, 0.0)
        elif Y_MODE == 1:
            y = _load_field(x_ptr, ids_ptr, offsets_ptr, rows, mask_b, o, d, mask_d,
                            stride_ib, stride_in, stride_xb, stride_xn, stride_xd, GATHER)
        else:
            y = tl.load(y_ptr + rows[:, None] * stride_yb + o64 * stride_yn
                        + d[None, :] * stride_yd,
                        mask=mask_bd, other=0.0).to(tl.float32)
        if STORE_Z:
            tl.store(z_ptr + rows[:, None] * N * D + o64 * D + d[None, :], y, mask=mask_bd)
        if KIND != 0:
            logit += tl.sum(y * acc_t, axis=1)
    if KIND != 0:
        tl.store(logit_ptr + rows, logit, mask=mask_b)
        if HAS_LABELS:
            label = tl.load(labels_ptr + rows, mask=mask_b, other=0.0).to(tl.float32)
            t = tl.exp(-tl.abs(logit))
            # log1p(t) without log1p: log(1 + t) rounds to 0 once t < eps, the series does not
            softplus = tl.where(t < 1e-4, t * (1.0 - 0.5 * t), tl.log(1.0 + t))
            loss = tl.maximum(logit, 0.0) - logit * label + softplus
            prob = tl.where(logit >= 0, 1.0 / (1.0 + t), t / (1.0 + t))
            tl.store(loss_ptr + rows, loss, mask=mask_b)
            tl.store(dlogit_ptr + rows, prob - label, mask=mask_b)


@triton.jit
def _sfg_interaction_bwd_dy_kernel(
        x_ptr, ids_ptr, offsets_ptr, y_ptr, enc_w_ptr, enc_b_ptr, dec_ptr,
        dlogit_ptr, dz_ptr, dh_ptr, gy_ptr, dy_ptr,
        B, N, D, gamma,
        stride_ib, stride_in, stride_xb, stride_xn, stride_xd,
        stride_yb, stride_yn, stride_yd,
        stride_w0, stride_w1, stride_d0, stride_d1, stride_d2, stride_d3,
        stride_zb, stride_zn, stride_zd,
        ACT: tl.constexpr, HAS_BIAS: tl.constexpr, Y_MODE: tl.constexpr, RESIDUAL: tl.constexpr,
        KIND: tl.constexpr, GATHER: tl.constexpr, STORE_DY: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Backward pass 1 (per sample tile): recompute H and T rather than storing them, then write

        dY_o = g * T_o            (or the incoming dZ when there is no decoder, KIND = 0)
        dH_o = dY_o * gamma * act'(H_o)        gY_o = g * Y_o   (the decoder's weight-side operand)
    as contiguous [B, N, D] fp32 buffers (O(B*N*D), the size of V).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = rows < B
    d = tl.arange(0, BLOCK_D).to(tl.int64)          # int64 lanes: every offset below is int64
    mask_d = d < D
    mask_bd = mask_b[:, None] & mask_d[None, :]
    out_offs = rows[:, None] * N * D + d[None, :]
    if KIND != 0:
        g = tl.load(dlogit_ptr + rows, mask=mask_b, other=0.0).to(tl.float32)
    for o in range(0, N):
        o64 = tl.cast(o, tl.int64)
        acc_h, acc_t = _field_accumulators(
            x_ptr, ids_ptr, offsets_ptr, enc_w_ptr, dec_ptr, rows, mask_b, o, N, D, d, d, mask_d, mask_d,
            stride_ib, stride_in, stride_xb, stride_xn, stride_xd,
            stride_w0, stride_w1, stride_d0, stride_d1, stride_d2, stride_d3,
            Y_MODE == 0, KIND, GATHER, BLOCK_B, BLOCK_D, PRECISION)
        if KIND != 0:
            dy = g[:, None] * acc_t
        else:
            dy = tl.load(dz_ptr + rows[:, None] * stride_zb + o64 * stride_zn
                         + d[None, :] * stride_zd,
                         mask=mask_bd, other=0.0).to(tl.float32)
        if Y_MODE == 0:
            h = acc_h
            if HAS_BIAS:
                h += tl.load(enc_b_ptr + o64 * D + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            dh = dy * gamma * _activate_grad(h, ACT)
            tl.store(dh_ptr + out_offs + o64 * D, dh, mask=mask_bd)
            if KIND != 0:
                y = gamma * _activate(h, ACT)
                if RESIDUAL:
                    y += _load_field(x_ptr, ids_ptr, offsets_ptr, rows, mask_b, o, d, mask_d,
                                     stride_ib, stride_in, stride_xb, stride_xn, stride_xd, GATHER)
        elif Y_MODE == 1:
            y = _load_field(x_ptr, ids_ptr, offsets_ptr, rows, mask_b, o, d, mask_d,
                            stride_ib, stride_in, stride_xb, stride_xn, stride_xd, GATHER)
        else:
            y = tl.load(y_ptr + rows[:, None] * stride_yb + o64 * stride_yn
                        + d[None, :] * stride_yd,
                        mask=mask_bd, other=0.0).to(tl.float32)
        if KIND != 0:
            tl.store(gy_ptr + out_offs + o64 * D, g[:, None] * y, mask=mask_bd)
        if STORE_DY:
            tl.store(dy_ptr + out_offs + o64 * D, dy, mask=mask_bd)


@triton.jit
def _sfg_interaction_bwd_dx_kernel(
        enc_w_ptr, dec_ptr, dh_ptr, gy_ptr, dy_ptr, dx_ptr, ids_ptr, offsets_ptr,
        B, N, D,
        stride_ib, stride_in, stride_xb, stride_xn, stride_xd,
        stride_w0, stride_w1, stride_d0, stride_d1, stride_d2, stride_d3,
        HAS_ENC: tl.constexpr, KIND: tl.constexpr, ADD_DY: tl.constexpr, SCATTER: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Backward pass 2 (per sample tile): dX_k = sum_o dH_o @ We[o, k] + gY_o @ Blk(o, k)^T (+ dY_k).

    ADD_DY: X also feeds Y directly (residual encoder, or Y = X). SCATTER: atomically add dX_k into
    the dense table gradient at the gathered rows (the non-deterministic fast path); otherwise dX is
    stored as [B, N, D] (dx strides) for a deterministic reduction by the launcher.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = rows < B
    d = tl.arange(0, BLOCK_D).to(tl.int64)          # int64 lanes: every offset below is int64
    mask_d = d < D
    mask_bd = mask_b[:, None] & mask_d[None, :]
    buf_offs = rows[:, None] * N * D + d[None, :]
    for k in range(0, N):
        k64 = tl.cast(k, tl.int64)
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for o in range(0, N):
            o64 = tl.cast(o, tl.int64)
            if HAS_ENC:
                dh = tl.load(dh_ptr + buf_offs + o64 * D, mask=mask_bd, other=0.0)
                w = _encoder_block(enc_w_ptr, o64, k64, D, d, d, mask_d, mask_d, stride_w0, stride_w1)  # [q, p]
                acc = _mma(dh, w, acc, PRECISION)
            if KIND != 0:
                gy = tl.load(gy_ptr + buf_offs + o64 * D, mask=mask_bd, other=0.0)
                if KIND == 1:
                    r = tl.load(dec_ptr + o64 * stride_d0 + k64 * stride_d1).to(tl.float32)
                    acc += r * gy
                elif KIND == 2:
                    u = tl.load(dec_ptr + o64 * stride_d0 + k64 * stride_d1 + d * stride_d2,
                                mask=mask_d, other=0.0).to(tl.float32)
                    acc += u[None, :] * gy
                else:
                    # [q, p] = Blk(o, k)[p, q]: the transposed block
                    blk = tl.trans(_decoder_block(dec_ptr, o64, k64, d, d, mask_d, mask_d,
                                                  stride_d0, stride_d1, stride_d2, stride_d3))
                    acc = _mma(gy, blk, acc, PRECISION)
        if ADD_DY:
            acc += tl.load(dy_ptr + buf_offs + k64 * D, mask=mask_bd, other=0.0)
        ptrs = _field_ptrs(dx_ptr, ids_ptr, offsets_ptr, rows, mask_b, k64, d,
                           stride_ib, stride_in, stride_xb, stride_xn, stride_xd, SCATTER)
        if SCATTER:
            tl.atomic_add(ptrs, acc, mask=mask_bd, sem="relaxed")
        else:
            tl.store(ptrs, acc, mask=mask_bd)


@triton.jit
def _sfg_interaction_bwd_dw_kernel(
        x_ptr, ids_ptr, offsets_ptr, dh_ptr, gy_ptr, d_enc_w_ptr, d_enc_b_ptr, d_dec_ptr,
        B, N, D,
        stride_ib, stride_in, stride_xb, stride_xn, stride_xd,
        HAS_ENC: tl.constexpr, HAS_BIAS: tl.constexpr, KIND: tl.constexpr, GATHER: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Backward pass 3: program (o, k) owns weight block (o, k) and sums over the whole batch.

        dWe[o, k]   = sum_b dH_o^T X_k        ([D, D], written into d_enc_w [N*D, N*D])
        dBlk(o, k)  = sum_b X_k^T gY_o        (scalar: its trace part, vector: its diagonal)
        db_o        = sum_b dH_o               (by the k = 0 programs)
    Owning the output block means no atomics: the weight gradients are deterministic.
    Outputs are contiguous fp32: d_dec is [N, N], [N, N, D] or [N, N, D, D] in Blk orientation.
    """
    pid = tl.program_id(0)
    o64 = (pid // N).to(tl.int64)
    k64 = (pid % N).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)          # int64 lanes: every offset below is int64
    mask_d = d < D
    acc_w = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    acc_blk = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    acc_vec = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B).to(tl.int64)
        mask_b = rows < B
        mask_bd = mask_b[:, None] & mask_d[None, :]
        buf_offs = rows[:, None] * N * D + d[None, :]
        x = _load_field(x_ptr, ids_ptr, offsets_ptr, rows, mask_b, k64, d, mask_d,
                        stride_ib, stride_in, stride_xb, stride_xn, stride_xd, GATHER)
        if HAS_ENC:
            dh = tl.load(dh_ptr + buf_offs + o64 * D, mask=mask_bd, other=0.0)
            acc_w = _mma(tl.trans(dh), x, acc_w, PRECISION)
            if HAS_BIAS:
                acc_b += tl.sum(dh, axis=0)
        if KIND != 0:
            gy = tl.load(gy_ptr + buf_offs + o64 * D, mask=mask_bd, other=0.0)
            if KIND == 3:
                acc_blk = _mma(tl.trans(x), gy, acc_blk, PRECISION)
            else:
                acc_vec += tl.sum(x * gy, axis=0)
    mask_dd = mask_d[:, None] & mask_d[None, :]
    if HAS_ENC:
        r = o64 * D + d
        c = k64 * D + d
        tl.store(d_enc_w_ptr + r[:, None] * N * D + c[None, :], acc_w, mask=mask_dd)
        if HAS_BIAS:
            if k64 == 0:
                tl.store(d_enc_b_ptr + o64 * D + d, acc_b, mask=mask_d)
    if KIND == 1:
        tl.store(d_dec_ptr + pid.to(tl.int64), tl.sum(acc_vec, axis=0))
    elif KIND == 2:
        tl.store(d_dec_ptr + pid.to(tl.int64) * D + d, acc_vec, mask=mask_d)
    elif KIND == 3:
        base = d_dec_ptr + pid.to(tl.int64) * D * D
        tl.store(base + d[:, None] * D + d[None, :], acc_blk, mask=mask_dd)
