"""Small constant tensors (pair masks, identity blocks) built once per shape, dtype and device.

The eager hot paths rebuild a few of these every call (``torch.ones`` + ``triu`` for the pair set,
``torch.eye`` for the decoder's blocks): each is a kernel launch and an allocation, which on a GPU costs
host time comparable to the real work at CTR shapes. Kept here instead, they cost a dict lookup.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, Tuple

import torch

_CACHE: Dict[Tuple[Hashable, ...], torch.Tensor] = {}
_MAX_ENTRIES = 64


def device_key(device) -> torch.device:
    """``device`` with its index filled in (``cuda`` -> ``cuda:<current>``), as a cache key."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _fake_mode_active() -> bool:
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    except Exception:       # a torch without this query: assume none
        return False


def constant(key: Tuple[Hashable, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``'s tensor, built once per ``key`` (which must name everything ``make`` depends on, the
    device included: see ``device_key``). Shared: callers must not write to it.

    Built fresh and not kept while torch.compile traces (the graph folds it anyway), under a fake-tensor
    mode (export and fake propagation), while a CUDA graph captures (its memory belongs to the graph), or
    when ``make`` gives anything but a plain tensor. Kept tensors are built outside inference mode: an
    inference tensor could not be saved for a later backward."""
    if torch.compiler.is_compiling() or _fake_mode_active():
        return make()
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    with torch.inference_mode(False):
        value = make()
    if type(value) is not torch.Tensor or value.device.type == "meta" or (
            value.is_cuda and torch.cuda.is_current_stream_capturing()):
        return value
    if len(_CACHE) >= _MAX_ENTRIES:
        _CACHE.clear()
    _CACHE[key] = value
    return value
