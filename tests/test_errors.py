"""Bad input gets a clear error naming the argument, and never corrupts state."""
import pytest
import torch

from sfg_fast import functional as SF
from sfg_fast import models, nn as snn
from sfg_fast import reference as REF
from sfg_fast._backend import BackendUnavailableError

from helpers import offsets_of

FIELD_DIMS = [3, 5, 4]


def _lookup_args():
    return torch.tensor([[0, 1, 2], [2, 4, 3]]), torch.randn(sum(FIELD_DIMS), 4), offsets_of(FIELD_DIMS)


@pytest.mark.parametrize("fn", [SF.embedding_lookup, REF.embedding_lookup])
@pytest.mark.parametrize("bad,field,value", [((0, 1), 1, 5), ((1, 0), 0, -1), ((1, 2), 2, 99)])
def test_out_of_range_and_negative_ids_name_field_and_size(fn, bad, field, value):
    ids, weight, offsets = _lookup_args()
    ids[bad] = value
    with pytest.raises(IndexError, match=rf"field {field}\).*id {value}.*\[0, {FIELD_DIMS[field]}\)"):
        fn(ids, weight, offsets)


def test_float_ids_and_wrong_ranks():
    ids, weight, offsets = _lookup_args()
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        SF.embedding_lookup(ids.float(), weight, offsets)
    with pytest.raises(ValueError, match=r"ids must have shape \[B, N\]"):
        SF.embedding_lookup(ids[0], weight, offsets)
    with pytest.raises(TypeError, match="offsets must be an int64"):
        SF.embedding_lookup(ids, weight, offsets.int())
    with pytest.raises(ValueError, match=r"offsets must have shape \[N\]=\[3\]"):
        SF.embedding_lookup(ids, weight, offsets[:2])
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        SF.embedding_lookup(ids, weight[None], offsets)
    with pytest.raises(ValueError, match="bounds_check must be one of"):
        SF.embedding_lookup(ids, weight, offsets, bounds_check="warn")


def test_decode_shape_and_choice_errors():
    Z, V = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"weight for kind='scalar' must have shape \[3, 3\]"):
        SF.pairwise_decode(Z, V, torch.randn(3, 4), "scalar")
    with pytest.raises(ValueError, match=r"weight for kind='matrix' must have shape \[3, 3, 4, 4\]"):
        SF.pairwise_decode(Z, V, torch.randn(3, 3, 4), "matrix")
    with pytest.raises(ValueError, match="weight is required for kind='vector'"):
        SF.pairwise_decode(Z, V, None, "vector")
    with pytest.raises(ValueError, match="weight must be None for kind='identity'"):
        SF.pairwise_decode(Z, V, torch.randn(3, 3), "identity")
    with pytest.raises(ValueError, match="kind must be one of"):
        SF.pairwise_decode(Z, V, None, "tensor")
    with pytest.raises(ValueError, match="pairs must be one of"):
        SF.pairwise_decode(Z, V, None, "identity", pairs="lower")
    with pytest.raises(ValueError, match="generated_side must be one of"):
        SF.pairwise_decode(Z, V, None, "identity", generated_side="both")
    with pytest.raises(ValueError, match=r"V must have the shape of Z \[2, 3, 4\]"):
        SF.pairwise_decode(Z, V[:, :2], None, "identity")
    with pytest.raises(ValueError, match="Z must have 3 dimensions"):
        SF.pairwise_decode(Z[0], V, None, "identity")
    with pytest.raises(TypeError, match="Z must be a floating-point tensor"):
        SF.pairwise_decode(Z.long(), V, None, "identity")


def test_encode_errors():
    V = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \[N\*D, N\*D\]=\[12, 12\]"):
        SF.sfg_encode(V, torch.randn(12, 11))
    with pytest.raises(ValueError, match=r"bias must have shape \[N\*D\]=\[12\]"):
        SF.sfg_encode(V, torch.randn(12, 12), torch.randn(3))
    with pytest.raises(ValueError, match="activation must be one of"):
        SF.sfg_encode(V, torch.randn(12, 12), activation="swish")
    with pytest.raises(ValueError, match="gamma must be finite"):
        SF.sfg_encode(V, torch.randn(12, 12), gamma=float("nan"))


@pytest.mark.parametrize("fn", [SF.bce_with_logits, REF.bce_with_logits])
def test_bad_labels(fn):
    logits = torch.randn(4)
    with pytest.raises(ValueError, match="labels contain 1 NaN/inf"):
        fn(logits, torch.tensor([0.0, float("nan"), 1.0, 0.0]))
    with pytest.raises(ValueError, match="labels contain 1 NaN/inf"):
        fn(logits, torch.tensor([0.0, float("inf"), 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        fn(logits, torch.tensor([0.0, 2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"labels must have the shape of logits \[4\]"):
        fn(logits, torch.zeros(3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(logits, torch.zeros(4), reduction="avg")


def test_cross_errors():
    with pytest.raises(ValueError, match=r"weight must have shape \[K, K\]=\[6, 6\]"):
        SF.generative_cross(torch.randn(2, 6), torch.randn(2, 6), torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"x_gen must have the shape of x"):
        SF.generative_cross(torch.randn(2, 6), torch.randn(2, 5), torch.randn(6, 6))


def test_backend_errors_quote_reason():
    Z, V = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        SF.pairwise_decode(Z, V, None, "identity", backend="numpy")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable"):
        SF.pairwise_decode(Z, V, None, "identity", backend="cuda")


def test_env_var_overrides_auto(monkeypatch):
    Z, V = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    monkeypatch.setenv("SFG_FAST_BACKEND", "reference")
    calls = []
    monkeypatch.setattr(REF, "pairwise_decode", lambda *a, **k: calls.append(1) or torch.zeros(2))
    SF.pairwise_decode(Z, V, None, "identity")
    assert calls == [1]
    monkeypatch.setenv("SFG_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SFG_FAST_BACKEND must be one of"):
        SF.pairwise_decode(Z, V, None, "identity")


def test_models_reject_mismatched_ids_and_bad_field_dims():
    model = models.build("fm", FIELD_DIMS, 4, generative=True)
    with pytest.raises(ValueError, match=r"ids must have shape \[B, N\]=\[B, 3\]"):
        model(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(IndexError, match=r"field 1\)"):
        model(torch.tensor([[0, 7, 0]]))
    with pytest.raises(ValueError, match="field_dims must be positive"):
        models.build("fm", [3, 0], 4)
    with pytest.raises(ValueError, match="unknown model 'fmm'"):
        models.build("fmm", FIELD_DIMS)


def test_bad_ids_leave_parameters_untouched():
    model = models.build("fwfm", FIELD_DIMS, 4, generative=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(IndexError):
        model(torch.tensor([[0, 1, 4]])).sum().backward()
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_clamp_to_oov_module_counts():
    emb = snn.FieldEmbedding(FIELD_DIMS, 2, bounds_check="clamp_to_oov")
    out = emb(torch.tensor([[0, 9, 1], [-3, 1, 1]]))
    assert emb.num_clamped == 2
    assert torch.equal(out[0, 1], emb.weight[3 + 4]) and torch.equal(out[1, 0], emb.weight[2])


def test_clamp_to_oov_counts_under_compile_without_graph_break():
    emb = snn.FieldEmbedding(FIELD_DIMS, 2, bounds_check="clamp_to_oov")
    compiled = torch.compile(emb, backend="eager", fullgraph=True)
    out = compiled(torch.tensor([[0, 9, 1], [-3, 1, 1]]))
    assert emb.num_clamped == 2
    assert torch.equal(out[0, 1], emb.weight[3 + 4])


def test_parameters_on_another_device_are_named():
    """Fused backends take raw pointers, so a weight left on another device must be refused up front
    (the meta device stands in for a second device on CPU-only machines)."""
    V = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="weight is on meta but V is on cpu"):
        SF.sfg_encode(V, torch.randn(12, 12, device="meta"))
    with pytest.raises(ValueError, match="bias is on meta but V is on cpu"):
        SF.sfg_encode(V, torch.randn(12, 12), torch.randn(12, device="meta"))
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        SF.generative_cross(x, x, torch.randn(6, 6, device="meta"))
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        SF.generative_cross(x, x, torch.randn(6, 6), torch.randn(6, device="meta"))
    ids, table, offsets = _lookup_args()
    with pytest.raises(ValueError, match="enc_weight is on meta but table is on cpu"):
        SF.sfg_logits(ids, table, offsets, torch.randn(12, 12, device="meta"), None, None, "identity")


def test_sfg_logits_errors_name_its_own_arguments():
    """sfg_logits has two weights: its errors must say which (enc_weight / enc_bias / dec_weight)."""
    ids, table, offsets = _lookup_args()                      # N = 3, D = 4
    with pytest.raises(ValueError, match=r"enc_weight must have shape \[N\*D, N\*D\]=\[12, 12\]"):
        SF.sfg_logits(ids, table, offsets, torch.randn(12, 11), None, None, "identity")
    with pytest.raises(ValueError, match=r"enc_bias must have shape \[N\*D\]=\[12\]"):
        SF.sfg_logits(ids, table, offsets, torch.randn(12, 12), torch.randn(5), None, "identity")
    with pytest.raises(ValueError, match=r"dec_weight for kind='scalar' must have shape \[3, 3\]"):
        SF.sfg_logits(ids, table, offsets, None, None, torch.randn(3, 3, 4), "scalar")
    with pytest.raises(ValueError, match="dec_weight is required for kind='matrix'"):
        SF.sfg_logits(ids, table, offsets, None, None, None, "matrix")
    with pytest.raises(ValueError, match="dec_weight must be None for kind='identity'"):
        SF.sfg_logits(ids, table, offsets, None, None, torch.randn(3, 3), "identity")



def test_int32_ids_against_a_field_past_int32_range():
    """Field sizes are int64; narrowing them to int32 ids' dtype would wrap a 2^31+ row field negative
    and flag every id as bad. Checked on the size tensor directly (no such table is allocated)."""
    from sfg_fast import _checks as C
    sizes = torch.tensor([2**31 + 5, 4], dtype=torch.int64)
    ids = torch.tensor([[0, 1], [2**31 - 1, 3]], dtype=torch.int32)
    C.check_ids_in_range(ids, sizes)                                  # all in range: no error
    remapped, count = C.clamp_to_oov(ids, sizes)
    assert count == 0 and torch.equal(remapped, ids)
    bad = torch.tensor([[0, 7], [2**31 - 1, -2]], dtype=torch.int32)
    with pytest.raises(IndexError, match=r"field 1\).*id 7"):
        C.check_ids_in_range(bad, sizes)
    remapped, count = C.clamp_to_oov(bad, sizes)
    assert count == 2 and remapped.dtype == torch.int64      # field 0's OOV id needs int64
    assert torch.equal(remapped, torch.tensor([[0, 3], [2**31 - 1, 3]]))
    # a bad id of the big field goes to its own OOV id (2^31 + 4), not to the int32 maximum (an in-vocabulary
    # id of that field); the same for a table module's clamp (its sizes from field_dims) and in a graph
    negative = torch.tensor([[-1, 0], [5, 4]], dtype=torch.int32)
    expected = torch.tensor([[2**31 + 4, 0], [5, 3]])
    assert torch.equal(C.clamp_to_oov(negative, sizes)[0], expected)
    from types import SimpleNamespace
    from sfg_fast.nn import clamp_ids_to_oov
    module = SimpleNamespace(field_sizes=sizes, field_dims=[2**31 + 5, 4])
    remapped, count = clamp_ids_to_oov(module, negative)
    assert int(count) == 2 and torch.equal(remapped, expected)
    remapped, count = C.clamp_to_oov(negative, torch.tensor([7, 4]))
    assert remapped.dtype == torch.int32 and torch.equal(remapped, torch.tensor([[6, 0], [5, 3]], dtype=torch.int32))
    from sfg_fast import library
    offsets = torch.tensor([0, 2**31 + 5])
    traced = torch.compile(lambda i: library.checked_ids(i, offsets, 2**31 + 9, "clamp_to_oov"), fullgraph=True,
                           backend="aot_eager")
    assert torch.equal(traced(negative), expected)


@pytest.mark.parametrize("field_dims,error", [([2.7, 3], TypeError), ("12", TypeError), ([0, 3], ValueError),
                                              ([True, 3], ValueError), ([], ValueError)])
def test_field_dims_are_never_truncated_or_split(field_dims, error):
    from sfg_fast.nn import FieldEmbedding
    with pytest.raises(error, match="field_dims"):
        FieldEmbedding(field_dims, 4)
    with pytest.raises(error, match="field_dims"):
        models.build("fm", field_dims, 4)


@pytest.mark.parametrize("build,error,name", [
    (lambda: models.build("fm", FIELD_DIMS, 4.9), TypeError, "embedding_dim"),
    (lambda: models.build("fm", FIELD_DIMS, True), ValueError, "embedding_dim"),
    (lambda: models.build("dcnv2", FIELD_DIMS, 4, num_cross_layers=-1), ValueError, "num_cross_layers"),
    (lambda: snn.GenerativeCrossNet(2, 3, num_layers=-2), ValueError, "num_layers"),
    (lambda: snn.GenerativeCrossNet(2, 3, backend="bogus"), ValueError, "backend"),
    (lambda: snn.MLP(4, (3,), dropout=-0.5), ValueError, "dropout"),
    (lambda: snn.MLP(4, (3,), dropout=float("nan")), ValueError, "dropout"),
    (lambda: snn.MLP(2.5, (3,)), TypeError, "input_dim"),
    (lambda: snn.MLP(4, (3,), output_dim=0), ValueError, "output_dim"),
    (lambda: snn.CIN(2, 3, [-1]), ValueError, "layer_sizes"),
    (lambda: snn.CIN(2, 3, 16), TypeError, "layer_sizes"),
    (lambda: snn.FieldEmbedding(FIELD_DIMS, 2, backend="bogus"), ValueError, "backend"),
    (lambda: snn.CIN(2, 3, []), ValueError, "layer_sizes"),
    (lambda: snn.FieldEmbedding(FIELD_DIMS, 2, init_std=float("inf")), ValueError, "init_std"),
    (lambda: snn.FieldEmbedding(FIELD_DIMS, 2, init_std=-1.0), ValueError, "init_std"),
    (lambda: snn.GenerativeCrossNet(2, 3, cross_bias="no"), TypeError, "cross_bias"),
    (lambda: snn.SFGEncoder(2, 3, gamma=True), TypeError, "gamma"),
    (lambda: snn.SFGEncoder(2, 3, gamma=torch.tensor(True)), TypeError, "gamma"),
    (lambda: snn.FieldEmbedding(FIELD_DIMS, 2, init_std=True), TypeError, "init_std"),
    # options of the encoder a layer built without one still takes: wrong is wrong either way
    (lambda: snn.SFGInteraction(2, 3, generative=False, activation="x"), ValueError, "activation"),
    (lambda: snn.SFGInteraction(2, 3, generative=False, gamma=float("nan")), ValueError, "gamma"),
    (lambda: snn.GenerativeCrossNet(2, 3, generative=False, dropout=2.0), ValueError, "dropout"),
    (lambda: snn.CIN(2, 3, generative=False, activation="x"), ValueError, "activation"),
    (lambda: snn.CIN(2, 3, backend="x"), ValueError, "backend"),
])
def test_layer_sizes_and_counts_are_never_truncated_or_dropped(build, error, name):
    """A float width, a negative layer count or dropout is an error naming it, not a truncation or a
    layer silently left out."""
    with pytest.raises(error, match=name):
        build()


def test_layers_name_a_wrong_input_width():
    with pytest.raises(ValueError, match=r"x0 must have shape \[B, N\*D\]=\[B, 6\]"):
        snn.GenerativeCrossNet(2, 3, 1)(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"x0 must have shape"):
        snn.GenerativeCrossNet(2, 3, 1, generative=False)(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"V must have shape \[B, N, D\]=\[B, 2, 3\]"):
        snn.CIN(2, 3, (4,))(torch.randn(4, 3, 3))
    x0 = torch.randn(4, 6)
    assert torch.equal(snn.GenerativeCrossNet(2, 3, 0)(x0), x0)     # no cross layer: x_L = x_0


@pytest.mark.parametrize("backend", ["torch", "reference", "cpu",
                                     pytest.param("triton", marks=pytest.mark.interpreter)])
def test_clamp_to_oov_refuses_a_field_without_rows(backend):
    """A field of size 0 (equal offsets, or the last one at the table's end) has no OOV row: its "last id"
    would be the next field's first row or the row past the table. Refused by name on every backend,
    before anything is read or updated (the buffer's row past the table stays untouched)."""
    if backend == "cpu":
        pytest.importorskip("sfg_fast._C")
    from sfg_fast import optim
    buf = torch.zeros(4, 2)
    buf[3] = 7.0
    weight = buf[:3]
    for offsets in (torch.tensor([0, 3]), torch.tensor([0, 0])):
        ids = torch.tensor([[1, 5]])
        with pytest.raises(ValueError, match="field 1 has none|field 0 has none"):
            SF.embedding_lookup(ids, weight, offsets, "clamp_to_oov", backend=backend)
        if backend != "reference":
            table = weight.detach().requires_grad_()
            with pytest.raises(ValueError, match="has none"):
                optim.fused_embedding_lookup(ids, table, offsets, optim.SparseRowOptimizer("sgd", lr=1.0),
                                             bounds_check="clamp_to_oov", backend=backend)
    assert torch.equal(buf[3], torch.full((2,), 7.0)) and torch.equal(buf[:3], torch.zeros(3, 2))


@pytest.mark.parametrize("module", ["FieldEmbedding", "FusedFieldEmbedding"])
def test_clamp_to_oov_counts_only_lookups_that_succeed(module, monkeypatch):
    """The OOV counter moves only when the lookup itself succeeds: a lookup that raises (here the backend
    refuses the call) leaves num_clamped where it was."""
    from sfg_fast import optim
    cls = snn.FieldEmbedding if module == "FieldEmbedding" else optim.FusedFieldEmbedding
    emb = cls(FIELD_DIMS, 2, bounds_check="clamp_to_oov", backend="torch")
    emb(torch.tensor([[0, 9, 1]]))
    assert emb.num_clamped == 1
    import sfg_fast.functional as functional

    def refuse(*args, **kwargs):
        raise BackendUnavailableError("refused for the test")
    monkeypatch.setattr(functional, "_impl", refuse)
    monkeypatch.setattr(optim, "_fused_lookup", refuse)
    with pytest.raises(BackendUnavailableError):
        emb(torch.tensor([[0, 9, 1], [-1, 0, 0]]))
    assert emb.num_clamped == 1


def test_state_dict_saved_with_other_field_dims_is_refused(tmp_path):
    # [3, 5] and [5, 3] give the same [8, D] table: only the recorded field_dims tell them apart
    from sfg_fast.nn import FieldEmbedding
    from sfg_fast.optim import FusedFieldEmbedding
    from sfg_fast.serving import quantize_model

    for make in (lambda dims: FieldEmbedding(dims, 4), lambda dims: FusedFieldEmbedding(dims, 4)):
        saved = make([3, 5])
        target = make([5, 3])
        before = target.weight.detach().clone()
        path = tmp_path / "table.pt"
        torch.save(saved.state_dict(), path)
        with pytest.raises(RuntimeError, match=r"field_dims=\[3, 5\].*field_dims=\[5, 3\]"):
            target.load_state_dict(torch.load(path, weights_only=True))
        assert torch.equal(target.weight, before)
        same = make([3, 5])
        same.load_state_dict(torch.load(path, weights_only=True))
        assert torch.equal(same.weight, saved.weight)
        # a state dict without the metadata (older files, or rebuilt by hand) still loads by shape
        target.load_state_dict(dict(saved.state_dict()))
        assert torch.equal(target.weight, saved.weight)
    model = models.build("fm", [3, 5, 2], embedding_dim=4)
    with pytest.raises(RuntimeError, match="embedding.field_dims"):
        models.build("fm", [5, 3, 2], embedding_dim=4).load_state_dict(model.state_dict())
    served = quantize_model(model)
    with pytest.raises(RuntimeError, match="embedding.field_dims"):
        quantize_model(models.build("fm", [5, 3, 2], embedding_dim=4)).load_state_dict(served.state_dict())


def test_fused_table_arguments_are_named():
    from sfg_fast.optim import FusedFieldEmbedding
    with pytest.raises(ValueError, match="optimizer must be one of"):
        FusedFieldEmbedding(FIELD_DIMS, 2, optimizer="x")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        FusedFieldEmbedding(FIELD_DIMS, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="init_std"):
        FusedFieldEmbedding(FIELD_DIMS, 2, init_std=float("nan"))


def test_numbers_of_numpy_and_torch_are_numbers():
    import numpy as np
    assert snn.FieldEmbedding(FIELD_DIMS, 2, init_std=np.float32(0.5)).init_std == 0.5
    assert snn.FieldEmbedding(FIELD_DIMS, 2, init_std=torch.tensor(0.25)).init_std == 0.25
    assert snn.SFGEncoder(2, 3, gamma=np.float64(2.0)).gamma == 2.0


@pytest.mark.parametrize("name", ["fm", "fwfm", "fmfm", "deepfm", "ipnn", "xdeepfm", "dcnv2", "crossnet"])
@pytest.mark.parametrize("option,error,match", [
    (dict(gamma=float("nan")), ValueError, "gamma must be finite"),
    (dict(activation="bogus"), ValueError, "activation must be one of"),
    (dict(encoder_dropout=2.0), ValueError, r"encoder_dropout must lie in \[0, 1\)"),
    (dict(residual=1), TypeError, "residual must be a bool"),
    (dict(gamma="2"), TypeError, "gamma must be a real number"),
])
def test_base_models_refuse_bad_encoder_options_too(name, option, error, match):
    with pytest.raises(error, match=match):
        models.build(name, [3, 4], 4, generative=False, **option)


@pytest.mark.parametrize("name", ["fm", "fwfm", "fmfm", "deepfm", "ipnn", "xdeepfm", "dcnv2", "crossnet"])
@pytest.mark.parametrize("embedding", ["native", "fused"])
@pytest.mark.parametrize("bounds_check", ["fatal", "clamp_to_oov", "off"])
def test_models_run_on_meta_tensors(name, embedding, bounds_check):
    # shapes without values: the checks that read ids and labels have nothing to read
    with torch.device("meta"):
        model = models.build(name, [3, 4, 5], 4, embedding=embedding, bounds_check=bounds_check)
    out = model(torch.zeros(4, 3, dtype=torch.long, device="meta"))
    assert out.is_meta and out.shape == (4,)
    loss = SF.bce_with_logits(out, torch.zeros(4, device="meta"))
    assert loss.is_meta and loss.shape == ()


def test_a_non_finite_gamma_is_refused_under_compile_too():
    V, W = torch.randn(2, 3, 4), torch.randn(12, 12)
    fn = torch.compile(lambda V: SF.sfg_interaction(V, W, None, None, "identity", "relu", float("nan")),
                       backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="gamma must be finite"):
        fn(V)
    torch._dynamo.reset()
    model = models.build("fwfm", [3, 4, 5], 4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    ids = torch.zeros(4, 3, dtype=torch.long)
    assert compiled(ids).shape == (4,)
    model.encoder.gamma = float("inf")       # changed after it was built: refused at the next call
    with pytest.raises(Exception, match="gamma must be finite"):
        compiled(ids)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["fm", "fwfm", "fmfm", "deepfm", "ipnn", "xdeepfm", "dcnv2", "crossnet"])
def test_torch_func_grad_of_every_model_on_the_default_backend(name):
    from torch.func import functional_call, grad
    torch.manual_seed(0)
    model = models.build(name, [3, 4, 5], 4)
    ids, y = torch.tensor([[0, 1, 2], [2, 3, 4]]), torch.tensor([1.0, 0.0])
    params = dict(model.named_parameters())

    def loss(p):
        return SF.bce_with_logits(functional_call(model, p, (ids,)), y)

    got = grad(loss)(params)
    loss(params).backward()
    for key, p in params.items():
        torch.testing.assert_close(got[key], p.grad, rtol=1e-5, atol=1e-6)


def test_torch_func_refuses_a_fused_table_by_name():
    from torch.func import functional_call, grad
    model = models.build("fm", [3, 4], 4, embedding="fused")
    with pytest.raises(RuntimeError, match="a fused lookup .* cannot run inside a torch.func transform"):
        grad(lambda p: functional_call(model, p, (torch.tensor([[0, 1]]),)).sum())(dict(model.named_parameters()))


def test_an_unrunnable_backend_variable_is_refused_not_replaced(monkeypatch):
    # SFG_FAST_BACKEND=cuda on a machine without a GPU: the model's ops raise saying why, as functional
    # calls do; they never run the torch ops in its place
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("SFG_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable"):
        models.build("fwfm", [3, 4, 5], 4)(torch.tensor([[0, 1, 2]]))


def test_torch_func_refuses_an_explicit_kernel_backend_by_name():
    from torch.func import grad
    pytest.importorskip("sfg_fast._C")
    Z = torch.randn(2, 3, 4)
    W = torch.randn(12, 12)
    with pytest.raises(BackendUnavailableError, match=r"inside a torch.func transform.*backend='torch'"):
        grad(lambda w: SF.sfg_interaction(Z, w, None, torch.randn(3, 3), "scalar", backend="cpu").sum())(W)


def test_backend_variable_builds_every_layer_as_that_backend(monkeypatch):
    # SFG_FAST_BACKEND=cpu: a model on "auto" runs as one built with backend="cpu" (torch where the
    # extension has no kernel), while a functional call stays strict
    pytest.importorskip("sfg_fast._C")
    monkeypatch.setenv("SFG_FAST_BACKEND", "cpu")
    ids = torch.tensor([[0, 1, 2], [2, 3, 4]])
    for name in ("dcnv2", "ipnn", "xdeepfm"):
        torch.manual_seed(0)
        out = models.build(name, [3, 4, 5], 4)(ids)
        monkeypatch.delenv("SFG_FAST_BACKEND")
        torch.manual_seed(0)
        want = models.build(name, [3, 4, 5], 4, backend="cpu")(ids)
        monkeypatch.setenv("SFG_FAST_BACKEND", "cpu")
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    with pytest.raises(BackendUnavailableError, match="backend 'cpu' is unavailable for generative_cross"):
        SF.generative_cross(torch.randn(2, 3), torch.randn(2, 3), torch.randn(3, 3), None)


def test_boolean_environment_variables_parse_strictly(monkeypatch):
    """SFG_FAST_GEMM_PATH=off left the path on (only "0" turned it off) and SFG_FAST_ALLOW_TF32=true read as
    off; every boolean variable now takes 1/0, true/false, yes/no, on/off and refuses anything else."""
    from sfg_fast._checks import env_flag
    for value, want in (("off", False), ("FALSE", False), ("0", False), ("on", True), ("Yes", True), ("1", True),
                        ("", None)):
        monkeypatch.setenv("SFG_FAST_TEST_FLAG", value)
        assert env_flag("SFG_FAST_TEST_FLAG", None) is want
    monkeypatch.setenv("SFG_FAST_TEST_FLAG", "maybe")
    with pytest.raises(ValueError, match="SFG_FAST_TEST_FLAG must be 1 or 0"):
        env_flag("SFG_FAST_TEST_FLAG", False)
