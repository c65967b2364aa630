"""torch.autograd.gradcheck in fp64 for every functional op, on both pure-PyTorch backends."""
import pytest
import torch
from torch.autograd import gradcheck

from sfg_fast import functional as SF

from helpers import offsets_of, zipf_ids

BACKENDS = ["torch", "reference"]


def _r(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["identity", "scalar", "vector", "matrix"])
@pytest.mark.parametrize("pairs,side,symmetric", [("upper", "left", False), ("all", "right", False),
                                                 ("offdiag", "left", True)])
def test_gradcheck_pairwise_decode(backend, kind, pairs, side, symmetric):
    n, d = 3, 2
    shape = {"scalar": (n, n), "vector": (n, n, d), "matrix": (n, n, d, d)}.get(kind)
    inputs = [_r(2, n, d), _r(2, n, d)] + ([_r(*shape)] if shape else [])

    def fn(Z, V, *w):
        return SF.pairwise_decode(Z, V, w[0] if w else None, kind, pairs, side, symmetric, backend=backend)

    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["identity", "tanh", "sigmoid", "silu", "gelu", "relu"])
def test_gradcheck_sfg_encode(backend, activation):
    n, d = 2, 3
    V = _r(3, n, d)
    if activation == "relu":  # keep pre-activations away from the kink at 0
        W = torch.eye(n * d, dtype=torch.float64).requires_grad_(True)
        V = (V.detach().abs() + 0.5).requires_grad_(True)
    else:
        W = _r(n * d, n * d)
    b = _r(n * d)
    assert gradcheck(lambda V, W, b: SF.sfg_encode(V, W, b, activation, 0.7, True, backend=backend), [V, W, b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_embedding_lookup(backend):
    field_dims = [3, 4, 2]
    weight = _r(sum(field_dims), 3)
    ids = zipf_ids(6, field_dims)
    offsets = offsets_of(field_dims)
    assert gradcheck(lambda w: SF.embedding_lookup(ids, w, offsets, backend=backend), [weight])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_pairwise_products(backend):
    assert gradcheck(lambda Z, V: SF.pairwise_products(Z, V, "upper", backend=backend), [_r(2, 4, 3), _r(2, 4, 3)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_generative_cross(backend):
    assert gradcheck(lambda x, g, W, b: SF.generative_cross(x, g, W, b, backend=backend),
                     [_r(3, 5), _r(3, 5), _r(5, 5), _r(5)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_bce(backend, reduction):
    labels = torch.tensor([0.0, 1.0, 0.25, 1.0], dtype=torch.float64)
    x = torch.tensor([-3.0, 0.0, 0.7, 12.0], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: SF.bce_with_logits(x, labels, reduction, backend=backend), [x])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_sfg_logits(backend):
    field_dims = [3, 2, 4]
    ids = zipf_ids(5, field_dims)
    offsets = offsets_of(field_dims)
    n, d = 3, 2
    inputs = [_r(sum(field_dims), d), _r(n * d, n * d), _r(n * d), _r(n, n, d)]
    assert gradcheck(lambda t, w, b, u: SF.sfg_logits(ids, t, offsets, w, b, u, "vector", "tanh", 2.0, True,
                                                      backend=backend), inputs)
