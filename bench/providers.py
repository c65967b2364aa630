"""Providers shared by the bench scripts: the literal per-field baseline and the optional peers.

"literal" rebuilds the authors' style (one nn.Embedding per field, materialised pairs through
``sfg_fast.reference``); "torch" is the factored backend; the compiled extension, Triton, FBGEMM
TBE and TorchRec EBC are used when they can run here, and raise :class:`bench.common.Skip` with
the reason when not.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch
from torch import nn

from sfg_fast._backend import unavailable_reason

from .common import Skip

EXTENSION = {"cpu": "cpu", "cuda": "cuda"}


class PerFieldEmbedding(nn.Module):
    """One nn.Embedding per field, stacked to ``[B, N, D]``: the authors' (FuxiCTR) layout."""

    def __init__(self, field_dims: Sequence[int], embedding_dim: int, init_std: float = 1e-4):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(int(n), embedding_dim) for n in field_dims)
        for t in self.tables:
            nn.init.normal_(t.weight, std=init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([t(ids[:, f]) for f, t in enumerate(self.tables)], dim=1)


def concatenated_table(field_dims: Sequence[int], embedding_dim: int, device: str,
                       dtype=torch.float32, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``weight [sum(field_dims), D]`` (requires grad) and int64 ``offsets [N]``."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(sum(field_dims), embedding_dim, generator=gen, dtype=dtype) * 1e-2)
    starts = [0]
    for n in field_dims[:-1]:
        starts.append(starts[-1] + int(n))
    return weight.to(device).requires_grad_(), torch.tensor(starts, dtype=torch.int64, device=device)


def extension_backend(op: str, device: str) -> str:
    """The compiled-extension backend name for ``device`` if it implements ``op``, else Skip(reason)."""
    from sfg_fast.ops import load_backends
    load_backends()
    name = EXTENSION[device]
    why = unavailable_reason(name, op, torch.device(device))
    if why is not None:
        raise Skip(f"extension backend {name!r}: {why}")
    return name


def triton_backend(op: str, device: str) -> str:
    """'triton' when it can run ``op`` on a GPU here; on CPU it would only be the interpreter."""
    if device != "cuda":
        raise Skip("Triton needs a GPU; on CPU it runs only in the interpreter (TRITON_INTERPRET=1), "
                   "whose timings mean nothing")
    from sfg_fast.ops import load_backends
    load_backends()
    why = unavailable_reason("triton", op, torch.device(device))
    if why is not None:
        raise Skip(f"triton: {why}")
    return "triton"


def _import_or_skip(module: str, what: str):
    import importlib
    import warnings
    try:
        with warnings.catch_warnings():
            # fbgemm_gpu announces every optional kernel module it lacks (SSD, ...) on import.
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(module)
    except Exception as exc:
        raise Skip(f"{what} is not importable ({type(exc).__name__}: {exc}); "
                   f"install it as an optional extra") from None


class FbgemmLookup:
    """FBGEMM table-batched embeddings: one table per field, SUM pooling over bags of length one
    (= a plain lookup). Output reshaped to ``[B, N, D]``; its backward applies the fused optimizer."""

    def __init__(self, field_dims: Sequence[int], embedding_dim: int, device: str, optimizer: str = "adam"):
        _import_or_skip("fbgemm_gpu", "fbgemm_gpu")
        EmbOptimType = _import_or_skip("fbgemm_gpu.split_embedding_configs", "fbgemm_gpu").EmbOptimType
        tbe = _import_or_skip("fbgemm_gpu.split_table_batched_embeddings_ops_training", "fbgemm_gpu")
        ComputeDevice, EmbeddingLocation = tbe.ComputeDevice, tbe.EmbeddingLocation
        PoolingMode, SplitTableBatchedEmbeddingBagsCodegen = tbe.PoolingMode, tbe.SplitTableBatchedEmbeddingBagsCodegen
        location, compute = ((EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if device == "cuda"
                             else (EmbeddingLocation.HOST, ComputeDevice.CPU))
        opt = {"adam": EmbOptimType.ADAM, "adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
               "sgd": EmbOptimType.EXACT_SGD}[optimizer]
        self.num_fields = len(field_dims)
        self.dim = embedding_dim
        specs = [(int(n), embedding_dim, location, compute) for n in field_dims]
        extra = {"device": torch.device(device)} if device == "cuda" else {}
        self.optimizer = optimizer
        try:
            self.module = SplitTableBatchedEmbeddingBagsCodegen(
                specs, optimizer=opt, learning_rate=0.01, pooling_mode=PoolingMode.SUM, **extra)
        except AssertionError:
            # FBGEMM's CPU path has no Adam: fall back to its own rowwise Adagrad (the row says so).
            self.optimizer = "adagrad-rowwise"
            self.module = SplitTableBatchedEmbeddingBagsCodegen(
                specs, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01,
                pooling_mode=PoolingMode.SUM, **extra)
        self.device = device

    def inputs(self, ids: torch.Tensor):
        """FBGEMM's field-major CSR: indices ``[N*B]`` and bag offsets ``[N*B + 1]``."""
        batch = ids.shape[0]
        indices = ids.t().contiguous().reshape(-1).to(torch.int64)
        offsets = torch.arange(batch * self.num_fields + 1, dtype=torch.int64, device=ids.device)
        return indices, offsets

    def __call__(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        out = self.module(indices, offsets)
        return out.view(out.shape[0], self.num_fields, self.dim)


class TorchrecLookup:
    """TorchRec EmbeddingBagCollection (unsharded): one table and feature per field, bags of one."""

    def __init__(self, field_dims: Sequence[int], embedding_dim: int, device: str):
        torchrec = _import_or_skip("torchrec", "torchrec")
        self.keys: List[str] = [f"f{i}" for i in range(len(field_dims))]
        tables = [torchrec.EmbeddingBagConfig(name=f"t{i}", embedding_dim=embedding_dim, num_embeddings=int(n),
                                              feature_names=[self.keys[i]])
                  for i, n in enumerate(field_dims)]
        self.module = torchrec.EmbeddingBagCollection(tables=tables, device=torch.device(device))
        self.kjt = torchrec.KeyedJaggedTensor
        self.num_fields = len(field_dims)
        self.dim = embedding_dim

    def inputs(self, ids: torch.Tensor):
        values = ids.t().contiguous().reshape(-1).to(torch.int64)
        lengths = torch.ones_like(values, dtype=torch.int32)
        return (self.kjt.from_lengths_sync(keys=self.keys, values=values, lengths=lengths),)

    def __call__(self, features) -> torch.Tensor:
        out = self.module(features).values()
        return out.view(out.shape[0], self.num_fields, self.dim)


def compile_available(device: str) -> None:
    """Raise Skip when torch.compile cannot work here (checked before spending compile time)."""
    if os.environ.get("SFG_BENCH_NO_COMPILE"):
        raise Skip("SFG_BENCH_NO_COMPILE is set")
    if not hasattr(torch, "compile"):
        raise Skip("torch.compile is not available in this torch build")
    if device == "cpu":
        import shutil
        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            raise Skip("torch.compile on CPU needs a C++ compiler (none on PATH)")


def backward_workload(forward, leaves, grad_out=None, compiled: bool = False, info=None):
    """A Workload timing ``forward()`` + backward into ``leaves`` (grads reset each call)."""
    from .common import Workload

    def step():
        for t in leaves:
            t.grad = None
        out = forward()
        if grad_out is None:
            out.backward()
        else:
            out.backward(grad_out)

    return Workload(step=step, forward=forward, compiled=compiled, info=dict(info or {}))


def functional_providers(op: str, device: str, make):
    """Providers of one functional op. ``make(backend)`` -> ``(forward, leaves, grad_out)`` with
    fresh, identically seeded inputs; "literal" is the reference backend."""

    def plain(backend_fn):
        def factory():
            backend = backend_fn()
            forward, leaves, grad_out = make(backend)
            return backward_workload(forward, leaves, grad_out, info={"backend": backend})
        return factory

    def compiled(backend):
        def factory():
            compile_available(device)
            forward, leaves, grad_out = make(backend)
            return backward_workload(torch.compile(forward), leaves, grad_out, compiled=True,
                                     info={"backend": backend})
        return factory

    ext = EXTENSION[device]
    return {
        "literal": plain(lambda: "reference"),
        "torch": plain(lambda: "torch"),
        "literal+compile": compiled("reference"),
        "torch+compile": compiled("torch"),
        "triton": plain(lambda: triton_backend(op, device)),
        f"ext-{ext}": plain(lambda: extension_backend(op, device)),
    }
