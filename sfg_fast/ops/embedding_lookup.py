"""Triton launchers and autograd glue of the multi-field embedding lookup and its fused sparse update.

``embedding_lookup_fwd`` gathers ``[B, N, D]`` rows; ``embedding_lookup_bwd`` builds the table's
gradient (atomics, or a sorted segment reduction with no atomics when
``torch.are_deterministic_algorithms_enabled()``); ``sparse_update`` reduces each unique row's
gradient and applies an optimizer update to the table in place (used by ``sfg_fast.optim``).
Registered as the ``"triton"`` implementation of ``functional.embedding_lookup``.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ._higher_order import create_graph_requested
from ._launch import cdiv, next_pow2

try:  # the package works without Triton; this backend then simply does not register
    import triton
    import triton.language as tl

    from ..kernels.embedding_lookup import (_embedding_lookup_bwd_kernel, _embedding_lookup_bwd_sorted_kernel,
                                            _embedding_lookup_fwd_kernel)
    from ..kernels.sparse_update import (UNCLAIMED, _accumulate_rows_kernel, _claim_rows_kernel, _owner_update_kernel,
                                         _sparse_update_kernel)
except ImportError:
    triton = None

# How the fused sparse update finds each touched row's gradient sum outside deterministic mode:
#   "sort" (default): the sorted segment reduction of deterministic mode (torch.sort of the B*N rows, segment
#                     ends, two launches; bitwise repeatable);
#   "map":  no sort: a persistent int32 map over the table's rows (4 bytes a row, kept by the optimizer) names
#           each row's first position, float atomics sum into it, the owner updates (four launches, about ten
#           fewer kernels than the sort's radix passes; sums repeat to fp32 rounding only).
# Deterministic mode always sorts. gpu_check's `fused map` / `fused map graph` bwd+adagrad rows measure it
# against the sort; the default follows the measurement.
SPARSE_DEDUP = os.environ.get("SFG_FAST_SPARSE_DEDUP", "sort")
_DEDUP_MODES = ("sort", "map")


def row_map_wanted(total: int) -> bool:
    """Whether the fused update of ``total`` (b, f) positions takes the row map (see SPARSE_DEDUP)."""
    if SPARSE_DEDUP not in _DEDUP_MODES:
        raise ValueError(f"SFG_FAST_SPARSE_DEDUP must be one of {_DEDUP_MODES}, got {SPARSE_DEDUP!r}")
    # positions are stored as int32 in the map
    return SPARSE_DEDUP == "map" and not torch.are_deterministic_algorithms_enabled() and total < 2 ** 31 - 1


def new_row_map(num_rows: int, device) -> torch.Tensor:
    """The scratch map of :data:`SPARSE_DEDUP` "map": int32 [V], every entry UNCLAIMED between calls."""
    return torch.full((num_rows,), UNCLAIMED.value, dtype=torch.int32, device=device)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KINDS = {"sgd": 0, "adagrad": 1, "adam": 2}  # KIND_SGD / KIND_ADAGRAD / KIND_ADAM of the kernel


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tile_rows(block_d: int, cap_on_gpu: int) -> int:
    """Rows per program: the interpreter pays per program, a GPU wants ~cap_on_gpu elements per tile."""
    if _interpreting():
        return 4096
    return max(1, cap_on_gpu // block_d)


def _check_table(weight: torch.Tensor) -> None:
    if weight.dtype not in _SUPPORTED:
        raise TypeError(f"weight dtype {weight.dtype} is not supported by the triton lookup; "
                        f"expected one of {_SUPPORTED}")
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"weight must be a [V, D] table with unit stride along D, got shape "
                         f"{list(weight.shape)} strides {list(weight.stride())}")


def embedding_lookup_fwd(ids: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``V[b, f] = weight[offsets[f] + ids[b, f]]`` as ``[B, N, D]`` in weight's dtype (ids pre-validated).

    ``out``: optional contiguous ``[B, N, D]`` destination of weight's dtype.
    """
    _check_table(weight)
    batch, num_fields = ids.shape
    dim = weight.shape[1]
    if out is None:
        out = torch.empty(batch, num_fields, dim, dtype=weight.dtype, device=weight.device)
    elif out.shape != (batch, num_fields, dim) or out.dtype != weight.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {weight.dtype} tensor of shape [B, N, D]="
                         f"{[batch, num_fields, dim]}, got {out.dtype} {list(out.shape)}")
    if out.numel() == 0:
        return out
    block_n = next_pow2(num_fields)
    block_d = next_pow2(dim)
    block_b = min(next_pow2(batch), max(1, _tile_rows(block_d, 4096) // block_n))
    grid = (cdiv(batch, block_b),)
    _embedding_lookup_fwd_kernel[grid](ids, offsets.contiguous(), weight, out, batch, num_fields, dim,
                                       ids.stride(0), ids.stride(1), weight.stride(0),
                                       BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d)
    return out


def sorted_segments(ids: torch.Tensor, offsets: torch.Tensor,
                    num_rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the B*N looked-up rows by table row, deterministically and without a host sync.

    Returns ``(sorted_rows [B*N] ascending, perm [B*N] int64, seg_end [B*N])``: the flattened
    (b * N + f) positions are sorted stably by row, so the positions that read row ``sorted_rows[p]`` are
    ``perm[s:seg_end[p]]`` (in ascending position order, which fixes the order of every later
    summation), where s is the first p' with ``sorted_rows[p'] == sorted_rows[p]``. Every size is B*N:
    counting the unique rows would make the host wait for the device (and break CUDA graph capture).
    With ``num_rows`` (the table's) and B*N below 2^31 the keys, ``sorted_rows`` and ``seg_end`` are int32: a radix
    sort of 32-bit keys takes half the passes of 64-bit ones, over half the bytes (the kernels widen every
    row they load to int64 before addressing with it); else int64.
    """
    flat = (ids.to(torch.int64) + offsets).reshape(-1)
    # 32 bits hold the rows (keys) and the positions (segment ends: searchsorted's int32 output)
    narrow = num_rows is not None and num_rows <= 2 ** 31 - 1 and flat.numel() < 2 ** 31 - 1
    keys = flat.to(torch.int32) if narrow else flat
    sorted_rows, perm = torch.sort(keys, stable=True)
    seg_end = torch.searchsorted(sorted_rows, sorted_rows, right=True, out_int32=narrow)
    return sorted_rows, perm, seg_end


def _segment_block_d(dim: int) -> int:
    """BLOCK_D of the segment reduction: at least 8. Triton 3.6 fails to compile it for a GPU at
    BLOCK_D <= 4 (a layout pass, TritonGPURemoveLayoutConversions, breaks a masked load: "mask type
    matches ptr type"), which the fused first-order tables (D = 1) hit; the extra lanes are masked off."""
    return max(8, next_pow2(dim))


def _segment_blocks(total: int, block_d: int):
    """(BLOCK_P, CHUNK, WINDOW) of the segment reduction: [BLOCK_P, CHUNK, BLOCK_D] elements per step;
    a piece of a segment spans at most WINDOW positions (WINDOW / CHUNK steps in phase 0), and a hot
    row's pieces are summed CHUNK at a time in phase 1. The interpreter's window is small, so tests
    with a few dozen duplicates of one id cross windows."""
    if _interpreting():
        return min(next_pow2(total), 1024), 16, 32
    return max(1, min(64, 2048 // (16 * block_d))), 16, 128


def _segment_launches(kernel, before: tuple, after: tuple, total: int, dim: int, acc_dtype: torch.dtype,
                      device: torch.device, **constexprs) -> None:
    """Both phases of a segment-reduction kernel (``kernels.embedding_lookup.segment_sum``), in stream
    order: phase 0 finishes the segments inside one window and stores the pieces of longer ones in a
    [2 * windows, D] buffer, phase 1 finishes those. The kernel's arguments are ``before``, that
    buffer (``partial_ptr``), then ``after``."""
    block_d = _segment_block_d(dim)
    block_p, chunk, window = _segment_blocks(total, block_d)
    partial = torch.empty(2 * cdiv(total, window), dim, dtype=acc_dtype, device=device)
    grid = (cdiv(total, block_p),)
    for phase in (0, 1):
        kernel[grid](*before, partial, *after, PHASE=phase, BLOCK_P=block_p, CHUNK=chunk, WINDOW=window,
                     BLOCK_D=block_d, **constexprs)


def _grad_strides(grad: torch.Tensor):
    return grad.stride(0), grad.stride(1), grad.stride(2)


def embedding_lookup_bwd(grad: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, num_rows: int,
                         dtype: torch.dtype, deterministic: Optional[bool] = None) -> torch.Tensor:
    """Dense ``[V, D]`` table gradient: ``sum`` of ``grad[b, f]`` over every (b, f) that read each row.

    Accumulates in fp32 (fp64 for fp64 tables). ``deterministic`` (default: torch's global flag)
    selects the sorted segment reduction, bitwise repeatable; otherwise atomics.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    batch, num_fields, dim = grad.shape
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    block_d = next_pow2(dim)
    if deterministic:
        out_dtype = dtype
        grad_weight = torch.zeros(num_rows, dim, dtype=out_dtype, device=grad.device)
        if grad.numel() == 0:
            return grad_weight
        sorted_rows, perm, seg_end = sorted_segments(ids, offsets, num_rows)
        total = perm.numel()
        _segment_launches(_embedding_lookup_bwd_sorted_kernel, (grad, grad_weight, perm, sorted_rows, seg_end),
                          (total, num_fields, dim, *_grad_strides(grad)), total, dim, acc_dtype, grad.device,
                          ACC_DTYPE=tl.float64 if acc_dtype == torch.float64 else tl.float32)
        return grad_weight
    grad_weight = torch.zeros(num_rows, dim, dtype=acc_dtype, device=grad.device)
    if grad.numel():
        block_n = next_pow2(num_fields)
        block_b = min(next_pow2(batch), max(1, _tile_rows(block_d, 4096) // block_n))
        grid = (cdiv(batch, block_b),)
        _embedding_lookup_bwd_kernel[grid](ids, offsets.contiguous(), grad, grad_weight, batch, num_fields, dim,
                                           ids.stride(0), ids.stride(1), *_grad_strides(grad),
                                           BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d)
    return grad_weight.to(dtype)


def sparse_update(weight: torch.Tensor, grad: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                  kind: str, lr: float, eps: float = 0.0, beta1: float = 0.0, beta2: float = 0.0,
                  bias1: float = 1.0, bias2: float = 1.0, state1: Optional[torch.Tensor] = None,
                  state2: Optional[torch.Tensor] = None, row_map: Optional[torch.Tensor] = None) -> None:
    """Apply one row-sparse optimizer step to ``weight`` in place from the lookup's output gradient.

    See ``sfg_fast.kernels.sparse_update`` for the formulas. ``state1``/``state2``: fp32 optimizer
    state (Adagrad ``[V]``; Adam ``[V, D]`` each), updated in place on touched rows only.
    ``row_map``: the int32 ``[V]`` scratch map of SPARSE_DEDUP "map" (:func:`new_row_map`; left as it was
    found), which replaces the sort outside deterministic mode; None sorts.
    No host sync: the kernel's grid is sized by B * N, not by the number of touched rows.
    """
    _check_table(weight)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {tuple(_KINDS)}, got {kind!r}")
    num_rows, dim = weight.shape
    if grad.shape != (ids.shape[0], ids.shape[1], dim):
        raise ValueError(f"grad must have shape [B, N, D]={[ids.shape[0], ids.shape[1], dim]}, "
                         f"got {list(grad.shape)}")
    if kind == "adagrad" and (state1 is None or state1.shape != (num_rows,) or state1.dtype != torch.float32
                              or not state1.is_contiguous()):
        raise ValueError(f"adagrad needs a contiguous fp32 state1 of shape [V]=[{num_rows}]")
    if kind == "adam":
        for name, s in (("state1", state1), ("state2", state2)):
            if s is None or s.shape != (num_rows, dim) or s.dtype != torch.float32 or not s.is_contiguous():
                raise ValueError(f"adam needs a contiguous fp32 {name} of shape [V, D]=[{num_rows}, {dim}]")
    if ids.numel() == 0:
        return
    dummy = weight.new_empty(0, dtype=torch.float32)
    hyper = (float(lr), float(eps), float(beta1), float(beta2), float(bias1), float(bias2))
    if row_map is not None and _row_map_applies(row_map, num_rows, weight.device, ids.numel()):
        _row_map_update(weight, grad, ids, offsets, kind, row_map, state1 if state1 is not None else dummy,
                        state2 if state2 is not None else dummy, hyper)
        return
    sorted_rows, perm, seg_end = sorted_segments(ids, offsets, num_rows)
    total = perm.numel()
    _segment_launches(
        _sparse_update_kernel, (weight, weight.stride(0), grad, *_grad_strides(grad), perm, sorted_rows, seg_end),
        (state1 if state1 is not None else dummy, state2 if state2 is not None else dummy, total, ids.shape[1], dim,
         *hyper),
        total, dim, torch.float32, weight.device, KIND=_KINDS[kind])


def _row_map_applies(row_map: torch.Tensor, num_rows: int, device, total: int) -> bool:
    """``row_map`` fits this table (int32 [V] on its device) and the map path applies (see row_map_wanted)."""
    if row_map.dtype != torch.int32 or tuple(row_map.shape) != (num_rows,) or row_map.device != device \
            or not row_map.is_contiguous():
        raise ValueError(f"row_map must be a contiguous int32 [V]=[{num_rows}] tensor on {device}, got "
                         f"{row_map.dtype} {list(row_map.shape)} on {row_map.device}")
    return not torch.are_deterministic_algorithms_enabled() and total < 2 ** 31 - 1


def _row_map_update(weight, grad, ids, offsets, kind, row_map, state1, state2, hyper) -> None:
    """SPARSE_DEDUP "map": claim, accumulate, update (kernels.sparse_update). The map comes back all
    UNCLAIMED; should a launch fail part-way, it is refilled before the error propagates, so that the next
    step never reads a stale owner."""
    batch, num_fields = ids.shape
    dim = weight.shape[1]
    total = batch * num_fields
    block_d = _segment_block_d(dim)
    block_p = min(next_pow2(total), 1024) if _interpreting() else max(1, 2048 // block_d)
    grid = (cdiv(total, block_p),)
    offsets = offsets.contiguous()
    id_strides = (ids.stride(0), ids.stride(1))
    acc = torch.zeros(total, dim, dtype=torch.float32, device=weight.device)
    try:
        _claim_rows_kernel[grid](ids, offsets, row_map, total, num_fields, *id_strides, BLOCK_P=block_p)
        _accumulate_rows_kernel[grid](ids, offsets, row_map, grad, acc, total, num_fields, dim, *id_strides,
                                      *_grad_strides(grad), BLOCK_P=block_p, BLOCK_D=block_d)
        _owner_update_kernel[grid](ids, offsets, row_map, acc, weight, weight.stride(0), state1, state2, total,
                                   num_fields, dim, *id_strides, *hyper, KIND=_KINDS[kind], BLOCK_P=block_p,
                                   BLOCK_D=block_d)
    except BaseException:
        row_map.fill_(UNCLAIMED.value)
        raise


class EmbeddingLookupFunction(torch.autograd.Function):
    """Lookup forward by gather; backward returns the dense table gradient (kernel accumulation)."""

    @staticmethod
    def forward(ctx, ids, weight, offsets):
        ctx.save_for_backward(ids, offsets)
        ctx.table = (weight.shape[0], weight.dtype)
        return embedding_lookup_fwd(ids, weight, offsets)

    @staticmethod
    def backward(ctx, grad):
        ids, offsets = ctx.saved_tensors
        num_rows, dtype = ctx.table
        if create_graph_requested():
            # higher-order gradients: the table gradient is a scatter-add of grad, kept differentiable in grad
            rows = (ids.to(torch.int64) + offsets).reshape(-1)
            dim = grad.shape[-1]
            table_grad = grad.new_zeros(num_rows, dim, dtype=torch.float32).index_add(
                0, rows, grad.reshape(-1, dim).to(torch.float32))
            return None, table_grad.to(dtype), None
        return None, embedding_lookup_bwd(grad, ids, offsets, num_rows, dtype), None


def embedding_lookup(ids: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Triton implementation of ``functional.embedding_lookup`` (ids already validated or remapped).
    A table whose rows are not contiguous along D (a transposed view) is gathered by torch instead, as
    the Triton sfg_logits does: the kernel reads rows as unit-stride vectors, and copying the table to
    make them so would cost a pass over all of it."""
    if weight.dim() == 2 and weight.stride(1) != 1:
        from .. import factored
        return factored.embedding_lookup(ids, weight, offsets)
    return EmbeddingLookupFunction.apply(ids, weight, offsets)


def _register() -> None:
    from ..functional import register_impl
    register_impl("triton", "embedding_lookup", embedding_lookup)


if triton is not None:
    _register()
