"""Model zoo: FM, FwFM, FmFM, DeepFM, IPNN, xDeepFM, DCNv2, CrossNet — base or SFG (``generative``).

``build(name, field_dims, embedding_dim, generative, **hparams)`` returns a model with
``forward(ids [B, N]) -> logits [B]``; ``model.config`` rebuilds it.
"""
from __future__ import annotations

from typing import Sequence

from .base import CTRModel, FirstOrder, use_embedding_for_first_order
from .deep import DCNv2, CrossNet, xDeepFM
from .fm_family import FM, IPNN, DeepFM, FmFM, FwFM

MODELS = {cls.name: cls for cls in (FM, FwFM, FmFM, DeepFM, IPNN, xDeepFM, DCNv2, CrossNet)}

__all__ = ["build", "MODELS", "CTRModel", "FirstOrder", "FM", "FwFM", "FmFM", "DeepFM", "IPNN",
           "xDeepFM", "DCNv2", "CrossNet"]


def build(name: str, field_dims: Sequence[int], embedding_dim: int = 16, generative: bool = True,
          **hparams) -> CTRModel:
    """Build model ``name`` (case-insensitive: fm, fwfm, fmfm, deepfm, ipnn, xdeepfm, dcnv2, crossnet).

    ``embedding="torchrec"`` puts every id-indexed table (the field embeddings and the first-order
    weights) in TorchRec EmbeddingBagCollections, ready for DistributedModelParallel.
    """
    key = str(name).lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    model = MODELS[key](field_dims, embedding_dim=embedding_dim, generative=generative, **hparams)
    # ``embedding="torchrec"`` also moves the first-order tables onto TorchRec (see base.py).
    use_embedding_for_first_order(model, hparams.get("embedding", "native"))
    return model
