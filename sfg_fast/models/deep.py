"""xDeepFM, DCNv2 and CrossNet, each as its base model or its SFG form (the forms of the SFG paper, Yin et al., ICML 2025)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn import CIN, MLP, GenerativeCrossNet, _count, _to_parameters_dtype
from .base import CTRModel, FirstOrder


class xDeepFM(CTRModel):
    """y = sigma(lr + fc(sum-pooled CIN(V)) + DNN(e)); SFG: a separate encoder per CIN layer fed raw V."""
    name = "xdeepfm"

    def __init__(self, field_dims, embedding_dim: int = 16, generative: bool = True,
                 cin_layer_units: Sequence[int] = (16, 16, 16), hidden_units: Sequence[int] = (400, 400, 400),
                 dropout: float = 0.0, batch_norm: bool = False, **kwargs):
        super().__init__(field_dims, embedding_dim, generative, **kwargs)
        enc = self.encoder_kwargs
        self.linear = FirstOrder(self.field_dims, self.config["bounds_check"], self.backend)
        self.cin = CIN(self.num_fields, self.embedding_dim, cin_layer_units, self.generative,
                       enc["activation"], enc["gamma"], enc["bias"], enc["residual"], self.backend,
                       dropout=enc["dropout"])
        self.cin_fc = nn.Linear(self.cin.output_dim, 1)
        self.dnn = MLP(self.num_fields * self.embedding_dim, hidden_units, "relu", dropout, batch_norm, 1) \
            if hidden_units else None
        self._record(cin_layer_units=list(cin_layer_units), hidden_units=list(hidden_units),
                     dropout=dropout, batch_norm=batch_norm)

    def generate(self, V):
        return self.cin.generators[0](V) if self.generative else V

    def score(self, ids, V):
        logit = self.linear(ids) + self.cin_fc(_to_parameters_dtype(self.cin_fc, self.cin(V))).squeeze(1)
        if self.dnn is not None:
            logit = logit + self.dnn(V.flatten(1)).squeeze(1)
        return logit


class CrossNet(CTRModel):
    """CrossNet (cross layers only): base x_{l+1} = x_l + x_0 * (W_l x_l); SFG gate G_l(x_l); head Linear(x_L).

    It has no DNN, so DNN options (hidden_units, dropout, batch_norm) are refused like any unknown
    hyper-parameter rather than ignored: they belong to DCNv2."""
    name = "crossnet"

    def __init__(self, field_dims, embedding_dim: int = 16, generative: bool = True,
                 num_cross_layers: int = 3, regenerate_from: str = "x_l", cross_bias: bool = False, **kwargs):
        super().__init__(field_dims, embedding_dim, generative, **kwargs)
        self._build_cross(num_cross_layers, regenerate_from, cross_bias, dnn=None)

    def _build_cross(self, num_cross_layers, regenerate_from, cross_bias, dnn) -> None:
        """The cross layers, then (DCNv2) the parallel DNN from ``dnn`` = (hidden_units, dropout,
        batch_norm), then the head, in this order (the order parameters draw their initial values)."""
        enc = self.encoder_kwargs
        num_cross_layers = _count("num_cross_layers", num_cross_layers, minimum=0)
        self.crossnet = GenerativeCrossNet(self.num_fields, self.embedding_dim, num_cross_layers, self.generative,
                                           regenerate_from, enc["residual"], enc["dropout"], enc["activation"],
                                           enc["gamma"], enc["bias"], cross_bias, self.backend)
        width = self.num_fields * self.embedding_dim
        self.dnn = MLP(width, dnn[0], "relu", dnn[1], dnn[2]) if dnn is not None else None
        head_in = width + (self.dnn.output_dim if self.dnn is not None else 0)
        self.head = nn.Linear(head_in, 1)
        self._record(num_cross_layers=int(num_cross_layers), regenerate_from=regenerate_from,
                     cross_bias=cross_bias)
        if dnn is not None:
            self._record(hidden_units=list(dnn[0]), dropout=dnn[1], batch_norm=dnn[2])

    def generate(self, V):
        if not self.generative:
            return V
        x0 = V.flatten(1)
        return self.crossnet.gate(0, x0, x0).view_as(V)

    def score(self, ids, V):
        e = V.flatten(1)
        parts = [self.crossnet(e)]
        if self.dnn is not None:
            parts.append(self.dnn(e))
        return self.head(_to_parameters_dtype(self.head, torch.cat(parts, dim=1))).squeeze(1)


class DCNv2(CrossNet):
    """DCNv2 (parallel): head on [CrossNet(e) ; DNN(e)]; SFG regenerates each layer's gate G_l(x_l)."""
    name = "dcnv2"

    def __init__(self, field_dims, embedding_dim: int = 16, generative: bool = True,
                 num_cross_layers: int = 3, regenerate_from: str = "x_l", cross_bias: bool = False,
                 hidden_units: Sequence[int] = (400, 400, 400), dropout: float = 0.0, batch_norm: bool = False,
                 **kwargs):
        CTRModel.__init__(self, field_dims, embedding_dim, generative, **kwargs)
        self._build_cross(num_cross_layers, regenerate_from, cross_bias, dnn=(hidden_units, dropout, batch_norm))
