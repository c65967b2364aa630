"""Stateless SFG ops (like torch.nn.functional). Data flows ids -> lookup -> encode -> decode -> loss.

Shape letters used throughout sfg_fast:
    B  batch size (samples)
    N  number of categorical fields
    D  embedding dimension, shared by all fields
    V  total vocabulary: rows of the concatenated table, ``sum(field_dims)``
    P  number of scored field pairs (N(N-1)/2 for ``pairs="upper"``)

Every op takes ``backend="auto" | "triton" | "cuda" | "cpu" | "torch" | "reference"``; see
``sfg_fast._backend`` for how "auto" resolves and ``python -m sfg_fast.info`` for what is available.
Inputs are validated here, once, with errors that name the offending argument.

Floating operands of different dtypes (a bf16 V meeting fp32 weights, an fp64 bias) are cast here
to their promoted dtype (``torch.promote_types``), so every backend computes the same thing and
returns that dtype (the contract of ``sfg_fast.library``); the casts are differentiable, so each
gradient comes back in its own operand's dtype. An encoder's bias follows the promoted dtype of V
and the weight. ``sfg_logits`` never casts the table: it gathers first and casts the rows.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import _checks as C
from . import factored, reference
from ._backend import ENV_VAR, BackendUnavailableError, autocast_on, kernels_invisible, module_backend, resolve

__all__ = ["embedding_lookup", "sfg_encode", "pairwise_decode", "pairwise_products",
           "generative_cross", "bce_with_logits", "sfg_logits", "sfg_interaction"]

_OPTIONAL_IMPLS = {}  # (backend, op) -> callable, registered by the compiled/Triton backends


def _promoted(*tensors):
    """``tensors`` (None allowed) cast to their promoted dtype; returned as they are when they agree."""
    if len({t.dtype for t in tensors if t is not None}) <= 1:
        return tensors
    dtype = _library._promote(*tensors)   # the custom ops' output-dtype rule
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def _with_bias(bias, like):
    """An encoder bias in the dtype its encoder computes in."""
    return bias if bias is None or bias.dtype == like.dtype else bias.to(like.dtype)


def _contract_dtype(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out`` in the op's output dtype (its promoted operands', ``sfg_fast.library``'s contract), which under
    autocast the backends disagreed on: torch's autocast GEMMs return half outputs, the fused kernels fp32,
    and the compiled custom ops the contract dtype."""
    if out.dtype == dtype or not out.is_floating_point():
        return out
    return out.to(dtype) if autocast_on(out.device.type) else out


def register_impl(backend: str, op: str, fn) -> None:
    """Let an optional backend (triton / cpu / cuda) provide ``op``; same arguments as the torch impl."""
    from ._backend import register
    _OPTIONAL_IMPLS[(backend, op)] = fn
    register(backend, op)


def _kernels_invisible(backend: str, op: str, where: str):
    """The implementation where the compiled kernels cannot run (``_backend.kernels_invisible``: a torch.func
    transform, a torch.jit.trace): the factored torch ops, which both see through. "auto" takes torch
    (as SFG_FAST_BACKEND=auto does) and an explicit kernel backend is refused, naming the one that works."""
    env = os.environ.get(ENV_VAR, "").strip()
    if backend == "auto" and env in ("", "auto", "torch"):
        return getattr(factored, op)
    if backend == "auto" and env == "reference":
        return None
    hint = "unset SFG_FAST_BACKEND (or set it to torch)" if backend == "auto" else "use backend='torch' (or 'auto')"
    raise BackendUnavailableError(
        f"backend {(env if backend == 'auto' else backend)!r} is unavailable for {op} {where}; {hint}")


def _impl(backend: str, op: str, device: torch.device):
    if torch.compiler.is_compiling():
        # opaque backends become custom ops so the whole model stays one graph (sfg_fast.library)
        return _library.compiled_impl(backend, op, device)
    if backend != "torch" and backend != "reference":
        from .ops import load_backends
        load_backends()
    if backend in ("auto", "cpu", "cuda", "triton"):
        where = kernels_invisible()
        if where is not None:
            return _kernels_invisible(backend, op, where)
    chosen = resolve(backend, op, device)
    if chosen == "reference":
        return None
    if chosen == "torch":
        return getattr(factored, op)
    return _OPTIONAL_IMPLS[(chosen, op)]


def embedding_lookup(ids: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                     bounds_check: str = "fatal", backend: str = "auto") -> torch.Tensor:
    """Multi-field lookup from one concatenated table: ``V[b, f] = weight[offsets[f] + ids[b, f]]``.

    Args:
        ids: int32/int64 ``[B, N]`` field-local ids, ``0 <= ids[:, f] < field_dims[f]``.
        weight: floating ``[V, D]`` concatenated table (fields stacked in order).
        offsets: int64 ``[N]`` first row of each field in ``weight`` (exclusive cumsum of field_dims).
        bounds_check: ``"fatal"`` raises IndexError naming the field and id; ``"clamp_to_oov"``
            remaps bad ids to the field's last id (the OOV row); ``"off"`` skips the separate check
            (no host sync on a GPU) and trusts the ids and the offsets (FBGEMM's ``NONE``: a bad id reads
            another row), except on the ``cpu`` backend for inference on fp32/bf16 tables (no grad), whose
            C++ gather still scans the ids and offsets it addresses memory with and raises the fatal mode's
            error (the ``reference`` backend checks the offsets too).
    Returns:
        ``[B, N, D]`` embeddings, differentiable with respect to ``weight``.
    """
    C.check_lookup(ids, weight, offsets, bounds_check)
    impl = _impl(backend, "embedding_lookup", weight.device)
    if bounds_check != "off" and torch.compiler.is_compiling():
        # reading ids is a graph break: check them at run time inside the graph instead (the reference too)
        ids, bounds_check = _library.checked_ids(ids, offsets, weight.shape[0], bounds_check), "off"
    if impl is None:
        return reference.embedding_lookup(ids, weight, offsets, bounds_check)
    ids = C.apply_bounds_check(ids, offsets, weight.shape[0], bounds_check)
    return impl(ids, weight, offsets)


def sfg_encode(V: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               activation: str = "relu", gamma: float = 1.0, residual: bool = False,
               backend: str = "auto") -> torch.Tensor:
    """SFG encoder: ``Z = gamma * act(V.reshape(B, N*D) @ weight.T + bias).reshape(B, N, D) (+ V)``.

    Args:
        V: ``[B, N, D]`` raw field embeddings.
        weight: ``[N*D, N*D]`` in nn.Linear's (out, in) convention; rows ``i*D:(i+1)*D`` generate field i.
        bias: optional ``[N*D]``.
        activation: identity | relu | tanh | sigmoid | silu | gelu.
        gamma: scalar output scale.  residual: add V to the output.
    Returns:
        ``Z [B, N, D]``, the generated embeddings.
    """
    gamma = C.check_encode(V, weight, bias, activation, gamma, residual)
    V, weight = _promoted(V, weight)
    bias = _with_bias(bias, V)
    impl = _impl(backend, "sfg_encode", V.device)
    if impl is None:
        return _contract_dtype(reference.sfg_encode(V, weight, bias, activation, gamma, residual), V.dtype)
    return _contract_dtype(impl(V, weight, bias, activation, gamma, residual), V.dtype)


def pairwise_decode(Z: torch.Tensor, V: torch.Tensor, weight: Optional[torch.Tensor], kind: str,
                    pairs: str = "upper", generated_side: str = "left", symmetric: bool = False,
                    backend: str = "auto") -> torch.Tensor:
    """All-Predict-All score: ``logit[b] = sum_{(i,j) in P} (a_i @ W_ij) . b_j``.

    The operands are ``(a, b) = (Z, V)`` for ``generated_side="left"`` (``< dec_ij(z_i), v_j >``),
    ``(V, Z)`` for ``"right"`` (``v_i^T W_ij z_j``, the authors' FmFM, which reduces to base FmFM when
    Z = V), and ``(Z, Z)`` when ``symmetric``. ``W_ij`` is the decoder of pair (i, j):

        identity  weight None            W_ij = I
        scalar    weight [N, N]          W_ij = weight[i, j] * I
        vector    weight [N, N, D]       W_ij = diag(weight[i, j])
        matrix    weight [N, N, D, D]    W_ij = weight[i, j]     (dec_ij(z) = z @ weight[i, j])

    Entries of ``weight`` outside P are ignored. ``pairs``: upper (i<j) | all | offdiag (i != j).
    Args:
        Z: ``[B, N, D]`` generated embeddings.  V: ``[B, N, D]`` raw embeddings.
    Returns:
        ``[B]`` pairwise logit contribution.
    """
    C.check_decode(Z, V, weight, kind, pairs, generated_side, symmetric)
    Z, V, weight = _promoted(Z, V, weight)
    impl = _impl(backend, "pairwise_decode", Z.device)
    if impl is None:
        return _contract_dtype(reference.pairwise_decode(Z, V, weight, kind, pairs, generated_side, symmetric),
                               Z.dtype)
    return _contract_dtype(impl(Z, V, weight, kind, pairs, generated_side, symmetric), Z.dtype)


def pairwise_products(Z: torch.Tensor, V: torch.Tensor, pairs: str = "upper",
                      generated_side: str = "left", symmetric: bool = False,
                      backend: str = "auto") -> torch.Tensor:
    """Per-pair inner products ``p[b, k] = < a_i, b_j >`` for the k-th pair of P (row-major order).

    IPNN's product vector (SFG form ``p_ij = <z_i, v_j>``). Operands as in :func:`pairwise_decode`.
    Returns ``[B, P]``.
    """
    C.check_products(Z, V, pairs, generated_side, symmetric)
    Z, V = _promoted(Z, V)
    impl = _impl(backend, "pairwise_products", Z.device)
    if impl is None:
        return _contract_dtype(reference.pairwise_products(Z, V, pairs, generated_side, symmetric), Z.dtype)
    return _contract_dtype(impl(Z, V, pairs, generated_side, symmetric), Z.dtype)


def generative_cross(x: torch.Tensor, x_gen: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """One DCNv2 cross layer: ``x + x_gen * (x @ weight.T + bias)``.

    Base DCNv2 passes ``x_gen = x_0``; SFG passes ``x_gen = G_l(x_l)``.
    Args:
        x: ``[B, K]`` (K = N*D), x_gen: ``[B, K]``, weight: ``[K, K]``, bias: optional ``[K]``.
    """
    C.check_cross(x, x_gen, weight, bias)
    x, x_gen, weight, bias = _promoted(x, x_gen, weight, bias)
    impl = _impl(backend, "generative_cross", x.device)
    if impl is None:
        return _contract_dtype(reference.generative_cross(x, x_gen, weight, bias), x.dtype)
    return _contract_dtype(impl(x, x_gen, weight, bias), x.dtype)


def bce_with_logits(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                    backend: str = "auto") -> torch.Tensor:
    """Stable binary cross-entropy on logits, computed in fp32 (fp64 for fp64 inputs).

    ``loss = max(x, 0) - x*y + log1p(exp(-|x|))``; finite for |x| up to 1e4 and beyond.
    Args:
        logits: floating ``[B]`` (any shape).  labels: same shape, values in [0, 1], no NaN/inf.
        reduction: mean | sum | none.
    """
    if torch.compiler.is_compiling():
        labels = _library.validate_bce(logits, labels, reduction)   # label values checked at run time
        impl = _impl(backend, "bce_with_logits", logits.device)
    else:
        C.check_bce(logits, labels, reduction, values=False)
        impl = _impl(backend, "bce_with_logits", logits.device)
        checking = getattr(impl, "checking_labels", None)
        if checking is not None:      # the kernel checks the label values as it reads them
            return checking(logits, labels, reduction)
        C.check_label_values(labels)
    if impl is None:
        return reference.bce_with_logits(logits, labels, reduction)
    return impl(logits, labels, reduction)


def sfg_logits(ids: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor,
               enc_weight: Optional[torch.Tensor], enc_bias: Optional[torch.Tensor],
               dec_weight: Optional[torch.Tensor], kind: str, activation: str = "relu", gamma: float = 1.0,
               residual: bool = False, pairs: str = "upper", generated_side: str = "left",
               symmetric: bool = False, bounds_check: str = "fatal", backend: str = "auto") -> torch.Tensor:
    """The whole SFG interaction in one op (what fused backends implement as one kernel pipeline).

    ``V = embedding_lookup(ids, table, offsets)``; ``Z = sfg_encode(V, enc_weight, enc_bias, activation,
    gamma, residual)`` (``Z = V`` when ``enc_weight`` is None: the base model); returns
    ``pairwise_decode(Z, V, dec_weight, kind, pairs, generated_side, symmetric)`` as ``[B]``.
    Args: as for the three ops it composes; ``table [V, D]``, ``enc_weight [N*D, N*D]`` or None.
    """
    gamma = C.check_sfg_logits(ids, table, offsets, enc_weight, enc_bias, dec_weight, kind, activation,
                               gamma, residual, pairs, generated_side, symmetric, bounds_check)
    if len({t.dtype for t in (table, enc_weight, dec_weight) if t is not None}) > 1:
        # mixed dtypes: gather in the table's dtype, then the interaction on promoted operands (the same
        # math; the table itself is never cast)
        V = embedding_lookup(ids, table, offsets, bounds_check, backend=module_backend(backend, "embedding_lookup"))
        return sfg_interaction(V, enc_weight, enc_bias, dec_weight, kind, activation, gamma, residual, pairs,
                               generated_side, symmetric, backend=module_backend(backend, "sfg_interaction"))
    enc_bias = _with_bias(enc_bias, table)
    impl = _impl(backend, "sfg_logits", table.device)
    if bounds_check != "off" and torch.compiler.is_compiling():
        ids, bounds_check = _library.checked_ids(ids, offsets, table.shape[0], bounds_check), "off"
    if impl is None:
        return _contract_dtype(reference.sfg_logits(ids, table, offsets, enc_weight, enc_bias, dec_weight, kind,
                                                    activation, gamma, residual, pairs, generated_side, symmetric,
                                                    bounds_check), table.dtype)
    ids = C.apply_bounds_check(ids, offsets, table.shape[0], bounds_check)
    return _contract_dtype(impl(ids, table, offsets, enc_weight, enc_bias, dec_weight, kind, activation, gamma,
                                residual, pairs, generated_side, symmetric), table.dtype)


def sfg_interaction(V: torch.Tensor, enc_weight: Optional[torch.Tensor], enc_bias: Optional[torch.Tensor],
                    dec_weight: Optional[torch.Tensor], kind: str, activation: str = "relu", gamma: float = 1.0,
                    residual: bool = False, pairs: str = "upper", generated_side: str = "left",
                    symmetric: bool = False, backend: str = "auto") -> torch.Tensor:
    """Encoder and decoder as ONE op on ready embeddings: the drop-in SFG layer for any lookup.

    Equals ``pairwise_decode(sfg_encode(V, enc_weight, enc_bias, activation, gamma, residual), V,
    dec_weight, kind, pairs, generated_side, symmetric)`` (``Z = V`` when ``enc_weight`` is None: the
    base model). Fused backends run it as one forward and one backward pipeline; on CPU the backward
    hands back ``dV`` ready for a fused sparse embedding update (``sfg_fast.optim``).
    Args: ``V [B, N, D]``; the rest as for :func:`sfg_logits` (``enc_weight [N*D, N*D]`` or None).
    Returns: ``[B]``.
    """
    gamma = C.check_interaction(V, enc_weight, enc_bias, dec_weight, kind, activation, gamma, residual, pairs,
                                generated_side, symmetric)
    V, enc_weight, dec_weight = _promoted(V, enc_weight, dec_weight)
    enc_bias = _with_bias(enc_bias, V)
    impl = _impl(backend, "sfg_interaction", V.device)
    if impl is None:
        return _contract_dtype(reference.sfg_interaction(V, enc_weight, enc_bias, dec_weight, kind, activation,
                                                         gamma, residual, pairs, generated_side, symmetric), V.dtype)
    return _contract_dtype(impl(V, enc_weight, enc_bias, dec_weight, kind, activation, gamma, residual, pairs,
                                generated_side, symmetric), V.dtype)


from . import library as _library  # noqa: E402  (registers the custom ops; imports this module back)
