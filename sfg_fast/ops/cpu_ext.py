"""Python glue of the compiled CPU kernels (``sfg_fast._C``, sources in ``csrc/``).

Registers the ``"cpu"`` implementations of the functional ops that the extension runs correctly
AND at least as fast as the factored torch path at the Criteo shape (see bench/bench_cpu_ext.py),
and exposes the entry points that have no functional twin:

    sparse_row_update(kind, weight, state, ids, offsets, grad_V, lr, eps, betas, step)
    quantize_rowwise_int8(weight) -> (qweight, scale_bias);  dequantize_rowwise_int8(...)
    embedding_lookup_int8(ids, qweight, scale_bias, offsets, bounds_check)
    embedding_lookup(ids, weight, offsets, bounds_check)

When the extension is missing, nothing is registered (``sfg_fast._backend`` reports the import
error) and the entry points above raise BackendUnavailableError quoting it.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .. import _checks as C
from .. import factored
from .._backend import BackendUnavailableError, _extension_status
from ..library import _promote as _out_dtype
from ._higher_order import create_graph_requested, recompute_grads

try:
    from .. import _C
except Exception:  # no compiler at install time, or a stale build: the package works without it
    _C = None

__all__ = ["available", "sparse_row_update", "quantize_rowwise_int8", "dequantize_rowwise_int8",
           "embedding_lookup_int8", "embedding_lookup", "sfg_logits", "sfg_interaction", "SfgInteractionFunction",
           "empty_buffer_pool"]

_FAST_DTYPES = (torch.float32, torch.bfloat16)
_TILE = 64  # samples per tile: 3 fp32 tile buffers of 64 x N*D stay in a core's L2 at N*D = 624
# with bf16 GEMMs the BLAS wants taller tiles: 256 rows measured 1.1-1.3x faster than 64 at the Criteo
# shape (2-core EPYC, interleaved runs), 4096 (one tile) slower again
_TILE_BF16 = 256
_UPDATE_KINDS = ("sgd", "adagrad", "adam")
_QUANTISE_BLOCK_ELEMENTS = 1 << 22   # float temporaries of quantize_rowwise_int8: 16 MB a block


def available() -> bool:
    """True when ``sfg_fast._C`` imported."""
    return _C is not None


def _require() -> None:
    if _C is None:
        raise BackendUnavailableError(f"backend 'cpu' is unavailable: {_extension_status()}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def embedding_lookup(ids: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                     bounds_check: str = "fatal") -> torch.Tensor:
    """``V[b, f] = weight[offsets[f] + ids[b, f]]`` by the C++ gather (no autograd: inference).

    Args: ids int32/int64 ``[B, N]``; weight fp32/bf16 ``[V, D]``; offsets int64 ``[N]``;
    bounds_check "fatal" (IndexError naming field and id) | "clamp_to_oov" | "off".
    Returns ``[B, N, D]`` in weight's dtype.
    """
    _require()
    return _C.embedding_lookup(ids, weight.detach(), offsets, bounds_check)


def sfg_logits(ids, table, offsets, enc_weight, enc_bias, dec_weight, kind, activation, gamma, residual,
               pairs, generated_side, symmetric):
    """``"cpu"`` sfg_logits: the fused tile pipeline of csrc/sfg_logits_cpu.cpp for inference.

    When autograd needs gradients (grad enabled and any parameter requires grad), torch's gather
    feeds the fused training op :func:`sfg_interaction` (the table gradient is torch's dense one; a
    sparse update goes through ``sfg_fast.optim.fused_embedding_lookup`` + ``sfg_interaction``
    instead). Dtypes the kernels do not handle (fp64, fp16) and mixed-dtype parameters run the
    factored torch path. Ids arrive validated by ``sfg_fast.functional``, so the kernel runs with
    bounds_check="off".
    """
    params = (table, enc_weight, enc_bias, dec_weight)
    dtypes = {t.dtype for t in params if t is not None}
    if _needs_grad(*params) and len(dtypes) == 1 and table.dtype in _FAST_DTYPES:
        # training: torch's gather (its backward builds the table gradient) + the fused interaction
        return sfg_interaction(factored.embedding_lookup(ids, table, offsets), enc_weight, enc_bias, dec_weight,
                               kind, activation, gamma, residual, pairs, generated_side, symmetric)
    if _needs_grad(*params) or len(dtypes) != 1 or table.dtype not in _FAST_DTYPES:
        return factored.sfg_logits(ids, table, offsets, enc_weight, enc_bias, dec_weight, kind, activation, gamma,
                                   residual, pairs, generated_side, symmetric)
    bf16 = bf16_gemms(table.dtype)
    out = _C.sfg_logits(ids, table, offsets, enc_weight, enc_bias, dec_weight, kind, activation, float(gamma),
                        bool(residual), pairs, generated_side, bool(symmetric), "off",
                        _tile(ids.shape[0], bf16), bf16_gemm=bf16)
    return out.to(table.dtype)


class SfgInteractionFunction(torch.autograd.Function):
    """The fused CPU forward and backward of ``sfg_interaction`` (csrc/sfg_interaction_cpu.cpp).

    Forward saves H = V @ W_enc^T (+ b) and the decoded T (two fp32 ``[B, N*D]`` buffers, nothing
    pair-sized); backward returns dV, dW_enc, d bias and the decoder gradient from one tile pass plus
    the weight-gradient GEMMs. ``config`` = (kind, activation, gamma, residual, pairs, generated_side,
    symmetric); ``bf16`` runs the GEMMs on bf16 operands (see :func:`bf16_gemms`).
    """

    @staticmethod
    def forward(ctx, V, enc_weight, enc_bias, dec_weight, config, tile, bf16):
        with torch.autocast("cpu", enabled=False):   # the kernel picks its GEMM dtype itself
            logit, H, T = _C.sfg_interaction_fwd(V, enc_weight, enc_bias, dec_weight, *config, tile=tile,
                                                 bf16_gemm=bf16, save=True)
        ctx.save_for_backward(V, H if enc_weight is not None else None, T, enc_weight, enc_bias, dec_weight)
        ctx.config, ctx.tile, ctx.bf16 = config, tile, bf16
        return logit.to(_out_dtype(V, enc_weight, dec_weight))

    @staticmethod
    def backward(ctx, grad):
        V, H, T, enc_weight, enc_bias, dec_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if create_graph_requested():
            # higher-order gradients: the factored twin's graph (the kernels' gradients carry none)
            grads = recompute_grads(lambda v, w, b, d: factored.sfg_interaction(v, w, b, d, *ctx.config),
                                    (V, enc_weight, enc_bias, dec_weight), needs, grad)
            return (*grads, None, None, None)
        with torch.autocast("cpu", enabled=False):
            grads = _C.sfg_interaction_bwd(grad.float(), V, H, T, enc_weight, enc_bias, dec_weight, *ctx.config,
                                           tile=ctx.tile, bf16_gemm=ctx.bf16, need_v=needs[0],
                                           need_enc_weight=needs[1], need_enc_bias=needs[2], need_dec=needs[3])
        inputs = (V, enc_weight, enc_bias, dec_weight)
        out = [g.to(t.dtype).view(t.shape) if need and t is not None and g is not None else None
               for g, t, need in zip(grads, inputs, needs)]
        return (*out, None, None, None)


def empty_buffer_pool() -> int:
    """Free the idle [B, N*D] buffers (H, T, dV) the fused CPU training op keeps to reuse in its next
    step (csrc/buffer_pool.h: at most 256 MB idle); returns the bytes freed. Like
    ``torch.cuda.empty_cache()``: only needed to hand memory back between phases of a program."""
    _require()
    return int(_C.buffer_pool_release())


def sfg_interaction(V, enc_weight, enc_bias, dec_weight, kind, activation, gamma, residual, pairs, generated_side,
                    symmetric):
    """``"cpu"`` sfg_interaction: the fused C++ forward (and backward, under autograd) on V.

    fp32 or bf16 operands of one dtype; anything else (fp64, fp16, mixed dtypes) runs the factored
    torch path. Under ``torch.autocast("cpu", bfloat16)`` and for bf16 models the GEMMs take bf16
    operands with fp32 accumulation; every epilogue, the decoders and the gradients' sums stay fp32.
    """
    params = (V, enc_weight, enc_bias, dec_weight)
    if len({t.dtype for t in params if t is not None}) != 1 or V.dtype not in _FAST_DTYPES:
        return factored.sfg_interaction(V, enc_weight, enc_bias, dec_weight, kind, activation, gamma, residual,
                                        pairs, generated_side, symmetric)
    bf16 = bf16_gemms(V.dtype)
    tile = _tile(V.shape[0], bf16)
    config = (kind, activation, float(gamma), bool(residual), pairs, generated_side, bool(symmetric))
    if _needs_grad(*params):
        return SfgInteractionFunction.apply(V, enc_weight, enc_bias, dec_weight, config, tile, bf16)
    with torch.autocast("cpu", enabled=False):
        logit = _C.sfg_interaction_fwd(V, enc_weight, enc_bias, dec_weight, *config, tile=tile, bf16_gemm=bf16,
                                       save=False)[0]
    return logit.to(_out_dtype(V, enc_weight, dec_weight))


def _tile(batch: int, bf16: bool) -> int:
    """Samples per tile: the measured size (64 fp32, 256 bf16), but small enough that a batch of a few
    hundred still splits into up to 16 tiles for the threads (never under 16 rows), and any batch of two
    or more into at least two tiles. A function of the batch alone, so that the bits do not depend on the
    thread count: a tiling that followed it would regroup the sums; and a batch in ONE tile runs outside
    OpenMP's parallel region, where MKL threads its GEMM itself and rounds by its thread count (measured:
    batches of 5-11 rows differed between 1 and 2 threads), while tiles inside the region run MKL
    sequentially."""
    batch = max(int(batch), 1)
    return max(1, min(_TILE_BF16 if bf16 else _TILE, max(16, -(-batch // 16)), -(-batch // 2)))


def bf16_gemms(param_dtype: torch.dtype) -> bool:
    """Whether the fused CPU kernel runs its GEMMs on bf16 operands: for a bf16 model (what torch's
    own bf16 matmul does with it), and under ``torch.autocast("cpu", dtype=torch.bfloat16)``, whose
    matmuls are bf16 too. The kernel's epilogues, decoders and output stay fp32 either way."""
    if param_dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def sparse_row_update(kind: str, weight: torch.Tensor, state: Dict[str, torch.Tensor], ids: torch.Tensor,
                      offsets: torch.Tensor, grad_V: torch.Tensor, lr: float, eps: float = 1e-8,
                      betas: Tuple[float, float] = (0.9, 0.999), step: int = 1,
                      bounds_check: str = "fatal") -> None:
    """Fused row-sparse optimizer step on the rows that ``ids`` touch, in place.

    Duplicate rows are reduced in fp32 after a stable sort by row (entry order b * N + f), so the
    result is bitwise identical for any thread count. With ``g`` = summed gradient of row ``r``:

        sgd:      w[r] -= lr * g
        adagrad:  acc[r] += mean_d(g^2);  w[r] -= lr * g / (sqrt(acc[r]) + eps)      (rowwise, FBGEMM)
        adam:     m[r] = b1 m[r] + (1-b1) g;  v[r] = b2 v[r] + (1-b2) g^2;
                  w[r] -= lr * (m[r] / (1-b1^step)) / (sqrt(v[r] / (1-b2^step)) + eps)   (lazy rows)

    Args:
        kind: "sgd" | "adagrad" | "adam" (the kinds of ``sfg_fast.optim.SparseRowOptimizer``).
        weight: fp32/bf16 contiguous ``[V, D]`` CPU table, updated in place.
        state: optimizer state, created here (zeros) when missing: adagrad ``"sum"`` fp32 ``[V]``;
            adam ``"exp_avg"``, ``"exp_avg_sq"`` fp32 ``[V, D]``. Updated in place.
        ids: int32/int64 ``[B, N]`` field-local ids.  offsets: int64 ``[N]``.
        grad_V: fp32/bf16 ``[B, N, D]`` gradient of the lookup output.
        lr, eps: step size and denominator guard.  betas: Adam's (b1, b2).
        step: the optimizer's global step count (>= 1), for Adam's bias correction.
        bounds_check: "fatal" | "clamp_to_oov" | "off", as for the lookup.
    """
    _require()
    if kind not in _UPDATE_KINDS:
        raise ValueError(f"kind must be one of {_UPDATE_KINDS}, got {kind!r}")
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of optimizer state tensors, got {type(state).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a [V, D] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if weight.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"weight must be an fp32 or bf16 table for the cpu backend, got dtype {weight.dtype}")
    # the hyper-parameters SparseRowOptimizer accepts: lr = NaN or eps = 0 would write NaN into touched rows
    lr, eps = C.check_positive_finite("lr", lr), C.check_positive_finite("eps", eps)
    b1, b2 = C.check_betas(betas)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an integer >= 1 (the optimizer's step count), got {step!r}")
    rows, dim = weight.shape
    # Create missing state only (an eager default would zero two [V, D] tensors on every step), and into a
    # copy of the dict until the update has run: a call that fails leaves ``state`` as it was.
    shapes = {"adagrad": {"sum": (rows,)}, "adam": {"exp_avg": (rows, dim), "exp_avg_sq": (rows, dim)}}
    created = {name: torch.zeros(shape, dtype=torch.float32)
               for name, shape in shapes.get(kind, {}).items() if name not in state}
    full = dict(state, **created)
    state1 = full.get("sum") if kind == "adagrad" else full.get("exp_avg")
    state2 = full.get("exp_avg_sq") if kind == "adam" else None
    with torch.no_grad():
        _C.sparse_row_update(kind, weight, state1, state2, ids, offsets, grad_V.detach(), lr, eps,
                             b1, b2, step, bounds_check)
    state.update(created)


def quantize_rowwise_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise asymmetric int8 quantisation for serving: ``w[r, d] ~= q[r, d] * scale[r] + bias[r]``.

    ``bias[r] = min_d w[r, d]``, ``scale[r] = (max_d w[r, d] - bias[r]) / 255``, ``q = round((w - bias) / scale)``.
    Error bound: ``|dequant - w| <= scale[r] / 2`` per element (plus fp32 rounding of the affine map).
    Args:
        weight: floating ``[V, D]``.
    Returns:
        ``(qweight uint8 [V, D], scale_bias float32 [V, 2])`` with columns (scale, bias).
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating [V, D] tensor, got "
                        f"{weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a floating [V, D] tensor, got shape {list(weight.shape)}")
    if weight.shape[1] == 0:
        raise ValueError(f"weight must have at least one column to be quantised, got shape {list(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError("weight must hold data to be quantised, got a meta tensor")
    w = weight.detach().to(torch.float32)
    low = w.amin(dim=1)
    high = w.amax(dim=1)
    if not bool(torch.isfinite(low).all() & torch.isfinite(high).all()):
        raise ValueError("weight must be finite to be quantised")
    scale = (high - low) / 255.0
    if not bool(torch.isfinite(scale).all()):
        # max - min overflows float32: neither the scale nor the dequantised row would be representable
        row = int((~torch.isfinite(scale)).nonzero()[0, 0])
        raise ValueError(f"weight row {row} spans [{float(low[row])}, {float(high[row])}], wider than float32's "
                         "range: it cannot be quantised (scale = (max - min) / 255 overflows)")
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))   # constant rows: q = 0, value = bias
    q = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    # row blocks bound the float temporaries (a production table is gigabytes)
    step = max(1, _QUANTISE_BLOCK_ELEMENTS // max(w.shape[1], 1))
    for r0 in range(0, w.shape[0], step):
        r1 = min(w.shape[0], r0 + step)
        block = (w[r0:r1] - low[r0:r1, None]).div_(safe[r0:r1, None]).round_().clamp_(0, 255)
        q[r0:r1] = block.to(torch.uint8)
    return q, torch.stack([scale, low], dim=1).contiguous()


def dequantize_rowwise_int8(qweight: torch.Tensor, scale_bias: torch.Tensor) -> torch.Tensor:
    """``qweight * scale + bias`` row-wise, as float32 ``[V, D]`` (the inverse of the quantiser)."""
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8:
        raise TypeError("qweight must be a uint8 [V, D] tensor (from quantize_rowwise_int8)")
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be a uint8 [V, D] tensor, got shape {list(qweight.shape)}")
    if not isinstance(scale_bias, torch.Tensor) or scale_bias.dtype != torch.float32:
        raise TypeError(f"scale_bias must be a float32 [V, 2]=[{qweight.shape[0]}, 2] tensor (from "
                        "quantize_rowwise_int8)")
    if tuple(scale_bias.shape) != (qweight.shape[0], 2):
        raise ValueError(f"scale_bias must have shape [V, 2]=[{qweight.shape[0]}, 2], got {list(scale_bias.shape)}")
    return qweight.to(torch.float32) * scale_bias[:, :1] + scale_bias[:, 1:]


def embedding_lookup_int8(ids: torch.Tensor, qweight: torch.Tensor, scale_bias: torch.Tensor,
                          offsets: torch.Tensor, bounds_check: str = "fatal") -> torch.Tensor:
    """Lookup from an int8 row-wise quantised table, dequantised on the fly to float32 ``[B, N, D]``.

    Args: ids int32/int64 ``[B, N]``; qweight uint8 ``[V, D]`` and scale_bias float32 ``[V, 2]`` from
    :func:`quantize_rowwise_int8`; offsets int64 ``[N]``; bounds_check as for the lookup.
    """
    _require()
    return _C.embedding_lookup_int8(ids, qweight, scale_bias, offsets, bounds_check)


def _cpu_embedding_lookup(ids, weight, offsets):
    """``"cpu"`` embedding_lookup: the C++ gather for inference (ids validated by functional); when
    autograd needs the table's gradient, or for dtypes the kernel lacks, the factored torch path."""
    if _needs_grad(weight) or weight.dtype not in _FAST_DTYPES:
        return factored.embedding_lookup(ids, weight, offsets)
    return _C.embedding_lookup(ids, weight, offsets, "off")


def _cuda_embedding_lookup(ids, weight, offsets):
    """``"cuda"`` embedding_lookup: the CUDA gather for inference; autograd needs the torch path."""
    if _needs_grad(weight):
        return factored.embedding_lookup(ids, weight, offsets)
    return _C.embedding_lookup_cuda(ids, weight, offsets)


def _register() -> None:
    from ..functional import register_impl
    # Only ops measured at least as fast as the factored torch path at the Criteo shape are
    # registered (bench/bench_cpu_ext.py, idle 2-core run: fused sfg_logits 1.1-1.7x, gather 1.5x).
    # Training on CPU goes through sfg_fast.optim.fused_embedding_lookup(backend="cpu"): the C++
    # gather forward and sparse_row_update in backward.
    register_impl("cpu", "sfg_logits", sfg_logits)
    register_impl("cpu", "sfg_interaction", sfg_interaction)
    register_impl("cpu", "embedding_lookup", _cpu_embedding_lookup)
    if getattr(_C, "WITH_CUDA", False):
        register_impl("cuda", "embedding_lookup", _cuda_embedding_lookup)


if _C is not None:
    _register()
