"""Launchers and autograd Functions of the fused backends: one module per op (``ops/<op>.py``).

Each module registers its implementations with ``sfg_fast.functional.register_impl(backend, op, fn)``
at import time (the callable takes the same arguments as the torch implementation in
``sfg_fast/factored.py``). ``load_backends()`` imports every module here once; a module that
fails to import is recorded in ``LOAD_ERRORS`` (shown by ``python -m sfg_fast.info``), never raised.
"""
from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import Dict

LOAD_ERRORS: Dict[str, str] = {}
_LOADED = False
_LOADING = False
# Threads making their first calls at once wait for one load: before, a second thread returned while the
# first was still importing and found no kernel registered (an explicit backend raised, "auto" fell back).
_LOCK = threading.RLock()


def load_backends() -> None:
    global _LOADED, _LOADING
    if _LOADED:
        return
    with _LOCK:
        if _LOADED or _LOADING:   # _LOADING: this thread, re-entered from one of the imports below
            return
        _LOADING = True
        try:
            for info in pkgutil.iter_modules(__path__):
                if info.name.startswith("_"):
                    continue
                try:
                    importlib.import_module(f"{__name__}.{info.name}")
                except Exception as exc:  # an optional backend must never break the package
                    LOAD_ERRORS[info.name] = f"{type(exc).__name__}: {exc}"
        finally:
            _LOADING = False
            _LOADED = True
