"""Launchers and autograd Functions of the fused backends: one module per op (``ops/<op>.py``).

Each module registers its implementations with ``sfg_fast.functional.register_impl(backend, op, fn)``
at import time (the callable takes the same arguments as the torch implementation in
``sfg_fast/factored.py``). ``load_backends()`` imports every module here once; a module that
fails to import is recorded in ``LOAD_ERRORS`` (shown by ``python -m sfg_fast.info``), never raised.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict

LOAD_ERRORS: Dict[str, str] = {}
_LOADED = False


def load_backends() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except Exception as exc:  # an optional backend must never break the package
            LOAD_ERRORS[info.name] = f"{type(exc).__name__}: {exc}"
