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
    mask_u = head
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
