"""Drop-in composition: torch.library custom ops, torch.compile(fullgraph=True) and autocast.

CPU runs the "torch" backend (plain PyTorch, traced by Dynamo) and the "triton" backend through the
interpreter (opaque kernels behind the sfg_fast:: custom ops). Inductor compiles take ~15-60 s on
this machine, so one model goes through Inductor (slow); the others use the "aot_eager" backend,
which runs the same Dynamo capture, fake-tensor propagation and AOTAutograd partitioning.
"""
import pytest
import torch

import sfg_fast.functional as SF
from sfg_fast import library, models
from sfg_fast import ops as sfg_ops
from sfg_fast.optim import GRAPH_ROW_UPDATE
from tests.helpers import offsets_of

# Triton runs natively on a GPU and through the interpreter on CPU; the torch backend stays on CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIELD_DIMS = [7, 5, 11, 3]
D = 4
B = 6
ALL_MODELS = ["fm", "fwfm", "fmfm", "deepfm", "ipnn", "xdeepfm", "dcnv2", "crossnet"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _ids(batch=B, dtype=torch.int64, device="cpu"):
    return torch.stack([torch.randint(0, d, (batch,)) for d in FIELD_DIMS], 1).to(dtype).to(device)


def _model(name, backend="torch", **extra):
    kw = {}
    if name in ("deepfm", "ipnn", "xdeepfm", "dcnv2"):
        kw["hidden_units"] = (8,)
    if name == "xdeepfm":
        kw["cin_layer_units"] = (4,)
    kw.update(extra)
    torch.manual_seed(1)
    model = models.build(name, FIELD_DIMS, embedding_dim=D, generative=True, backend=backend, **kw)
    with torch.no_grad():   # larger weights than the 1e-4 default so products are not ~0
        model.embedding.weight.normal_(0, 0.5)
    return model.to(_device(backend))


def _step(model, ids, labels, backend):
    logits = model(ids)
    # the extension has no loss kernel: a model on it pairs with the factored loss, as the trainer's "auto"
    return logits, SF.bce_with_logits(logits, labels, backend="torch" if backend == "cpu" else backend)


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _compare_compiled(name, backend, compile_backend):
    model = _model(name, backend)
    device = _device(backend)
    ids, labels = _ids(device=device), torch.rand(B, device=device)
    logits, loss = _step(model, ids, labels, backend)
    loss.backward()
    eager = _grads(model)
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(lambda i, y: _step(model, i, y, backend), fullgraph=True, backend=compile_backend)
    logits_c, loss_c = compiled(ids, labels)
    loss_c.backward()
    got = _grads(model)
    torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    assert set(got) == set(eager) and len(got) > 0
    for key in eager:
        torch.testing.assert_close(got[key], eager[key], rtol=1e-4, atol=1e-6, msg=f"grad of {key}")


# ---------------------------------------------------------------------------------------------
# the custom ops themselves


def _op_cases(device):
    n, width = len(FIELD_DIMS), len(FIELD_DIMS) * D
    rows = sum(FIELD_DIMS)
    offsets = offsets_of(FIELD_DIMS).to(device)

    def r(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)
    return {
        "embedding_lookup": lambda: (_ids(3, device=device), r(rows, D), offsets),
        "sfg_encode": lambda: (r(3, n, D), r(width, width), r(width), "relu", 0.5, True),
        "pairwise_decode": lambda: (r(3, n, D), r(3, n, D), r(n, n, D), "vector", "upper", "left", False),
        "pairwise_products": lambda: (r(3, n, D), r(3, n, D), "offdiag", "right", False),
        "generative_cross": lambda: (r(3, width), r(3, width), r(width, width), r(width)),
        "bce_with_logits": lambda: (r(3), torch.rand(3, device=device), "mean"),
        "sfg_logits": lambda: (_ids(3, device=device), r(rows, D), offsets, r(width, width), None,
                               r(n, n, D, D), "matrix", "tanh", 1.5, False, "upper", "right", False),
        "sfg_interaction": lambda: (r(3, n, D), r(width, width), r(width), r(n, n, D), "vector", "relu", 0.7, True,
                                    "upper", "left", False),
    }


def _cpu_extension_built() -> bool:
    from sfg_fast.ops import cpu_ext
    return cpu_ext.available()


OP_CASES = {"torch": _op_cases("cpu"), "triton": _op_cases(TRITON_DEVICE), "cpu": _op_cases("cpu")}
# the compiled CPU extension's ops (sfg_fast._C; skipped when it is not built)
CPU_OPS = ("embedding_lookup", "sfg_logits", "sfg_interaction")
OP_PARAMS = [pytest.param("torch", name, id=f"torch-{name}") for name in OP_CASES["torch"]] + [
    pytest.param("triton", name, id=f"triton-{name}", marks=pytest.mark.interpreter)
    for name in OP_CASES["triton"] if name != "pairwise_products"] + [
    pytest.param("cpu", name, id=f"cpu-{name}",
                 marks=pytest.mark.skipif(not _cpu_extension_built(), reason="sfg_fast._C is not built"))
    for name in CPU_OPS]


@pytest.mark.parametrize("backend,name", OP_PARAMS)
def test_opcheck(backend, name):
    """Schema, fake tensor, autograd registration and AOT dispatch of every custom op."""
    torch.library.opcheck(library.op(name), OP_CASES[backend][name]() + (backend,))


@pytest.mark.parametrize("backend,name", OP_PARAMS)
def test_custom_op_matches_backend(backend, name):
    """The custom op returns the backend's own forward and gradients (fake and real agree on dtype)."""
    args = OP_CASES[backend][name]()
    direct_args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                   for a in args]
    out = library.op(name)(*args, backend)
    sfg_ops.load_backends()
    impl = library._backend_impl(backend, name)
    expected = impl(*direct_args)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    checked = 0
    for a, b in zip(args, direct_args):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("backend,name", OP_PARAMS)
def test_real_outputs_have_the_fake_strides(backend, name):
    """Inductor asserts that a custom op's real outputs have the strides its fake kernel promised
    (a mismatch failed torch.compile of the fused matrix/vector decoders on an H200): forward and
    backward outputs must be laid out as the fakes are (dense, like the inputs)."""
    args = OP_CASES[backend][name]()
    out = library.op(name)(*args, backend)
    assert out.stride() == torch.empty_like(out, memory_format=torch.contiguous_format).stride()
    spec = library.OPS[name]
    needs = [isinstance(args[p], torch.Tensor) and args[p].is_floating_point() for p in spec.differentiable]
    grads = library.backward_op(name)(torch.randn_like(out), *args, backend, needs)
    for pos, g, need in zip(spec.differentiable, grads, needs):
        if need:
            assert g.shape == args[pos].shape and g.stride() == torch.empty_like(args[pos]).stride(), \
                f"d{spec.arg_names[pos]}: strides {g.stride()} != {torch.empty_like(args[pos]).stride()}"


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_custom_ops_called_directly_check_shapes_by_name(backend):
    """torch.ops.sfg_fast.* is public: a call that bypasses sfg_fast.functional gets its shape checks
    (a [6, 6] encoder for N*D = 9 read past the weight's end on the kernels' raw pointers), eagerly and
    while tracing (the fake)."""
    if backend == "cpu":
        pytest.importorskip("sfg_fast._C")
    V, w, dec = torch.randn(2, 3, 3), torch.randn(6, 6), torch.randn(3, 3, 3)
    args = (V, w, None, dec, "vector", "gelu", 1.0, False, "upper", "left", True, backend)
    with pytest.raises(ValueError, match=r"enc_weight must have shape \[N\*D, N\*D\]=\[9, 9\]"):
        library.op("sfg_interaction")(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="enc_weight must have shape"):
        library.op("sfg_interaction")(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    with pytest.raises(ValueError, match="offsets must have shape"):
        library.op("embedding_lookup")(_ids(3), torch.randn(sum(FIELD_DIMS), D), torch.zeros(2, dtype=torch.int64),
                                       backend)


def test_opcheck_validation_ops():
    offsets = offsets_of(FIELD_DIMS)
    torch.library.opcheck(library.checked_ids, (_ids(3), offsets, sum(FIELD_DIMS), "fatal"))
    torch.library.opcheck(library.checked_ids, (_ids(3), offsets, sum(FIELD_DIMS), "clamp_to_oov"))
    torch.library.opcheck(library.checked_labels, (torch.rand(5, requires_grad=True),))


def test_fake_dtype_follows_promotion():
    """bf16 activations meeting fp32 weights promote to fp32 (what the kernels return under autocast)."""
    n, width = len(FIELD_DIMS), len(FIELD_DIMS) * D
    with torch._subclasses.fake_tensor.FakeTensorMode():
        V = torch.empty(2, n, D, dtype=torch.bfloat16)
        w = torch.empty(width, width)
        assert library.op("sfg_encode")(V, w, None, "relu", 1.0, False, "torch").dtype == torch.float32
        loss = library.op("bce_with_logits")(torch.empty(2, dtype=torch.bfloat16), torch.empty(2), "none", "torch")
        assert loss.dtype == torch.float32 and loss.shape == (2,)


# ---------------------------------------------------------------------------------------------
# whole models under torch.compile(fullgraph=True)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_traces_without_graph_break(name, backend):
    """fullgraph=True raises on any graph break; the "eager" backend keeps this to Dynamo alone. The
    literal reference compiles too: its id checks run inside the graph and its pair indices come from
    shapes alone."""
    model = _model(name, backend)
    ids, labels = _ids(), torch.rand(B)
    compiled = torch.compile(lambda i, y: _step(model, i, y, backend), fullgraph=True, backend="eager")
    logits_c, loss_c = compiled(ids, labels)
    logits, loss = _step(model, ids, labels, backend)
    torch.testing.assert_close(logits_c, logits)
    torch.testing.assert_close(loss_c, loss)


@pytest.mark.skipif(not _cpu_extension_built(), reason="sfg_fast._C is not built")
@pytest.mark.parametrize("name", ["fwfm", "fmfm"])
def test_compiled_matches_eager_cpu_extension(name):
    """backend="cpu": the C++ lookup and fused interaction as custom ops in the graph: fullgraph capture,
    the same logits, loss and gradients as eager."""
    _compare_compiled(name, "cpu", "aot_eager")


def test_auto_compiles_the_factored_ops_on_cpu(monkeypatch):
    """While compiling on CPU, backend="auto" takes the factored torch ops, which Inductor compiles and
    fuses (the extension's kernels would stay opaque ops whose compiled backward recomputes the forward:
    slower, bench_train-20261128T194128). Eager "auto" and torch.export keep the extension;
    SFG_FAST_BACKEND still rules."""
    from sfg_fast._backend import resolve

    def ops_in_graph():
        seen = []

        def backend(gm, inputs):
            seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward
        torch._dynamo.reset()
        model = _model("fwfm", backend="auto")
        torch.compile(model, fullgraph=True, backend=backend)(_ids())
        return [t for t in seen if "sfg_fast" in t]

    monkeypatch.delenv("SFG_FAST_BACKEND", raising=False)
    found = ops_in_graph()
    assert found and all("checked_ids" in t for t in found), found     # the id check alone
    if _cpu_extension_built():
        assert resolve("auto", "sfg_interaction", torch.device("cpu")) == "cpu"
        # an exported program is not compiled further: it keeps the extension's kernels
        program = torch.export.export(_model("fwfm", backend="auto"), (_ids(),))
        assert any("sfg_interaction" in str(n.target) for n in program.graph.nodes)
        monkeypatch.setenv("SFG_FAST_BACKEND", "cpu")
        assert any("sfg_interaction" in t for t in ops_in_graph())


@pytest.mark.parametrize("name", ["fm", "fmfm", "dcnv2"])
def test_compiled_matches_eager_torch_backend(name):
    _compare_compiled(name, "torch", "aot_eager")


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["fm", "fmfm", "dcnv2"])
def test_compiled_matches_eager_triton_backend(name):
    """Opaque Triton kernels inside one graph: forward, loss and every parameter gradient."""
    _compare_compiled(name, "triton", "aot_eager")


@pytest.mark.slow
def test_inductor_matches_eager():
    """The default backend (Inductor, C++ codegen on CPU) on SFG-FM: one graph, same numbers."""
    _compare_compiled("fm", "torch", "inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fm", "dcnv2"])
def test_inductor_triton_backend_on_gpu(name):
    """Inductor (Triton codegen) around the opaque sfg_fast kernels on a GPU."""
    _compare_compiled(name, "triton", "inductor")


@pytest.mark.skipif(not _cpu_extension_built(), reason="sfg_fast._C is not built")
def test_backend_choice_loads_backends_at_trace_time():
    """A first call that is already compiled must not trace module imports (load_backends)."""
    sfg_ops.load_backends()
    saved = sfg_ops._LOADED
    sfg_ops._LOADED = False
    try:
        model = _model("fwfm", backend="cpu")
        ids = _ids()
        out = torch.compile(model, fullgraph=True, backend="eager")(ids)
        assert sfg_ops._LOADED
    finally:
        sfg_ops._LOADED = saved
    torch.testing.assert_close(out, model(ids))


def _ids_with_bad(field, value):
    ids = _ids()
    ids[2, field] = value
    return ids


@pytest.mark.parametrize("backend", ["torch", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_compiled_bounds_check_raises_naming_field(backend):
    model = _model("fm", backend)
    device = _device(backend)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(_ids(device=device))
    with pytest.raises(IndexError, match=r"field 2"):
        compiled(_ids_with_bad(2, FIELD_DIMS[2] + 4).to(device))
    with pytest.raises(IndexError, match=r"field 1"):
        compiled(_ids_with_bad(1, -1).to(device))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_compiled_clamp_to_oov_matches_eager(backend):
    weight = torch.randn(sum(FIELD_DIMS), D)
    offsets = offsets_of(FIELD_DIMS)
    ids = _ids_with_bad(3, 99)

    def lookup(i):
        return SF.embedding_lookup(i, weight, offsets, "clamp_to_oov", backend=backend)
    got = torch.compile(lookup, fullgraph=True, backend="eager")(ids)
    torch.testing.assert_close(got, lookup(ids))
    assert torch.equal(got[2, 3], weight[offsets[3] + FIELD_DIMS[3] - 1])


def test_compiled_label_check_raises():
    compiled = torch.compile(lambda x, y: SF.bce_with_logits(x, y), fullgraph=True, backend="eager")
    logits = torch.randn(4)
    torch.testing.assert_close(compiled(logits, torch.tensor([0.0, 1.0, 0.5, 1.0])),
                               SF.bce_with_logits(logits, torch.tensor([0.0, 1.0, 0.5, 1.0])))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        compiled(logits, torch.tensor([0.0, 2.0, 0.5, 1.0]))
    # a static error under fullgraph stops the trace; without fullgraph Dynamo falls back to eager
    # for that frame, which raises the usual ValueError
    lenient = torch.compile(lambda x, y: SF.bce_with_logits(x, y), backend="eager")
    with pytest.raises(ValueError, match=r"labels must have the shape of logits"):
        lenient(logits, torch.rand(3))


# ---------------------------------------------------------------------------------------------
# autocast


def _autocast_check(name, backend, dtype):
    model = _model(name, backend)
    device = _device(backend)
    ids, labels = _ids(device=device), torch.rand(B, device=device)
    logits32, loss32 = _step(model, ids, labels, backend)
    with torch.autocast(device, dtype=dtype):
        logits, loss = _step(model, ids, labels, backend)
    assert loss.dtype == torch.float32, f"{name}: loss must be computed in fp32, got {loss.dtype}"
    loss.backward()
    grads = _grads(model)
    assert model.embedding.weight.grad is not None
    for key, g in grads.items():
        assert g.dtype == dict(model.named_parameters())[key].dtype
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient of {key}"
    # bf16 keeps 8 bits of mantissa: the mixed-precision loss stays within a few 1e-2 of fp32
    torch.testing.assert_close(loss.detach(), loss32.detach(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(logits.detach().float(), logits32.detach(), rtol=1e-1, atol=1e-1)


def _op_calls(device):
    n, d, b = 3, 4, 2
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(b, n, d, generator=gen).to(device)
    weight = (torch.randn(n * d, n * d, generator=gen) / (n * d) ** 0.5).to(device)
    bias, dec = torch.randn(n * d, generator=gen).to(device), torch.randn(n, n, generator=gen).to(device)
    ids, offsets = torch.tensor([[0, 1, 2], [3, 0, 1]], device=device), torch.tensor([0, 4, 8], device=device)
    table = torch.randn(12, d, generator=gen).to(device)
    x = V.flatten(1)
    return {
        "sfg_encode": lambda be: SF.sfg_encode(V, weight, None, "relu", 1.0, False, backend=be),
        "sfg_encode with bias": lambda be: SF.sfg_encode(V, weight, bias, "relu", 1.0, False, backend=be),
        "pairwise_decode": lambda be: SF.pairwise_decode(V, V, dec, "scalar", backend=be),
        "pairwise_products": lambda be: SF.pairwise_products(V, V, backend=be),
        "generative_cross": lambda be: SF.generative_cross(x, x, weight, bias, backend=be),
        "sfg_interaction": lambda be: SF.sfg_interaction(V, weight, None, None, "identity", symmetric=True,
                                                         backend=be),
        "sfg_logits": lambda be: SF.sfg_logits(ids, table, offsets, weight, None, None, "identity",
                                               symmetric=True, backend=be),
    }


@pytest.mark.parametrize("backend", [
    "reference", "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_extension_built(), reason="sfg_fast._C is not built")),
    pytest.param("triton", marks=pytest.mark.interpreter)])
def test_every_op_returns_its_promoted_dtype_under_autocast(backend):
    """fp32 operands under autocast(bf16) give fp32 outputs on every backend, as the compiled custom ops
    state: torch's autocast GEMMs returned bf16 (the reference too, unless a bias promoted it back), the
    fused kernels fp32."""
    from sfg_fast._backend import BackendUnavailableError
    device = _device(backend)
    ran = []
    for op, call in _op_calls(device).items():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            try:
                out = call(backend)
            except BackendUnavailableError:     # this backend has no kernel for the op
                continue
        assert out.dtype == torch.float32, (op, backend, out.dtype)
        ran.append(op)
    assert ran


@pytest.mark.parametrize("name", ALL_MODELS)
def test_autocast_bf16_every_model(name):
    _autocast_check(name, "torch", torch.bfloat16)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["fm", "dcnv2"])
def test_autocast_bf16_triton_backend(name):
    _autocast_check(name, "triton", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fm", "fmfm", "dcnv2"])
def test_autocast_fp16_triton_backend_on_gpu(name):
    _autocast_check(name, "triton", torch.float16)


@pytest.mark.interpreter
def test_autocast_reaches_the_triton_gemms_under_compile(monkeypatch):
    """A compiled graph runs its custom ops with autocast off, so the caller's autocast state rides in the
    op's backend string: the compiled forward and its backward's recomputation take autocast's half
    operands as the eager op does, and the compiled model matches the eager one under autocast."""
    from sfg_fast.ops import sfg_gemm
    seen = []
    real_forward, real_backward = sfg_gemm.forward, sfg_gemm.backward
    monkeypatch.setattr(sfg_gemm, "forward", lambda plan, *a, **k: seen.append(("fwd", plan.precision))
                        or real_forward(plan, *a, **k))
    monkeypatch.setattr(sfg_gemm, "backward", lambda plan, *a, **k: seen.append(("bwd", plan.precision))
                        or real_backward(plan, *a, **k))
    half = "bf16_rne" if TRITON_DEVICE == "cpu" else "bf16"
    model = _model("fwfm", "triton")
    ids, labels = _ids(device=TRITON_DEVICE), torch.rand(B, device=TRITON_DEVICE)

    def step(i, y):
        with torch.autocast(TRITON_DEVICE, dtype=torch.bfloat16):
            return _step(model, i, y, "triton")
    logits, loss = step(ids, labels)
    loss.backward()
    eager_grads = _grads(model)
    assert seen and {p for _, p in seen} == {half}, seen
    model.zero_grad(set_to_none=True)
    seen.clear()
    logits_c, loss_c = torch.compile(step, fullgraph=True, backend="aot_eager")(ids, labels)
    loss_c.backward()
    assert {kind for kind, _ in seen} == {"fwd", "bwd"} and {p for _, p in seen} == {half}, seen
    torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-5)
    for key, g in _grads(model).items():
        torch.testing.assert_close(g, eager_grads[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
    with torch.autocast(TRITON_DEVICE, dtype=torch.bfloat16, enabled=False):   # autocast off: fp32 again
        seen.clear()
        torch.compile(lambda i: model(i), fullgraph=True, backend="aot_eager")(ids)
    assert seen and {p for _, p in seen} == {"ieee"}, seen


def test_autocast_under_compile():
    model = _model("dcnv2")
    ids, labels = _ids(), torch.rand(B)

    def step(i, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _step(model, i, y, "torch")
    logits_c, loss_c = torch.compile(step, fullgraph=True, backend="aot_eager")(ids, labels)
    logits, loss = step(ids, labels)
    assert loss_c.dtype == torch.float32
    torch.testing.assert_close(loss_c, loss, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["fm", "fwfm", "fmfm", "deepfm", "ipnn", "xdeepfm", "dcnv2", "crossnet"])
def test_dynamic_shapes_compile(name):
    """torch.compile(dynamic=True): the batch and the modules' float attributes (gamma) are traced as
    symbols; every model compiles with no graph break, and forward and gradients match eager at two
    batch sizes on the CPU default backend."""
    torch._dynamo.reset()
    model = _model(name, "auto")
    compiled = torch.compile(lambda i, y: _step(model, i, y, "auto"), fullgraph=True, dynamic=True,
                             backend="aot_eager")
    for batch in (B, 5):
        ids, labels = _ids(batch), torch.rand(batch)
        logits, loss = _step(model, ids, labels, "auto")
        loss.backward()
        eager = _grads(model)
        model.zero_grad(set_to_none=True)
        logits_c, loss_c = compiled(ids, labels)
        loss_c.backward()
        torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_grads(model), eager, rtol=1e-5, atol=1e-6)
        model.zero_grad(set_to_none=True)


def _fused_twins(name, optimizer="rowwise_adagrad", **extra):
    """Two identical models with fused tables (embedding="fused"), on the torch backend: compiled, "auto"
    takes it on CPU too, so eager and compiled steps run the same kernels and must agree bit for bit."""
    from sfg_fast import models as M
    torch.manual_seed(0)
    extra = {"backend": "torch", **extra}
    if name == "deepfm":
        extra = {"hidden_units": (8,), "dropout": 0.0, **extra}
    eager = M.build(name, FIELD_DIMS, D, embedding="fused", embedding_lr=0.05, embedding_optimizer=optimizer,
                    **extra)
    twin = M.build(name, FIELD_DIMS, D, embedding="fused", embedding_lr=0.05, embedding_optimizer=optimizer,
                   **extra)
    twin.load_state_dict(eager.state_dict())
    return eager, twin


def _assert_same_training(eager, twin):
    for a, b in ((eager.embedding, twin.embedding), (eager.linear.table, twin.linear.table)):
        assert a.optimizer.step_count == b.optimizer.step_count
        assert torch.equal(a.weight, b.weight)
        assert a.optimizer.state.keys() == b.optimizer.state.keys()
        for key in a.optimizer.state:
            assert torch.equal(a.optimizer.state[key], b.optimizer.state[key]), key
    for (key, p), q in zip(eager.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), key


def _train_side_by_side(eager, twin, compiled, steps):
    """``steps`` training steps of ``eager`` and of ``twin`` through its compiled wrapper ``compiled``, on
    the same batches, each with a dense Adam on its parameters outside the fused tables."""
    opts = [torch.optim.Adam([p for n, p in m.named_parameters() if "embedding" not in n and "table" not in n])
            for m in (eager, twin)]
    for step in range(steps):
        ids, labels = _ids(), torch.rand(B)
        for model, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            SF.bce_with_logits(model(ids), labels, backend="torch").backward()
            opt.step()


@pytest.mark.parametrize("name,optimizer", [("fwfm", "rowwise_adagrad"), ("fwfm", "adam"), ("fwfm", "sgd"),
                                            ("deepfm", "rowwise_adagrad")])
def test_fused_tables_compile_fullgraph_and_train_like_eager(name, optimizer):
    """embedding="fused" under torch.compile(fullgraph=True): the lookup is the custom op
    sfg_fast::fused_embedding_lookup, whose backward is the mutating op sfg_fast::fused_row_update on the
    table, its row state and its step counter. Three training steps (a dense Adam on the rest) leave the
    tables, their optimizer state and step counts, and every dense parameter bit for bit where eager
    training leaves them, with one compile (the step counter is a tensor, so no step recompiles)."""
    eager, twin = _fused_twins(name, optimizer)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train_side_by_side(eager, twin, compiled, steps=3)
    assert eager.embedding.optimizer.step_count == 3
    assert twin.embedding.weight.grad is None
    _assert_same_training(eager, twin)


def test_fused_lookup_runs_between_graphs_where_torch_cannot_hold_the_update(monkeypatch):
    """torch < 2.13 cannot compile a backward that writes a parameter (GRAPH_ROW_UPDATE is False there):
    the fused lookup then runs eagerly between graphs, trains like eager, and fullgraph=True fails with an
    error naming why."""
    import sfg_fast.optim as O
    monkeypatch.setattr(O, "GRAPH_ROW_UPDATE", False)
    torch._dynamo.reset()
    eager, twin = _fused_twins("fwfm", "adam")
    with pytest.raises(Exception, match="_fused_lookup_between_graphs_before_torch_2_13"):
        torch.compile(twin, fullgraph=True, backend="aot_eager")(_ids())
    torch._dynamo.reset()
    ids = _ids()
    with torch.no_grad():      # inference has no update to keep out: it compiles whole on any torch
        torch.testing.assert_close(torch.compile(twin, fullgraph=True, backend="aot_eager")(ids), eager(ids),
                                   rtol=0, atol=0)
    torch._dynamo.reset()
    _train_side_by_side(eager, twin, torch.compile(twin, backend="aot_eager"), steps=2)
    assert twin.embedding.optimizer.step_count == 2
    _assert_same_training(eager, twin)
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_updates_fused_tables_in_place():
    """Under Inductor the update op runs on the module's own table and state (Inductor re-inplaces the
    functionalised mutation; a copy of the table per step would cost as much as a dense update), and
    trains exactly like eager."""
    import sfg_fast.optim as O
    eager, twin = _fused_twins("fwfm", "adam")
    seen, real = [], O._fused_step
    def spy(optimizer, weight, *args):
        seen.append((weight.data_ptr(), [t.data_ptr() for t in optimizer.state.values()],
                     optimizer._step.data_ptr()))
        return real(optimizer, weight, *args)
    compiled = torch.compile(twin, fullgraph=True)
    for step in range(2):
        ids, labels = _ids(), torch.rand(B)
        SF.bce_with_logits(eager(ids), labels, backend="torch").backward()
        O._fused_step = spy
        try:
            SF.bce_with_logits(compiled(ids), labels, backend="torch").backward()
        finally:
            O._fused_step = real
    own = {(t.weight.data_ptr(), tuple(v.data_ptr() for v in t.optimizer.state.values()), t.optimizer._step.data_ptr())
           for t in (twin.embedding, twin.linear.table)}
    assert len(seen) == 4 and {(w, tuple(st), c) for w, st, c in seen} == own
    _assert_same_training(eager, twin)


def test_fused_table_bounds_checks_inside_a_compiled_graph():
    """The bounds modes of a fused table hold in a graph: "fatal" raises the eager IndexError naming the
    field at run time, and "clamp_to_oov" remaps and counts in a buffer."""
    from sfg_fast.optim import FusedFieldEmbedding
    table = FusedFieldEmbedding(FIELD_DIMS, D)
    compiled = torch.compile(table, fullgraph=True, backend="aot_eager")
    ids = _ids()
    torch.testing.assert_close(compiled(ids), table(ids))
    bad = ids.clone()
    bad[2, 1] = FIELD_DIMS[1]
    with pytest.raises(IndexError, match=r"ids\[:, 1\] \(field 1\) holds id 5"):
        compiled(bad)
    clamping = FusedFieldEmbedding(FIELD_DIMS, D, bounds_check="clamp_to_oov")
    with torch.no_grad():
        clamping.weight.copy_(table.weight)
    out = torch.compile(clamping, fullgraph=True, backend="aot_eager")(bad)
    fixed = bad.clone()
    fixed[2, 1] = FIELD_DIMS[1] - 1
    torch.testing.assert_close(out, table(fixed))
    assert clamping.num_clamped == 1
    assert clamping.state_dict()["_extra_state"]["num_clamped"] == 1


def test_fused_table_state_follows_the_module():
    """The optimizer state moves with the module (.to / .double), where a compiled graph finds it; a table
    moved without its module is refused while tracing (a graph writes the state in place, it cannot move
    it). fullgraph=True surfaces the error; without it Dynamo falls back to eager, which moves the state."""
    from sfg_fast.optim import FusedFieldEmbedding
    table = FusedFieldEmbedding(FIELD_DIMS, D, optimizer="adam").double()
    assert {v.dtype for v in table.optimizer.state.values()} == {torch.float64}
    compiled = torch.compile(table, fullgraph=True, backend="aot_eager")
    compiled(_ids()).sum().backward()
    assert table.optimizer.step_count == 1
    torch._dynamo.reset()
    table.weight.data = table.weight.data.float()     # the table alone changes dtype: its state stays fp64
    compiled = torch.compile(table, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="optimizer state 'exp_avg' is torch.float64 on cpu, the table needs "
                                        "torch.float32"):
        compiled(_ids())
    assert table.optimizer.step_count == 1


def _backward_patterns(fn, steps=2):
    """What eager autograd allows around a table: gradient accumulation, one table looked up twice in one
    loss, retain_graph, two forwards then two backwards."""
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        ids = [torch.stack([torch.randint(0, d, (B,), generator=gen) for d in FIELD_DIMS], 1) for _ in range(2)]
        (fn(ids[0]).square().sum() + fn(ids[1]).square().sum()).backward()
        (fn(ids[0]) * fn(ids[1])).sum().backward()
        loss = fn(ids[0]).square().sum()
        loss.backward(retain_graph=True)
        loss.backward()
        a, b = fn(ids[0]).square().sum(), fn(ids[1]).sum()
        a.backward()
        b.backward()


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_compiled_fused_table_allows_every_backward_pattern_of_eager(kind):
    """Several backwards on one forward's state step the table once each, as in eager mode: the tensors the
    update writes are kept on ctx, not saved for backward (saved tensors are version-checked, and the second
    backward would refuse the table the first one updated)."""
    from sfg_fast.optim import FusedFieldEmbedding
    tables = [FusedFieldEmbedding(FIELD_DIMS, D, optimizer=kind, lr=0.05) for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    _backward_patterns(tables[0])
    # retain_graph through any compiled backward needs torch's donated buffers off (torch's own rule)
    with torch._functorch.config.patch(donated_buffer=False):
        _backward_patterns(torch.compile(tables[1], fullgraph=True, backend="aot_eager"))
    assert tables[0].optimizer.step_count == tables[1].optimizer.step_count == 2 * 8
    assert torch.equal(tables[0].weight, tables[1].weight)
    for key, value in tables[0].optimizer.state.items():
        assert torch.equal(value, tables[1].optimizer.state[key]), key


def test_changing_the_tables_hyper_parameters_does_not_recompile():
    """lr, eps and betas reach the graph's update as a CPU tensor read at run time: a schedule on the
    table's lr trains like eager with one compile (as Python floats every value was a new graph, and
    fullgraph=True failed at the recompile limit)."""
    from sfg_fast.optim import FusedFieldEmbedding
    tables = [FusedFieldEmbedding(FIELD_DIMS, D, optimizer="adam", lr=0.1) for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    compiled = torch.compile(tables[1], fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(10):
            ids = _ids()
            for table in tables:
                table.optimizer.lr = 0.1 * 0.8 ** step
                table.optimizer.betas = (0.9 - 0.01 * step, 0.999)
            tables[0](ids).square().sum().backward()
            compiled(ids).square().sum().backward()
    assert tables[1].optimizer.step_count == 10
    assert torch.equal(tables[0].weight, tables[1].weight)


def test_adagrad_starting_value():
    """initial_accumulator_value: a constructor argument of the table; set on its optimizer before the first
    step it refills the state already built (the state exists from construction on, for compiled graphs);
    an optimizer assigned to the table is prepared for it."""
    from sfg_fast.optim import FusedFieldEmbedding, SparseRowOptimizer
    table = FusedFieldEmbedding(FIELD_DIMS, D, initial_accumulator_value=0.1)
    assert torch.equal(table.optimizer.state["sum"], torch.full((sum(FIELD_DIMS),), 0.1))
    table.optimizer.initial_accumulator_value = 0.25
    assert torch.equal(table.optimizer.state["sum"], torch.full((sum(FIELD_DIMS),), 0.25))
    table.optimizer = SparseRowOptimizer("adagrad", initial_accumulator_value=0.5)
    assert torch.equal(table.optimizer.state["sum"], torch.full((sum(FIELD_DIMS),), 0.5))
    torch.compile(table, fullgraph=True, backend="aot_eager")(_ids()).sum().backward()
    assert table.optimizer.step_count == 1
    before = table.optimizer.state["sum"].clone()
    table.optimizer.initial_accumulator_value = 0.0    # after a step: the state is the run's, left alone
    assert torch.equal(table.optimizer.state["sum"], before)
    with pytest.raises(TypeError, match="optimizer must be a SparseRowOptimizer"):
        table.optimizer = torch.optim.SGD([table.weight], lr=0.1)


def test_functional_fused_lookup_compiles():
    """sfg_fast.optim.fused_embedding_lookup with a prepared optimizer inside a fullgraph-compiled function."""
    from sfg_fast.optim import SparseRowOptimizer, fused_embedding_lookup
    weights = [torch.randn(sum(FIELD_DIMS), D, requires_grad=True) for _ in range(2)]
    weights[1].data.copy_(weights[0].data)
    opts = [SparseRowOptimizer("adam", lr=0.1) for _ in range(2)]
    opts[1].prepare(weights[1])
    offsets = offsets_of(FIELD_DIMS)
    compiled = torch.compile(lambda i, w, o: fused_embedding_lookup(i, w, offsets, o).square().sum(),
                             fullgraph=True, backend="aot_eager")
    for step in range(2):
        ids = _ids()
        fused_embedding_lookup(ids, weights[0], offsets, opts[0]).square().sum().backward()
        compiled(ids, weights[1], opts[1]).backward()
    assert opts[1].step_count == 2
    assert torch.equal(weights[0], weights[1])
    for key in opts[0].state:
        assert torch.equal(opts[0].state[key], opts[1].state[key])


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_fused_table_triton_backend_compiles(kind):
    """The Triton gather and fused update as the graph's lookup and update ops: two compiled steps leave
    the table, its state and its step count where two eager steps do."""
    from sfg_fast.optim import FusedFieldEmbedding
    tables = [FusedFieldEmbedding(FIELD_DIMS, D, optimizer=kind, lr=0.1, backend="triton").to(TRITON_DEVICE)
              for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    # torch < 2.13 (a GPU image's torch 2.11): the lookup runs between graphs (optim.GRAPH_ROW_UPDATE)
    compiled = torch.compile(tables[1], fullgraph=GRAPH_ROW_UPDATE, backend="aot_eager")
    for step in range(2):
        ids = _ids(device=TRITON_DEVICE)
        upstream = torch.randn(B, len(FIELD_DIMS), D, device=TRITON_DEVICE)
        tables[0](ids).backward(upstream)
        compiled(ids).backward(upstream)
    assert tables[1].optimizer.step_count == 2
    assert torch.equal(tables[0].weight, tables[1].weight)
    for key, value in tables[0].optimizer.state.items():
        assert torch.equal(value, tables[1].optimizer.state[key]), key


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adam"])     # one Inductor compile: the GPU tests run under a time limit
def test_inductor_fused_tables_on_gpu(kind):
    """Inductor with the Triton gather and fused update as graph ops on a GPU: the update writes the
    module's own table and state, and (deterministic mode: sorted segment sums, no atomics) three compiled
    steps leave everything bit for bit where three eager steps do."""
    import sfg_fast.optim as O
    from sfg_fast.optim import FusedFieldEmbedding
    tables = [FusedFieldEmbedding(FIELD_DIMS, 16, optimizer=kind, lr=0.05).cuda() for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    seen, real = [], O._fused_step

    def spy(optimizer, weight, *args):
        seen.append((weight.data_ptr(), tuple(t.data_ptr() for t in optimizer.state.values())))
        return real(optimizer, weight, *args)
    compiled = torch.compile(tables[1], fullgraph=GRAPH_ROW_UPDATE)    # torch < 2.13: between graphs
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for step in range(3):
            ids = _ids(batch=64, device="cuda")
            tables[0](ids).square().sum().backward()
            O._fused_step = spy
            try:
                compiled(ids).square().sum().backward()
            finally:
                O._fused_step = real
    finally:
        torch.use_deterministic_algorithms(before)
    own = (tables[1].weight.data_ptr(), tuple(t.data_ptr() for t in tables[1].optimizer.state.values()))
    assert seen == [own] * 3
    assert tables[1].optimizer.step_count == 3
    assert torch.equal(tables[0].weight, tables[1].weight)
    for key, value in tables[0].optimizer.state.items():
        assert torch.equal(value, tables[1].optimizer.state[key]), key


def test_reference_called_directly_keeps_its_checks_under_compile():
    """sfg_fast.reference called straight from a compiled function (not through sfg_fast.functional): its
    id and label checks still run, inside the graph, with the eager errors."""
    from sfg_fast import reference
    weight, offsets = torch.randn(sum(FIELD_DIMS), D), offsets_of(FIELD_DIMS)
    lookup = torch.compile(lambda i: reference.embedding_lookup(i, weight, offsets), fullgraph=True,
                           backend="aot_eager")
    ids = _ids()
    torch.testing.assert_close(lookup(ids), reference.embedding_lookup(ids, weight, offsets))
    with pytest.raises(IndexError, match=r"field 2"):
        lookup(_ids_with_bad(2, FIELD_DIMS[2]))
    loss = torch.compile(lambda x, y: reference.bce_with_logits(x, y), fullgraph=True, backend="aot_eager")
    logits = torch.randn(3)
    torch.testing.assert_close(loss(logits, torch.tensor([0.0, 1.0, 0.5])),
                               reference.bce_with_logits(logits, torch.tensor([0.0, 1.0, 0.5])))
    with pytest.raises(ValueError, match="NaN"):
        loss(logits, torch.tensor([0.0, float("nan"), 0.5]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_checked_ids_of_an_empty_batch(dtype):
    """An empty batch through the in-graph id check: a new tensor (a custom op's output may not alias its
    input), in the dtype the fake promised, for both checking modes."""
    from sfg_fast import library
    offsets = offsets_of(FIELD_DIMS)
    empty = torch.empty(0, len(FIELD_DIMS), dtype=dtype)
    for mode in ("fatal", "clamp_to_oov"):
        got = library.checked_ids(empty, offsets, sum(FIELD_DIMS), mode)
        assert got.shape == empty.shape and got.dtype == dtype
        traced = torch.compile(lambda i: library.checked_ids(i, offsets, sum(FIELD_DIMS), mode), fullgraph=True,
                               backend="aot_eager", dynamic=True)
        assert traced(empty).shape == empty.shape
