"""Multi-field embedding lookup from one concatenated table: forward gather and weight-gradient kernels.

Row of (sample b, field f) is ``offsets[f] + ids[b, f]``; every row index and every ``row * stride``
product is formed in int64 so tables past 2^31 elements address correctly.
"""
import triton
import triton.language as tl


@triton.jit
def _tile_rows(ids_ptr, offsets_ptr, batch, num_fields, dim, stride_ids_b, stride_ids_f,
               BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_B samples x all fields: int64 table rows ``offsets[f] + ids[b, f]`` and the
    [BLOCK_B, BLOCK_N, BLOCK_D] mask. Everything is int64 before any multiply (rows * stride > 2^31)."""
    pid = tl.program_id(0)
    offs_b = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_f = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_bf = (offs_b[:, None] < batch) & (offs_f[None, :] < num_fields)
    ids = tl.load(ids_ptr + offs_b[:, None] * stride_ids_b + offs_f[None, :] * stride_ids_f,
                  mask=mask_bf, other=0).to(tl.int64)
    base = tl.load(offsets_ptr + offs_f, mask=offs_f < num_fields, other=0).to(tl.int64)
    rows = base[None, :] + ids                                     # int64 [BLOCK_B, BLOCK_N]
    mask = mask_bf[:, :, None] & (offs_d[None, None, :] < dim)
    return offs_b, offs_f, offs_d, rows, mask


@triton.jit
def _embedding_lookup_fwd_kernel(ids_ptr, offsets_ptr, weight_ptr, out_ptr,
                                 batch, num_fields, dim,
                                 stride_ids_b, stride_ids_f, stride_w,
                                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, f, :] = weight[offsets[f] + ids[b, f], :].

    Each program owns BLOCK_B samples x all N fields (BLOCK_N >= N) x the whole row (BLOCK_D >= D),
    so one program issues BLOCK_B * N independent row gathers. Values pass through fp32 (exact for
    fp16/bf16/fp32; bf16 must not be used arithmetically under the interpreter) and are stored in the
    output's dtype; fp64 tables gather in fp64.
    """
    offs_b, offs_f, offs_d, rows, mask = _tile_rows(ids_ptr, offsets_ptr, batch, num_fields, dim,
                                                    stride_ids_b, stride_ids_f, BLOCK_B, BLOCK_N, BLOCK_D)
    src = weight_ptr + rows[:, :, None] * stride_w + offs_d[None, None, :]
    vals = tl.load(src, mask=mask, other=0.0)
    if vals.dtype != tl.float64:
        vals = vals.to(tl.float32)
    dst = out_ptr + ((offs_b[:, None] * num_fields + offs_f[None, :]) * dim)[:, :, None] + offs_d[None, None, :]
    tl.store(dst, vals.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _embedding_lookup_bwd_kernel(ids_ptr, offsets_ptr, grad_ptr, grad_weight_ptr,
                                 batch, num_fields, dim,
                                 stride_ids_b, stride_ids_f, stride_g_b, stride_g_f, stride_g_d,
                                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_weight[offsets[f] + ids[b, f], :] += grad[b, f, :] with atomics (non-deterministic order).

    Tiling as in the forward; duplicate rows meet in the atomic adds of an fp32 (or fp64) buffer.
    """
    offs_b, offs_f, offs_d, rows, mask = _tile_rows(ids_ptr, offsets_ptr, batch, num_fields, dim,
                                                    stride_ids_b, stride_ids_f, BLOCK_B, BLOCK_N, BLOCK_D)
    g = tl.load(grad_ptr + (offs_b[:, None] * stride_g_b + offs_f[None, :] * stride_g_f)[:, :, None]
                + offs_d[None, None, :] * stride_g_d, mask=mask, other=0.0)
    if g.dtype != tl.float64:
        g = g.to(tl.float32)
    tl.atomic_add(grad_weight_ptr + rows[:, :, None] * dim + offs_d[None, None, :],
                  g.to(grad_weight_ptr.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def segment_sum(grad_ptr, num_fields, stride_g_b, stride_g_f, stride_g_d, perm_ptr, sorted_rows_ptr, seg_end_ptr,
                partial_ptr, total, offs_p, mask_p, offs_d, mask_d, dim,
                ACC_DTYPE: tl.constexpr, PHASE: tl.constexpr, CHUNK: tl.constexpr, WINDOW: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Sums of the gradient rows of the segments that start at positions ``offs_p`` of a row-sorted list,
    in two launches whose serial depth is bounded whatever the ids' skew.

    ``sorted_rows`` [total] holds the table rows of the flattened (b * N + f) positions sorted stably by
    row, ``perm`` their positions, ``seg_end[p]`` the end of the run of equal rows that holds p. A
    position heads a segment when its row differs from the one before it. The sorted list is cut into
    windows of WINDOW positions, and a segment into pieces at the window starts:
    - PHASE 0 sums every piece, CHUNK members per step ([P, CHUNK, D] tiles reduced over CHUNK), so a
      piece costs at most WINDOW / CHUNK steps. A segment inside one window is then complete: it is
      returned as owned. A piece of a longer segment is stored in ``partial`` [2 * windows, D]: the
      piece starting window w at slot 2w, the head piece of the segment that leaves window w at slot
      2w + 1 (at most one of each per window, so the buffer is tiny and needs no count of pieces).
    - PHASE 1 (a later launch) sums the stored pieces of each segment that crosses a window end, CHUNK
      pieces per step: a hot row of B positions costs (B / WINDOW) / CHUNK steps, not B / CHUNK.
    The grid is sized by B * N and needs no count of unique rows (no host sync). The chunking and the
    reduction trees are fixed by the shapes, so every sum is bitwise repeatable (no atomics).
    Returns ``(acc [BLOCK_P, BLOCK_D] in ACC_DTYPE, rows [BLOCK_P] int64, owned [BLOCK_P])``: owned
    marks the segment heads whose whole sum this phase holds; each head is owned in exactly one phase.
    """
    rows = tl.load(sorted_rows_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    prev = tl.load(sorted_rows_ptr + (offs_p - 1), mask=mask_p & (offs_p > 0), other=-1).to(tl.int64)
    head = mask_p & (rows != prev)
    window = offs_p // WINDOW
    window_end = (window + 1) * WINDOW
    offs_c = tl.arange(0, CHUNK).to(tl.int64)
    acc = tl.zeros([offs_p.shape[0], BLOCK_D], dtype=ACC_DTYPE)
    if PHASE == 0:
        piece = head | (mask_p & (offs_p == window * WINDOW))
        end = tl.load(seg_end_ptr + offs_p, mask=piece, other=0).to(tl.int64)
        length = tl.where(piece, tl.minimum(end, window_end) - offs_p, 0)
        longest = tl.max(length, axis=0)
        for k in range(0, longest, CHUNK):
            live = piece[:, None] & ((k + offs_c)[None, :] < length[:, None])              # [P, CHUNK]
            j = tl.load(perm_ptr + (offs_p[:, None] + (k + offs_c)[None, :]), mask=live, other=0).to(tl.int64)
            b = j // num_fields
            f = j - b * num_fields
            row_base = b * stride_g_b + f * stride_g_f
            g = tl.load(grad_ptr + row_base[:, :, None] + offs_d[None, None, :] * stride_g_d,
                        mask=live[:, :, None] & mask_d[None, None, :], other=0.0)
            acc += tl.sum(g.to(ACC_DTYPE), axis=1)
        owned = head & (end <= window_end)
        stored = piece & ~owned                 # a later window's piece, or the head piece of a hot row
        slot = 2 * window + tl.where(offs_p == window * WINDOW, 0, 1)
        tl.store(partial_ptr + slot[:, None] * dim + offs_d[None, :], acc,
                 mask=stored[:, None] & mask_d[None, :])
    else:
        end = tl.load(seg_end_ptr + offs_p, mask=head, other=0).to(tl.int64)
        last = (end - 1) // WINDOW
        owned = head & (end > window_end)
        count = tl.where(owned, last - window + 1, 0)
        longest = tl.max(count, axis=0)
        first_slot = 2 * window + tl.where(offs_p == window * WINDOW, 0, 1)
        for k in range(0, longest, CHUNK):
            kk = k + offs_c
            live = owned[:, None] & (kk[None, :] < count[:, None])                         # [P, CHUNK]
            slot = tl.where(kk[None, :] == 0, first_slot[:, None], 2 * (window[:, None] + kk[None, :]))
            g = tl.load(partial_ptr + slot[:, :, None] * dim + offs_d[None, None, :],
                        mask=live[:, :, None] & mask_d[None, None, :], other=0.0)
            acc += tl.sum(g, axis=1)
    return acc, rows, owned


@triton.jit
def _embedding_lookup_bwd_sorted_kernel(grad_ptr, grad_weight_ptr, perm_ptr, sorted_rows_ptr, seg_end_ptr,
                                        partial_ptr, total, num_fields, dim,
                                        stride_g_b, stride_g_f, stride_g_d,
                                        ACC_DTYPE: tl.constexpr, PHASE: tl.constexpr, BLOCK_P: tl.constexpr,
                                        CHUNK: tl.constexpr, WINDOW: tl.constexpr, BLOCK_D: tl.constexpr):
    """Deterministic weight gradient: grad_weight[row] = the fixed-order sum of the row's segment.

    Launched twice (PHASE 0, then 1; see ``segment_sum``). Each program owns BLOCK_P positions of the
    sorted list; a row is written only by the program holding its segment's first position, in the
    phase that completes its sum, so each row is written exactly once.
    """
    pid = tl.program_id(0)
    offs_p = (pid * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < total
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = offs_d < dim
    acc, rows, owned = segment_sum(grad_ptr, num_fields, stride_g_b, stride_g_f, stride_g_d, perm_ptr,
                                   sorted_rows_ptr, seg_end_ptr, partial_ptr, total, offs_p, mask_p, offs_d,
                                   mask_d, dim, ACC_DTYPE, PHASE, CHUNK, WINDOW, BLOCK_D)
    tl.store(grad_weight_ptr + rows[:, None] * dim + offs_d[None, :],
             acc.to(grad_weight_ptr.dtype.element_ty), mask=owned[:, None] & mask_d[None, :])
