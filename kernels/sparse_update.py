"""Fused backward of the embedding lookup: segment-reduce the gradient of each unique row and apply a
row-sparse optimizer update to the table in place (no dense [V, D] gradient ever exists).

Formulas (g = summed gradient of a touched row r, all arithmetic in fp32, stored in the table dtype):
    SGD:              w[r] -= lr * g
    rowwise Adagrad:  acc[r] += mean_d(g^2);  w[r] -= lr * g / (sqrt(acc[r]) + eps)
    Adam (lazy rows): m[r] = b1*m[r] + (1-b1)*g;  v[r] = b2*v[r] + (1-b2)*g^2;
                      w[r] -= lr * (m[r] / bias1) / (sqrt(v[r] / bias2) + eps)
"""
import triton
import triton.language as tl

from .embedding_lookup import segment_sum

KIND_SGD = 0
KIND_ADAGRAD = 1
KIND_ADAM = 2


@triton.jit
def _row_update(weight_ptr, stride_w, state1_ptr, state2_ptr, rows, g, mask_u, offs_d, mask_d, dim,
                lr, eps, beta1, beta2, bias1, bias2, KIND: tl.constexpr):
    """Apply the optimizer step (module docstring) to the table rows ``rows`` [P] whose summed fp32
    gradients are ``g`` [P, BLOCK_D], where ``mask_u``: each row is updated by exactly one lane of the
    launch, so the read-modify-write of the row and its state needs no atomics."""
    mask = mask_u[:, None] & mask_d[None, :]
    w_ptrs = weight_ptr + rows[:, None] * stride_w + offs_d[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    if KIND == 0:
        w = w - lr * g
    elif KIND == 1:
        acc = tl.load(state1_ptr + rows, mask=mask_u, other=0.0)
        acc = acc + tl.sum(g * g, axis=1) / dim
        tl.store(state1_ptr + rows, acc, mask=mask_u)
        w = w - (lr / (tl.sqrt(acc) + eps))[:, None] * g
    else:
        state_offs = rows[:, None] * dim + offs_d[None, :]
        m = tl.load(state1_ptr + state_offs, mask=mask, other=0.0)
        v = tl.load(state2_ptr + state_offs, mask=mask, other=0.0)
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * (g * g)
        tl.store(state1_ptr + state_offs, m, mask=mask)
        tl.store(state2_ptr + state_offs, v, mask=mask)
        w = w - lr * (m / bias1) / (tl.sqrt(v / bias2) + eps)
    tl.store(w_ptrs, w.to(weight_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sparse_update_kernel(weight_ptr, stride_w, grad_ptr, stride_g_b, stride_g_f, stride_g_d,
                          perm_ptr, sorted_rows_ptr, seg_end_ptr, partial_ptr, state1_ptr, state2_ptr,
                          total, num_fields, dim,
                          lr, eps, beta1, beta2, bias1, bias2,
                          KIND: tl.constexpr, PHASE: tl.constexpr, BLOCK_P: tl.constexpr,
                          CHUNK: tl.constexpr, WINDOW: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program owns BLOCK_P positions of the row-sorted (b, f) list x the whole row (BLOCK_D >= D).

    A touched row is updated by the program holding the first position of its segment, with the
    fixed-order sum of the segment, so the update is bitwise repeatable and each row is read and
    written by exactly one program. Launched twice (PHASE 0, then 1): a segment inside one window of
    the sorted list is updated in phase 0, one that crosses a window's end (every hot row) in phase 1
    from its pieces' partial sums (``segment_sum``). The grid is sized by B * N: no count of unique
    rows, no host sync.
    state1: Adagrad's fp32 [V] accumulator or Adam's fp32 [V, D] first moment; state2: Adam's second.
    """
    pid = tl.program_id(0)
    offs_p = (pid * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < total
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = offs_d < dim
    g, rows, head = segment_sum(grad_ptr, num_fields, stride_g_b, stride_g_f, stride_g_d, perm_ptr,
                                sorted_rows_ptr, seg_end_ptr, partial_ptr, total, offs_p, mask_p, offs_d, mask_d,
                                dim, tl.float32, PHASE, CHUNK, WINDOW, BLOCK_D)
    _row_update(weight_ptr, stride_w, state1_ptr, state2_ptr, rows, g, head, offs_d, mask_d, dim,
                lr, eps, beta1, beta2, bias1, bias2, KIND)


# Without sorting (non-deterministic mode only): a persistent int32 map over the table's rows, every entry
# UNCLAIMED between calls, names each touched row's owner, the first (b * N + f) position that reads it.
# Three launches over the B * N positions: claim (atomic min), accumulate (float atomic adds into the
# owner's slot of a [B * N, D] buffer) and update (each owner applies the step to its row and clears the
# map entry). The summation order of the adds is not fixed, so results repeat only to fp32 rounding.
UNCLAIMED = tl.constexpr(2 ** 31 - 1)     # (a constexpr: kernels read it as a compile-time constant)


@triton.jit
def _position_rows(ids_ptr, offsets_ptr, offs_p, mask_p, num_fields, stride_ids_b, stride_ids_f):
    """Table rows (int64) of the flattened positions ``offs_p`` = b * N + f, and their (b, f)."""
    b = offs_p // num_fields
    f = offs_p - b * num_fields
    ids = tl.load(ids_ptr + b * stride_ids_b + f * stride_ids_f, mask=mask_p, other=0).to(tl.int64)
    base = tl.load(offsets_ptr + f, mask=mask_p, other=0).to(tl.int64)
    return base + ids, b, f


@triton.jit
def _claim_rows_kernel(ids_ptr, offsets_ptr, row_map_ptr, total, num_fields, stride_ids_b, stride_ids_f,
                       BLOCK_P: tl.constexpr):
    """row_map[r] = min over the positions p that read row r (atomic min): r's owner. Entries of rows
    nobody reads stay UNCLAIMED. One program owns BLOCK_P positions."""
    offs_p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < total
    rows, b, f = _position_rows(ids_ptr, offsets_ptr, offs_p, mask_p, num_fields, stride_ids_b, stride_ids_f)
    tl.atomic_min(row_map_ptr + rows, offs_p.to(tl.int32), mask=mask_p, sem="relaxed")


@triton.jit
def _accumulate_rows_kernel(ids_ptr, offsets_ptr, row_map_ptr, grad_ptr, acc_ptr, total, num_fields, dim,
                            stride_ids_b, stride_ids_f, stride_g_b, stride_g_f, stride_g_d,
                            BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc[owner(r)] += grad[b, f] for every position (b, f) reading row r (float atomics into a zeroed
    fp32 [B * N, D] buffer: only owners' slots are written). One program owns BLOCK_P positions x the row."""
    offs_p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < total
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = mask_p[:, None] & (offs_d < dim)[None, :]
    rows, b, f = _position_rows(ids_ptr, offsets_ptr, offs_p, mask_p, num_fields, stride_ids_b, stride_ids_f)
    owner = tl.load(row_map_ptr + rows, mask=mask_p, other=0).to(tl.int64)
    g = tl.load(grad_ptr + (b * stride_g_b + f * stride_g_f)[:, None] + offs_d[None, :] * stride_g_d,
                mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(acc_ptr + owner[:, None] * dim + offs_d[None, :], g, mask=mask, sem="relaxed")


@triton.jit
def _owner_update_kernel(ids_ptr, offsets_ptr, row_map_ptr, acc_ptr, weight_ptr, stride_w, state1_ptr, state2_ptr,
                         total, num_fields, dim, stride_ids_b, stride_ids_f,
                         lr, eps, beta1, beta2, bias1, bias2,
                         KIND: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each row's owner applies the step with the row's summed gradient acc[owner], then sets the map
    entry back to UNCLAIMED for the next call. Another position of the row reads the entry as its owner
    or as UNCLAIMED (once cleared): neither equals itself, so exactly one lane updates each row."""
    offs_p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < total
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = offs_d < dim
    rows, b, f = _position_rows(ids_ptr, offsets_ptr, offs_p, mask_p, num_fields, stride_ids_b, stride_ids_f)
    owner = tl.load(row_map_ptr + rows, mask=mask_p, other=-1).to(tl.int64)
    mine = mask_p & (owner == offs_p)
    g = tl.load(acc_ptr + offs_p[:, None] * dim + offs_d[None, :], mask=mine[:, None] & mask_d[None, :], other=0.0)
    _row_update(weight_ptr, stride_w, state1_ptr, state2_ptr, rows, g, mine, offs_d, mask_d, dim,
                lr, eps, beta1, beta2, bias1, bias2, KIND)
    tl.store(row_map_ptr + rows, tl.full([BLOCK_P], UNCLAIMED, tl.int32), mask=mine)
