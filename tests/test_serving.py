"""Serving with int8 row-wise quantised tables (sfg_fast.serving): the fused CPU pipeline and the torch
twin against the fp64 reference on the dequantised table (the 2x rule of tests/helpers.py), bounds modes, bad input
naming the argument, and whole quantised models against the float model on the dequantised table."""
import pytest
import torch

from helpers import assert_close_2x, decoder_weight, offsets_of, zipf_ids
from sfg_fast import factored, models, reference, serving
from sfg_fast._backend import BackendUnavailableError
from sfg_fast.ops import cpu_ext

needs_ext = pytest.mark.skipif(not cpu_ext.available(), reason="sfg_fast._C is not built (no compiler at install)")
BACKENDS = ["torch", pytest.param("cpu", marks=needs_ext)]


def _quantised(field_dims, dim, spread=True):
    table = torch.randn(sum(field_dims), dim, dtype=torch.float64)
    if spread:
        table *= torch.rand(sum(field_dims), 1, dtype=torch.float64) * 4    # rows of different ranges
    q, scale_bias = serving.quantize_rowwise_int8(table)
    return q, scale_bias, serving.dequantize_rowwise_int8(q, scale_bias)


CASES = [
    # kind, activation, gamma, residual, pairs, side, symmetric, bias, encode
    ("identity", "relu", 0.5, False, "upper", "left", False, False, True),
    ("scalar", "gelu", 0.7, True, "offdiag", "right", False, True, True),
    ("vector", "silu", 1.3, False, "all", "left", True, True, True),
    ("matrix", "relu", 0.9, True, "upper", "right", False, True, True),
    ("matrix", "tanh", 1.0, False, "all", "left", True, False, True),
    ("scalar", "relu", 1.0, False, "upper", "left", False, False, False),   # base model: no encoder
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
@pytest.mark.parametrize("batch,field_dims,dim,id_dtype",
                         [(1, [3, 4], 1, torch.int64), (70, [5, 9, 2, 30, 6], 3, torch.int32),
                          (130, [11] * 7, 16, torch.int64)])
def test_sfg_logits_int8_vs_reference_on_the_dequantised_table(backend, case, batch, field_dims, dim, id_dtype):
    kind, act, gamma, residual, pairs, side, symmetric, use_bias, encode = case
    n, offsets = len(field_dims), offsets_of(field_dims)
    q, scale_bias, deq = _quantised(field_dims, dim)
    enc = torch.randn(n * dim, n * dim, dtype=torch.float64) / (n * dim) ** 0.5 if encode else None
    bias = torch.randn(n * dim, dtype=torch.float64) if use_bias else None
    dec = decoder_weight(kind, n, dim)
    ids = zipf_ids(batch, field_dims, dtype=id_dtype)
    args = (kind, act, gamma, residual, pairs, side, symmetric)
    f32 = [None if t is None else t.float() for t in (deq, enc, bias, dec)]
    ref64 = reference.sfg_logits(ids, deq.double(), offsets, enc, bias, dec, *args)
    torch32 = factored.sfg_logits(ids, f32[0], offsets, f32[1], f32[2], f32[3], *args)
    out = serving.sfg_logits_int8(ids, q, scale_bias, offsets, f32[1], f32[2], f32[3], *args, backend=backend)
    assert out.shape == (batch,) and out.dtype == torch.float32
    assert_close_2x(out, ref64, torch32, f"sfg_logits_int8 {backend} {case}", floor=1e-5)


@needs_ext
def test_cpu_pipeline_equals_lookup_then_interaction_and_bf16_autocast():
    """The fused int8 pipeline is the dequantising lookup followed by the fused interaction; under bf16
    autocast its GEMMs run on bf16 operands like the float tables' path (2x rule vs torch's autocast)."""
    field_dims, dim = [40, 7, 300, 12, 9, 25], 16
    n, offsets = len(field_dims), offsets_of(field_dims)
    q, scale_bias, deq = _quantised(field_dims, dim)
    enc = torch.randn(n * dim, n * dim) / (n * dim) ** 0.5
    dec = torch.randn(n, n)
    ids = zipf_ids(300, field_dims)
    fused = serving.sfg_logits_int8(ids, q, scale_bias, offsets, enc, None, dec, "scalar", backend="cpu")
    V = serving.embedding_lookup_int8(ids, q, scale_bias, offsets, backend="cpu")
    with torch.no_grad():
        two_step = cpu_ext.sfg_interaction(V, enc, None, dec, "scalar", "relu", 1.0, False, "upper", "left", False)
    torch.testing.assert_close(fused, two_step, rtol=1e-5, atol=1e-5)
    ref64 = reference.sfg_logits(ids, deq.double(), offsets, enc.double(), None, dec.double(), "scalar")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = serving.sfg_logits_int8(ids, q, scale_bias, offsets, enc, None, dec, "scalar", backend="cpu")
        torch_bf16 = serving.sfg_logits_int8(ids, q, scale_bias, offsets, enc, None, dec, "scalar", backend="torch")
    assert out.dtype == torch.float32
    assert_close_2x(out, ref64, torch_bf16, "bf16 autocast", floor=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_lookup_int8_backends_agree_and_match_the_dequantised_table(backend, id_dtype):
    field_dims, dim = [13, 1, 40, 6], 5
    q, scale_bias, deq = _quantised(field_dims, dim)
    offsets = offsets_of(field_dims)
    ids = zipf_ids(90, field_dims, dtype=id_dtype)
    out = serving.embedding_lookup_int8(ids, q, scale_bias, offsets, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (90, 4, dim)
    torch.testing.assert_close(out, reference.embedding_lookup(ids, deq.float(), offsets), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bounds_modes(backend):
    field_dims, dim = [6, 4, 9], 4
    n, offsets = 3, offsets_of(field_dims)
    q, scale_bias, deq = _quantised(field_dims, dim)
    enc, dec = torch.randn(n * dim, n * dim) / 4, torch.randn(n, n)
    ids = zipf_ids(20, field_dims)
    bad = ids.clone()
    bad[7, 2], bad[3, 0] = 9, -1
    for fn in (lambda i, m: serving.embedding_lookup_int8(i, q, scale_bias, offsets, m, backend=backend),
               lambda i, m: serving.sfg_logits_int8(i, q, scale_bias, offsets, enc, None, dec, "scalar",
                                                    bounds_check=m, backend=backend)):
        with pytest.raises(IndexError, match="field 0|field 2"):
            fn(bad, "fatal")
        clamped = bad.clone()
        clamped[7, 2], clamped[3, 0] = 8, 5            # each field's last id: its OOV row
        torch.testing.assert_close(fn(bad, "clamp_to_oov"), fn(clamped, "fatal"), rtol=0, atol=0)
        torch.testing.assert_close(fn(ids, "off"), fn(ids, "fatal"), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend):
    field_dims, dim = [5, 3], 4
    q, scale_bias, _ = _quantised(field_dims, dim)
    offsets = offsets_of(field_dims)
    ids = zipf_ids(6, field_dims)
    enc, dec = torch.randn(8, 8), torch.randn(2, 2)

    def logits(**kw):
        a = dict(ids=ids, qweight=q, scale_bias=scale_bias, offsets=offsets, enc_weight=enc, enc_bias=None,
                 dec_weight=dec, kind="scalar", backend=backend)
        a.update(kw)
        return serving.sfg_logits_int8(**a)

    with pytest.raises(TypeError, match="qweight"):
        logits(qweight=q.float())
    with pytest.raises(TypeError, match="scale_bias"):
        logits(scale_bias=scale_bias.double())
    with pytest.raises(ValueError, match="scale_bias"):
        logits(scale_bias=scale_bias[:-1])
    with pytest.raises(TypeError, match="ids"):
        logits(ids=ids.float())
    with pytest.raises(TypeError, match="offsets"):
        logits(offsets=offsets.int())
    with pytest.raises(ValueError, match="enc_weight"):
        logits(enc_weight=torch.randn(8, 7))
    with pytest.raises(ValueError, match="dec_weight"):
        logits(dec_weight=torch.randn(3, 3))
    with pytest.raises(ValueError, match="backend"):
        logits(backend="triton")
    with pytest.raises(ValueError, match="bounds_check"):
        serving.embedding_lookup_int8(ids, q, scale_bias, offsets, "wrap", backend=backend)


@needs_ext
def test_extension_refuses_a_uint8_table_without_scale_bias_and_the_converse():
    from sfg_fast import _C
    field_dims, dim = [5, 3], 4
    q, scale_bias, deq = _quantised(field_dims, dim)
    offsets, ids = offsets_of(field_dims), zipf_ids(6, field_dims)
    common = (None, None, None, "identity", "relu", 1.0, False, "upper", "left", False, "fatal", 4)
    with pytest.raises(ValueError, match="scale_bias"):
        _C.sfg_logits(ids, q, offsets, *common)
    with pytest.raises(ValueError, match="scale_bias"):
        _C.sfg_logits(ids, deq.float(), offsets, *common, scale_bias=scale_bias)
    with pytest.raises(ValueError, match="scale_bias"):
        _C.sfg_logits(ids, q, offsets, *common, scale_bias=scale_bias[:-1])
    with pytest.raises(TypeError, match="scale_bias"):
        _C.sfg_logits(ids, q, offsets, *common, scale_bias=scale_bias.double())


def test_cpu_backend_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_C", None)
    field_dims = [5, 3]
    q, scale_bias, _ = _quantised(field_dims, 4)
    ids, offsets = zipf_ids(4, field_dims), offsets_of(field_dims)
    with pytest.raises(BackendUnavailableError, match="cpu"):
        serving.embedding_lookup_int8(ids, q, scale_bias, offsets, backend="cpu")
    # auto falls back to the torch twin
    out = serving.embedding_lookup_int8(ids, q, scale_bias, offsets)
    assert out.shape == (4, 2, 4)


MODEL_NAMES = ["fm", "fwfm", "fmfm", "deepfm", "ipnn", "xdeepfm", "dcnv2", "crossnet"]


@pytest.mark.parametrize("generative", [True, False])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_quantised_model_equals_the_float_model_on_the_dequantised_table(name, generative):
    torch.manual_seed(0)
    field_dims = [20, 7, 33, 4]
    model = models.build(name, field_dims, embedding_dim=8, generative=generative, init_std=0.1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    served = serving.quantize_model(model)
    assert isinstance(served.embedding, serving.QuantizedFieldEmbedding)
    assert not served.training and not any(p.requires_grad for p in served.parameters())
    # the source model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    # first-order tables (D = 1) stay float
    assert not any(isinstance(m, serving.QuantizedFieldEmbedding) and m.embedding_dim == 1 for m in served.modules())
    ids = zipf_ids(64, field_dims)
    with torch.no_grad():
        model.embedding.weight.copy_(serving.dequantize_rowwise_int8(served.embedding.qweight,
                                                                     served.embedding.scale_bias))
        expected = model(ids)
        got = served(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_quantised_model_state_dict_round_trip_and_memory():
    field_dims = [50, 9, 120]
    model = models.build("fwfm", field_dims, embedding_dim=16, init_std=0.1)
    served = serving.quantize_model(model)
    state = served.state_dict()
    assert state["embedding.qweight"].dtype == torch.uint8
    fresh = serving.quantize_model(models.build("fwfm", field_dims, embedding_dim=16, init_std=0.1))
    fresh.load_state_dict(state)
    ids = zipf_ids(32, field_dims)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), served(ids), rtol=0, atol=0)
    emb = served.embedding
    float_bytes = model.embedding.weight.numel() * 4
    int8_bytes = emb.qweight.numel() + emb.scale_bias.numel() * 4
    assert int8_bytes * 2.5 < float_bytes                 # 24 bytes a row instead of 64 at D = 16


def test_quantised_embedding_clamp_to_oov_counts_and_remaps():
    field_dims = [5, 3]
    model = models.build("fm", field_dims, embedding_dim=4, bounds_check="clamp_to_oov", init_std=0.1)
    served = serving.quantize_model(model)
    ids = torch.tensor([[1, 2], [7, 1], [0, -3]])
    fixed = torch.tensor([[1, 2], [4, 1], [0, 2]])
    with torch.no_grad():
        out = served(ids)
        assert served.embedding.num_clamped == 2
        torch.testing.assert_close(out, served(fixed), rtol=0, atol=0)


def test_quantize_model_errors():
    with pytest.raises(TypeError, match="model"):
        serving.quantize_model("fm")
    with pytest.raises(ValueError, match="FieldEmbedding"):
        serving.quantize_model(torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match="backend"):
        serving.quantize_model(models.build("fm", [3, 4], embedding_dim=4), backend="gpu")


@pytest.mark.parametrize("name", ["fwfm", "deepfm"])
def test_quantised_model_compiles_fullgraph_and_exports(name):
    """The int8 ops are torch.library custom ops with fake implementations: a served model traces with
    no graph break, and the compiled model still raises on a bad id (the check runs inside the op)."""
    torch._dynamo.reset()
    field_dims = [20, 7, 33, 4]
    served = serving.quantize_model(models.build(name, field_dims, embedding_dim=8, init_std=0.1))
    ids = zipf_ids(16, field_dims)
    with torch.no_grad():
        eager = served(ids)
        compiled = torch.compile(served, fullgraph=True)
        torch.testing.assert_close(compiled(ids), eager, rtol=1e-5, atol=1e-6)
        bad = ids.clone()
        bad[3, 1] = 7
        with pytest.raises(IndexError, match="field 1"):
            compiled(bad)
        exported = torch.export.export(served, (ids,))
        torch.testing.assert_close(exported.module()(ids), eager, rtol=1e-5, atol=1e-6)


def test_int8_ops_are_inference_only():
    """Backward through the int8 ops is refused by name (they have no gradient formula)."""
    field_dims = [5, 3]
    q, scale_bias, _ = _quantised(field_dims, 4)
    enc = torch.randn(8, 8, requires_grad=True)
    out = serving.sfg_logits_int8(zipf_ids(4, field_dims), q, scale_bias, offsets_of(field_dims), enc, None,
                                  torch.randn(2, 2), "scalar")
    with pytest.raises(RuntimeError, match="sfg_logits_int8"):
        out.sum().backward()


def test_save_and_load_quantized(tmp_path):
    field_dims = [30, 4, 11]
    model = models.build("fmfm", field_dims, embedding_dim=6, init_std=0.1)
    with pytest.raises(ValueError, match="quantize_model"):
        serving.save_quantized(model, str(tmp_path / "float.pt"))
    served = serving.quantize_model(model)
    path = str(tmp_path / "m.pt")
    serving.save_quantized(served, path)
    back = serving.load_quantized(path, backend="torch")
    assert isinstance(back.embedding, serving.QuantizedFieldEmbedding) and back.embedding.backend == "torch"
    assert not back.training and not any(p.requires_grad for p in back.parameters())
    ids = zipf_ids(40, field_dims)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), served(ids), rtol=1e-6, atol=1e-6)
    torch.save({"format": "something else"}, str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="serving"):
        serving.load_quantized(str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError):
        serving.load_quantized(str(tmp_path / "missing.pt"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fwfm", "dcnv2"])
def test_quantised_model_on_a_gpu_runs_the_torch_twin(name):
    """On CUDA tensors the int8 ops run the torch twin (auto), and agree with the CPU extension's result."""
    field_dims = [200, 7, 33, 4]
    model = models.build(name, field_dims, embedding_dim=16, init_std=0.1)
    served_cpu = serving.quantize_model(model)
    served_gpu = serving.quantize_model(model.cuda())
    assert served_gpu.embedding.qweight.is_cuda
    # backend "cpu" refuses CUDA tensors; without the extension (a GPU check runs these tests while it
    # builds) it is refused for that reason first
    with pytest.raises(BackendUnavailableError, match="CPU" if cpu_ext.available() else "not built"):
        serving.QuantizedFieldEmbedding.from_embedding(model.embedding, backend="cpu")(
            zipf_ids(4, field_dims).cuda())
    ids = zipf_ids(512, field_dims)
    with torch.no_grad():
        torch.testing.assert_close(served_gpu(ids.cuda()).cpu(), served_cpu(ids), rtol=1e-4, atol=1e-4)


def test_quantiser_row_blocks_give_the_one_block_result(monkeypatch):
    """The quantiser works in row blocks (bounded temporaries); block edges change nothing."""
    table = torch.randn(1000, 7) * torch.rand(1000, 1) * 3
    q_one, sb_one = serving.quantize_rowwise_int8(table)
    monkeypatch.setattr(cpu_ext, "_QUANTISE_BLOCK_ELEMENTS", 7 * 33)      # 33-row blocks, a ragged last one
    q, sb = serving.quantize_rowwise_int8(table)
    assert torch.equal(q, q_one) and torch.equal(sb, sb_one)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_quantised_bf16_and_fp64_models_keep_their_dtype(name, dtype, backend):
    """A bf16 / fp64 model's serving copy looks up V in the model's dtype: it equals the float model on
    the dequantised table (cast to that dtype), and save/load keeps the dtype."""
    torch.manual_seed(0)
    field_dims = [20, 7, 33, 4]
    model = models.build(name, field_dims, embedding_dim=8, init_std=0.1).to(dtype).eval()
    served = serving.quantize_model(model, backend=backend)
    assert served.embedding.dtype == dtype and served.embedding.scale_bias.dtype == torch.float32
    ids = zipf_ids(32, field_dims)
    with torch.no_grad():
        deq = serving.dequantize_rowwise_int8(served.embedding.qweight, served.embedding.scale_bias)
        model.embedding.weight.copy_(deq.to(dtype))
        expected = model(ids)
        got = served(ids)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_module_dtype_casts_keep_the_scales_float32(tmp_path):
    model = models.build("fwfm", [20, 7, 33], embedding_dim=8, init_std=0.1)
    served = serving.quantize_model(model)
    scales = served.embedding.scale_bias.clone()
    served.double()
    assert served.embedding.dtype == torch.float64 and torch.equal(served.embedding.scale_bias, scales)
    ids = zipf_ids(16, [20, 7, 33])
    with torch.no_grad():
        assert served(ids).dtype == torch.float64
    path = str(tmp_path / "m.pt")
    serving.save_quantized(served, path)
    back = serving.load_quantized(path)
    assert back.embedding.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(back(ids), served(ids), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_mode_never_wraps_a_negative_id(backend):
    """bounds_check="off" trusts ids, but a negative id must still fail, never read another field's row."""
    q, scale_bias, _ = _quantised([5, 6], 4)
    with pytest.raises(IndexError):
        serving.embedding_lookup_int8(torch.tensor([[-1, 0]]), q, scale_bias, offsets_of([5, 6]), "off",
                                      backend=backend)


def test_messages_name_qweight_and_meta_tensors_trace():
    field_dims = [5, 6]
    q, scale_bias, _ = _quantised(field_dims, 4)
    ids, offsets = zipf_ids(3, field_dims), offsets_of(field_dims)
    with pytest.raises(ValueError, match="qweight"):
        serving.embedding_lookup_int8(ids.to("meta"), q, scale_bias, offsets)
    with pytest.raises(ValueError, match="qweight rows"):
        serving.embedding_lookup_int8(ids, q, scale_bias, torch.tensor([0, 50]))
    meta = [t.to("meta") for t in (ids, q, scale_bias, offsets)]
    out = serving.sfg_logits_int8(*meta, torch.randn(8, 8, device="meta"), None, None, "identity", backend="torch")
    assert out.device.type == "meta" and out.shape == (3,)


def test_load_quantized_refuses_malformed_files(tmp_path):
    field_dims = [30, 4, 11]
    served = serving.quantize_model(models.build("fwfm", field_dims, embedding_dim=6, init_std=0.1))
    good = str(tmp_path / "good.pt")
    serving.save_quantized(served, good)
    blob = torch.load(good, weights_only=True)

    def write(name, **change):
        b = dict(blob)
        b.update(change)
        for k in [k for k, v in change.items() if v is None]:
            del b[k]
        path = str(tmp_path / name)
        torch.save(b, path)
        return path

    float_codes = dict(blob["state"])
    float_codes["embedding.qweight"] = float_codes["embedding.qweight"].float() * 1.5
    nan_scale = type(blob["state"])(blob["state"])
    nan_scale["embedding.scale_bias"] = nan_scale["embedding.scale_bias"].clone()
    nan_scale["embedding.scale_bias"][3, 0] = float("nan")
    cases = {
        "no-state.pt": dict(state=None),
        "config-list.pt": dict(model_config=[1, 2]),
        "unknown-hparam.pt": dict(model_config=dict(blob["model_config"], not_a_param=3)),
        "other-dims.pt": dict(field_dims=[30, 4, 12]),
        "float-codes.pt": dict(state=float_codes),
        "extra-key.pt": dict(state=dict(blob["state"], extra=torch.zeros(1))),
        # same total rows, so every shape fits: the tables' recorded field_dims tell them apart
        "permuted-dims.pt": dict(field_dims=[4, 30, 11]),
        "nan-scale.pt": dict(state=nan_scale),
    }
    for name, change in cases.items():
        with pytest.raises(ValueError, match=name):
            serving.load_quantized(write(name, **change))


@pytest.mark.parametrize("name,generative", [("fwfm", False), ("deepfm", True)])
def test_exported_program_runs_where_the_extension_is_missing(monkeypatch, name, generative):
    """The ops resolve backend "auto" when they run: a program exported where the extension exists runs
    on the torch twin where it does not (the same numbers). DeepFM adds the float first-order lookup and
    the interaction on ready embeddings, which must keep "auto" in the program too."""
    field_dims = [20, 7, 33, 4]
    extra = dict(hidden_units=(8,)) if name == "deepfm" else {}
    served = serving.quantize_model(models.build(name, field_dims, embedding_dim=8, init_std=0.1,
                                                 generative=generative, **extra))
    ids = zipf_ids(16, field_dims)
    program = torch.export.export(served, (ids,))
    baked = [a for node in program.graph.nodes if node.op == "call_function" and "sfg_fast" in str(node.target)
             for a in node.args if isinstance(a, str) and a.split("@")[0] in ("cpu", "triton", "cuda")]
    assert baked == [], f"backends fixed at export time: {baked}"
    with torch.no_grad():
        expected = served(ids)
        calls = []
        real = serving._gather_dequantised
        monkeypatch.setattr(serving, "_gather_dequantised", lambda *a: calls.append(1) or real(*a))
        torch.testing.assert_close(program.module()(ids), expected, rtol=1e-5, atol=1e-6)
        assert calls == [] or not cpu_ext.available()            # with the extension: its kernel ran
        monkeypatch.setattr(cpu_ext, "available", lambda: False)  # the serving ops now see no extension
        torch.testing.assert_close(program.module()(ids), expected, rtol=1e-5, atol=1e-6)
        assert calls                                             # ... and ran the torch twin
        with pytest.raises(BackendUnavailableError, match="cpu"):
            serving.quantize_model(models.build("fm", [3, 4], embedding_dim=4), backend="cpu")(zipf_ids(2, [3, 4]))


def test_quantiser_input_errors():
    with pytest.raises(ValueError, match="column"):
        serving.quantize_rowwise_int8(torch.zeros(4, 0))
    with pytest.raises(ValueError, match="meta"):
        serving.quantize_rowwise_int8(torch.zeros(4, 3, device="meta"))
    with pytest.raises(TypeError, match="weight"):        # a dtype: TypeError, as the house rule
        serving.quantize_rowwise_int8(torch.zeros(4, 3, dtype=torch.int32))
    q, sb = serving.quantize_rowwise_int8(torch.randn(4, 3))
    with pytest.raises(TypeError, match="qweight"):
        serving.dequantize_rowwise_int8(q.float(), sb)
    with pytest.raises(ValueError, match="scale_bias"):     # a shape: ValueError
        serving.dequantize_rowwise_int8(q, sb[:3])


def test_model_trained_with_the_fused_sparse_table_quantises(tmp_path):
    """A model whose table is an optim.FusedFieldEmbedding (the fused CPU training path) quantises like
    a FieldEmbedding one, after a training step, and round-trips through save/load."""
    from sfg_fast import functional as SF
    from sfg_fast.optim import FusedFieldEmbedding

    field_dims = [30, 4, 11]
    table = FusedFieldEmbedding(field_dims, 8, optimizer="adagrad", lr=0.1, init_std=0.1)
    model = models.build("fwfm", field_dims, embedding_dim=8, embedding=table)
    ids = zipf_ids(64, field_dims)
    SF.bce_with_logits(model(ids), torch.rand(64)).backward()      # the table updates itself in backward
    served = serving.quantize_model(model)
    assert isinstance(served.embedding, serving.QuantizedFieldEmbedding)
    assert serving.table_bytes(model)["float"] == (sum(field_dims) * 8 + sum(field_dims)) * 4
    with torch.no_grad():
        model.embedding.weight.copy_(serving.dequantize_rowwise_int8(served.embedding.qweight,
                                                                     served.embedding.scale_bias))
        torch.testing.assert_close(served(ids), model(ids), rtol=0, atol=0)
        path = str(tmp_path / "m.pt")
        serving.save_quantized(served, path)
        torch.testing.assert_close(serving.load_quantized(path)(ids), served(ids), rtol=0, atol=0)


def test_embedding_fused_model_serves_on_plain_tables_and_exports(tmp_path):
    """embedding="fused" makes the first-order table fused too: the int8 copy serves it as a plain float
    FieldEmbedding (no optimizer, no data-dependent checks), so it saves, reloads and exports."""
    from sfg_fast import functional as SF
    from sfg_fast.optim import FusedFieldEmbedding

    field_dims = [30, 4, 11]
    model = models.build("fwfm", field_dims, embedding_dim=8, embedding="fused", embedding_lr=0.1, init_std=0.1)
    assert isinstance(model.linear.table, FusedFieldEmbedding)
    ids = zipf_ids(64, field_dims)
    SF.bce_with_logits(model(ids), torch.rand(64)).backward()
    served = serving.quantize_model(model)
    assert not any(isinstance(m, FusedFieldEmbedding) for m in served.modules())
    assert isinstance(model.linear.table, FusedFieldEmbedding)              # the trained model is untouched
    assert torch.equal(served.linear.table.weight, model.linear.table.weight)
    path = str(tmp_path / "m.pt")
    serving.save_quantized(served, path)
    loaded = serving.load_quantized(path)
    assert not any(isinstance(m, FusedFieldEmbedding) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), served(ids), rtol=0, atol=0)
        program = torch.export.export(loaded, (ids,))
        torch.testing.assert_close(program.module()(ids), served(ids), rtol=0, atol=0)


def test_serving_copy_of_a_fused_table_stays_on_its_device_and_draws_no_random_numbers():
    from sfg_fast.optim import FusedFieldEmbedding
    from sfg_fast.serving import _plain_table

    with torch.device("meta"):
        table = FusedFieldEmbedding([3, 5], 1, optimizer="sgd", backend="torch")
    state = torch.random.get_rng_state()
    plain = _plain_table(table)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert plain.weight.device.type == plain.offsets.device.type == plain.field_sizes.device.type == "meta"
    assert plain.backend == "torch" and not plain.weight.requires_grad


@pytest.mark.parametrize("rows", [0, 1, 3])
def test_export_of_a_tiny_split_keeps_the_batch_dynamic(rows):
    """sfg-fast quantize exports on up to 64 test rows; a split of one row would trace a program that
    refuses every other batch size, and an empty one could not trace."""
    from sfg_fast.train import export_dynamic_batch
    field_dims = [5, 7, 3]
    served = serving.quantize_model(models.build("fm", field_dims, embedding_dim=4, init_std=0.1))
    ids = zipf_ids(9, field_dims)
    program = export_dynamic_batch(served, ids[:rows])
    with torch.no_grad():
        for batch in (ids[:1], ids):
            torch.testing.assert_close(program.module()(batch), served(batch), rtol=1e-5, atol=1e-6)


def test_int8_helpers_raise_typeerror_for_dtypes_and_valueerror_for_shapes():
    """As the house rule and embedding_lookup_int8: a wrong dtype is a TypeError, a wrong shape a ValueError
    (the quantiser called a non-float weight a ValueError, the dequantiser a wrong scale_bias shape a TypeError)."""
    from sfg_fast.ops import cpu_ext
    with pytest.raises(TypeError, match="weight must be a floating"):
        cpu_ext.quantize_rowwise_int8(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="got shape \\[6\\]"):
        cpu_ext.quantize_rowwise_int8(torch.zeros(6))
    q, scale_bias = cpu_ext.quantize_rowwise_int8(torch.randn(3, 2))
    with pytest.raises(ValueError, match="scale_bias must have shape"):
        cpu_ext.dequantize_rowwise_int8(q, scale_bias[:2])
    with pytest.raises(TypeError, match="scale_bias must be a float32"):
        cpu_ext.dequantize_rowwise_int8(q, scale_bias.double())
    with pytest.raises(ValueError, match="qweight must be"):
        cpu_ext.dequantize_rowwise_int8(q.flatten(), scale_bias)


def test_star_import_of_the_layers_exports_the_layers_only():
    namespace = {}
    exec("from sfg_fast.nn import *", namespace)
    exported = {k for k in namespace if not k.startswith("__")}
    assert {"FieldEmbedding", "SFGInteraction", "CIN"} <= exported
    assert not exported & {"F", "SF", "C", "nn", "torch", "Optional"}    # a user's F stays theirs
