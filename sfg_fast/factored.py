"""The ``"torch"`` backend: SFG in plain PyTorch, factored so no pair tensor ever exists.

Algebra of the factored forms. With the bilinear score (a_i @ W_ij) . b_j summed over P:
  identity / scalar: T = R @ b per sample (R = w * mask, [N, N]); logit = sum(a * T)
  vector:            T[b, i, d] = sum_j U[i, j, d] b[b, j, d];      logit = sum(a * T)
  matrix:            T = b.flat @ Wbig^T (one [B, ND] x [ND, ND] GEMM); logit = rowdot(a.flat, T)
Autograd keeps only O(B*N*D) tensors (a, b, T). Inputs are validated by ``sfg_fast.functional``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks as C
from ._backend import in_torch_func


def embedding_lookup(ids, weight, offsets):
    rows = ids.to(torch.int64) + offsets          # int64 row index into the concatenated table
    if (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64) and weight.requires_grad
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not in_torch_func()):
        return _CpuGather.apply(rows, weight)
    return F.embedding(rows, weight)


class _CpuGather(torch.autograd.Function):
    """``F.embedding``'s gather whose table gradient is one ``index_add_`` of the [B*N, D] row gradients.

    ATen's CPU embedding backward adds one row at a time through a TensorIterator it rebuilds per id:
    measured 1.1 ms against 0.23 ms for ``index_add_`` at the main job's shape ([3107, 16] table), 35
    against 10 ms at a Criteo-like one. Both add the rows in id order, so the gradient is the same bits
    (tests/test_functional.py checks it; not for bf16 / fp16 tables, whose ATen backward sums in fp32).
    Used for fp32 / fp64 CPU tables in eager autograd only: compiled graphs
    keep ``F.embedding`` (Inductor lowers its backward itself), as do torch.func transforms."""

    @staticmethod
    def forward(ctx, rows, weight):
        ctx.save_for_backward(rows)
        ctx.save_for_forward(rows)
        ctx.num_rows = weight.shape[0]
        return F.embedding(rows, weight)

    @staticmethod
    def jvp(ctx, rows_tangent, weight_tangent):
        # forward-mode AD (torch.autograd.forward_ad): the gather is linear in the table
        (rows,) = ctx.saved_tensors
        return F.embedding(rows, weight_tangent)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        table_grad = flat.new_zeros((ctx.num_rows, flat.shape[1]))
        # (differentiable: with create_graph=True the second-order graph records this add)
        return None, table_grad.index_add(0, rows.reshape(-1), flat)


def sfg_encode(V, weight, bias, activation, gamma, residual):
    batch, n, d = V.shape
    h = F.linear(V.reshape(batch, n * d), weight, bias)
    z = C.ACTIVATIONS[activation](h)
    if gamma != 1.0:
        z = z * gamma
    z = z.view(batch, n, d)
    return z + V if residual else z


def _operands(Z, V, generated_side, symmetric):
    if symmetric:
        return Z, Z
    return (Z, V) if generated_side == "left" else (V, Z)


def masked_weight(weight: Optional[torch.Tensor], kind: str, pairs: str, n: int, like: torch.Tensor):
    """The decoder weight with entries outside P zeroed (identity -> the mask as a matrix)."""
    mask = C.pair_mask(n, pairs, like.device)
    if kind == "identity":
        return mask.to(like.dtype)
    if kind == "scalar":
        return weight * mask
    if kind == "vector":
        return weight * mask[:, :, None]
    return weight * mask[:, :, None, None]


def mix(weight_masked: torch.Tensor, kind: str, right: torch.Tensor) -> torch.Tensor:
    """T such that logit = sum(left * T): the decoder applied to the right operand."""
    batch, n, d = right.shape
    if kind in ("identity", "scalar"):
        return torch.einsum("ij,bjd->bid", weight_masked, right)
    if kind == "vector":
        return torch.einsum("ijd,bjd->bid", weight_masked, right)
    big = weight_masked.permute(0, 2, 1, 3).reshape(n * d, n * d)   # [(i,d), (j,e)]
    return (right.reshape(batch, n * d) @ big.t()).view(batch, n, d)


def pairwise_decode(Z, V, weight, kind, pairs, generated_side, symmetric):
    left, right = _operands(Z, V, generated_side, symmetric)
    dtype = torch.promote_types(left.dtype, right.dtype)
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)
        weight = weight.to(dtype)
    left, right = left.to(dtype), right.to(dtype)
    w = masked_weight(weight, kind, pairs, Z.shape[1], left)
    t = mix(w, kind, right)
    return (left * t).sum(dim=(1, 2))


def pairwise_products(Z, V, pairs, generated_side, symmetric):
    left, right = _operands(Z, V, generated_side, symmetric)
    dtype = torch.promote_types(left.dtype, right.dtype)
    gram = torch.bmm(left.to(dtype), right.to(dtype).transpose(1, 2))  # [B, N, N], never [B, P, D]
    rows, cols = C.pair_index(Z.shape[1], pairs, Z.device)
    return gram[:, rows, cols]


def generative_cross(x, x_gen, weight, bias):
    return torch.addcmul(x, x_gen, F.linear(x, weight, bias))


def bce_with_logits(logits, labels, reduction):
    x = logits if logits.dtype == torch.float64 else logits.float()
    return F.binary_cross_entropy_with_logits(x, labels.to(x.dtype), reduction=reduction)


def sfg_interaction(V, enc_weight, enc_bias, dec_weight, kind, activation, gamma, residual, pairs,
                    generated_side, symmetric):
    Z = V if enc_weight is None else sfg_encode(V, enc_weight, enc_bias, activation, gamma, residual)
    return pairwise_decode(Z, V, dec_weight, kind, pairs, generated_side, symmetric)


def sfg_logits(ids, table, offsets, enc_weight, enc_bias, dec_weight, kind, activation, gamma, residual,
               pairs, generated_side, symmetric):
    return sfg_interaction(embedding_lookup(ids, table, offsets), enc_weight, enc_bias, dec_weight, kind,
                           activation, gamma, residual, pairs, generated_side, symmetric)
