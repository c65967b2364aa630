"""Serving with int8 row-wise quantised embedding tables (CPU first; the torch fallback runs anywhere).

The format (:func:`quantize_rowwise_int8`): every table row becomes D uint8 codes plus a float32
``(scale, bias)`` pair, ``w[r, d] ~= q[r, d] * scale[r] + bias[r]``, with ``|error| <= scale[r] / 2``.
At D = 16 a row shrinks from 64 bytes to 24 (2.7x less memory and memory traffic); the dense SFG
weights (encoder, decoder, MLPs) stay as they are.

    qweight, scale_bias = quantize_rowwise_int8(table)
    embedding_lookup_int8(ids, qweight, scale_bias, offsets)          -> V float32 [B, N, D]
    sfg_logits_int8(ids, qweight, scale_bias, offsets, enc_weight, enc_bias, dec_weight, kind, ...)
                                                                        -> logits float32 [B]
    QuantizedFieldEmbedding.from_embedding(field_embedding)            (an inference-only FieldEmbedding)
    serving_model = quantize_model(model)                              (a quantised copy of a CTR model)
    save_quantized(serving_model, path);  load_quantized(path)         (no float table on the way back)

``sfg_logits_int8`` is the fused CPU inference pipeline (csrc/sfg_logits_cpu.cpp) with the
dequantisation in its gather: ids -> int8 rows -> fp32 tile -> encoder GEMM -> act/gamma -> decoder
-> row dot, no tensor larger than a tile. Its meaning is exactly "dequantise the rows, then
``sfg_interaction`` on that float32 V" (mixed parameter dtypes promote as there); backend
``"torch"`` computes it that way and is the fallback when the extension is missing or the tensors
are not on the CPU.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from . import _checks as C
from . import functional as SF
from ._backend import BackendUnavailableError, _extension_status, autocast_on
from .nn import FieldDimsState, FieldEmbedding, check_ids_width, clamp_ids_to_oov, init_table_fields, weights_copied_in
from .ops import cpu_ext
from .optim import FusedFieldEmbedding
from .ops.cpu_ext import dequantize_rowwise_int8, quantize_rowwise_int8

__all__ = ["quantize_rowwise_int8", "dequantize_rowwise_int8", "embedding_lookup_int8", "sfg_logits_int8",
           "QuantizedFieldEmbedding", "quantize_model", "save_quantized", "load_quantized", "table_bytes",
           "SERVING_FORMAT"]

_BACKENDS = ("auto", "cpu", "torch")
_FLOAT_TABLES = (FieldEmbedding, FusedFieldEmbedding)   # id-indexed float tables quantize_model replaces


def _check_quantised(ids, qweight, scale_bias, offsets, bounds_check: str) -> torch.Tensor:
    """Checks of the int8 table operands; returns a float32 stand-in of the table's shape and device
    (zero strides, no memory) for the shared float-table checks."""
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        got = f"{qweight.dtype} {list(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise TypeError(f"qweight must be a uint8 [V, D] tensor (from quantize_rowwise_int8), got {got}")
    rows = qweight.shape[0]
    if not isinstance(scale_bias, torch.Tensor) or scale_bias.dtype != torch.float32:
        got = scale_bias.dtype if isinstance(scale_bias, torch.Tensor) else type(scale_bias).__name__
        raise TypeError(f"scale_bias must be a float32 [V, 2] tensor (from quantize_rowwise_int8), got {got}")
    if tuple(scale_bias.shape) != (rows, 2):
        raise ValueError(f"scale_bias must have shape [V, 2]=[{rows}, 2] (one (scale, bias) per row of qweight), "
                         f"got {list(scale_bias.shape)}")
    if scale_bias.device != qweight.device:
        raise ValueError(f"qweight ({qweight.device}) and scale_bias ({scale_bias.device}) must be on one device")
    stand_in = torch.empty_strided(tuple(qweight.shape), (0, 0), dtype=torch.float32, device=qweight.device)
    C.check_lookup(ids, stand_in, offsets, bounds_check, table="qweight")
    return stand_in


def _backend(backend: str, device: torch.device) -> str:
    C.check_choice("backend", backend, _BACKENDS)
    if backend == "auto":
        # (the extension's calls are invisible to torch.jit.trace: _backend.kernels_invisible)
        return "cpu" if device.type == "cpu" and cpu_ext.available() and not torch.jit.is_tracing() else "torch"
    if backend == "cpu":
        if not cpu_ext.available():
            raise BackendUnavailableError(f"backend 'cpu' is unavailable: {_extension_status()}")
        if device.type != "cpu":
            raise BackendUnavailableError(f"backend 'cpu' needs CPU tensors, got {device}")
    return backend


def _check_backend(backend: str, device: torch.device) -> str:
    """Validate the requested backend now (an unavailable explicit one fails before any work) and return
    it unresolved: the ops resolve "auto" when they run, so a torch.export program made where the
    extension exists still runs (on the torch twin) where it does not."""
    _backend(backend, device)
    return backend


def _gather_dequantised(ids, qweight, scale_bias, offsets) -> torch.Tensor:
    """The torch twin of the C++ int8 gather: dequantise only the addressed rows -> float32 [B, N, D]."""
    rows = (ids.to(torch.int64) + offsets).reshape(-1)
    # index_select raises on an out-of-range row, like F.embedding; plain indexing would wrap negatives
    sb = scale_bias.index_select(0, rows)
    v = qweight.index_select(0, rows).to(torch.float32) * sb[:, :1] + sb[:, 1:]
    return v.reshape(ids.shape[0], ids.shape[1], qweight.shape[1])


def _autocast_dtype(device: torch.device) -> str:
    """The autocast dtype active for ``device`` as a string ("" when off). Read outside the custom ops:
    inside a compiled graph an op's body no longer sees the caller's autocast state."""
    if not autocast_on(device.type):
        return ""
    return str(torch.get_autocast_dtype(device.type)).replace("torch.", "")


# The data-reading work (bounds checks, kernels) runs inside custom ops with fake implementations, so a
# quantised model traces under torch.compile(fullgraph=True) and torch.export; eager calls go through
# the same ops (their dispatch costs microseconds against milliseconds of inference).

@torch.library.custom_op("sfg_fast::serving_lookup_int8", mutates_args=())
def _lookup_op(ids: torch.Tensor, qweight: torch.Tensor, scale_bias: torch.Tensor, offsets: torch.Tensor,
               bounds_check: str, backend: str) -> torch.Tensor:
    ids = C.apply_bounds_check(ids, offsets, qweight.shape[0], bounds_check, table="qweight")
    backend = _backend(backend, qweight.device)
    if backend == "cpu":
        # ids already checked / remapped; the kernel still scans the ids it addresses memory with
        return cpu_ext.embedding_lookup_int8(ids, qweight, scale_bias, offsets, "off")
    return _gather_dequantised(ids, qweight, scale_bias, offsets)


@_lookup_op.register_fake
def _lookup_fake(ids, qweight, scale_bias, offsets, bounds_check, backend):
    return qweight.new_empty((ids.shape[0], ids.shape[1], qweight.shape[1]), dtype=torch.float32)


@torch.library.custom_op("sfg_fast::serving_sfg_logits_int8", mutates_args=())
def _logits_op(ids: torch.Tensor, qweight: torch.Tensor, scale_bias: torch.Tensor, offsets: torch.Tensor,
               enc_weight: Optional[torch.Tensor], enc_bias: Optional[torch.Tensor], dec_weight: Optional[torch.Tensor],
               kind: str, activation: str, gamma: float, residual: bool, pairs: str, generated_side: str,
               symmetric: bool, bounds_check: str, backend: str, amp: str) -> torch.Tensor:
    ids = C.apply_bounds_check(ids, offsets, qweight.shape[0], bounds_check, table="qweight")
    backend = _backend(backend, qweight.device)
    if backend == "torch":
        with torch.no_grad(), torch.autocast(qweight.device.type, dtype=getattr(torch, amp or "float32"),
                                             enabled=bool(amp)):
            V = _gather_dequantised(ids, qweight, scale_bias, offsets)
            out = SF.sfg_interaction(V, enc_weight, enc_bias, dec_weight, kind, activation, gamma, residual, pairs,
                                     generated_side, symmetric, backend="torch")
        return out.to(torch.float32)
    bf16 = amp == "bfloat16"
    detach = (lambda t: None if t is None else t.detach())
    return cpu_ext._C.sfg_logits(ids, qweight, offsets, detach(enc_weight), detach(enc_bias), detach(dec_weight),
                                 kind, activation, gamma, residual, pairs, generated_side, symmetric, "off",
                                 cpu_ext._tile(ids.shape[0], bf16), bf16_gemm=bf16, scale_bias=scale_bias)


@_logits_op.register_fake
def _logits_fake(ids, qweight, scale_bias, offsets, *args):
    return qweight.new_empty((ids.shape[0],), dtype=torch.float32)


def embedding_lookup_int8(ids: torch.Tensor, qweight: torch.Tensor, scale_bias: torch.Tensor,
                          offsets: torch.Tensor, bounds_check: str = "fatal", backend: str = "auto") -> torch.Tensor:
    """``V[b, f] = dequant(qweight, scale_bias)[offsets[f] + ids[b, f]]`` as float32 ``[B, N, D]``.

    Args: ids int32/int64 ``[B, N]``; qweight uint8 ``[V, D]`` and scale_bias float32 ``[V, 2]`` from
    :func:`quantize_rowwise_int8`; offsets int64 ``[N]``; bounds_check "fatal" | "clamp_to_oov" | "off";
    backend "auto" | "cpu" | "torch". Inference only (the int8 table has no gradient).
    """
    _check_quantised(ids, qweight, scale_bias, offsets, bounds_check)
    return _lookup_op(ids, qweight, scale_bias, offsets, bounds_check, _check_backend(backend, qweight.device))


def sfg_logits_int8(ids: torch.Tensor, qweight: torch.Tensor, scale_bias: torch.Tensor, offsets: torch.Tensor,
                    enc_weight: Optional[torch.Tensor], enc_bias: Optional[torch.Tensor],
                    dec_weight: Optional[torch.Tensor], kind: str, activation: str = "relu", gamma: float = 1.0,
                    residual: bool = False, pairs: str = "upper", generated_side: str = "left",
                    symmetric: bool = False, bounds_check: str = "fatal", backend: str = "auto") -> torch.Tensor:
    """``sfg_logits`` on an int8 row-wise quantised table: the SFG interaction logits, float32 ``[B]``.

    Equals ``functional.sfg_interaction(embedding_lookup_int8(ids, qweight, scale_bias, offsets), enc_weight,
    enc_bias, dec_weight, kind, ...)``; on the cpu backend it runs as one fused tile pipeline. Arguments
    as :func:`sfg_fast.functional.sfg_logits`, with ``(qweight, scale_bias)`` in place of the table.
    Under ``torch.autocast("cpu", torch.bfloat16)`` the GEMMs run on bf16 operands (fp32 accumulation),
    like the float tables' path; other autocast dtypes (fp16) leave the cpu backend in fp32, while the torch
    backend follows autocast. Inference only: parameters are read, never differentiated. Backend "auto" is
    resolved when the op runs, so an exported program falls back to the torch twin where the extension
    is missing.
    """
    stand_in = _check_quantised(ids, qweight, scale_bias, offsets, bounds_check)
    gamma = C.check_sfg_logits(ids, stand_in, offsets, enc_weight, enc_bias, dec_weight, kind, activation, gamma,
                               residual, pairs, generated_side, symmetric, bounds_check)
    for name, t in (("enc_weight", enc_weight), ("enc_bias", enc_bias), ("dec_weight", dec_weight)):
        if t is not None and t.device != qweight.device:
            raise ValueError(f"{name} ({t.device}) must be on qweight's device ({qweight.device})")
    return _logits_op(ids, qweight, scale_bias, offsets, enc_weight, enc_bias, dec_weight, kind, activation,
                      float(gamma), bool(residual), pairs, generated_side, bool(symmetric), bounds_check,
                      _check_backend(backend, qweight.device), _autocast_dtype(qweight.device))


class QuantizedFieldEmbedding(FieldDimsState, nn.Module):
    """An inference-only :class:`~sfg_fast.nn.FieldEmbedding` whose table is int8 row-wise quantised.

    ``forward(ids [B, N]) -> V [B, N, D]`` (dequantised rows) in ``dtype``: the dtype of the float table
    it replaces, so a bf16 or fp64 model computes on the dequantised table exactly as before (a module
    ``.to(dtype)`` moves it along; ``scale_bias`` always stays float32). Buffers: ``qweight`` uint8
    ``[sum(field_dims), D]``, ``scale_bias`` float32 ``[sum(field_dims), 2]``; bounds modes as FieldEmbedding.
    Build it with :meth:`from_embedding` (or :func:`quantize_model` for a whole model).
    """

    def __init__(self, field_dims, embedding_dim: int, bounds_check: str = "fatal", backend: str = "auto",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        dims = init_table_fields(self, field_dims, embedding_dim, bounds_check)
        C.check_choice("backend", backend, _BACKENDS)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.backend = backend
        self.register_buffer("qweight", torch.zeros(sum(dims), self.embedding_dim, dtype=torch.uint8))
        self.register_buffer("scale_bias", torch.zeros(sum(dims), 2, dtype=torch.float32))
        self.register_buffer("clamped_count", torch.zeros((), dtype=torch.int64), persistent=False)
        # empty floating buffer: the output dtype, converted by module.to(dtype) / .half() / .double()
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_probe.dtype

    def _apply(self, fn, recurse=True):
        # module.to(dtype) casts every floating buffer: the scales would lose their float32 precision (a
        # bf16 scale is off by up to 0.4%); only the device move applies to them
        scale_bias = self.scale_bias
        super()._apply(fn, recurse)
        if self.scale_bias.dtype != torch.float32:
            self._buffers["scale_bias"] = scale_bias.to(self.scale_bias.device)
        return self

    @classmethod
    def from_embedding(cls, embedding: nn.Module, backend: str = "auto") -> "QuantizedFieldEmbedding":
        """Quantise a trained table's rows: a :class:`~sfg_fast.nn.FieldEmbedding` or an
        :class:`~sfg_fast.optim.FusedFieldEmbedding` (its field_dims and bounds mode carry over)."""
        if not isinstance(embedding, _FLOAT_TABLES):
            raise TypeError("embedding must be a sfg_fast.nn.FieldEmbedding or sfg_fast.optim.FusedFieldEmbedding, "
                            f"got {type(embedding).__name__}")
        out = cls(embedding.field_dims, embedding.embedding_dim, embedding.bounds_check, backend,
                  dtype=embedding.weight.dtype)
        qweight, scale_bias = quantize_rowwise_int8(embedding.weight)
        out.qweight = qweight.to(embedding.weight.device)
        out.scale_bias = scale_bias.to(embedding.weight.device)
        out.to(embedding.weight.device)
        return out

    def _ids(self, ids: torch.Tensor) -> Tuple[torch.Tensor, str, Optional[torch.Tensor]]:
        """ids ready for the kernels, the bounds mode still to apply, and (clamp_to_oov) the count of
        remapped ids to add to ``clamped_count`` once the lookup has succeeded."""
        check_ids_width(self, ids)
        if self.bounds_check != "clamp_to_oov":
            return ids, self.bounds_check, None
        _check_quantised(ids, self.qweight, self.scale_bias, self.offsets, "clamp_to_oov")
        ids, clamped = clamp_ids_to_oov(self, ids)
        return ids, "off", clamped

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids, mode, clamped = self._ids(ids)
        V = embedding_lookup_int8(ids, self.qweight, self.scale_bias, self.offsets, mode, backend=self.backend)
        if clamped is not None:
            self.clamped_count += clamped
        return V if self.dtype == torch.float32 else V.to(self.dtype)

    @property
    def num_clamped(self) -> int:
        """How many out-of-range ids ``clamp_to_oov`` has remapped so far."""
        return int(self.clamped_count)

    def extra_repr(self) -> str:
        return (f"field_dims={self.field_dims}, embedding_dim={self.embedding_dim}, "
                f"bounds_check={self.bounds_check!r}, int8 row-wise -> {self.dtype}")


def _swap_tables(model: nn.Module, make) -> None:
    """Replace every float table of embedding_dim >= 2 in ``model`` by ``make(table)``, and every
    :class:`FusedFieldEmbedding` left (the first-order weights) by a plain FieldEmbedding."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _FLOAT_TABLES) and child.embedding_dim >= 2:
                setattr(parent, name, make(child))
            elif isinstance(child, FusedFieldEmbedding):
                setattr(parent, name, _plain_table(child))


def _plain_table(table: FusedFieldEmbedding) -> FieldEmbedding:
    """The weights of a table that trains itself, as a plain :class:`FieldEmbedding`: serving has no backward
    and no optimizer (whose data-dependent id checks would also keep ``torch.export`` from tracing it)."""
    device = table.weight.device
    # built where the table lives (its offsets too), without drawing from the global RNG
    with weights_copied_in(), torch.device(device):
        plain = FieldEmbedding(table.field_dims, table.embedding_dim, table.bounds_check, table.init_std,
                               backend=table.backend)
    plain.weight = nn.Parameter(table.weight.detach().clone(), requires_grad=False)
    return plain


def quantize_model(model: nn.Module, backend: str = "auto") -> nn.Module:
    """A copy of ``model`` for serving, in eval mode, with every :class:`~sfg_fast.nn.FieldEmbedding` (and
    :class:`~sfg_fast.optim.FusedFieldEmbedding`, the table that trains itself in backward) of
    embedding_dim >= 2 replaced by its int8 :class:`QuantizedFieldEmbedding` (``model`` is untouched).

    The first-order tables (one weight per id, D = 1) stay in the model's float dtype: a row's int8 code
    plus its float32 (scale, bias) would take more memory than the float (a FusedFieldEmbedding one becomes a plain
    FieldEmbedding: serving needs no optimizer). The model then computes exactly what the float
    model computes on the dequantised table (the interaction runs on the rows the lookup dequantises).
    Tables that are not FieldEmbeddings (TorchRec) are left as they are. Parameters of the copy do not
    require grad. Raises ValueError when nothing was quantised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    C.check_choice("backend", backend, _BACKENDS)
    tables = [m for m in model.modules() if isinstance(m, _FLOAT_TABLES) and m.embedding_dim >= 2]
    if not tables:
        raise ValueError("model has no sfg_fast.nn.FieldEmbedding (or optim.FusedFieldEmbedding) with "
                         "embedding_dim >= 2 to quantise")
    # deepcopy's memo maps each float table straight to its int8 replacement: the copy never holds a
    # second float table (gigabytes at production vocabularies)
    memo = {id(t): QuantizedFieldEmbedding.from_embedding(t, backend=backend) for t in tables}
    memo.update({id(t): _plain_table(t) for t in model.modules()
                 if isinstance(t, FusedFieldEmbedding) and id(t) not in memo})
    served = copy.deepcopy(model, memo).eval()
    for p in served.parameters():
        p.requires_grad_(False)
    return served


SERVING_FORMAT = "sfg_fast.serving-int8/1"


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of a model's parameters and output (float32 when it has none)."""
    for m in model.modules():
        if isinstance(m, QuantizedFieldEmbedding):
            return m.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def save_quantized(served: nn.Module, path: str, feature_map_digest: Optional[str] = None) -> None:
    """Write a :func:`quantize_model` copy of an ``sfg_fast.models`` model to ``path`` (atomically): its
    name, field_dims, config, dtype and state (int8 tables included), and the digest of the feature map
    its run trained with, when given (``sfg-fast predict --int8`` checks it). :func:`load_quantized`
    rebuilds it (``feature_map_digest`` becomes an attribute of the model)."""
    from .train import atomic_save

    if not all(hasattr(served, a) for a in ("name", "field_dims", "config")):
        raise TypeError("served must be a quantize_model copy of an sfg_fast.models model (name, field_dims, config)")
    if not any(isinstance(m, QuantizedFieldEmbedding) for m in served.modules()):
        raise ValueError("served holds no QuantizedFieldEmbedding: quantise it with quantize_model first")
    atomic_save({"format": SERVING_FORMAT, "model_name": served.name, "field_dims": list(served.field_dims),
                 "model_config": dict(served.config), "dtype": str(_model_dtype(served)).replace("torch.", ""),
                 "state": served.state_dict(), "feature_map_digest": feature_map_digest}, path)


def load_quantized(path: str, backend: str = "auto") -> nn.Module:
    """Rebuild a model written by :func:`save_quantized` (eval mode, no grad), without a float table.

    Raises FileNotFoundError for a missing file and ValueError naming the file for anything else that is
    not a complete, consistent serving file (every state tensor must have the rebuilt model's shape and
    dtype: a float ``qweight`` would otherwise be cast into the uint8 codes without a word).
    """
    from . import models

    C.check_choice("backend", backend, _BACKENDS)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path!r} could not be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != SERVING_FORMAT:
        raise ValueError(f"{path!r} is not an sfg_fast int8 serving file (expected format {SERVING_FORMAT!r})")
    name, field_dims, config, state = (blob.get(k) for k in ("model_name", "field_dims", "model_config", "state"))
    dtype = getattr(torch, str(blob.get("dtype", "float32")), None)
    if not (isinstance(name, str) and isinstance(field_dims, list) and isinstance(config, dict)
            and isinstance(state, dict) and isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{path!r} is not a complete serving file (model_name, field_dims, model_config, dtype "
                         "and state are required)")
    config = dict(config)
    try:
        if config.get("embedding", "native") in ("native", "fused") and int(config.get("embedding_dim", 16)) >= 2:
            # the main table is built int8 from the start: no float table of the vocabulary's size on the way
            # (a "fused" run's tables serve as plain ones: no optimizer, so its settings go too)
            for key in ("embedding_optimizer", "embedding_lr", "embedding_eps"):
                config.pop(key, None)
            config["embedding"] = QuantizedFieldEmbedding(field_dims, config.get("embedding_dim", 16),
                                                          config.get("bounds_check", "fatal"), backend, dtype)
        served = models.build(name, field_dims, **config)
        _swap_tables(served, lambda t: QuantizedFieldEmbedding(t.field_dims, t.embedding_dim, t.bounds_check,
                                                               backend, dtype))
        served.to(dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} describes a model that cannot be rebuilt: {exc}") from exc
    expected = served.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{path!r}: the state does not fit the model (missing {missing}, unexpected {unexpected})")
    for key, want in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            got_desc = f"{got.dtype} {list(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"{path!r}: state[{key!r}] is {got_desc}, the model needs {want.dtype} {list(want.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            # the quantiser refuses non-finite weights: a NaN/inf here (a scale, a bias, a weight) is damage,
            # which would silently turn every logit it touches into NaN
            raise ValueError(f"{path!r}: state[{key!r}] holds {int((~torch.isfinite(got)).sum())} NaN/inf values")
    try:
        served.load_state_dict(state)
    except RuntimeError as exc:     # e.g. field_dims recorded with the tables that differ from the file's
        raise ValueError(f"{path!r}: the state does not fit the model: {exc}") from exc
    digest = blob.get("feature_map_digest")
    served.feature_map_digest = digest if isinstance(digest, str) else None
    served.eval()
    for p in served.parameters():
        p.requires_grad_(False)
    return served


def table_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of the id-indexed tables of ``model``: ``{"float": ..., "int8": ...}`` (FieldEmbedding weights,
    QuantizedFieldEmbedding codes + scale/bias)."""
    out = {"float": 0, "int8": 0}
    for m in model.modules():
        if isinstance(m, _FLOAT_TABLES):
            out["float"] += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QuantizedFieldEmbedding):
            out["int8"] += m.qweight.numel() + m.scale_bias.numel() * m.scale_bias.element_size()
    return out
