"""Triton launchers and autograd glue of ``bce_with_logits`` (reduction mean | sum | none).

Registered as the ``"triton"`` implementation of ``functional.bce_with_logits``. The loss is
computed in fp32 (fp64 for fp64 logits) and returned in that dtype, like the torch backend;
gradients come back in the dtypes of logits and labels.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _checks as C
from .. import reference
from ._higher_order import create_graph_requested, recompute_grads
from ._launch import cdiv, next_pow2

try:  # the package works without Triton; this backend then simply does not register
    import triton
    import triton.language as tl

    from ..kernels.bce_with_logits import _bce_with_logits_bwd_kernel, _bce_with_logits_fwd_kernel
except ImportError:
    triton = None


def _block(numel: int) -> int:
    cap = 1 << 16 if os.environ.get("TRITON_INTERPRET") == "1" else 4096
    return max(16, min(next_pow2(max(numel, 1)), cap))


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def bce_with_logits_fwd(logits: torch.Tensor, labels: torch.Tensor, reduction: str,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Loss of every element (``"none"``, logits' shape) or its mean/sum (0-d), in the compute dtype.

    ``out``: optional contiguous destination for ``reduction="none"`` (logits' shape, compute dtype).
    """
    return _forward(logits, labels, reduction, out, check=False)[0]


def _forward(logits, labels, reduction, out, check: bool):
    """(loss, bad) with ``bad`` the int32 per-program counts of labels outside [0, 1] (``check``), else
    None. One kernel when the reduction fits one program (B up to 4096 on a GPU): it writes the mean or
    sum itself."""
    compute = _compute_dtype(logits)
    # The kernel indexes flat memory: reshape(-1) of a strided 1-D view (e.g. logits[:, 0]) is
    # still that strided view, so force unit stride or the kernel reads the wrong elements.
    x, y = logits.reshape(-1).contiguous(), labels.reshape(-1).contiguous()
    numel = x.numel()
    if reduction != "none" and numel == 0:  # match torch: mean of nothing is nan, sum is 0
        return torch.full((), float("nan") if reduction == "mean" else 0.0, dtype=compute, device=x.device), None
    block = _block(numel)
    grid = (cdiv(numel, block),)
    if out is not None:
        if reduction != "none" or out.shape != logits.shape or out.dtype != compute or not out.is_contiguous():
            raise ValueError(f"out is only for reduction='none' and must be a contiguous {compute} tensor of "
                             f"shape {list(logits.shape)}, got {out.dtype} {list(out.shape)}")
        out = out.view(-1)
    else:
        out = torch.empty(grid[0] if reduction != "none" else numel, dtype=compute, device=x.device)
    bad = torch.empty(grid[0], dtype=torch.int32, device=x.device) if (check and numel) else None
    final = reduction != "none" and grid[0] == 1
    if numel:
        _bce_with_logits_fwd_kernel[grid](x, y, out, bad if bad is not None else out, numel,
                                          numel if reduction == "mean" else 1,
                                          REDUCE=reduction != "none", FINAL=final, CHECK=bad is not None,
                                          COMPUTE=tl.float64 if compute == torch.float64 else tl.float32,
                                          BLOCK=block)
    if reduction == "none":
        return out.view(logits.shape), bad
    if final:
        return out.view(()), bad
    total = out.sum()
    return (total / numel if reduction == "mean" else total), bad


def bce_with_logits_bwd(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, reduction: str,
                        need_logits: bool = True, need_labels: bool = False):
    """Returns ``(dlogits or None, dlabels or None)`` shaped like the inputs, in their dtypes."""
    compute = _compute_dtype(logits)
    x, y = logits.reshape(-1).contiguous(), labels.reshape(-1).contiguous()   # unit stride, as in fwd
    numel = x.numel()
    dx = torch.empty(numel, dtype=logits.dtype, device=x.device) if need_logits else None
    dy = torch.empty(numel, dtype=labels.dtype, device=x.device) if need_labels else None
    if numel and (need_logits or need_labels):
        g = grad.reshape(-1).contiguous() if reduction == "none" else grad.reshape(1)
        block = _block(numel)
        _bce_with_logits_bwd_kernel[(cdiv(numel, block),)](
            x, y, g, dx if dx is not None else x, dy if dy is not None else x, numel,
            numel if reduction == "mean" else 1,
            SCALAR_GRAD=reduction != "none", NEED_DX=need_logits, NEED_DY=need_labels,
            COMPUTE=tl.float64 if compute == torch.float64 else tl.float32, BLOCK=block)
    return (dx.view(logits.shape) if dx is not None else None,
            dy.view(labels.shape) if dy is not None else None)


class BCEWithLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, reduction, check_labels=False):
        loss, bad = _forward(logits, labels, reduction, None, check_labels)
        if bad is not None:
            C.raise_on_bad_labels(bad, labels)     # before anything is saved or returned
        ctx.save_for_backward(logits, labels)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, labels = ctx.saved_tensors
        if create_graph_requested():   # higher-order gradients: the reference twin's graph
            twin = lambda x, y: reference.bce_with_logits(x, y, ctx.reduction)  # noqa: E731
            needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] and labels.is_floating_point())
            return (*recompute_grads(twin, (logits, labels), needs, grad), None, None)
        need_labels = ctx.needs_input_grad[1] and labels.is_floating_point()
        dx, dy = bce_with_logits_bwd(grad, logits, labels, ctx.reduction, ctx.needs_input_grad[0], need_labels)
        return dx, dy, None, None


def bce_with_logits(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Triton implementation of ``functional.bce_with_logits`` (inputs already validated)."""
    return BCEWithLogitsFunction.apply(logits, labels, reduction)


def bce_with_logits_checking_labels(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """As :func:`bce_with_logits` for labels whose values are not checked yet: the forward kernel counts
    the labels outside [0, 1] as it reads them, and the one host read of that count replaces
    ``check_label_values``'s four reductions (the same errors; ``functional.bce_with_logits`` calls this).
    fp64 labels of non-fp64 logits are checked on the host: the kernel reads them as fp32, which would
    round 1 + 1e-9 to 1."""
    if labels.dtype == torch.float64 and _compute_dtype(logits) != torch.float64:
        C.check_label_values(labels)
        return BCEWithLogitsFunction.apply(logits, labels, reduction)
    return BCEWithLogitsFunction.apply(logits, labels, reduction, True)


bce_with_logits.checking_labels = bce_with_logits_checking_labels


def _register() -> None:
    from ..functional import register_impl
    register_impl("triton", "bce_with_logits", bce_with_logits)


if triton is not None:
    _register()
