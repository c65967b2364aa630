"""Bridges from sfg_fast to other engines. Nothing here imports an optional dependency eagerly.

``sfg_fast.integrations.torchrec``: TorchRec embeddings (EmbeddingBagCollection, KeyedJaggedTensor)
in front of sfg_fast's encoders, decoders and heads; importing it checks the torchrec/fbgemm/torch
versions and raises ImportError explaining a mismatch.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

__all__ = ["torchrec_available", "torchrec_unavailable_reason"]

_REASON: Optional[str] = None
_CHECKED = False


def torchrec_unavailable_reason() -> Optional[str]:
    """None when ``sfg_fast.integrations.torchrec`` imports; else why it does not (one line).

    The first call imports torchrec (several seconds); the answer is cached.
    """
    global _REASON, _CHECKED
    if not _CHECKED:
        _CHECKED = True
        if importlib.util.find_spec("torchrec") is None:
            _REASON = "torchrec is not installed (see docs/distributed.md for the install lines)"
        else:
            try:
                from . import torchrec as _tr  # noqa: F401
            except ImportError as exc:
                _REASON = str(exc).splitlines()[0]
    return _REASON


def torchrec_available() -> bool:
    """True when TorchRec and a matching FBGEMM import (see :func:`torchrec_unavailable_reason`)."""
    return torchrec_unavailable_reason() is None
