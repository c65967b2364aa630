"""Reference implementation of every sfg_fast op: literal, readable, fp64-capable.

Written the way the authors' code computes SFG (one pass per field, materialised pair tensors
``z[:, rows] * v[:, cols]``). It is the ground truth every faster backend is tested against and
is NEVER edited to agree with a kernel. Signatures equal those of ``sfg_fast.functional``
(the ``backend`` argument is accepted and ignored so the two are interchangeable).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks as C


def embedding_lookup(ids: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                     bounds_check: str = "fatal", backend: str = "reference") -> torch.Tensor:
    """V[b, f] = weight[offsets[f] + ids[b, f]]: one row gather per (sample, field)."""
    C.check_lookup(ids, weight, offsets, bounds_check)
    if torch.compiler.is_compiling():
        # reading ids or offsets on the host is a graph break: "fatal" and "clamp_to_oov" run their checks
        # inside the graph (sfg_fast::checked_ids, as the functional API does); "off" trusts ids and offsets,
        # as every compiled backend does
        if bounds_check != "off":
            from .library import checked_ids
            ids = checked_ids(ids, offsets, weight.shape[0], bounds_check)
    else:
        if bounds_check == "off":
            C.check_offsets(offsets, weight.shape[0])   # the other modes validate offsets themselves
        ids = C.apply_bounds_check(ids, offsets, weight.shape[0], bounds_check)
    columns = []
    for f in range(ids.shape[1]):
        rows = offsets[f] + ids[:, f].to(torch.int64)
        columns.append(weight[rows])
    if not columns:     # N = 0: an empty [B, 0, D] (still a function of weight: its gradient is zeros)
        return weight[torch.zeros(ids.shape[0], 0, dtype=torch.int64, device=weight.device)]
    return torch.stack(columns, dim=1)


def sfg_encode(V: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               activation: str = "relu", gamma: float = 1.0, residual: bool = False,
               backend: str = "reference") -> torch.Tensor:
    """z_i = gamma * act(e @ W_i + b_i) (+ v_i), one field-wise linear layer per generated field."""
    gamma = C.check_encode(V, weight, bias, activation, gamma, residual)
    act = C.ACTIVATIONS[activation]
    batch, n, d = V.shape
    e = V.reshape(batch, n * d)
    fields = []
    for i in range(n):
        w_i = weight[i * d:(i + 1) * d]          # rows of nn.Linear's (out, in) weight for field i
        h = e @ w_i.t()
        if bias is not None:
            h = h + bias[i * d:(i + 1) * d]
        z_i = gamma * act(h)
        if residual:
            z_i = z_i + V[:, i]
        fields.append(z_i)
    return torch.stack(fields, dim=1)


def _operands(Z, V, generated_side, symmetric):
    if symmetric:
        return Z, Z
    return (Z, V) if generated_side == "left" else (V, Z)


def pairwise_decode(Z: torch.Tensor, V: torch.Tensor, weight: Optional[torch.Tensor], kind: str,
                    pairs: str = "upper", generated_side: str = "left", symmetric: bool = False,
                    backend: str = "reference") -> torch.Tensor:
    """sum over (i, j) in P of (a_i @ W_ij) . b_j, with (a, b) = (Z, V), (V, Z) or (Z, Z)."""
    C.check_decode(Z, V, weight, kind, pairs, generated_side, symmetric)
    left, right = _operands(Z, V, generated_side, symmetric)
    rows, cols = C.pair_index(Z.shape[1], pairs, Z.device)
    a = left[:, rows]                            # [B, P, D]: the authors' materialised pairs
    b = right[:, cols]
    if kind == "identity":
        scored = a * b
    elif kind == "scalar":
        scored = weight[rows, cols][None, :, None] * a * b
    elif kind == "vector":
        scored = weight[rows, cols][None] * a * b
    else:
        decoded = torch.einsum("bpd,pde->bpe", a, weight[rows, cols])
        scored = decoded * b
    return scored.sum(dim=(1, 2))


def pairwise_products(Z: torch.Tensor, V: torch.Tensor, pairs: str = "upper",
                      generated_side: str = "left", symmetric: bool = False,
                      backend: str = "reference") -> torch.Tensor:
    """[B, P] inner products <a_i, b_j> for (i, j) in P in row-major order (IPNN's p vector)."""
    C.check_products(Z, V, pairs, generated_side, symmetric)
    left, right = _operands(Z, V, generated_side, symmetric)
    rows, cols = C.pair_index(Z.shape[1], pairs, Z.device)
    return (left[:, rows] * right[:, cols]).sum(-1)


def generative_cross(x: torch.Tensor, x_gen: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, backend: str = "reference") -> torch.Tensor:
    """One DCNv2 cross layer with a generated gate: x + x_gen * (x @ W.T + b)."""
    C.check_cross(x, x_gen, weight, bias)
    h = x @ weight.t()
    if bias is not None:
        h = h + bias
    return x + x_gen * h


def bce_with_logits(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                    backend: str = "reference") -> torch.Tensor:
    """Binary cross-entropy on logits: log(1 + e^x) - x*y (= max(x,0) - x*y + log1p(e^-|x|)), fp32 or better."""
    if torch.compiler.is_compiling():
        # the label values are checked inside the graph (sfg_fast::checked_labels), as the functional API does
        from .library import validate_bce
        labels = validate_bce(logits, labels, reduction)
    else:
        C.check_bce(logits, labels, reduction)
    x = logits if logits.dtype == torch.float64 else logits.to(torch.float32)
    y = labels.to(x.dtype)
    # Two branches so that each exp() sees a non-positive argument (no overflow) and the gradient is
    # the true sigmoid(x) - y everywhere, including x = 0 where max() and |x| have kinks.
    positive = x >= 0
    x_pos = torch.where(positive, x, torch.zeros_like(x))
    x_neg = torch.where(positive, torch.zeros_like(x), x)
    # log(1 + e^x) - x*y regrouped per branch so no large terms cancel (keeps tiny losses exact).
    loss = torch.where(positive, x_pos * (1 - y) + torch.log1p(torch.exp(-x_pos)),
                       torch.log1p(torch.exp(x_neg)) - x_neg * y)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def sfg_logits(ids: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor,
               enc_weight: Optional[torch.Tensor], enc_bias: Optional[torch.Tensor],
               dec_weight: Optional[torch.Tensor], kind: str, activation: str = "relu", gamma: float = 1.0,
               residual: bool = False, pairs: str = "upper", generated_side: str = "left",
               symmetric: bool = False, bounds_check: str = "fatal", backend: str = "reference") -> torch.Tensor:
    """The whole SFG interaction: lookup -> encode (skipped when enc_weight is None) -> decode."""
    V = embedding_lookup(ids, table, offsets, bounds_check)
    Z = V if enc_weight is None else sfg_encode(V, enc_weight, enc_bias, activation, gamma, residual)
    return pairwise_decode(Z, V, dec_weight, kind, pairs, generated_side, symmetric)


def sfg_interaction(V: torch.Tensor, enc_weight: Optional[torch.Tensor], enc_bias: Optional[torch.Tensor],
                    dec_weight: Optional[torch.Tensor], kind: str, activation: str = "relu", gamma: float = 1.0,
                    residual: bool = False, pairs: str = "upper", generated_side: str = "left",
                    symmetric: bool = False, backend: str = "reference") -> torch.Tensor:
    """Encode (skipped when enc_weight is None) -> decode, on ready embeddings V ``[B, N, D]``."""
    Z = V if enc_weight is None else sfg_encode(V, enc_weight, enc_bias, activation, gamma, residual)
    return pairwise_decode(Z, V, dec_weight, kind, pairs, generated_side, symmetric)
