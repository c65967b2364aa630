"""sfg_fast: fast, exact Supervised Feature Generation (SFG) layers and models for CTR prediction.

Public API: ``sfg_fast.functional`` (ops), ``sfg_fast.nn`` (layers), ``sfg_fast.models`` (model zoo),
``sfg_fast.reference`` (literal reference twin of every op).
"""
from . import _cublas  # noqa: F401  (first: it notes whether CUBLAS_WORKSPACE_CONFIG predates CUDA's start)
from . import functional, models, nn, reference  # noqa: F401
from ._backend import BACKENDS, BackendUnavailableError  # noqa: F401

__version__ = "0.1.0"
