"""CPU microbenchmarks through pytest-benchmark (medians, IQR, --benchmark-compare / --benchmark-save).

Not part of the test suite (testpaths = tests). Run:

    python -m pytest bench/test_cpu_pytest_benchmark.py --benchmark-enable --benchmark-columns=median,iqr,rounds \
        --benchmark-group-by=param:kind --benchmark-save=cpu

Criteo shape (B=4096, N=39, D=16, fp32, Zipf ids, vocabularies scaled by SFG_FAST_BENCH_VOCAB_SCALE, default
0.01) at a fixed thread count (SFG_FAST_BENCH_THREADS, default 2): the literal reference vs the factored torch
backend vs the compiled extension (where it implements the op), forward + backward.
"""
import os

import pytest
import torch

from bench.common import field_dims_for, make_ids
from sfg_fast import functional as SF
from sfg_fast._backend import unavailable_reason
from sfg_fast.ops import load_backends

BATCH, FIELDS, DIM = 4096, 39, 16
torch.set_num_threads(int(os.environ.get("SFG_FAST_BENCH_THREADS", "2")))
load_backends()


def _inputs(kind):
    gen = torch.Generator().manual_seed(0)
    field_dims = field_dims_for(FIELDS, float(os.environ.get("SFG_FAST_BENCH_VOCAB_SCALE", "0.01")))
    ids = make_ids(BATCH, field_dims, "zipf")
    table = (torch.randn(sum(field_dims), DIM, generator=gen) * 1e-2).requires_grad_()
    starts = [0]
    for n in field_dims[:-1]:
        starts.append(starts[-1] + n)
    offsets = torch.tensor(starts, dtype=torch.int64)
    width = FIELDS * DIM
    enc = (torch.randn(width, width, generator=gen) / width ** 0.5).requires_grad_()
    shape = {"identity": None, "scalar": (FIELDS, FIELDS), "vector": (FIELDS, FIELDS, DIM),
             "matrix": (FIELDS, FIELDS, DIM, DIM)}[kind]
    dec = None if shape is None else torch.randn(shape, generator=gen).requires_grad_()
    labels = torch.randint(0, 2, (BATCH,), generator=gen).float()
    return ids, table, offsets, enc, dec, labels


def _backend_or_skip(backend, op):
    why = unavailable_reason(backend, op, torch.device("cpu"))
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("kind", ["identity", "scalar", "vector", "matrix"])
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_sfg_step_fwd_bwd(benchmark, kind, backend):
    """lookup -> encode -> decode -> BCE, forward + backward (cpu: torch's gather, whose backward builds
    the dense table gradient, + the fused C++ interaction)."""
    _backend_or_skip(backend, "sfg_logits")
    ids, table, offsets, enc, dec, labels = _inputs(kind)

    def step():
        for t in (table, enc, dec):            # each round computes its own gradients, not a running sum
            if t is not None:
                t.grad = None
        logits = SF.sfg_logits(ids, table, offsets, enc, None, dec, kind, backend=backend)
        SF.bce_with_logits(logits, labels, backend="torch" if backend == "cpu" else backend).backward()

    benchmark.pedantic(step, rounds=3 if backend == "reference" else 10, warmup_rounds=1)


@pytest.mark.parametrize("kind", ["identity", "scalar", "vector", "matrix"])
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_sfg_inference(benchmark, kind, backend):
    """The whole interaction without autograd (serving)."""
    _backend_or_skip(backend, "sfg_logits")
    ids, table, offsets, enc, dec, _ = _inputs(kind)

    def infer():
        with torch.no_grad():
            SF.sfg_logits(ids, table, offsets, enc, None, dec, kind, backend=backend)

    benchmark.pedantic(infer, rounds=3 if backend == "reference" else 10, warmup_rounds=1)


@pytest.mark.parametrize("kind", ["identity", "scalar", "vector", "matrix"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sfg_interaction_fwd_bwd(benchmark, kind, backend):
    """encode -> decode on a ready V (sfg_interaction), forward + backward: every gradient, no table."""
    _backend_or_skip(backend, "sfg_interaction")
    ids, table, offsets, enc, dec, _ = _inputs(kind)
    V = SF.embedding_lookup(ids, table.detach(), offsets, backend="torch").requires_grad_()
    upstream = torch.randn(BATCH)

    def step():
        for t in (V, enc, dec):
            if t is not None:
                t.grad = None
        out = SF.sfg_interaction(V, enc, None, dec, kind, backend=backend)
        (out * upstream).sum().backward()

    benchmark.pedantic(step, rounds=10, warmup_rounds=1)
