"""Triton generative cross layer and bce_with_logits: forward and every gradient against the fp64
reference by the 2x rule (kernel error <= 2 x torch's same-dtype error + a small floor)."""
import pytest
import torch

import sfg_fast.functional as SF
from sfg_fast import reference

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_2x(kernel, ref64, torch_same_dtype, floor):
    bound = 2 * _err(torch_same_dtype, ref64) + floor
    torch.testing.assert_close(kernel.double(), ref64.double(), rtol=0, atol=bound)


def _forward_and_grads(fn, inputs, upstream):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wrt, upstream.to(out.dtype))
    return out, grads


# ---------------------------------------------------------------- generative cross

CROSS_SHAPES = [(1, 3), (2, 2 * 17), (7, 51), (33, 40)]   # K = N * D: B=1, N=2 D=17, N=3 D=17, non-powers of 2


def _cross_inputs(batch, width, bias, dtype=torch.float32):
    x = torch.randn(batch, width, device=DEVICE).to(dtype)
    x_gen = torch.randn(batch, width, device=DEVICE).to(dtype)
    weight = (torch.randn(width, width, device=DEVICE) / width ** 0.5).to(dtype)
    b = torch.randn(width, device=DEVICE).to(dtype) if bias else None
    return [x, x_gen, weight, b]


@pytest.mark.parametrize("batch,width", CROSS_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_cross_forward_and_grads_fp32(batch, width, bias):
    inputs = _cross_inputs(batch, width, bias)
    upstream = torch.randn(batch, width, device=DEVICE)
    ref_out, ref_grads = _forward_and_grads(reference.generative_cross, [t.double() if t is not None else None
                                                                        for t in inputs], upstream.double())
    t_out, t_grads = _forward_and_grads(lambda *a: SF.generative_cross(*a, backend="torch"), inputs, upstream)
    k_out, k_grads = _forward_and_grads(lambda *a: SF.generative_cross(*a, backend="triton"), inputs, upstream)
    assert k_out.dtype == torch.float32
    assert_2x(k_out, ref_out, t_out, floor=1e-6)
    assert len(k_grads) == len(ref_grads) == (4 if bias else 3)
    for name, k, t, r in zip(["dx", "dx_gen", "dW", "db"], k_grads, t_grads, ref_grads):
        assert k.dtype == torch.float32, name
        assert_2x(k, r, t, floor=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_half_inputs(dtype):
    inputs = _cross_inputs(9, 34, True, dtype)
    upstream = torch.randn(9, 34, device=DEVICE).to(dtype)
    ref_out, ref_grads = _forward_and_grads(reference.generative_cross, [t.double() for t in inputs],
                                            upstream.double())
    t_out, t_grads = _forward_and_grads(lambda *a: SF.generative_cross(*a, backend="torch"), inputs, upstream)
    k_out, k_grads = _forward_and_grads(lambda *a: SF.generative_cross(*a, backend="triton"), inputs, upstream)
    assert k_out.dtype == dtype and all(g.dtype == dtype for g in k_grads)
    eps = torch.finfo(dtype).eps
    assert_2x(k_out, ref_out, t_out, floor=eps)
    for k, t, r in zip(k_grads, t_grads, ref_grads):
        assert_2x(k, r, t, floor=eps * r.abs().max().item())


def test_cross_non_contiguous_inputs_and_poisoned_output():
    from sfg_fast.ops.generative_cross import generative_cross_fwd
    base = torch.randn(5, 2 * 17, device=DEVICE)
    x = base[:, ::2]                                  # stride 2 along K
    x_gen = torch.randn(17, 5, device=DEVICE).t()     # column-major
    weight = torch.randn(17, 17, device=DEVICE).t()
    bias = torch.randn(17, device=DEVICE)
    out = torch.full((5, 17), float("nan"), device=DEVICE)
    generative_cross_fwd(x, x_gen, weight, bias, out=out)
    expected = reference.generative_cross(x.double(), x_gen.double(), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


def test_cross_backward_is_repeatable_and_default_is_exact_fp32():
    inputs = _cross_inputs(33, 40, True)
    upstream = torch.randn(33, 40, device=DEVICE)
    fn = lambda *a: SF.generative_cross(*a, backend="triton")  # noqa: E731
    first = _forward_and_grads(fn, inputs, upstream)[1]
    second = _forward_and_grads(fn, inputs, upstream)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # IEEE fp32 (not TF32, ~1e-3 relative): dW within fp32 accumulation error of the fp64 truth.
    ref = _forward_and_grads(reference.generative_cross, [t.double() for t in inputs], upstream.double())[1]
    torch.testing.assert_close(first[2].double(), ref[2], rtol=0, atol=1e-4 * ref[2].abs().max().item())


def test_cross_takes_fp64_on_the_exact_path_as_the_other_triton_ops():
    """fp64 (for checking) runs the factored torch path, as Triton's other ops do: it was refused, naming x
    even when only the bias was fp64, and a backend="triton" DCNv2 / CrossNet could not run .double()."""
    x, x_gen, weight, bias = (t.double() for t in _cross_inputs(5, 12, True))
    out, grads = _forward_and_grads(lambda *a: SF.generative_cross(*a, backend="triton"), [x, x_gen, weight, bias],
                                    torch.ones(5, 12, device=DEVICE, dtype=torch.float64))
    want, want_grads = _forward_and_grads(reference.generative_cross, [x, x_gen, weight, bias],
                                          torch.ones(5, 12, device=DEVICE, dtype=torch.float64))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)
    x32 = x.float()
    out = SF.generative_cross(x32, x32, weight.float(), bias, backend="triton")   # only the bias in fp64
    assert out.dtype == torch.float64


@pytest.mark.parametrize("name", ["dcnv2", "crossnet", "ipnn"])
def test_models_built_for_triton_run_every_op(name):
    """A model built with backend="triton" in fp64 (DCNv2, CrossNet), and IPNN, whose products have no Triton
    kernel and now run on torch (it raised BackendUnavailableError in any dtype): forward and backward equal
    the torch backend's."""
    from sfg_fast import models
    field_dims, ids = [4, 3, 5], torch.tensor([[0, 1, 2], [3, 2, 4]], device=DEVICE)
    dtype = torch.float32 if name == "ipnn" else torch.float64
    built = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        extra = {} if name == "crossnet" else {"hidden_units": (8,)}
        built[backend] = models.build(name, field_dims, 4, backend=backend, init_std=0.1,
                                      **extra).to(device=DEVICE, dtype=dtype)
    outs = {}
    for backend, model in built.items():
        loss = SF.bce_with_logits(model(ids), torch.tensor([1.0, 0.0], device=DEVICE, dtype=dtype))
        loss.backward()
        outs[backend] = (loss.detach(), [p.grad for p in model.parameters()])
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(outs["triton"][1], outs["torch"][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)



def test_cross_mixed_dtypes_promote_like_torch():
    """Under autocast the gate may arrive in bf16 while x and W stay fp32: promote, return fp32."""
    x, x_gen, weight, bias = _cross_inputs(5, 34, True)
    x_gen = x_gen.bfloat16().requires_grad_()
    x, weight = x.requires_grad_(), weight.requires_grad_()
    out = SF.generative_cross(x, x_gen, weight, bias, backend="triton")
    assert out.dtype == torch.float32
    expected = reference.generative_cross(x.double(), x_gen.double(), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), [x, x_gen, weight])
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16, torch.float32]


# ---------------------------------------------------------------- bce_with_logits

def _logits_labels(numel, dtype=torch.float32):
    logits = torch.randn(numel, device=DEVICE) * 6
    labels = torch.rand(numel, device=DEVICE)
    extremes = torch.tensor([1e4, -1e4, 1e4, -1e4, 100.0, -100.0, 30.0, -30.0, 0.0], device=DEVICE)
    k = min(numel, extremes.numel())
    logits[:k] = extremes[:k]
    labels[:k] = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.25, 1.0], device=DEVICE)[:k]
    return logits.to(dtype), labels


@pytest.mark.parametrize("numel", [1, 37, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_forward_and_grads_fp32(numel, reduction):
    logits, labels = _logits_labels(numel)
    upstream = torch.randn(numel if reduction == "none" else (), device=DEVICE)
    ref_out, ref_grads = _forward_and_grads(lambda x, y: reference.bce_with_logits(x, y, reduction),
                                            [logits.double(), labels.double()], upstream.double())
    t_out, t_grads = _forward_and_grads(lambda x, y: SF.bce_with_logits(x, y, reduction, backend="torch"),
                                        [logits, labels], upstream)
    k_out, k_grads = _forward_and_grads(lambda x, y: SF.bce_with_logits(x, y, reduction, backend="triton"),
                                        [logits, labels], upstream)
    assert k_out.dtype == torch.float32 and k_out.shape == ref_out.shape
    assert torch.isfinite(k_out).all()
    assert_2x(k_out, ref_out, t_out, floor=1e-6 * max(1.0, ref_out.abs().max().item()))
    for k, t, r in zip(k_grads, t_grads, ref_grads):       # dlogits, dlabels
        assert torch.isfinite(k).all()
        assert_2x(k, r, t, floor=1e-7)


def test_bce_tiny_losses_keep_relative_accuracy():
    """log1p(exp(-|x|)) for large confident logits: the loss is ~exp(-x), far below fp32's eps."""
    logits = torch.tensor([20.0, 40.0, 80.0, -20.0, -40.0, -80.0], device=DEVICE)
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], device=DEVICE)
    got = SF.bce_with_logits(logits, labels, "none", backend="triton")
    # With y = 1 for x > 0 and y = 0 for x < 0 the loss is exactly log1p(exp(-|x|)); computed
    # directly, because the reference's max(x, 0) - x*y + ... form cancels it away in fp64 too.
    expected = torch.log1p(torch.exp(-logits.double().abs()))
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_bce_other_logit_dtypes(dtype):
    logits, labels = _logits_labels(50, dtype)
    if dtype != torch.float64:
        logits = logits.clamp(-1e4, 1e4)               # half types round 1e4 but stay finite
    upstream = torch.randn((), device=DEVICE, dtype=torch.float64)
    ref_out, ref_grads = _forward_and_grads(lambda x: reference.bce_with_logits(x, labels.double()),
                                            [logits.double()], upstream)
    k_out, k_grads = _forward_and_grads(lambda x: SF.bce_with_logits(x, labels, backend="triton"),
                                        [logits], upstream)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert k_out.dtype == compute and k_grads[0].dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(k_out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(k_grads[0].double(), ref_grads[0], rtol=torch.finfo(dtype).eps, atol=1e-12)


def test_bce_integer_labels_and_poisoned_output():
    from sfg_fast.ops.bce_with_logits import bce_with_logits_fwd
    logits = torch.randn(4, 9, device=DEVICE)
    labels = torch.randint(0, 2, (4, 9), device=DEVICE)
    out = torch.full((4, 9), float("nan"), device=DEVICE)
    bce_with_logits_fwd(logits, labels, "none", out=out)
    expected = reference.bce_with_logits(logits.double(), labels, "none")
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)
    loss = SF.bce_with_logits(logits.requires_grad_(), labels, "mean", backend="triton")
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad.double(), (torch.sigmoid(logits.double()) - labels) / 36, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bce_strided_one_dimensional_views(reduction):
    """A logit column sliced from a [B, 2] head (stride 2) stays a strided view under reshape(-1);
    the flat-indexing kernel must still read the right elements, forward and backward."""
    head = torch.randn(37, 2, device=DEVICE) * 3
    soft = torch.rand(37, 3, device=DEVICE)
    logits, labels = head[:, 0], soft[:, 1]
    assert logits.stride() == (2,) and labels.stride() == (3,)
    upstream = torch.randn(37 if reduction == "none" else (), device=DEVICE)
    ref_out, ref_grads = _forward_and_grads(lambda x, y: reference.bce_with_logits(x, y, reduction),
                                            [logits.double(), labels.double()], upstream.double())
    t_out, t_grads = _forward_and_grads(lambda x, y: SF.bce_with_logits(x, y, reduction, backend="torch"),
                                        [logits, labels], upstream)
    leaves = [head.clone().requires_grad_(), soft.clone().requires_grad_()]
    k_out = SF.bce_with_logits(leaves[0][:, 0], leaves[1][:, 1], reduction, backend="triton")
    k_head, k_soft = torch.autograd.grad(k_out, leaves, upstream)
    assert_2x(k_out, ref_out, t_out, floor=1e-6)
    assert_2x(k_head[:, 0], ref_grads[0], t_grads[0], floor=1e-7)
    assert_2x(k_soft[:, 1], ref_grads[1], t_grads[1], floor=1e-7)
    assert not k_head[:, 1].any() and not k_soft[:, [0, 2]].any()   # neighbouring columns untouched


@pytest.mark.parametrize("numel", [9, 70_000])          # one program, then two under the interpreter
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_triton_checks_label_values_in_its_forward_kernel(numel, reduction):
    """Through functional.bce_with_logits the Triton forward kernel counts the bad labels as it reads them:
    a good call reads that count once and runs none of check_label_values's reductions; a NaN, an inf, a
    2 or a -1 anywhere (the last program included) raises the same errors as the torch backend."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    logits = torch.randn(numel, device=DEVICE)
    labels = (torch.rand(numel, device=DEVICE) < 0.3).float()
    with Record() as record:
        got = SF.bce_with_logits(logits, labels, reduction, backend="triton")
    want = SF.bce_with_logits(logits, labels, reduction, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not {"ge", "le", "isfinite", "all"} & set(record.ops), record.ops
    assert record.ops.count("_local_scalar_dense") == 1
    for bad, message in ((float("nan"), "labels contain 1 NaN/inf"), (float("inf"), "labels contain 1 NaN/inf"),
                         (2.0, r"labels must lie in \[0, 1\], got min 0.0 max 2.0"),
                         (-1.0, r"labels must lie in \[0, 1\], got min -1.0 max 1.0")):
        poisoned = labels.clone()
        poisoned[-1] = bad
        poisoned[0] = 1.0
        for backend in ("triton", "torch"):
            with pytest.raises(ValueError, match=message):
                SF.bce_with_logits(logits, poisoned, reduction, backend=backend)


def test_bce_mean_of_one_program_is_one_launch(monkeypatch):
    """Where the reduction fits one program (B <= 4096 on a GPU) the kernel writes the mean itself: no
    partial-sum pass and no division launched after it; the value matches the partial-sum route."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from sfg_fast.ops import bce_with_logits as ops_bce

    class Record(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Record.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    logits, labels = torch.randn(300, device=DEVICE), torch.rand(300, device=DEVICE)
    with Record():
        one = ops_bce.bce_with_logits_fwd(logits, labels, "mean")
    assert not {"sum", "div", "mean"} & set(Record.ops), Record.ops
    monkeypatch.setattr(ops_bce, "_block", lambda numel: 16)          # 19 programs: partials, then sum / B
    Record.ops.clear()
    with Record():
        many = ops_bce.bce_with_logits_fwd(logits, labels, "mean")
    assert "sum" in Record.ops
    assert one.shape == () and many.shape == ()
    torch.testing.assert_close(one, many, rtol=1e-6, atol=0)


def test_bce_triton_label_check_at_the_labels_precision():
    """Labels the compute dtype would round into [0, 1] still fail: fp64 labels of fp32 logits (1 + 1e-9,
    -1e-50) as on the torch backend; fp32 negative denormals (a comparison on a flush-to-zero GPU would
    see -0); -0.0, denormal positives, 0 and 1 pass; integer labels 2 and -1 fail."""
    logits = torch.randn(6, device=DEVICE)
    for bad, dtype in ((1 + 1e-9, torch.float64), (-1e-50, torch.float64), (-1e-40, torch.float32),
                       (2, torch.int64), (-1, torch.int32)):
        labels = torch.tensor([0, 1, 0, 1, 0, 0], dtype=dtype, device=DEVICE)
        labels[3] = bad
        for backend in ("triton", "torch"):
            with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
                SF.bce_with_logits(logits, labels, backend=backend)
    fine = torch.tensor([0.0, -0.0, 1.0, 1e-40, 0.5, 1.0 - 2 ** -24], device=DEVICE)
    torch.testing.assert_close(SF.bce_with_logits(logits, fine, backend="triton"),
                               SF.bce_with_logits(logits, fine, backend="torch"), rtol=1e-6, atol=1e-7)
    fp64 = SF.bce_with_logits(logits.double(), fine.double() * 0 + 1e-300, backend="triton")   # fp64 compute
    assert fp64.dtype == torch.float64
