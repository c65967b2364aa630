"""Contracts every backend keeps alike: higher-order gradients are right or refused (never silently
graph-less), mixed operand dtypes promote, the encoder's options are checked with or without an
encoder, the layers reject bad hyper-parameters and inputs by name, and a layer or model built with
backend="cpu" runs every op (compiled kernels where the extension has them, torch elsewhere)."""
import math

import pytest
import torch

from sfg_fast import functional as SF
from sfg_fast import models
from sfg_fast import nn as snn
from sfg_fast._backend import module_backend
from sfg_fast.ops import cpu_ext

needs_ext = pytest.mark.skipif(not cpu_ext.available(), reason="sfg_fast._C is not built")
# Triton runs compiled on a GPU machine (bench/gpu_check.sh runs the "interpreter" tests there), else
# through the interpreter on CPU tensors
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _device(backend):
    return DEVICE if backend == "triton" else "cpu"
INTERACTION_BACKENDS = ["reference", "torch", pytest.param("cpu", marks=needs_ext),
                        pytest.param("triton", marks=pytest.mark.interpreter)]


def _interaction_params(kind, n=3, d=2, seed=0, bias=True, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    dec = {"identity": None, "scalar": (n, n), "vector": (n, n, d), "matrix": (n, n, d, d)}[kind]
    leaves = dict(V=torch.randn(5, n, d, generator=gen, dtype=dtype),
                  enc_weight=torch.randn(n * d, n * d, generator=gen, dtype=dtype) / n,
                  enc_bias=torch.randn(n * d, generator=gen, dtype=dtype) if bias else None,
                  dec_weight=None if dec is None else torch.randn(*dec, generator=gen, dtype=dtype))
    return {k: (None if v is None else v.to(device).requires_grad_()) for k, v in leaves.items()}


def _penalised_grads(backend, kind, dtype, seed):
    """Gradients of loss = sum(logit) + |d sum(logit) / dV|^2 (a gradient penalty: second order)."""
    p = _interaction_params(kind, seed=seed, dtype=dtype)
    logit = SF.sfg_interaction(p["V"], p["enc_weight"], p["enc_bias"], p["dec_weight"], kind, "tanh", 0.7, True,
                               "upper", "left", False, backend=backend)
    g_v, = torch.autograd.grad(logit.sum(), p["V"], create_graph=True)
    assert g_v.requires_grad, "the first-order gradient lost its graph"
    (logit.sum() + g_v.pow(2).sum()).backward()
    return {k: v.grad.double() for k, v in p.items() if v is not None}


@needs_ext
@pytest.mark.parametrize("kind", ["identity", "scalar", "matrix"])
def test_cpu_interaction_second_order_gradients_match_the_reference(kind):
    # fp32 on the fused CPU op (the kernels' dtype) vs fp64 reference, 2x-rule style tolerance: the
    # float32 torch path's own error, doubled
    ref = _penalised_grads("reference", kind, torch.float64, seed=3)
    ours = _penalised_grads("cpu", kind, torch.float32, seed=3)
    same = _penalised_grads("torch", kind, torch.float32, seed=3)
    for name in ref:
        err = (ours[name] - ref[name]).abs().max().item()
        bound = 2 * (same[name] - ref[name]).abs().max().item() + 1e-5 * ref[name].abs().max().item()
        assert err <= bound, f"{name}: {err} > {bound}"


@pytest.mark.interpreter
def test_triton_interaction_refuses_higher_order_gradients_by_name():
    p = _interaction_params("scalar", dtype=torch.float32, device=DEVICE)
    logit = SF.sfg_interaction(p["V"], p["enc_weight"], None, p["dec_weight"], "scalar", "tanh", 1.0, False,
                               "upper", "left", False, backend="triton")
    with pytest.raises(RuntimeError, match=r"backend 'triton'.*create_graph=True.*backend='torch'"):
        torch.autograd.grad(logit.sum(), p["V"], create_graph=True)
    # first-order gradients are unaffected
    logit = SF.sfg_interaction(p["V"], p["enc_weight"], None, p["dec_weight"], "scalar", "tanh", 1.0, False,
                               "upper", "left", False, backend="triton")
    logit.sum().backward()
    assert p["V"].grad is not None


@pytest.mark.interpreter
def test_triton_cross_loss_and_lookup_second_order_gradients_match_the_reference():
    def cross(backend):
        gen = torch.Generator().manual_seed(5)
        x, g, w, b = (torch.randn(*s, generator=gen).to(DEVICE).requires_grad_()
                      for s in ((4, 6), (4, 6), (6, 6), (6,)))
        out = SF.generative_cross(x, g, w, b, backend=backend)
        gx, = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        return [t.grad for t in (x, g, w, b)]

    def loss(backend):
        gen = torch.Generator().manual_seed(6)
        logits = torch.randn(7, generator=gen).to(DEVICE).requires_grad_()
        labels = torch.rand(7, generator=gen).to(DEVICE)
        gl, = torch.autograd.grad(SF.bce_with_logits(logits, labels, backend=backend), logits, create_graph=True)
        gl.pow(2).sum().backward()
        return [logits.grad]

    def lookup(backend):
        gen = torch.Generator().manual_seed(7)
        table = torch.randn(9, 3, generator=gen).to(DEVICE).requires_grad_()
        ids, offsets = torch.tensor([[0, 1], [3, 3], [0, 2]], device=DEVICE), torch.tensor([0, 5], device=DEVICE)
        V = SF.embedding_lookup(ids, table, offsets, backend=backend)
        gt, = torch.autograd.grad(V.pow(3).sum(), table, create_graph=True)
        gt.pow(2).sum().backward()
        return [table.grad]

    for fn in (cross, loss, lookup):
        for got, want in zip(fn("triton"), fn("reference")):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=fn.__name__)


@pytest.mark.parametrize("backend", INTERACTION_BACKENDS)
def test_mixed_operand_dtypes_promote_on_every_backend(backend):
    device = _device(backend)
    p = _interaction_params("vector", dtype=torch.float32, device=device)
    V16 = p["V"].detach().to(torch.bfloat16).requires_grad_()
    bias64 = p["enc_bias"].detach().double().requires_grad_()
    out = SF.sfg_interaction(V16, p["enc_weight"], bias64, p["dec_weight"], "vector", "relu", 1.0, False, "upper",
                             "left", False, backend=backend)
    assert out.dtype == torch.float32   # promote(bf16 V, fp32 weights); the bias follows them
    want = SF.sfg_interaction(V16.detach().float(), p["enc_weight"].detach(), bias64.detach().float(),
                              p["dec_weight"].detach(), "vector", "relu", 1.0, False, "upper", "left", False,
                              backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert V16.grad.dtype == torch.bfloat16 and bias64.grad.dtype == torch.float64
    # sfg_logits gathers in the table's dtype and never casts the table
    table = torch.randn(7, 2, dtype=torch.bfloat16, device=device)
    ids, offsets = torch.tensor([[0, 1, 0], [1, 2, 1]], device=device), torch.tensor([0, 2, 5], device=device)
    logits = SF.sfg_logits(ids, table, offsets, p["enc_weight"].detach(), None, p["dec_weight"].detach(), "vector",
                           backend=backend)
    assert logits.dtype == torch.float32 and table.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", INTERACTION_BACKENDS)
def test_encoder_options_are_checked_without_an_encoder_too(backend):
    V = torch.randn(2, 3, 2, device=_device(backend))
    for kwargs, err, match in ((dict(activation="bogus"), ValueError, "activation must be one of"),
                               (dict(residual="False"), TypeError, "residual must be a bool"),
                               (dict(gamma=torch.tensor(2.0, requires_grad=True)), TypeError,
                                "gamma must be a number")):
        options = {**dict(activation="relu", gamma=1.0, residual=False), **kwargs}
        with pytest.raises(err, match=match):
            SF.sfg_interaction(V, None, None, None, "identity", options["activation"], options["gamma"],
                               options["residual"], "upper", "left", False, backend=backend)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(symmetric="False"), TypeError, "symmetric must be a bool"),
    (dict(residual="False"), TypeError, "residual must be a bool"),
    (dict(generative=1), TypeError, "generative must be a bool"),
    (dict(bias="yes"), TypeError, "bias must be a bool"),
    (dict(dropout=-0.5), ValueError, r"dropout must lie in \[0, 1\)"),
    (dict(dropout=float("nan")), ValueError, r"dropout must lie in \[0, 1\)"),
    (dict(dropout=1.0), ValueError, r"dropout must lie in \[0, 1\)"),
    (dict(num_fields=2.7), TypeError, "num_fields must be an integer"),
    (dict(num_fields=-1), ValueError, "num_fields must be a positive integer"),
    (dict(embedding_dim=-2), ValueError, "embedding_dim must be a positive integer"),
    (dict(embedding_dim=True), ValueError, "embedding_dim must be a positive integer"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_layer_rejects_bad_hyper_parameters_by_name(kwargs, err, match):
    options = dict(num_fields=3, embedding_dim=4, kind="vector")
    options.update(kwargs)
    with pytest.raises(err, match=match):
        snn.SFGInteraction(**options)


def test_layer_hyper_parameters_accept_integer_like_values():
    import numpy as np
    layer = snn.SFGInteraction(np.int64(3), torch.tensor(4), kind="scalar", dropout=0)
    assert (layer.decoder.num_fields, layer.decoder.embedding_dim) == (3, 4) and layer.encoder.dropout is None


def test_layers_check_the_embeddings_against_their_shape():
    layer = snn.SFGInteraction(3, 4, kind="scalar", generative=False)
    with pytest.raises(ValueError, match=r"V must have shape \[B, N, D\]=\[B, 3, 4\].*got \[2, 7, 9\]"):
        layer(torch.randn(2, 7, 9))
    encoder = snn.SFGEncoder(3, 4)
    with pytest.raises(ValueError, match=r"V must have shape \[B, N, D\]=\[B, 3, 4\]"):
        encoder(torch.randn(2, 3, 5))
    decoder = snn.PairwiseDecoder(3, 4, "vector")
    with pytest.raises(ValueError, match=r"Z must have shape \[B, N, D\]=\[B, 3, 4\]"):
        decoder(torch.randn(2, 4, 4), torch.randn(2, 3, 4))


@needs_ext
def test_module_backend_falls_back_to_torch_only_for_ops_the_extension_lacks():
    assert module_backend("cpu", "sfg_interaction") == "cpu"
    assert module_backend("cpu", "sfg_encode") == "torch"
    assert module_backend("auto", "sfg_encode") == "auto" and module_backend("triton", "sfg_encode") == "triton"
    # Triton has no pairwise_products: a triton IPNN ran nowhere
    assert module_backend("triton", "pairwise_products") == "torch"
    # the functional ops stay strict
    with pytest.raises(RuntimeError, match="no kernel for 'sfg_encode'"):
        SF.sfg_encode(torch.randn(2, 3, 4), torch.randn(12, 12), backend="cpu")


@needs_ext
@pytest.mark.parametrize("name", ["fm", "fwfm", "fmfm", "deepfm", "ipnn", "xdeepfm", "dcnv2"])
def test_every_model_trains_on_backend_cpu_and_matches_torch(name):
    torch.manual_seed(0)
    field_dims = [5, 6, 7]
    built = {b: models.build(name, field_dims, embedding_dim=4, backend=b) for b in ("cpu", "torch")}
    built["torch"].load_state_dict(built["cpu"].state_dict())
    ids = torch.stack([torch.randint(0, x, (8,)) for x in field_dims], dim=1)
    y = (torch.arange(8) % 2).float()
    grads = {}
    for b, model in built.items():
        model.train()
        torch.manual_seed(1)   # same dropout masks
        loss = SF.bce_with_logits(model(ids), y)
        loss.backward()
        grads[b] = {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
    assert grads["cpu"].keys() == grads["torch"].keys() and grads["cpu"]
    for k in grads["cpu"]:
        torch.testing.assert_close(grads["cpu"][k], grads["torch"][k], rtol=1e-4, atol=1e-6, msg=k)


@needs_ext
def test_interaction_layer_with_encoder_dropout_trains_on_backend_cpu():
    layer = snn.SFGInteraction(3, 4, kind="scalar", dropout=0.2, backend="cpu")
    V = torch.randn(5, 3, 4, requires_grad=True)
    layer.train()
    layer(V).sum().backward()
    assert V.grad is not None and math.isfinite(float(V.grad.abs().sum()))
    layer.eval()
    torch.testing.assert_close(layer(V), snn.score_pairs(layer.encoder, layer.decoder, V, "torch"))


def test_launch_arithmetic_matches_triton():
    """ops._launch's plain-Python next_pow2 / cdiv (the launchers' block sizes and grids) give Triton's
    results."""
    triton = pytest.importorskip("triton")
    from sfg_fast.ops._launch import cdiv, next_pow2
    for n in list(range(0, 300)) + [1023, 1024, 1025, 4095, 4096, 4097, 2 ** 31 - 1, 2 ** 31, 2 ** 40 + 3]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_constant_tensors_are_built_once_and_safe_to_share():
    """Pair masks and the decoder's identity blocks come from a per-(shape, device) store: the same tensor
    on every call, built outside inference mode (so a later backward may save it), never under a fake-tensor
    mode (export), and the masks it holds are those the definition gives."""
    from sfg_fast import _checks as C
    from sfg_fast import _constants, factored
    _constants._CACHE.clear()
    with torch.inference_mode():                      # first built here: still a normal tensor
        first = C.pair_mask(5, "offdiag")
    assert not first.is_inference()
    assert C.pair_mask(5, "offdiag", torch.device("cpu")) is first
    assert torch.equal(first, ~torch.eye(5, dtype=torch.bool))
    assert torch.equal(C.pair_mask(4, "upper"), torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))
    assert C.pair_mask(4, "all").all()
    weight = torch.randn(5, 5, requires_grad=True)
    factored.masked_weight(weight, "scalar", "offdiag", 5, weight).sum().backward()   # saves the shared mask
    assert torch.equal(weight.grad, first.float())
    from torch._subclasses.fake_tensor import FakeTensorMode
    before = dict(_constants._CACHE)
    with FakeTensorMode():
        fake = C.pair_mask(6, "upper")
    assert type(fake) is not torch.Tensor and _constants._CACHE == before
