"""The compiled CPU backend (sfg_fast._C via sfg_fast.ops.cpu_ext) against the fp64 reference.

Gathers compare exactly; reductions follow the 2x rule of tests/helpers.py (error vs fp64 at most twice the
error of torch's own fp32 computation, plus a small floor). The sparse optimizer update is
checked against a small torch reference written here, and for bitwise determinism across
thread counts.
"""
import pytest
import torch

from helpers import assert_close_2x, decoder_weight, offsets_of, zipf_ids
from sfg_fast import factored, functional, reference
from sfg_fast.ops import cpu_ext

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason="sfg_fast._C is not built (no compiler at install)")


def _table(field_dims, dim, dtype=torch.float32):
    return torch.randn(sum(field_dims), dim, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------------------- lookup

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch,field_dims,dim", [(1, [3, 5], 1), (37, [7, 1, 300, 11], 17), (256, [50] * 6, 16)])
def test_lookup_matches_reference_exactly(dtype, id_dtype, batch, field_dims, dim):
    weight = _table(field_dims, dim, dtype)
    offsets = offsets_of(field_dims)
    ids = zipf_ids(batch, field_dims, dtype=id_dtype)
    out = cpu_ext.embedding_lookup(ids, weight, offsets, "fatal")
    assert out.dtype == dtype
    assert torch.equal(out, reference.embedding_lookup(ids, weight, offsets))


def test_functional_lookup_cpu_backend_inference_and_grad():
    field_dims = [4, 9, 6]
    weight, offsets = _table(field_dims, 5), offsets_of(field_dims)
    ids = zipf_ids(12, field_dims, dtype=torch.int32)
    with torch.no_grad():
        assert torch.equal(functional.embedding_lookup(ids, weight, offsets, backend="cpu"),
                           reference.embedding_lookup(ids, weight, offsets))
    leaf = weight.clone().requires_grad_()
    out = functional.embedding_lookup(ids, leaf, offsets, backend="cpu")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = torch.zeros_like(weight).index_add_(0, (ids.long() + offsets).reshape(-1), grad.reshape(-1, 5))
    torch.testing.assert_close(leaf.grad, expected)


def test_lookup_non_contiguous_ids():
    field_dims = [4, 9, 6]
    weight, offsets = _table(field_dims, 3), offsets_of(field_dims)
    ids = zipf_ids(10, field_dims).t().contiguous().t()       # column-major [B, N]
    assert not ids.is_contiguous()
    assert torch.equal(cpu_ext.embedding_lookup(ids, weight, offsets), reference.embedding_lookup(ids, weight, offsets))


def test_bounds_fatal_names_field_and_id():
    field_dims = [4, 6, 5]
    weight, offsets = _table(field_dims, 3), offsets_of(field_dims)
    ids = zipf_ids(8, field_dims)
    ids[5, 1] = 6          # the field's vocabulary is [0, 6)
    ids[2, 2] = -1
    with pytest.raises(IndexError, match=r"ids\[:, 1\] \(field 1\) holds id 6 outside \[0, 6\)"):
        cpu_ext.embedding_lookup(ids, weight, offsets, "fatal")
    with pytest.raises(IndexError, match=r"field 1"):
        cpu_ext.sparse_row_update("sgd", weight.clone(), {}, ids, offsets, torch.randn(8, 3, 3), lr=0.1)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_bounds_clamp_to_oov_and_off(id_dtype):
    field_dims = [4, 6, 5]
    weight, offsets = _table(field_dims, 5), offsets_of(field_dims)
    ids = zipf_ids(9, field_dims, dtype=id_dtype)
    ids[0, 0], ids[3, 2], ids[8, 1] = 4, -7, 100
    out = cpu_ext.embedding_lookup(ids, weight, offsets, "clamp_to_oov")
    assert torch.equal(out, reference.embedding_lookup(ids, weight, offsets, "clamp_to_oov"))
    good = zipf_ids(9, field_dims, dtype=id_dtype)
    assert torch.equal(cpu_ext.embedding_lookup(good, weight, offsets, "off"),
                       reference.embedding_lookup(good, weight, offsets))
    with pytest.raises(ValueError, match="bounds_check"):
        cpu_ext.embedding_lookup(good, weight, offsets, "wrap")


def test_lookup_rejects_bad_arguments():
    field_dims = [4, 6]
    weight, offsets = _table(field_dims, 3), offsets_of(field_dims)
    ids = zipf_ids(3, field_dims)
    with pytest.raises(TypeError, match="offsets"):
        cpu_ext.embedding_lookup(ids, weight, offsets.to(torch.int32))
    with pytest.raises(ValueError, match="offsets"):
        cpu_ext.embedding_lookup(ids, weight, torch.tensor([0, 11]))
    with pytest.raises(TypeError, match="ids"):
        cpu_ext.embedding_lookup(ids.float(), weight, offsets)
    with pytest.raises(TypeError, match="weight"):
        cpu_ext.embedding_lookup(ids, weight.double(), offsets)


# --------------------------------------------------------------------------------------- int8 tables

def test_int8_quantiser_error_bound_and_lookup():
    field_dims = [40, 3, 25]
    weight = _table(field_dims, 17) * torch.rand(sum(field_dims), 1) * 10   # rows of very different ranges
    weight[5] = 0.25                                                         # a constant row: exact
    offsets = offsets_of(field_dims)
    q, scale_bias = cpu_ext.quantize_rowwise_int8(weight)
    assert q.dtype == torch.uint8 and scale_bias.shape == (weight.shape[0], 2)
    deq = cpu_ext.dequantize_rowwise_int8(q, scale_bias)
    scale = scale_bias[:, :1]
    bound = scale / 2 * (1 + 1e-5) + 1e-6 * weight.abs()
    assert bool(((deq - weight).abs() <= bound).all()), float(((deq - weight).abs() / scale.clamp_min(1e-30)).max())
    assert torch.equal(deq[5], weight[5])
    ids = zipf_ids(33, field_dims)
    out = cpu_ext.embedding_lookup_int8(ids, q, scale_bias, offsets)
    torch.testing.assert_close(out, reference.embedding_lookup(ids, deq, offsets), rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError, match="field 2"):
        bad = ids.clone()
        bad[0, 2] = 25
        cpu_ext.embedding_lookup_int8(bad, q, scale_bias, offsets)


# ------------------------------------------------------------------------------------- sparse update

def _torch_sparse_update(kind, weight, state, ids, offsets, grad_V, lr, eps, betas, step):
    """Reference of the fused update, in the weight's dtype (fp64 for the fp64 twin): unique rows,
    summed gradients, then the optimizer formula on those rows only."""
    dtype = weight.dtype
    rows = (ids.to(torch.int64) + offsets).reshape(-1)
    uniq, inverse = torch.unique(rows, return_inverse=True)
    g = torch.zeros(uniq.numel(), weight.shape[1], dtype=dtype).index_add_(0, inverse, grad_V.reshape(-1, weight.shape[1]).to(dtype))
    w = weight[uniq]
    if kind == "sgd":
        w = w - lr * g
    elif kind == "adagrad":
        acc = state["sum"][uniq] + (g * g).mean(dim=1)
        state["sum"][uniq] = acc
        w = w - lr * g / (acc.sqrt() + eps)[:, None]
    else:
        b1, b2 = betas
        m = b1 * state["exp_avg"][uniq] + (1 - b1) * g
        v = b2 * state["exp_avg_sq"][uniq] + (1 - b2) * g * g
        state["exp_avg"][uniq], state["exp_avg_sq"][uniq] = m, v
        w = w - lr * (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps)
    weight[uniq] = w


def _fresh_state(kind, rows, dim, dtype):
    if kind == "adagrad":
        return {"sum": torch.zeros(rows, dtype=dtype)}
    if kind == "adam":
        return {"exp_avg": torch.zeros(rows, dim, dtype=dtype), "exp_avg_sq": torch.zeros(rows, dim, dtype=dtype)}
    return {}


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("batch,field_dims,dim", [(1, [3, 4], 3), (64, [5, 2, 40], 17), (200, [30] * 5, 16)])
def test_sparse_update_matches_torch_reference(kind, batch, field_dims, dim):
    offsets = offsets_of(field_dims)
    weight64 = _table(field_dims, dim, torch.float64)
    weight, weight32 = weight64.float(), weight64.float()
    state, state32, state64 = {}, _fresh_state(kind, weight.shape[0], dim, torch.float32), \
        _fresh_state(kind, weight.shape[0], dim, torch.float64)
    lr, eps, betas = 0.05, 1e-8, (0.9, 0.999)
    for step in range(1, 4):                     # several steps: state carries over, Zipf duplicates
        ids = zipf_ids(batch, field_dims)
        grad = torch.randn(batch, len(field_dims), dim, dtype=torch.float64)
        cpu_ext.sparse_row_update(kind, weight, state, ids, offsets, grad.float(), lr, eps, betas, step)
        _torch_sparse_update(kind, weight32, state32, ids, offsets, grad.float(), lr, eps, betas, step)
        _torch_sparse_update(kind, weight64, state64, ids, offsets, grad, lr, eps, betas, step)
        assert_close_2x(weight, weight64, weight32, f"{kind} weight, step {step}")
        for name in state64:
            assert_close_2x(state[name], state64[name], state32[name], f"{kind} {name}, step {step}")


def test_sparse_update_leaves_untouched_rows_alone():
    field_dims = [50, 50]
    offsets = offsets_of(field_dims)
    weight = _table(field_dims, 4)
    before = weight.clone()
    ids = torch.tensor([[1, 2], [1, 7]])
    state = {}
    cpu_ext.sparse_row_update("adam", weight, state, ids, offsets, torch.randn(2, 2, 4), lr=0.1, step=1)
    touched = torch.tensor([1, 52, 57])
    mask = torch.ones(weight.shape[0], dtype=torch.bool)
    mask[touched] = False
    assert torch.equal(weight[mask], before[mask])
    assert not torch.equal(weight[touched], before[touched])
    assert bool((state["exp_avg"][mask] == 0).all()) and bool((state["exp_avg_sq"][mask] == 0).all())


def test_sparse_update_bf16_table():
    field_dims = [20, 9]
    offsets = offsets_of(field_dims)
    weight64 = _table(field_dims, 16, torch.float64)
    weight = weight64.to(torch.bfloat16)
    weight64 = weight.double()
    ids = zipf_ids(50, field_dims)
    grad = torch.randn(50, 2, 16)
    state = {}
    cpu_ext.sparse_row_update("adagrad", weight, state, ids, offsets, grad, lr=0.1)
    state64 = _fresh_state("adagrad", weight.shape[0], 16, torch.float64)
    _torch_sparse_update("adagrad", weight64, state64, ids, offsets, grad.double(), 0.1, 1e-8, (0.9, 0.999), 1)
    # one bf16 rounding of the stored result: half an ulp of bf16 (2^-8 relative)
    torch.testing.assert_close(weight.double(), weight64, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_sparse_update_bitwise_deterministic_across_thread_counts(kind):
    field_dims = [300, 7, 2000, 40]
    offsets = offsets_of(field_dims)
    ids = zipf_ids(1024, field_dims, a=1.5)          # heavy duplicates: the sum order matters
    grad = torch.randn(1024, 4, 16)
    start = _table(field_dims, 16)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            weight, state = start.clone(), {}
            for step in (1, 2):
                cpu_ext.sparse_row_update(kind, weight, state, ids, offsets, grad, 0.01, 1e-8, (0.9, 0.999), step)
            results.append((weight, state))
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(results[0][0], start)
    for weight, state in results[1:]:
        assert torch.equal(weight, results[0][0])
        for name in state:
            assert torch.equal(state[name], results[0][1][name])


def test_sparse_update_rejects_bad_arguments():
    field_dims = [4, 6]
    weight, offsets = _table(field_dims, 3), offsets_of(field_dims)
    ids = zipf_ids(3, field_dims)
    with pytest.raises(ValueError, match="kind"):
        cpu_ext.sparse_row_update("rmsprop", weight, {}, ids, offsets, torch.randn(3, 2, 3), lr=0.1)
    with pytest.raises(ValueError, match="grad_V"):
        cpu_ext.sparse_row_update("sgd", weight, {}, ids, offsets, torch.randn(3, 2, 4), lr=0.1)
    with pytest.raises(ValueError, match="exp_avg"):
        cpu_ext.sparse_row_update("adam", weight, {"exp_avg": torch.zeros(10, 2), "exp_avg_sq": torch.zeros(10, 3)},
                                  ids, offsets, torch.randn(3, 2, 3), lr=0.1)
    with pytest.raises(ValueError, match="step"):
        cpu_ext.sparse_row_update("adam", weight, {}, ids, offsets, torch.randn(3, 2, 3), lr=0.1, step=0)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_sparse_update_refuses_what_the_optimizer_refuses_and_keeps_state_on_failure(kind):
    """The hyper-parameters SparseRowOptimizer refuses (lr NaN, eps 0, beta 1) would write NaN into the
    touched rows; they are refused by name, and a call that fails, here or in the extension's own checks,
    leaves the table and the state dict as they were (no half-created state)."""
    field_dims = [4, 6]
    weight, offsets = _table(field_dims, 3), offsets_of(field_dims)
    ids = zipf_ids(3, field_dims)
    grad = torch.randn(3, 2, 3)
    before = weight.clone()
    for kwargs, name in (({"lr": float("nan")}, "lr"), ({"lr": "fast"}, "lr"), ({"lr": 0.1, "eps": 0.0}, "eps"),
                         ({"lr": 0.1, "betas": (1.0, 0.9)}, "betas"), ({"lr": 0.1, "step": 1.5}, "step")):
        state = {}
        with pytest.raises((ValueError, TypeError), match=name):
            cpu_ext.sparse_row_update(kind, weight, state, ids, offsets, grad, **kwargs)
        assert state == {} and torch.equal(weight, before)
    for bad_call in (lambda st: cpu_ext.sparse_row_update(kind, weight.double(), st, ids, offsets, grad, lr=0.1),
                     lambda st: cpu_ext.sparse_row_update(kind, weight, st, ids, offsets, grad[:, :1], lr=0.1)):
        state = {}
        with pytest.raises((ValueError, TypeError)):
            bad_call(state)
        assert state == {} and torch.equal(weight, before)
    # a table without columns: row-wise Adagrad's mean over D would be 0 / 0 in every touched row's state
    state = {}
    with pytest.raises(ValueError, match="at least one column"):
        cpu_ext.sparse_row_update(kind, torch.zeros(10, 0), state, ids, offsets, grad[..., :0], lr=0.1)
    assert state == {}
    from sfg_fast.optim import SparseRowOptimizer
    with pytest.raises(ValueError, match="at least one column"):
        SparseRowOptimizer(kind, lr=0.1).step_rows(torch.zeros(10, 0), torch.tensor([1]), torch.zeros(1, 0))
    with pytest.raises(ValueError, match=r"weight must have shape \[V, D\]"):
        cpu_ext.embedding_lookup(ids, torch.tensor(1.0), offsets)
    state = {}
    cpu_ext.sparse_row_update(kind, weight, state, ids, offsets, grad, lr=0.1)
    assert sorted(state) == {"sgd": [], "adagrad": ["sum"], "adam": ["exp_avg", "exp_avg_sq"]}[kind]
    assert not torch.equal(weight, before)


# ------------------------------------------------------------------------------------ fused sfg_logits

CASES = [
    # kind, activation, gamma, residual, pairs, side, symmetric, bias, encode
    ("identity", "relu", 0.5, False, "upper", "left", False, False, True),
    ("identity", "tanh", 1.0, True, "all", "right", False, True, True),
    ("identity", "identity", 1.0, False, "offdiag", "left", True, False, True),
    ("scalar", "relu", 2.0, False, "upper", "left", False, True, True),
    ("scalar", "gelu", 0.7, True, "offdiag", "right", False, False, True),
    ("vector", "silu", 1.3, False, "all", "left", True, True, True),
    ("vector", "sigmoid", 1.0, False, "upper", "right", False, False, True),
    ("matrix", "relu", 0.9, True, "upper", "right", False, True, True),
    ("matrix", "tanh", 1.0, False, "all", "left", True, False, True),
    ("scalar", "relu", 1.0, False, "upper", "left", False, False, False),   # base model: no encoder
    ("matrix", "relu", 1.0, False, "offdiag", "left", False, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
@pytest.mark.parametrize("batch,field_dims,dim", [(1, [3, 4], 1), (70, [5, 9, 2, 30, 6], 3), (130, [11] * 7, 16)])
def test_sfg_logits_cpu_vs_reference(case, batch, field_dims, dim):
    kind, act, gamma, residual, pairs, side, symmetric, use_bias, encode = case
    n = len(field_dims)
    offsets = offsets_of(field_dims)
    table = _table(field_dims, dim, torch.float64)
    enc = torch.randn(n * dim, n * dim, dtype=torch.float64) / (n * dim) ** 0.5 if encode else None
    bias = torch.randn(n * dim, dtype=torch.float64) if use_bias else None
    dec = decoder_weight(kind, n, dim)
    ids = zipf_ids(batch, field_dims)
    args = (kind, act, gamma, residual, pairs, side, symmetric)
    f32 = [None if t is None else t.float() for t in (table, enc, bias, dec)]
    ref64 = reference.sfg_logits(ids, table, offsets, enc, bias, dec, *args)
    torch32 = factored.sfg_logits(ids, f32[0], offsets, f32[1], f32[2], f32[3], *args)
    with torch.no_grad():
        out = functional.sfg_logits(ids, f32[0], offsets, f32[1], f32[2], f32[3], *args, backend="cpu")
    assert out.shape == (batch,) and out.dtype == torch.float32
    assert_close_2x(out, ref64, torch32, f"sfg_logits {case}", floor=1e-5)


@pytest.mark.parametrize("tile", [1, 3, 64])
def test_sfg_logits_tile_boundaries(tile):
    field_dims, dim = [6, 4, 9], 5
    n, offsets = 3, offsets_of(field_dims)
    table = _table(field_dims, dim)
    enc = torch.randn(n * dim, n * dim) / 4
    dec = torch.randn(n, n)
    ids = zipf_ids(67, field_dims, dtype=torch.int32)
    from sfg_fast import _C
    out = _C.sfg_logits(ids, table, offsets, enc, None, dec, "scalar", "relu", 1.0, False, "upper", "left", False,
                        "fatal", tile)
    ref = reference.sfg_logits(ids, table.double(), offsets, enc.double(), None, dec.double(), "scalar")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    bad = ids.clone()
    bad[66, 2] = 9
    with pytest.raises(IndexError, match="field 2"):
        _C.sfg_logits(bad, table, offsets, enc, None, dec, "scalar", "relu", 1.0, False, "upper", "left", False,
                      "fatal", tile)


def test_sfg_logits_tile_far_beyond_the_batch_is_clamped():
    """A tile larger than the batch (the per-thread buffers hold tile rows: 2^62 rows once overflowed
    the buffer size and crashed) gives the values of tile 1."""
    from sfg_fast import _C
    field_dims, dim = [3, 3, 3], 4
    table, offsets = _table(field_dims, dim), offsets_of(field_dims)
    enc, dec = torch.randn(12, 12) / 4, torch.randn(3, 3)
    ids = zipf_ids(5, field_dims)
    args = (ids, table, offsets, enc, None, dec, "scalar", "relu", 1.0, False, "upper", "left", False, "fatal")
    torch.testing.assert_close(_C.sfg_logits(*args, 2 ** 62), _C.sfg_logits(*args, 1), rtol=1e-6, atol=1e-6)


def test_sfg_logits_bf16_table_accumulates_in_fp32():
    field_dims, dim = [8, 20, 5, 9], 16
    n, offsets = 4, offsets_of(field_dims)
    params64 = [_table(field_dims, dim, torch.float64), torch.randn(n * dim, n * dim, dtype=torch.float64) / 8,
                torch.randn(n, n, dim, dtype=torch.float64)]
    bf = [t.to(torch.bfloat16) for t in params64]
    exact = [t.double() for t in bf]            # the bf16 values, evaluated exactly
    ids = zipf_ids(40, field_dims)
    ref64 = reference.sfg_logits(ids, exact[0], offsets, exact[1], None, exact[2], "vector")
    torch_bf16 = factored.sfg_logits(ids, bf[0], offsets, bf[1], None, bf[2], "vector", "relu", 1.0, False,
                                     "upper", "left", False)
    with torch.no_grad():
        out = functional.sfg_logits(ids, bf[0], offsets, bf[1], None, bf[2], "vector", backend="cpu")
    assert out.dtype == torch.bfloat16
    assert_close_2x(out, ref64, torch_bf16, "bf16 sfg_logits", floor=1e-3)


@pytest.mark.parametrize("kind", ["identity", "scalar", "matrix"])
def test_sfg_logits_bf16_model_and_autocast_use_bf16_gemms(kind):
    """A bf16 model, and fp32 weights under torch.autocast("cpu", bf16), run the kernel's GEMMs on
    bf16 operands (what torch's matmul does there): the error against the exact fp64 value of the
    inputs stays within twice that of torch's own bf16 computation (plus a bf16-sized floor)."""
    field_dims, dim = [8, 20, 5, 9], 16
    n, offsets = 4, offsets_of(field_dims)
    gen = torch.Generator().manual_seed(7)
    table64 = torch.randn(sum(field_dims), dim, generator=gen, dtype=torch.float64)
    enc64 = torch.randn(n * dim, n * dim, generator=gen, dtype=torch.float64) / 8
    bias64 = torch.randn(n * dim, generator=gen, dtype=torch.float64) * 0.1
    dec64 = {"identity": None, "scalar": torch.randn(n, n, generator=gen, dtype=torch.float64),
             "matrix": torch.randn(n, n, dim, dim, generator=gen, dtype=torch.float64) / 4}[kind]
    ids = zipf_ids(70, field_dims)
    opts = (kind, "tanh", 1.2, True, "upper", "right", False)
    # a bf16 model
    bf = [None if t is None else t.to(torch.bfloat16) for t in (table64, enc64, bias64, dec64)]
    exact = [None if t is None else t.double() for t in bf]
    ref64 = reference.sfg_logits(ids, exact[0], offsets, exact[1], exact[2], exact[3], *opts)
    torch_bf16 = factored.sfg_logits(ids, bf[0], offsets, bf[1], bf[2], bf[3], *opts)
    with torch.no_grad():
        out = functional.sfg_logits(ids, bf[0], offsets, bf[1], bf[2], bf[3], *opts, backend="cpu")
    assert out.dtype == torch.bfloat16
    assert_close_2x(out, ref64, torch_bf16, f"bf16 model {kind}", floor=2e-3)
    # fp32 weights under CPU autocast
    f32 = [None if t is None else t.float() for t in (table64, enc64, bias64, dec64)]
    ref64 = reference.sfg_logits(ids, table64, offsets, enc64, bias64, dec64, *opts)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch_auto = factored.sfg_logits(ids, f32[0], offsets, f32[1], f32[2], f32[3], *opts)
        out = functional.sfg_logits(ids, f32[0], offsets, f32[1], f32[2], f32[3], *opts, backend="cpu")
    assert out.dtype == torch.float32
    assert_close_2x(out, ref64, torch_auto, f"autocast {kind}", floor=2e-3)
    with torch.no_grad():
        exact_fp32 = functional.sfg_logits(ids, f32[0], offsets, f32[1], f32[2], f32[3], *opts, backend="cpu")
    assert not torch.equal(out, exact_fp32), "autocast did not switch the kernel's GEMMs to bf16"
    assert (exact_fp32.double() - ref64).abs().max() < 1e-3


def test_sfg_logits_cpu_falls_back_to_autograd_when_grad_is_needed():
    field_dims, dim = [5, 7, 3], 4
    n, offsets = 3, offsets_of(field_dims)
    table = _table(field_dims, dim).requires_grad_()
    enc = (torch.randn(n * dim, n * dim) / 4).requires_grad_()
    ids = zipf_ids(9, field_dims)
    out = functional.sfg_logits(ids, table, offsets, enc, None, None, "identity", backend="cpu")
    out.sum().backward()
    ref_table = table.detach().double().requires_grad_()
    ref_enc = enc.detach().double().requires_grad_()
    reference.sfg_logits(ids, ref_table, offsets, ref_enc, None, None, "identity").sum().backward()
    torch.testing.assert_close(table.grad.double(), ref_table.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(enc.grad.double(), ref_enc.grad, rtol=1e-4, atol=1e-5)


def test_auto_picks_cpu_for_sfg_logits(monkeypatch):
    from sfg_fast._backend import ENV_VAR, resolve
    from sfg_fast.ops import load_backends
    monkeypatch.delenv(ENV_VAR, raising=False)
    load_backends()
    assert resolve("auto", "sfg_logits", torch.device("cpu")) == "cpu"


# ------------------------------------------------------- training: fused lookup with the C++ update

def _reference_rows_update(weight64, opt64, ids, offsets, upstream64):
    """fp64 ground truth of one fused step: the reference lookup's dense gradient, reduced to its
    touched rows, then the torch-path optimizer (SparseRowOptimizer.step_rows) on those rows."""
    leaf = weight64.clone().requires_grad_()
    (grad,) = torch.autograd.grad(reference.embedding_lookup(ids, leaf, offsets), leaf, upstream64)
    rows = torch.unique((ids.to(torch.int64) + offsets).reshape(-1))
    opt64.step_rows(weight64, rows, grad[rows])


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch,field_dims,dim", [(1, [3, 4], 3), (96, [60, 2, 7, 300], 17)])
def test_fused_lookup_cpu_backend_equals_reference_optimizer(kind, id_dtype, batch, field_dims, dim):
    from sfg_fast.optim import SparseRowOptimizer, fused_embedding_lookup
    offsets = offsets_of(field_dims)
    hyper = dict(lr=0.05, eps=1e-8, betas=(0.8, 0.9))
    weight64 = _table(field_dims, dim, torch.float64)
    start = weight64.clone()
    weight_cpu = weight64.float().requires_grad_()
    weight_torch = weight64.float().requires_grad_()
    opts = {name: SparseRowOptimizer(kind, **hyper) for name in ("cpu", "torch", "ref")}
    for _ in range(3):                                   # state carries over; Zipf ids repeat rows
        ids = zipf_ids(batch, field_dims, dtype=id_dtype)
        upstream = torch.randn(batch, len(field_dims), dim, dtype=torch.float64)
        out = fused_embedding_lookup(ids, weight_cpu, offsets, opts["cpu"], backend="cpu")
        assert torch.equal(out, reference.embedding_lookup(ids, weight_cpu.detach(), offsets))
        out.backward(upstream.float())
        fused_embedding_lookup(ids, weight_torch, offsets, opts["torch"], backend="torch").backward(upstream.float())
        _reference_rows_update(weight64, opts["ref"], ids, offsets, upstream)
    assert weight_cpu.grad is None and opts["cpu"].step_count == 3
    assert not torch.equal(weight_cpu.detach().double(), start)
    assert_close_2x(weight_cpu, weight64, weight_torch, f"{kind} fused cpu update", floor=1e-7)
    for name, value in opts["ref"].state.items():
        assert_close_2x(opts["cpu"].state[name], value, opts["torch"].state[name], f"{kind} state {name}", floor=1e-7)


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_fused_lookup_cpu_backend_bitwise_repeatable(kind):
    from sfg_fast.optim import FusedFieldEmbedding
    field_dims = [500, 3, 40, 2000]
    ids = [zipf_ids(700, field_dims, a=1.5) for _ in range(2)]
    ups = [torch.randn(700, 4, 16) for _ in range(2)]
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (2, 1):
            torch.manual_seed(3)
            module = FusedFieldEmbedding(field_dims, 16, optimizer=kind, lr=0.02, backend="cpu", init_std=0.1)
            torch.set_num_threads(count)
            for i, u in zip(ids, ups):
                module(i).backward(u)
            results.append(module.state_dict())
    finally:
        torch.set_num_threads(threads)
    first, second = results
    assert torch.equal(first["weight"], second["weight"])
    for name, value in first["_extra_state"]["optimizer"]["state"].items():
        assert torch.equal(value, second["_extra_state"]["optimizer"]["state"][name])


def test_fused_module_cpu_backend_trains_like_torch_backend_bf16_and_resumes():
    from sfg_fast.optim import FusedFieldEmbedding
    field_dims = [30, 5, 11]
    modules = {}
    for backend in ("cpu", "torch"):
        torch.manual_seed(7)
        modules[backend] = FusedFieldEmbedding(field_dims, 16, optimizer="adagrad", lr=0.05, backend=backend,
                                               init_std=0.1, dtype=torch.bfloat16)
    for _ in range(3):
        ids = zipf_ids(40, field_dims)
        up = torch.randn(40, 3, 16).to(torch.bfloat16)
        for module in modules.values():
            module(ids).backward(up)
    got, want = modules["cpu"].weight.detach().double(), modules["torch"].weight.detach().double()
    # both sum and update in fp32 and round once per step to bf16: at most a bf16 ulp apart per step.
    torch.testing.assert_close(got, want, rtol=3 * 2 ** -8, atol=1e-3)
    restored = FusedFieldEmbedding(field_dims, 16, optimizer="adagrad", lr=0.05, backend="cpu", dtype=torch.bfloat16)
    restored.load_state_dict(modules["cpu"].state_dict())
    ids, up = zipf_ids(40, field_dims), torch.randn(40, 3, 16).to(torch.bfloat16)
    modules["cpu"](ids).backward(up)
    restored(ids).backward(up)
    assert torch.equal(restored.weight, modules["cpu"].weight)


def test_fused_backend_choice_and_errors(monkeypatch):
    from sfg_fast._backend import ENV_VAR, BackendUnavailableError
    from sfg_fast.optim import SparseRowOptimizer, _resolve_fused_backend, fused_embedding_lookup
    monkeypatch.delenv(ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    assert _resolve_fused_backend("auto", cpu, torch.float32) == "cpu"
    assert _resolve_fused_backend("auto", cpu, torch.bfloat16) == "cpu"
    assert _resolve_fused_backend("auto", cpu, torch.float64) == "torch"    # the C++ update is fp32
    field_dims = [4, 6]
    weight = _table(field_dims, 3, torch.float64).requires_grad_()
    ids = zipf_ids(5, field_dims)
    with pytest.raises(BackendUnavailableError, match="float64"):
        fused_embedding_lookup(ids, weight, offsets_of(field_dims), SparseRowOptimizer("sgd"), backend="cpu")
    # auto on an fp64 table still trains (torch path)
    opt = SparseRowOptimizer("sgd", lr=0.1)
    before = weight.detach().clone()
    fused_embedding_lookup(ids, weight, offsets_of(field_dims), opt).sum().backward()
    assert opt.step_count == 1 and not torch.equal(weight.detach(), before)
    with pytest.raises(TypeError, match="float32/bfloat16"):
        SparseRowOptimizer("sgd").step_lookup_cpu(weight.detach(), torch.ones(5, 2, 3, dtype=torch.float64), ids,
                                                  offsets_of(field_dims))
    bad = ids.clone()
    bad[1, 1] = 6
    with pytest.raises(IndexError, match="field 1"):
        fused_embedding_lookup(bad, weight.detach().float().requires_grad_(), offsets_of(field_dims),
                               SparseRowOptimizer("sgd"), backend="cpu")


@pytest.mark.parametrize("num_fields", [9, 17, 39])
@pytest.mark.parametrize("pairs,side,symmetric", [("upper", "left", False), ("upper", "right", False),
                                                  ("offdiag", "left", True), ("upper", "left", True)])
def test_sfg_logits_matrix_decoder_column_chunks(num_fields, pairs, side, symmetric):
    """The matrix decoder runs as column chunks over the K range each chunk's fields pair with
    (several fields per chunk at N > 8, a last partial chunk, fields that pair with nothing)."""
    field_dims, dim = [3 + (f * 7) % 11 for f in range(num_fields)], 3
    n, offsets = num_fields, offsets_of(field_dims)
    table = _table(field_dims, dim, torch.float64)
    enc = torch.randn(n * dim, n * dim, dtype=torch.float64) / (n * dim) ** 0.5
    dec = decoder_weight("matrix", n, dim)
    ids = zipf_ids(67, field_dims)
    args = ("matrix", "relu", 0.8, False, pairs, side, symmetric)
    ref64 = reference.sfg_logits(ids, table, offsets, enc, None, dec, *args)
    torch32 = factored.sfg_logits(ids, table.float(), offsets, enc.float(), None, dec.float(), *args)
    from sfg_fast import _C
    for tile in (5, 64):
        out = _C.sfg_logits(ids, table.float(), offsets, enc.float(), None, dec.float(), *args, "fatal", tile)
        assert_close_2x(out, ref64, torch32, f"chunked matrix decoder N={n} {pairs} {side} tile {tile}", floor=1e-5)


# ------------------------------------------------ training: the fused interaction (sfg_interaction)

def _interaction_inputs(case, batch, n, dim, dtype=torch.float64, seed=0):
    kind, act, gamma, residual, pairs, side, symmetric, use_bias, encode = case
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(batch, n, dim, generator=gen, dtype=dtype)
    enc = torch.randn(n * dim, n * dim, generator=gen, dtype=dtype) / (n * dim) ** 0.5 if encode else None
    bias = torch.randn(n * dim, generator=gen, dtype=dtype) if use_bias else None
    shape = {"identity": None, "scalar": (n, n), "vector": (n, n, dim), "matrix": (n, n, dim, dim)}[kind]
    dec = None if shape is None else torch.randn(*shape, generator=gen, dtype=dtype) / dim ** 0.5
    return [V, enc, bias, dec], (kind, act, gamma, residual, pairs, side, symmetric)


def _value_and_grads(fn, tensors, opts, upstream, dtype=None):
    """fn's output and the gradients of sum(upstream * out) for every tensor given (cast to dtype)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]
    out = fn(*leaves, *opts)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), wanted)
    return out, list(grads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
@pytest.mark.parametrize("batch,n,dim", [(1, 2, 1), (70, 5, 3), (67, 6, 10), (130, 7, 16)])
def test_sfg_interaction_cpu_forward_and_every_gradient_vs_reference(case, batch, n, dim):
    """The fused C++ forward and backward (dV, dW_enc, d bias, d decoder) against the fp64 reference
    by the 2x rule; D = 1, 3, 10, 16 exercise the 16 / 8 / 4 / single-lane paths of the loops."""
    tensors, opts = _interaction_inputs(case, batch, n, dim)
    upstream = torch.randn(batch, dtype=torch.float64)
    ref64, grads64 = _value_and_grads(reference.sfg_interaction, tensors, opts, upstream)
    torch32, grads32 = _value_and_grads(factored.sfg_interaction, tensors, opts, upstream, torch.float32)

    def cpu(*args):
        return functional.sfg_interaction(*args, backend="cpu")
    out, grads = _value_and_grads(cpu, tensors, opts, upstream, torch.float32)
    assert out.shape == (batch,) and out.dtype == torch.float32
    assert_close_2x(out, ref64, torch32, f"sfg_interaction {case}", floor=1e-5)
    names = [name for name, t in zip(("dV", "d_enc_weight", "d_enc_bias", "d_dec_weight"), tensors) if t is not None]
    for name, g, g64, g32 in zip(names, grads, grads64, grads32):
        assert g.dtype == torch.float32 and g.shape == g64.shape, name
        assert_close_2x(g, g64, g32, f"{name} {case}", floor=1e-5)


@pytest.mark.parametrize("tile", [1, 3, 64])
@pytest.mark.parametrize("kind", ["vector", "matrix"])
def test_sfg_interaction_tile_boundaries(tile, kind):
    """Tiles that do not divide B (67 samples) give the same values and gradients (per-thread sums
    of the decoder gradient and bias included)."""
    from sfg_fast import _C
    case = (kind, "silu", 0.8, True, "offdiag", "right", False, True, True)
    tensors, opts = _interaction_inputs(case, 67, 5, 4)
    V, enc, bias, dec = [t.float() for t in tensors]
    g = torch.randn(67)
    logit, H, T = _C.sfg_interaction_fwd(V, enc, bias, dec, *opts, tile=tile)
    dV, d_enc, d_bias, d_dec = _C.sfg_interaction_bwd(g, V, H, T, enc, bias, dec, *opts, tile=tile)
    ref, grads = _value_and_grads(factored.sfg_interaction, tensors, opts, g.double())
    torch.testing.assert_close(logit.double(), ref, rtol=1e-4, atol=1e-4)
    for got, want in zip((dV, d_enc, d_bias, d_dec), grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_sfg_interaction_only_requested_gradients():
    """Gradients flow only to what requires grad (a frozen encoder, or V from a detached lookup), and
    the ones computed equal those of the full backward."""
    case = ("scalar", "relu", 1.0, False, "upper", "left", False, True, True)
    tensors, opts = _interaction_inputs(case, 20, 4, 8, torch.float32)
    upstream = torch.randn(20)
    _, full = _value_and_grads(lambda *a: functional.sfg_interaction(*a, backend="cpu"), tensors, opts, upstream)
    V, enc, bias, dec = [t.clone() for t in tensors]
    dec.requires_grad_()
    out = functional.sfg_interaction(V, enc, bias, dec, *opts, backend="cpu")
    (out * upstream).sum().backward()
    assert V.grad is None and enc.grad is None and bias.grad is None
    torch.testing.assert_close(dec.grad, full[3], rtol=0, atol=0)
    V.requires_grad_()
    dec.grad = None
    dec.requires_grad_(False)
    (functional.sfg_interaction(V, enc, bias, dec, *opts, backend="cpu") * upstream).sum().backward()
    torch.testing.assert_close(V.grad, full[0], rtol=0, atol=0)
    with torch.no_grad():   # inference: the forward alone, same values
        torch.testing.assert_close(functional.sfg_interaction(V, enc, bias, dec, *opts, backend="cpu"), out.detach(),
                                   rtol=0, atol=0)


def test_sfg_interaction_bitwise_repeatable():
    case = ("vector", "relu", 0.5, False, "upper", "left", False, True, True)
    tensors, opts = _interaction_inputs(case, 300, 6, 16, torch.float32)
    upstream = torch.randn(300)
    runs = [_value_and_grads(lambda *a: functional.sfg_interaction(*a, backend="cpu"), tensors, opts, upstream)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["scalar", "vector", "matrix"])
def test_sfg_interaction_bitwise_identical_for_any_thread_count(kind):
    """Values and every gradient (bias and decoder included) are the same bits on 1 and 2 threads, at
    batches of one tile, a few small tiles and many: the tiling is a function of the batch alone, partial
    sums are kept per tile and added in tile order, and no tile runs MKL's own threading (a batch in one
    tile did: 5-11 rows rounded by the thread count); nor do the weight gradients' batch GEMMs (one GEMM over
    B = 1000 rows split its reduction by the thread count from 3 threads on). 1 to 4 threads (more threads
    than this machine's cores still split the work)."""
    case = (kind, "relu", 0.5, False, "upper", "left", False, True, True)
    before = torch.get_num_threads()
    for batch in (1, 5, 7, 11, 300, 1000, 2100):
        tensors, opts = _interaction_inputs(case, batch, 5, 8, torch.float32)
        upstream = torch.randn(batch)
        runs = []
        try:
            for threads in (1, 2, 3, 4):
                torch.set_num_threads(threads)
                runs.append(_value_and_grads(lambda *a: functional.sfg_interaction(*a, backend="cpu"), tensors, opts,
                                             upstream))
                with torch.no_grad():
                    runs[-1] += (functional.sfg_interaction(*tensors, *opts, backend="cpu"),)
        finally:
            torch.set_num_threads(before)
        for other in runs[1:]:
            assert torch.equal(runs[0][0], other[0]), batch
            assert torch.equal(runs[0][2], other[2]), batch
            for a, b in zip(runs[0][1], other[1]):
                assert torch.equal(a, b), batch


@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_extension_entry_points_repeat_across_thread_counts_for_any_tile(kind):
    """The C++ entry points themselves (not only the Python wrapper, whose tile already splits every batch):
    a tile of 64 asked for 5-11 rows ran them as ONE tile, outside OpenMP's parallel region, where MKL
    threaded its GEMM and rounded by the thread count; and 600 tiles of one row (more than the 256 partial
    sums of the weight gradients) group into 256 sums in fixed order. Both: the same bits on 1, 2, 3 threads,
    and values near the fp64 reference."""
    from sfg_fast import _C
    case = (kind, "tanh", 0.7, False, "upper", "left", False, True, True)
    before = torch.get_num_threads()
    for batch, tile in ((5, 64), (9, 64), (11, 64), (600, 1), (601, 2)):
        tensors, opts = _interaction_inputs(case, batch, 13, 16, seed=batch)
        V, enc, bias, dec = [t.float() for t in tensors]
        g = torch.randn(batch)
        ids, table, offsets = torch.randint(0, 3, (batch, 13)), torch.randn(3 * 13, 16), torch.arange(13) * 3
        runs = []
        try:
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                logit, H, T = _C.sfg_interaction_fwd(V, enc, bias, dec, *opts, tile=tile)
                grads = _C.sfg_interaction_bwd(g, V, H, T, enc, bias, dec, *opts, tile=tile)
                logits = _C.sfg_logits(ids, table, offsets, enc, bias, dec, *opts[:7], "fatal", tile)
                runs.append((logit, *grads, logits))
        finally:
            torch.set_num_threads(before)
        for a, b, c in zip(*runs):
            assert torch.equal(a, b) and torch.equal(a, c), (batch, tile)
        ref, want = _value_and_grads(factored.sfg_interaction, tensors, opts, g.double())
        torch.testing.assert_close(runs[0][0].double(), ref, rtol=1e-4, atol=1e-4)
        for got, expected in zip(runs[0][1:5], want):
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["scalar", "matrix"])
def test_sfg_interaction_bf16_model_and_autocast_gradients(kind):
    """bf16 models and fp32 models under torch.autocast("cpu", bf16) train through bf16 GEMMs: values
    and every gradient stay within twice torch's own bf16 error (plus a bf16-sized floor)."""
    case = (kind, "tanh", 1.2, True, "upper", "right", False, True, True)
    tensors, opts = _interaction_inputs(case, 70, 4, 16, seed=3)
    upstream = torch.randn(70, dtype=torch.float64)

    def cpu(*args):
        return functional.sfg_interaction(*args, backend="cpu")
    bf = [t.to(torch.bfloat16) for t in tensors]
    exact = [t.double() for t in bf]   # the bf16 values, evaluated exactly
    ref64, grads64 = _value_and_grads(reference.sfg_interaction, exact, opts, upstream)
    torch_bf, grads_bf = _value_and_grads(factored.sfg_interaction, bf, opts, upstream)
    out, grads = _value_and_grads(cpu, bf, opts, upstream)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert_close_2x(out, ref64, torch_bf, f"bf16 model {kind}", floor=2e-3)
    for name, g, g64, gbf in zip(("dV", "d_enc", "d_bias", "d_dec"), grads, grads64, grads_bf):
        assert_close_2x(g, g64, gbf, f"bf16 model {kind} {name}", floor=4e-3)
    ref64, grads64 = _value_and_grads(reference.sfg_interaction, tensors, opts, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_auto, grads_auto = _value_and_grads(factored.sfg_interaction, tensors, opts, upstream, torch.float32)
        out, grads = _value_and_grads(cpu, tensors, opts, upstream, torch.float32)
    assert out.dtype == torch.float32
    assert_close_2x(out, ref64, torch_auto, f"autocast {kind}", floor=2e-3)
    for name, g, g64, gauto in zip(("dV", "d_enc", "d_bias", "d_dec"), grads, grads64, grads_auto):
        assert g.dtype == torch.float32
        assert_close_2x(g, g64, gauto, f"autocast {kind} {name}", floor=4e-3)
    exact_fp32, _ = _value_and_grads(cpu, tensors, opts, upstream, torch.float32)
    assert not torch.equal(out, exact_fp32), "autocast did not switch the kernel's GEMMs to bf16"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_gemm_adds_the_encoder_bias_before_rounding(seed):
    """With bf16 GEMMs the encoder bias is added inside the GEMM and rounded once with the product, as torch's
    bf16 addmm: rounding the product first and adding the bias after flipped relu gates where the two nearly
    cancel, and d enc_weight then missed torch's own bf16 error by 10-50x. Training (every gradient) and the
    fused inference (sfg_logits) of a bf16 relu encoder with a bias, by the 2x rule."""
    gen = torch.Generator().manual_seed(seed)
    batch, n, dim = 256, 8, 16
    tensors = [torch.randn(batch, n, dim, generator=gen) * 0.3,
               torch.randn(n * dim, n * dim, generator=gen) / (n * dim) ** 0.5,
               torch.randn(n * dim, generator=gen) * 0.1, torch.randn(n, n, generator=gen)]
    bf = [t.to(torch.bfloat16) for t in tensors]
    opts = ("scalar", "relu", 1.0, False, "upper", "left", False)
    upstream = torch.randn(batch, generator=gen, dtype=torch.float64)
    ref64, grads64 = _value_and_grads(reference.sfg_interaction, [t.double() for t in bf], opts, upstream)
    torch_bf, grads_bf = _value_and_grads(factored.sfg_interaction, bf, opts, upstream)
    out, grads = _value_and_grads(lambda *a: functional.sfg_interaction(*a, backend="cpu"), bf, opts, upstream)
    assert_close_2x(out, ref64, torch_bf, "bf16 relu+bias value", floor=2e-3)
    for name, g, g64, gbf in zip(("dV", "d_enc", "d_bias", "d_dec"), grads, grads64, grads_bf):
        assert_close_2x(g, g64, gbf, f"bf16 relu+bias {name}", floor=4e-3)
    ids = torch.stack([torch.randint(0, 50, (batch,), generator=gen) for _ in range(n)], 1)
    table = (torch.randn(50 * n, dim, generator=gen) * 0.3).to(torch.bfloat16)
    offsets = torch.arange(n) * 50
    args = (ids, table, offsets, *bf[1:], *opts)
    with torch.no_grad():
        want64 = reference.sfg_logits(ids, table.double(), offsets, *[t.double() for t in bf[1:]], *opts)
        assert_close_2x(functional.sfg_logits(*args, backend="cpu"), want64, factored.sfg_logits(*args),
                        "bf16 relu+bias sfg_logits", floor=2e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_weight_gradient_of_a_batch_sorted_by_label(seed):
    """A batch laid out positives first: the weight gradient's halves cancel. Summing row groups whose partials
    were each rounded to bf16 (the thread-count-independent reduction's first form) missed torch's bf16
    error 3.5-7x there; bf16 operands now take the whole batch in one GEMM per column block, rounded once."""
    gen = torch.Generator().manual_seed(seed)
    batch, n, dim = 4096, 8, 16
    tensors = [torch.randn(batch, n, dim, generator=gen) * 0.3,
               torch.randn(n * dim, n * dim, generator=gen) / (n * dim) ** 0.5,
               torch.randn(n * dim, generator=gen) * 0.1, torch.randn(n, n, generator=gen) * 0.1]
    bf = [t.to(torch.bfloat16) for t in tensors]
    opts = ("scalar", "relu", 1.0, False, "upper", "left", False)
    labels = torch.cat([torch.ones(batch // 2), torch.zeros(batch - batch // 2)]).double()

    def grads(fn, operands):
        leaves = [t.detach().clone().requires_grad_() for t in operands]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(fn(*leaves, *opts).double(), labels,
                                                                    reduction="sum")
        return torch.autograd.grad(loss, leaves)
    want = grads(reference.sfg_interaction, [t.double() for t in bf])
    torch_bf = grads(factored.sfg_interaction, bf)
    got = grads(lambda *a: functional.sfg_interaction(*a, backend="cpu"), bf)
    for name, g, g64, gbf in zip(("dV", "d_enc", "d_bias", "d_dec"), got, want, torch_bf):
        assert_close_2x(g, g64, gbf, f"sorted batch {name}", floor=1e-3 * float(g64.abs().max()))


def test_sfg_interaction_rejects_bad_arguments():
    V = torch.randn(4, 3, 2)
    enc = torch.randn(6, 6)
    with pytest.raises(ValueError, match="enc_weight must have shape"):
        functional.sfg_interaction(V, torch.randn(5, 6), None, None, "identity", backend="cpu")
    with pytest.raises(ValueError, match="dec_weight for kind='vector' must have shape"):
        functional.sfg_interaction(V, enc, None, torch.randn(3, 3), "vector", backend="cpu")
    with pytest.raises(ValueError, match="enc_bias must be None when enc_weight is None"):
        functional.sfg_interaction(V, None, torch.randn(6), None, "identity", backend="cpu")
    with pytest.raises(ValueError, match="V"):
        functional.sfg_interaction(torch.randn(4, 6), enc, None, None, "identity", backend="cpu")
    from sfg_fast import _C
    logit, H, T = _C.sfg_interaction_fwd(V, enc, None, None, "identity", "relu", 1.0, False, "upper", "left", False)
    with pytest.raises(ValueError, match="T must be the forward's"):
        _C.sfg_interaction_bwd(torch.ones(4), V, H, T[:2], enc, None, None, "identity", "relu", 1.0, False, "upper",
                               "left", False)
    with pytest.raises(ValueError, match="grad must have B=4"):
        _C.sfg_interaction_bwd(torch.ones(3), V, H, T, enc, None, None, "identity", "relu", 1.0, False, "upper",
                               "left", False)
    with pytest.raises(ValueError, match="H must be the forward's"):
        _C.sfg_interaction_bwd(torch.ones(4), V, None, T, enc, None, None, "identity", "relu", 1.0, False, "upper",
                               "left", False)


@pytest.mark.parametrize("name", ["fm", "fwfm", "fmfm"])
def test_fm_family_models_run_the_fused_interaction(name, monkeypatch):
    """The FM-family models score through ONE sfg_interaction call (fused on the cpu backend), with
    the values and gradients of the torch backend; encoder dropout in training keeps the two ops."""
    from sfg_fast import models
    calls = []
    real = cpu_ext.sfg_interaction

    def spy(*args):
        calls.append(args[4])
        return real(*args)
    monkeypatch.setitem(functional._OPTIONAL_IMPLS, ("cpu", "sfg_interaction"), spy)
    field_dims, ids = [7, 5, 11, 3], None
    built = {}
    for backend in ("cpu", "torch"):
        torch.manual_seed(1)
        model = models.build(name, field_dims, embedding_dim=4, generative=True, backend=backend, gamma=0.5)
        with torch.no_grad():
            model.embedding.weight.normal_(0, 0.5)
        built[backend] = model
    ids = zipf_ids(9, field_dims)
    outs = {}
    for backend, model in built.items():
        out = model(ids)
        out.sum().backward()
        outs[backend] = (out, {k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == 1
    torch.testing.assert_close(outs["cpu"][0], outs["torch"][0], rtol=1e-5, atol=1e-6)
    assert set(outs["cpu"][1]) == set(outs["torch"][1])
    for key, g in outs["torch"][1].items():
        torch.testing.assert_close(outs["cpu"][1][key], g, rtol=1e-4, atol=1e-6, msg=key)
    # auto: the cpu backend where it has the op (sfg_interaction), torch for the encoder alone
    dropped = models.build(name, field_dims, embedding_dim=4, generative=True, backend="auto", encoder_dropout=0.2)
    dropped(ids)
    assert len(calls) == 1, "encoder dropout in training must keep encoder and decoder apart"
    dropped.eval()
    dropped(ids)
    assert len(calls) == 2


@pytest.mark.parametrize("opt_kind", ["adagrad", "adam"])
def test_fused_cpu_training_step_matches_torch_step(opt_kind):
    """The whole CPU path (C++ lookup + fused sparse update, fused interaction) trains like the torch
    path: after three steps the table, encoder and decoder agree."""
    from sfg_fast.optim import SparseRowOptimizer, fused_embedding_lookup
    field_dims, dim = [30, 4, 60, 9, 17], 8
    n, offsets = len(field_dims), offsets_of(field_dims)
    gen = torch.Generator().manual_seed(5)
    table0 = torch.randn(sum(field_dims), dim, generator=gen) * 0.3
    enc0 = torch.randn(n * dim, n * dim, generator=gen) / (n * dim) ** 0.5
    dec0 = torch.randn(n, n, generator=gen)
    batches = [(zipf_ids(64, field_dims, generator=gen), torch.randint(0, 2, (64,), generator=gen).float())
               for _ in range(3)]
    state = {}
    for backend in ("cpu", "torch"):
        table, enc, dec = table0.clone().requires_grad_(), enc0.clone().requires_grad_(), dec0.clone().requires_grad_()
        sparse, dense = SparseRowOptimizer(opt_kind, lr=0.05), torch.optim.Adam([enc, dec], lr=1e-2)
        for ids, y in batches:
            V = fused_embedding_lookup(ids, table, offsets, sparse, "fatal", backend=backend)
            logit = functional.sfg_interaction(V, enc, None, dec, "scalar", "relu", 0.5, False, "upper", "left", False,
                                               backend=backend)
            loss = functional.bce_with_logits(logit, y, backend="torch")
            dense.zero_grad()
            loss.backward()
            dense.step()
        state[backend] = (table.detach(), enc.detach(), dec.detach())
    assert not torch.equal(state["cpu"][0], table0)
    for got, want in zip(state["cpu"], state["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sfg_interaction_graphs_alive_together_keep_their_buffers():
    """Gradient accumulation: two forwards, then the backwards in the other order. The saved buffers
    of one graph (and the thread-local workspaces the backwards share) must not leak into the other."""
    case = ("matrix", "relu", 0.5, False, "upper", "right", False, True, True)
    tensors, opts = _interaction_inputs(case, 96, 5, 8, torch.float32, seed=9)
    other, _ = _interaction_inputs(case, 96, 5, 8, torch.float32, seed=10)
    upstream = torch.randn(96)

    def cpu(*args):
        return functional.sfg_interaction(*args, backend="cpu")
    _, alone_a = _value_and_grads(cpu, tensors, opts, upstream)
    _, alone_b = _value_and_grads(cpu, [other[0]] + tensors[1:], opts, upstream)
    params = [t.clone().requires_grad_() for t in tensors[1:]]
    va, vb = tensors[0].clone().requires_grad_(), other[0].clone().requires_grad_()
    out_a = cpu(va, *params, *opts)
    out_b = cpu(vb, *params, *opts)
    (out_b * upstream).sum().backward()
    grads_b = [va.grad] + [p.grad.clone() for p in params]
    assert grads_b[0] is None
    (out_a * upstream).sum().backward()
    assert torch.equal(vb.grad, alone_b[0]) and torch.equal(va.grad, alone_a[0])
    for p, ga, gb in zip(params, alone_a[1:], alone_b[1:]):
        torch.testing.assert_close(p.grad, ga + gb, rtol=1e-6, atol=1e-6)


def test_sfg_interaction_edge_shapes_and_tiles():
    """No fields (N = 0), an empty batch, and tiles far beyond the batch (clamped to it): the values
    and gradients of the factored path, no stray writes."""
    from sfg_fast import _C
    V = torch.randn(5, 0, 4, requires_grad=True)
    out = functional.sfg_interaction(V, None, None, None, "identity", backend="cpu")
    out.sum().backward()
    assert torch.equal(out, torch.zeros(5)) and V.grad.shape == (5, 0, 4)
    case = ("vector", "relu", 1.0, False, "upper", "left", False, True, True)
    for batch in (0, 3):
        tensors, opts = _interaction_inputs(case, batch, 3, 4, torch.float32)
        upstream = torch.randn(batch)
        _, want = _value_and_grads(factored.sfg_interaction, tensors, opts, upstream)
        _, got = _value_and_grads(lambda *a: functional.sfg_interaction(*a, backend="cpu"), tensors, opts, upstream)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    tensors, opts = _interaction_inputs(case, 7, 3, 4, torch.float32)
    small = _C.sfg_interaction_fwd(*tensors, *opts, tile=1)[0]
    huge = _C.sfg_interaction_fwd(*tensors, *opts, tile=2 ** 62)[0]
    torch.testing.assert_close(huge, small, rtol=1e-6, atol=1e-6)


def test_sfg_interaction_bf16_after_inference_mode():
    """A bf16 evaluation under torch.inference_mode() first (a trainer's sanity check), then training
    on the same thread: the cached bf16 staging buffers must stay usable outside inference mode."""
    import threading
    case = ("identity", "relu", 1.0, False, "upper", "left", False, False, True)
    tensors, opts = _interaction_inputs(case, 300, 4, 4, seed=2)
    bf = [None if t is None else t.to(torch.bfloat16) for t in tensors]
    upstream = torch.randn(300, dtype=torch.float64)
    result = {}

    def body():   # a fresh thread: its thread-local buffers are first made under inference mode
        try:
            with torch.inference_mode():
                result["eval"] = functional.sfg_interaction(*bf, *opts, backend="cpu")
            result["train"] = _value_and_grads(lambda *a: functional.sfg_interaction(*a, backend="cpu"), bf, opts,
                                               upstream)
        except Exception as exc:  # re-raised in the test's thread
            result["error"] = exc
    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    out, grads = result["train"]
    torch.testing.assert_close(out, result["eval"], rtol=0, atol=0)
    assert all(torch.isfinite(g.float()).all() for g in grads)


def test_inference_under_no_grad_with_trainable_parameters_on_all_threads():
    """Evaluation of a model in training (parameters require grad) under torch.no_grad(): the C++
    tiles run on every thread, whose grad mode is not the caller's, with the same result as torch."""
    field_dims, dim = [9, 4, 30, 7], 8
    n, offsets = 4, offsets_of(field_dims)
    table = _table(field_dims, dim).requires_grad_()
    enc = (torch.randn(n * dim, n * dim) / 6).requires_grad_()
    dec = torch.randn(n, n, dim, dim).requires_grad_()
    ids = zipf_ids(300, field_dims)
    with torch.no_grad():
        out = functional.sfg_logits(ids, table, offsets, enc, None, dec, "matrix", backend="cpu")
        V = functional.embedding_lookup(ids, table, offsets, backend="torch")
        out2 = functional.sfg_interaction(V, enc, None, dec, "matrix", backend="cpu")
        want = factored.sfg_logits(ids, table, offsets, enc, None, dec, "matrix", "relu", 1.0, False, "upper",
                                   "left", False)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out2, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- memory safety of the C++ entry points

def test_offsets_that_would_wrap_int64_are_rejected_everywhere():
    """Offsets near 2^63 make the field sizes (next - this) wrap into plausible values; validated by
    comparison instead, every path rejects them before a kernel addresses memory with them."""
    from sfg_fast import _C, optim
    weight = torch.arange(40.0).view(10, 4)
    ids = torch.zeros(1, 3, dtype=torch.int64)
    for offsets in (torch.tensor([0, 2 ** 63 - 1, -2]), torch.tensor([0, 2 ** 62 + 1, -2 ** 62])):
        for mode in ("fatal", "clamp_to_oov", "off"):
            with pytest.raises(ValueError, match="offsets must be non-decreasing"):
                _C.embedding_lookup(ids, weight, offsets, mode)
            with pytest.raises(ValueError, match="offsets must be non-decreasing"):
                _C.sparse_row_update("sgd", weight.clone(), None, None, ids, offsets, torch.ones(1, 3, 4), 1.0,
                                     0.0, 0.9, 0.999, 1, mode)
        with pytest.raises(ValueError, match="offsets must be non-decreasing"):
            functional.embedding_lookup(ids, weight, offsets, backend="cpu")
        with pytest.raises(ValueError, match="offsets must be non-decreasing"):
            functional.embedding_lookup(ids, weight, offsets, "clamp_to_oov", backend="torch")
        table = weight.clone().requires_grad_()
        with pytest.raises(ValueError, match="offsets must be non-decreasing"):
            optim.fused_embedding_lookup(ids, table, offsets, optim.SparseRowOptimizer("sgd", lr=1.0), backend="cpu")


def test_bounds_off_never_lets_a_bad_id_address_memory():
    """"off" skips the separate check, but the C++ kernels still scan the ids they address memory with:
    an id outside its field raises the fatal mode's IndexError instead of reading or writing past it."""
    from sfg_fast import _C
    weight, offsets = torch.zeros(10, 4), torch.tensor([0])
    for bad in (10 ** 7, -3):
        ids = torch.tensor([[bad]])
        with pytest.raises(IndexError, match=r"field 0\) holds id"):
            functional.embedding_lookup(ids, weight, offsets, "off", backend="cpu")
        with pytest.raises(IndexError, match=r"field 0\) holds id"):
            cpu_ext.sfg_logits(ids.expand(1, 2).contiguous(), weight, torch.tensor([0, 5]), None, None, None,
                               "identity", "relu", 1.0, False, "upper", "left", False)
        with pytest.raises(IndexError, match=r"field 0\) holds id"):
            _C.sparse_row_update("sgd", weight, None, None, ids, offsets, torch.ones(1, 1, 4), 1.0, 0.0, 0.9,
                                 0.999, 1, "off")
    assert torch.equal(weight, torch.zeros(10, 4))


def test_table_resized_between_forward_and_backward_is_refused():
    from sfg_fast import optim
    big = torch.zeros(40)
    weight = torch.zeros(10, 4, requires_grad=True)
    for backend in ("cpu", "torch"):
        V = optim.fused_embedding_lookup(torch.tensor([[9]]), weight, torch.tensor([0]),
                                         optim.SparseRowOptimizer("sgd", lr=1.0), backend=backend)
        old = weight.data
        weight.data = big[:8].view(2, 4)
        with pytest.raises(RuntimeError, match=r"weight changed shape from \[10, 4\] to \[2, 4\]"):
            V.sum().backward()
        weight.data = old
    assert torch.equal(big, torch.zeros(40))


@pytest.mark.parametrize("name", ["grad_V", "weight"])
def test_tensors_without_host_memory_are_rejected_by_name(name):
    """Meta tensors (no host data; a null data_ptr) must never reach the raw-pointer loops."""
    from sfg_fast import _C
    args = dict(weight=torch.zeros(10, 4), grad_V=torch.ones(2, 2, 4))
    args[name] = torch.empty(args[name].shape, device="meta")
    with pytest.raises(ValueError, match=rf"{name} must be a CPU"):
        _C.sparse_row_update("sgd", args["weight"], None, None, torch.tensor([[1, 2], [3, 1]]), torch.tensor([0, 5]),
                             args["grad_V"], 0.1, 0.0, 0.9, 0.999, 1, "fatal")


@pytest.mark.parametrize("name", ["enc_weight", "enc_bias", "dec_weight"])
def test_interaction_parameters_without_host_memory_are_rejected_by_name(name):
    """The kernels' parameters are checked for host memory too; sfg_logits used to hang (a meta kernel
    needing the GIL in a worker thread) and the interaction to return garbage."""
    from sfg_fast import _C
    params = dict(enc_weight=torch.randn(12, 12), enc_bias=torch.randn(12), dec_weight=torch.randn(3, 3))
    params[name] = torch.empty(params[name].shape, device="meta")
    opts = ("scalar", "relu", 1.0, False, "upper", "left", False)
    ids, table, offsets = torch.zeros(70, 3, dtype=torch.int64), torch.randn(10, 4), torch.tensor([0, 3, 6])
    with pytest.raises(ValueError, match=rf"{name} must be a CPU tensor"):
        _C.sfg_logits(ids, table, offsets, params["enc_weight"], params["enc_bias"], params["dec_weight"], *opts,
                      "fatal", 1)
    V = torch.randn(70, 3, 4)
    with pytest.raises(ValueError, match=rf"{name} must be a CPU tensor"):
        _C.sfg_interaction_fwd(V, params["enc_weight"], params["enc_bias"], params["dec_weight"], *opts, tile=8)
    good = [torch.randn(12, 12), torch.randn(12), torch.randn(3, 3)]
    logit, H, T = _C.sfg_interaction_fwd(V, *good, *opts, tile=8)
    bad = [params[k] for k in ("enc_weight", "enc_bias", "dec_weight")]
    with pytest.raises(ValueError, match=rf"{name} must be a CPU tensor"):
        _C.sfg_interaction_bwd(torch.ones(70), V, H, T, *bad, *opts, tile=8)
    with pytest.raises(ValueError, match="T must be a CPU tensor"):
        _C.sfg_interaction_bwd(torch.ones(70), V, H, torch.empty(T.shape, device="meta"), *good, *opts, tile=8)


@pytest.mark.parametrize("name", ["enc_weight", "enc_bias", "dec_weight"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_interaction_parameters_of_other_dtypes_are_rejected_by_name(name, dtype):
    """Integer weights would train nothing and complex ones lose their imaginary part: refused, by name."""
    from sfg_fast import _C
    params = dict(enc_weight=torch.randn(12, 12), enc_bias=torch.randn(12), dec_weight=torch.randn(3, 3))
    params[name] = torch.ones(params[name].shape, dtype=dtype)
    opts = ("scalar", "relu", 1.0, False, "upper", "left", False)
    ids, table, offsets = torch.zeros(70, 3, dtype=torch.int64), torch.randn(10, 4), torch.tensor([0, 3, 6])
    with pytest.raises(TypeError, match=rf"{name} must have a real floating dtype"):
        _C.sfg_logits(ids, table, offsets, params["enc_weight"], params["enc_bias"], params["dec_weight"], *opts,
                      "fatal", 1)
    with pytest.raises(TypeError, match=rf"{name} must have a real floating dtype"):
        _C.sfg_interaction_fwd(torch.randn(70, 3, 4), params["enc_weight"], params["enc_bias"], params["dec_weight"],
                               *opts, tile=8)


def test_quantiser_rejects_rows_wider_than_float32_range():
    """max - min beyond float32 would make the scale inf and the whole dequantised row NaN."""
    weight = torch.tensor([[0.5, -0.25, 1.0, 0.0], [-3e38, 3e38, 1.0, 0.0]])
    with pytest.raises(ValueError, match=r"weight row 1 spans .* wider than float32's range"):
        cpu_ext.quantize_rowwise_int8(weight)
    q, scale_bias = cpu_ext.quantize_rowwise_int8(weight * 1e-30)   # the same shape of row, in range
    assert torch.isfinite(cpu_ext.dequantize_rowwise_int8(q, scale_bias)).all()


def test_training_buffers_are_recycled_and_results_do_not_depend_on_the_pool(monkeypatch):
    """H, T and dV come from a pool of recycled buffers (no page faults next step): the values and
    gradients are bitwise those of freshly allocated tensors, the pool holds the buffers between
    steps, and empty_buffer_pool() frees them."""
    from sfg_fast import _C
    case = ("matrix", "relu", 0.5, False, "upper", "left", False, True, True)
    tensors, opts = _interaction_inputs(case, 70, 3, 4, torch.float32, seed=9)
    upstream = torch.randn(70)
    fn = lambda *a: functional.sfg_interaction(*a, backend="cpu")  # noqa: E731
    cpu_ext.empty_buffer_pool()
    pooled = [_value_and_grads(fn, tensors, opts, upstream) for _ in range(2)]   # the second reuses buffers
    size = 70 * 12 * 4
    assert _C.buffer_pool_idle_bytes() == 2 * size   # H and T are back; the dV handed out is still alive
    monkeypatch.setenv("SFG_FAST_NO_BUFFER_POOL", "1")
    fresh = _value_and_grads(fn, tensors, opts, upstream)
    for got in pooled:
        assert torch.equal(got[0], fresh[0])
        for g, w in zip(got[1], fresh[1]):
            assert torch.equal(g, w)
    del pooled, got, g   # the last references to the pooled dV buffers
    assert _C.buffer_pool_idle_bytes() == 4 * size
    assert cpu_ext.empty_buffer_pool() == 4 * size and _C.buffer_pool_idle_bytes() == 0
