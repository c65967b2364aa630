"""FM, FwFM, FmFM, DeepFM and IPNN, each as its base model or its SFG form (the forms of the SFG paper, Yin et al., ICML 2025)."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import functional as SF
from .._backend import module_backend
from ..nn import MLP, PairwiseDecoder, score_pairs
from .base import CTRModel, FirstOrder


class _PairwiseModel(CTRModel):
    """lr + sum_{i<j} B_ij(operands), with Z = SFGEncoder(V) replacing the generated operand."""

    kind = "identity"
    generated_side = "left"

    def __init__(self, field_dims, embedding_dim: int = 16, generative: bool = True, **kwargs):
        super().__init__(field_dims, embedding_dim, generative, **kwargs)
        self.linear = FirstOrder(self.field_dims, self.config["bounds_check"], self.backend)
        self.encoder = self.make_encoder()
        self.decoder = PairwiseDecoder(self.num_fields, self.embedding_dim, self.kind, "upper",
                                       self.generated_side, backend=self.backend)

    def interaction(self, V: torch.Tensor) -> torch.Tensor:
        # encoder + decoder as one op (fused on the backends that have it; the same math elsewhere)
        return score_pairs(self.encoder, self.decoder, V, self.backend)

    def score(self, ids, V):
        return self.linear(ids) + self.interaction(V)


class FM(_PairwiseModel):
    """FM: sigma(lr + sum_{i<j} <v_i, v_j>);  SFG: sum_{i<j} <z_i, v_j>."""
    name = "fm"
    kind = "identity"


class FwFM(_PairwiseModel):
    """FwFM: sigma(lr + sum_{i<j} r_ij <v_i, v_j>);  SFG: sum_{i<j} r_ij <z_i, v_j>."""
    name = "fwfm"
    kind = "scalar"


class FmFM(_PairwiseModel):
    """FmFM: sigma(lr + sum_{i<j} (v_i M_ij) . v_j);  SFG (authors' form): sum_{i<j} (v_i M_ij) . z_j.

    ``interaction="vector"`` gives the vectorised variant (FvFM, M_ij diagonal).
    """
    name = "fmfm"
    generated_side = "right"

    def __init__(self, field_dims, embedding_dim: int = 16, generative: bool = True,
                 interaction: str = "matrix", **kwargs):
        if interaction not in ("matrix", "vector"):
            raise ValueError(f"interaction must be 'matrix' or 'vector', got {interaction!r}")
        self.kind = interaction
        super().__init__(field_dims, embedding_dim, generative, **kwargs)
        self._record(interaction=interaction)


class DeepFM(_PairwiseModel):
    """DeepFM: FM part (as FM / SFG-FM) + MLP on the RAW concatenated embeddings e."""
    name = "deepfm"

    def __init__(self, field_dims, embedding_dim: int = 16, generative: bool = True,
                 hidden_units: Sequence[int] = (400, 400, 400), dropout: float = 0.0,
                 batch_norm: bool = False, **kwargs):
        super().__init__(field_dims, embedding_dim, generative, **kwargs)
        self.dnn = MLP(self.num_fields * self.embedding_dim, hidden_units, "relu", dropout, batch_norm, 1)
        self._record(hidden_units=list(hidden_units), dropout=dropout, batch_norm=batch_norm)

    def score(self, ids, V):
        return self.linear(ids) + self.interaction(V) + self.dnn(V.flatten(1)).squeeze(1)


class IPNN(CTRModel):
    """IPNN: p_ij = <v_i, v_j> (i<j), y = sigma(MLP([e ; p]));  SFG: p_ij = <z_i, v_j>."""
    name = "ipnn"

    def __init__(self, field_dims, embedding_dim: int = 16, generative: bool = True,
                 hidden_units: Sequence[int] = (1000, 1000, 1000), dropout: float = 0.0,
                 batch_norm: bool = False, **kwargs):
        super().__init__(field_dims, embedding_dim, generative, **kwargs)
        self.encoder = self.make_encoder()
        num_pairs = self.num_fields * (self.num_fields - 1) // 2
        self.dnn = MLP(self.num_fields * self.embedding_dim + num_pairs, hidden_units, "relu", dropout,
                       batch_norm, 1)
        self._record(hidden_units=list(hidden_units), dropout=dropout, batch_norm=batch_norm)

    def score(self, ids, V):
        products = SF.pairwise_products(self.generate(V), V, "upper",
                                        backend=module_backend(self.backend, "pairwise_products"))
        return self.dnn(torch.cat([V.flatten(1), products], dim=1)).squeeze(1)
