"""The torch (factored) backend equals the literal reference for every op, option and gradient."""
import itertools

import pytest
import torch

from sfg_fast import functional as SF
from sfg_fast import nn as snn
from sfg_fast import reference as REF
from sfg_fast.factored import masked_weight

from helpers import assert_close_2x, offsets_of, zipf_ids

KINDS = ["identity", "scalar", "vector", "matrix"]
PAIRS = ["upper", "all", "offdiag"]
SHAPES = [(1, 2, 1), (3, 2, 3), (4, 5, 17), (2, 39, 16), (6, 7, 16)]


def _decoder_weight(kind, n, d, dtype):
    if kind == "identity":
        return None
    shape = {"scalar": (n, n), "vector": (n, n, d), "matrix": (n, n, d, d)}[kind]
    return torch.randn(shape, dtype=dtype)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _decode_and_grads(backend, Z, V, W, kind, pairs, side, symmetric):
    Z, V, W = _leaf(Z), _leaf(V), _leaf(W)
    out = SF.pairwise_decode(Z, V, W, kind, pairs, side, symmetric, backend=backend)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype)   # a non-uniform upstream gradient
    out.backward(g)
    return out, Z.grad, V.grad, (W.grad if W is not None else None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("side,symmetric", [("left", False), ("right", False), ("left", True)])
def test_pairwise_decode_matches_reference_fp64(kind, pairs, side, symmetric):
    for batch, n, d in [(1, 2, 1), (4, 5, 3), (3, 6, 17)]:
        Z = torch.randn(batch, n, d, dtype=torch.float64)
        V = torch.randn(batch, n, d, dtype=torch.float64)
        W = _decoder_weight(kind, n, d, torch.float64)
        got = _decode_and_grads("torch", Z, V, W, kind, pairs, side, symmetric)
        want = _decode_and_grads("reference", Z, V, W, kind, pairs, side, symmetric)
        for name, a, b in zip(["logit", "dZ", "dV", "dW"], got, want):
            if b is None:
                assert a is None or symmetric and name == "dV"
                continue
            if a is None:  # symmetric scoring never reads V
                assert b.abs().max() == 0, name
                continue
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} mismatch")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,n,d", SHAPES)
def test_pairwise_decode_fp32_by_2x_rule(kind, batch, n, d):
    Z = torch.randn(batch, n, d)
    V = torch.randn(batch, n, d)
    W = _decoder_weight(kind, n, d, torch.float32)
    W64 = None if W is None else W.double()
    ref64 = _decode_and_grads("reference", Z.double(), V.double(), W64, kind, "upper", "left", False)
    ref32 = _decode_and_grads("reference", Z, V, W, kind, "upper", "left", False)
    got = _decode_and_grads("torch", Z, V, W, kind, "upper", "left", False)
    for name, a, b64, b32 in zip(["logit", "dZ", "dV", "dW"], got, ref64, ref32):
        if b64 is None:
            continue
        assert_close_2x(a, b64, b32, name=f"{kind} {name}", floor=1e-6)


def test_entries_outside_pairs_are_ignored():
    n, d = 5, 4
    Z, V = torch.randn(3, n, d, dtype=torch.float64), torch.randn(3, n, d, dtype=torch.float64)
    for kind in ["scalar", "vector", "matrix"]:
        W = _decoder_weight(kind, n, d, torch.float64)
        W2 = W.clone()
        lower = torch.tril(torch.ones(n, n, dtype=torch.bool))      # outside "upper"
        W2[lower] = 1e6
        for backend in ["torch", "reference"]:
            a = SF.pairwise_decode(Z, V, W, kind, backend=backend)
            b = SF.pairwise_decode(Z, V, W2, kind, backend=backend)
            torch.testing.assert_close(a, b)


def test_pair_tensor_never_materialised_by_torch_backend():
    """The factored path keeps only O(B*N*D) tensors for backward (no [B, P, D] pair tensor)."""
    batch, n, d = 64, 39, 16
    Z = torch.randn(batch, n, d, requires_grad=True)
    V = torch.randn(batch, n, d, requires_grad=True)
    W = torch.randn(n, n, d, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        SF.pairwise_decode(Z, V, W, "vector", backend="torch").sum().backward()
    pair_numel = batch * (n * (n - 1) // 2) * d
    assert sizes and max(sizes) < pair_numel / 10, (max(sizes), pair_numel)
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        SF.pairwise_decode(Z, V, W, "vector", backend="reference").sum().backward()
    assert max(sizes) >= pair_numel  # the literal reference does materialise pairs


def test_generated_side_right_is_the_fmfm_bilinear_form():
    n, d = 4, 3
    Z, V = torch.randn(2, n, d, dtype=torch.float64), torch.randn(2, n, d, dtype=torch.float64)
    M = torch.randn(n, n, d, d, dtype=torch.float64)
    want = torch.zeros(2, dtype=torch.float64)
    for i, j in itertools.combinations(range(n), 2):
        want += ((V[:, i] @ M[i, j]) * Z[:, j]).sum(-1)             # (v_i M_ij) . z_j
    for backend in ["torch", "reference"]:
        got = SF.pairwise_decode(Z, V, M, "matrix", generated_side="right", backend=backend)
        torch.testing.assert_close(got, want)


def test_left_side_is_decoded_generated_against_raw():
    n, d = 4, 3
    Z, V = torch.randn(2, n, d, dtype=torch.float64), torch.randn(2, n, d, dtype=torch.float64)
    M = torch.randn(n, n, d, d, dtype=torch.float64)
    U = torch.randn(n, n, d, dtype=torch.float64)
    r = torch.randn(n, n, dtype=torch.float64)
    want = {k: torch.zeros(2, dtype=torch.float64) for k in KINDS}
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            want["identity"] += (Z[:, i] * V[:, j]).sum(-1)
            want["scalar"] += r[i, j] * (Z[:, i] * V[:, j]).sum(-1)
            want["vector"] += (U[i, j] * Z[:, i] * V[:, j]).sum(-1)
            want["matrix"] += ((Z[:, i] @ M[i, j]) * V[:, j]).sum(-1)
    weights = {"identity": None, "scalar": r, "vector": U, "matrix": M}
    for kind in KINDS:
        got = SF.pairwise_decode(Z, V, weights[kind], kind, pairs="offdiag", backend="torch")
        torch.testing.assert_close(got, want[kind])


def test_masked_weight_zeroes_outside_pairs():
    w = masked_weight(torch.ones(3, 3), "scalar", "upper", 3, torch.ones(1))
    assert torch.equal(w, torch.triu(torch.ones(3, 3), 1))


@pytest.mark.parametrize("activation", ["identity", "relu", "tanh", "sigmoid", "silu", "gelu"])
@pytest.mark.parametrize("bias,residual,gamma", [(False, False, 1.0), (True, True, 0.37), (True, False, 36.0)])
def test_sfg_encode_matches_reference(activation, bias, residual, gamma):
    for batch, n, d in [(1, 2, 1), (5, 3, 17)]:
        V = torch.randn(batch, n, d, dtype=torch.float64, requires_grad=True)
        W = torch.randn(n * d, n * d, dtype=torch.float64, requires_grad=True)
        b = torch.randn(n * d, dtype=torch.float64, requires_grad=True) if bias else None
        outs = {}
        for backend in ["torch", "reference"]:
            for t in (V, W, b):
                if t is not None:
                    t.grad = None
            z = SF.sfg_encode(V, W, b, activation, gamma, residual, backend=backend)
            (z * torch.linspace(-1, 1, z.numel(), dtype=z.dtype).view_as(z)).sum().backward()
            outs[backend] = (z.detach(), V.grad.clone(), W.grad.clone(), None if b is None else b.grad.clone())
        for a, r in zip(outs["torch"], outs["reference"]):
            if r is not None:
                torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_sfg_encode_identity_weight_returns_V():
    V = torch.randn(4, 3, 5)
    z = SF.sfg_encode(V, torch.eye(15), None, "identity", 1.0, False)
    assert torch.equal(z, V)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_embedding_lookup_exact(ids_dtype):
    field_dims = [3, 50, 1, 17]
    weight = torch.randn(sum(field_dims), 5)
    offsets = offsets_of(field_dims)
    ids = zipf_ids(33, field_dims, dtype=ids_dtype)
    want = torch.stack([weight[offsets[f] + ids[:, f].long()] for f in range(len(field_dims))], 1)
    for backend in ["torch", "reference"]:
        got = SF.embedding_lookup(ids, weight, offsets, backend=backend)
        assert torch.equal(got, want)


def test_embedding_lookup_noncontiguous_and_grad():
    field_dims = [4, 6, 5]
    weight = torch.randn(sum(field_dims), 3, dtype=torch.float64, requires_grad=True)
    offsets = offsets_of(field_dims)
    wide = zipf_ids(10, field_dims * 2)[:, ::2]                     # a strided view: not contiguous
    ids = torch.stack([wide[:, 0] % 4, wide[:, 1] % 6, wide[:, 2] % 5], 1).t().contiguous().t()
    assert not ids.is_contiguous()
    grads = []
    for backend in ["torch", "reference"]:
        weight.grad = None
        out = SF.embedding_lookup(ids, weight, offsets, backend=backend)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_clamp_to_oov_remaps_to_last_id_of_field():
    field_dims = [3, 4]
    weight = torch.randn(7, 2)
    offsets = offsets_of(field_dims)
    ids = torch.tensor([[5, -1], [0, 3]])
    for backend in ["torch", "reference"]:
        out = SF.embedding_lookup(ids, weight, offsets, bounds_check="clamp_to_oov", backend=backend)
        assert torch.equal(out[0, 0], weight[2]) and torch.equal(out[0, 1], weight[6])
        assert torch.equal(out[1, 1], weight[6])


@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("side,symmetric", [("left", False), ("right", False), ("left", True)])
def test_pairwise_products_match_reference(pairs, side, symmetric):
    Z = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    V = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    res = {}
    for backend in ["torch", "reference"]:
        Z.grad = V.grad = None
        p = SF.pairwise_products(Z, V, pairs, side, symmetric, backend=backend)
        (p * torch.linspace(-1, 2, p.numel(), dtype=p.dtype).view_as(p)).sum().backward()
        res[backend] = (p.detach(), Z.grad.clone(), None if V.grad is None else V.grad.clone())
    for a, b in zip(res["torch"], res["reference"]):
        if a is None or b is None:
            continue
        torch.testing.assert_close(a, b)


def test_generative_cross_matches_reference():
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    W = torch.randn(12, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    res = {}
    for backend in ["torch", "reference"]:
        for t in (x, g, W, b):
            t.grad = None
        y = SF.generative_cross(x, g, W, b, backend=backend)
        (y * y).sum().backward()
        res[backend] = (y.detach(), x.grad.clone(), g.grad.clone(), W.grad.clone(), b.grad.clone())
    for a, r in zip(res["torch"], res["reference"]):
        torch.testing.assert_close(a, r)
    torch.testing.assert_close(res["torch"][0], (x + g * (x @ W.t() + b)).detach())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_with_logits_stable_and_matches(reduction):
    logits = torch.tensor([-1e4, -30.0, -1.0, 0.0, 0.5, 30.0, 1e4], requires_grad=True)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.3, 0.0, 1.0])
    want = []
    for x, y in zip(logits.double().tolist(), labels.double().tolist()):
        # log(1 + e^x) - x*y, written with the max trick in plain Python floats
        import math
        want.append(max(x, 0) + math.log1p(math.exp(-abs(x))) - x * y)
    want = torch.tensor(want, dtype=torch.float64)
    want = {"mean": want.mean(), "sum": want.sum(), "none": want}[reduction]
    for backend in ["torch", "reference"]:
        out = SF.bce_with_logits(logits, labels, reduction, backend=backend)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
        out.sum().backward()
        assert torch.isfinite(logits.grad).all()
        torch.testing.assert_close(logits.grad.double(), _bce_grad(logits, labels, reduction), rtol=1e-6, atol=1e-7)
        logits.grad = None


def _bce_grad(logits, labels, reduction):
    g = torch.sigmoid(logits.detach().double()) - labels.double()
    return g / logits.numel() if reduction == "mean" else g


def test_bce_accepts_integer_labels_and_fp16_logits():
    logits = torch.randn(8).half()
    labels = torch.randint(0, 2, (8,))
    out = SF.bce_with_logits(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, REF.bce_with_logits(logits.float(), labels.float()))


def test_sfg_logits_composes_the_three_ops():
    field_dims = [4, 7, 3]
    table = torch.randn(sum(field_dims), 5, dtype=torch.float64)
    offsets = offsets_of(field_dims)
    ids = zipf_ids(9, field_dims)
    W = torch.randn(15, 15, dtype=torch.float64)
    M = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    V = REF.embedding_lookup(ids, table, offsets)
    want = REF.pairwise_decode(REF.sfg_encode(V, W, None, "tanh", 0.5), V, M, "matrix", "all", "right")
    for backend in ["torch", "reference"]:
        got = SF.sfg_logits(ids, table, offsets, W, None, M, "matrix", "tanh", 0.5, False, "all", "right",
                            backend=backend)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_noncontiguous_operands_match_contiguous(kind):
    n, d = 5, 3
    base_z = torch.randn(n, 4, d, dtype=torch.float64)          # [N, B, D] then transposed: strided
    base_v = torch.randn(4, d, n, dtype=torch.float64)
    Z, V = base_z.transpose(0, 1), base_v.transpose(1, 2)
    assert not Z.is_contiguous() and not V.is_contiguous()
    W = _decoder_weight(kind, n, d, torch.float64)
    if W is not None:
        W = W.transpose(0, 1).contiguous().transpose(0, 1)        # strided weight too
    for backend in ["torch", "reference"]:
        got = SF.pairwise_decode(Z, V, W, kind, backend=backend)
        want = SF.pairwise_decode(Z.contiguous(), V.contiguous(), None if W is None else W.contiguous(), kind,
                                  backend="reference")
        torch.testing.assert_close(got, want)
    enc = torch.randn(n * d, n * d, dtype=torch.float64).t()
    torch.testing.assert_close(SF.sfg_encode(Z, enc, backend="torch"),
                               SF.sfg_encode(Z.contiguous(), enc.contiguous(), backend="reference"))


def test_auto_on_cuda_follows_the_measured_winner(monkeypatch):
    """auto on a CUDA tensor: Triton for the lookup, the factored torch path for the interaction ops
    (the H200 measurements in bench/results/nvidia-h200), the next one when the first is unavailable."""
    from sfg_fast import _backend
    cuda = torch.device("cuda")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "unavailable_reason", lambda backend, op="", device=None: None)
    assert _backend.resolve("auto", "embedding_lookup", cuda) == "triton"
    for op in ("sfg_logits", "sfg_encode", "pairwise_decode", "bce_with_logits", "generative_cross"):
        assert _backend.resolve("auto", op, cuda) == "torch"
    assert _backend.resolve("auto", "sfg_logits", torch.device("cpu")) == "cpu"
    monkeypatch.setattr(_backend, "unavailable_reason",
                        lambda backend, op="", device=None: "absent" if backend == "triton" else None)
    assert _backend.resolve("auto", "embedding_lookup", cuda) == "cuda"


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("generative", [True, False])
def test_sfg_interaction_layer_equals_encoder_then_decoder(backend, generative):
    """nn.SFGInteraction (one sfg_interaction op) = PairwiseDecoder(SFGEncoder(V), V) with the same
    weights, values and gradients; generative=False is the base model's interaction."""
    from sfg_fast.nn import SFGInteraction
    torch.manual_seed(3)
    layer = SFGInteraction(5, 4, kind="matrix", generated_side="right", generative=generative, gamma=0.7,
                           bias=True, residual=True, backend=backend).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    V = torch.randn(11, 5, 4, dtype=torch.float64, requires_grad=True)
    out = layer(V)
    out.sum().backward()
    got = [V.grad] + [p.grad for p in layer.parameters()]
    V2 = V.detach().clone().requires_grad_()
    Z = layer.encoder(V2) if generative else V2
    ref = layer.decoder(Z, V2)
    ref_grads = torch.autograd.grad(ref.sum(), [V2] + list(layer.parameters()))
    torch.testing.assert_close(out, ref)
    assert (layer.encoder is None) == (not generative)
    for g, r in zip(got, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("pairs", ["upper", "all", "offdiag"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 39])
def test_pair_index_lists_the_mask_in_row_major_order(pairs, n):
    from sfg_fast import _checks
    rows, cols = _checks.pair_index(n, pairs)
    want = _checks.pair_mask(n, pairs).nonzero()
    assert rows.dtype == cols.dtype == torch.int64
    assert torch.equal(torch.stack([rows, cols], 1), want)


@pytest.mark.parametrize("fused", [False, True])
def test_tables_built_on_the_meta_device_materialise_and_load(fused):
    """``with torch.device("meta")`` + ``to_empty()`` + ``load_state_dict``: the offsets and field sizes are
    functions of field_dims (not state) and are rebuilt where the module lands, so the loaded module looks
    up exactly like the one saved."""
    from sfg_fast.optim import FusedFieldEmbedding
    build = (lambda: FusedFieldEmbedding([3, 5, 4], 4, optimizer="adam")) if fused else \
        (lambda: snn.FieldEmbedding([3, 5, 4], 4))
    real = build()
    with torch.device("meta"):
        lazy = build()
    lazy = lazy.to_empty(device="cpu")
    lazy.load_state_dict(real.state_dict())
    assert torch.equal(lazy.offsets, torch.tensor([0, 3, 8])) and torch.equal(lazy.field_sizes, torch.tensor([3, 5, 4]))
    assert lazy.num_clamped == 0
    ids = torch.tensor([[0, 4, 3], [2, 0, 1]])
    assert torch.equal(lazy(ids), real(ids))


def test_layers_reset_parameters_to_their_documented_start():
    """reset_parameters (what meta-device materialisation and FSDP call) re-draws each layer's own start:
    tables N(0, init_std^2), the encoder nn.Linear's init, the decoder the FM start; under a seed it repeats,
    and a fused table's optimizer state starts again too."""
    from sfg_fast.optim import FusedFieldEmbedding
    torch.manual_seed(3)
    table = snn.FieldEmbedding([300, 500], 8, init_std=0.5)
    torch.manual_seed(3)
    again = snn.FieldEmbedding([300, 500], 8, init_std=0.5)
    with torch.no_grad():
        table.weight.add_(7.0)
    torch.manual_seed(3)
    table.reset_parameters()
    assert torch.equal(table.weight, again.weight) and abs(table.weight.std().item() - 0.5) < 0.02
    torch.manual_seed(5)
    enc = snn.SFGEncoder(3, 4, bias=True)
    first = [p.clone() for p in enc.parameters()]
    enc.reset_to_identity()
    torch.manual_seed(5)
    enc.reset_parameters()
    assert all(torch.equal(a, b) for a, b in zip(first, enc.parameters()))
    for kind in ("scalar", "vector", "matrix"):
        dec = snn.PairwiseDecoder(3, 4, kind=kind)
        start = dec.weight.clone()
        with torch.no_grad():
            dec.weight.mul_(-3.0)
        dec.reset_parameters()
        assert torch.equal(dec.weight, start)
    fused = FusedFieldEmbedding([3, 5], 4, optimizer="adagrad", initial_accumulator_value=0.1)
    out = fused(torch.tensor([[0, 1], [2, 4]]))
    out.sum().backward()
    assert fused.optimizer.step_count == 1 and bool((fused.optimizer.state["sum"] > 0.1).any())
    state = fused.optimizer.state["sum"]
    fused.reset_parameters()
    assert fused.optimizer.step_count == 0 and torch.equal(state, torch.full_like(state, 0.1))
    assert fused.optimizer.state["sum"] is state          # in place: a compiled graph keeps its tensors


def test_cross_net_and_cin_take_an_empty_batch_and_promote_dtypes():
    cross = snn.GenerativeCrossNet(3, 4, num_layers=2)
    assert cross(torch.randn(0, 12)).shape == (0, 12)
    cin = snn.CIN(3, 4, [5, 2], generative=True)
    assert cin(torch.randn(0, 3, 4)).shape == (0, 7)
    V = torch.randn(6, 3, 4, dtype=torch.float64)
    out = cin(V)
    assert out.dtype == torch.float64
    ref = cin.double()(V)
    torch.testing.assert_close(out, ref)


def test_to_empty_restarts_the_remap_counter_and_keeps_offsets():
    """to_empty gives uninitialised storage, also off the meta device: the offsets are rebuilt, the
    clamp_to_oov counter starts at 0."""
    table = snn.FieldEmbedding([3, 5], 4, bounds_check="clamp_to_oov")
    table(torch.tensor([[9, 0]]))
    assert table.num_clamped == 1
    table.to_empty(device="cpu")
    assert table.num_clamped == 0 and torch.equal(table.offsets, torch.tensor([0, 3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [1, 16])
def test_cpu_table_gradient_is_atens_embedding_backward_bit_for_bit(dtype, dim):
    """The torch backend's CPU lookup sums its table gradient with one index_add_ (factored._CpuGather):
    the same rows added in the same (id) order as F.embedding's backward, so the same bits, hot rows and
    every thread count included; and still differentiable twice."""
    import torch.nn.functional as F
    from sfg_fast import factored
    gen = torch.Generator().manual_seed(0)
    field_dims = [40, 3, 500]
    offsets = torch.tensor([0, 40, 43])
    weight = (torch.randn(543, dim, generator=gen, dtype=dtype)
              * torch.logspace(-4, 4, 543, dtype=dtype)[:, None]).requires_grad_()
    ids = torch.stack([torch.randint(0, d, (2048,), generator=gen) for d in field_dims], dim=1)
    ids[:1500, 1] = 2                                            # one very hot row
    grad = torch.randn(2048, 3, dim, generator=gen, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            want, = torch.autograd.grad(F.embedding(ids + offsets, weight), weight, grad)
            out = factored.embedding_lookup(ids, weight, offsets)
            assert type(out.grad_fn).__name__ == "_CpuGatherBackward"      # the index_add_ path ran
            got, = torch.autograd.grad(out, weight, grad)
            assert torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)
    small = torch.randn(543, dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda w: factored.embedding_lookup(ids[:5], w, offsets) ** 2, (small,))
    # forward-mode AD too (the gather is linear in the table)
    import torch.autograd.forward_ad as fwAD
    tangent = torch.randn_like(weight)
    with fwAD.dual_level():
        out = factored.embedding_lookup(ids, fwAD.make_dual(weight, tangent), offsets)
        assert torch.equal(fwAD.unpack_dual(out).tangent, F.embedding(ids + offsets, tangent))
