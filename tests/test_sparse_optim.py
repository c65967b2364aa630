"""Row-sparse optimizers fused into the lookup's backward (sfg_fast.optim), torch and triton paths.

The expected tables come from an independent fp64 re-statement of each formula, applied to the
gradient of the reference lookup (dense, fp64); SGD and Adam are also checked against torch.optim.
"""
import math

import pytest
import torch

from sfg_fast import reference
from sfg_fast.nn import FieldEmbedding
from sfg_fast.optim import FusedFieldEmbedding, SparseRowOptimizer, fused_embedding_lookup, unique_row_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIELD_DIMS = [50, 3, 7]
OFFSETS = [0, 50, 53]
KINDS = ["sgd", "adagrad", "adam"]
HYPER = {"sgd": dict(lr=0.5), "adagrad": dict(lr=0.1, eps=1e-8), "adam": dict(lr=0.05, eps=1e-8, betas=(0.8, 0.9))}


def _offsets():
    return torch.tensor(OFFSETS, dtype=torch.int64, device=DEVICE)


def _zipf_ids(batch, dtype=torch.int64):
    cols = []
    for size in FIELD_DIMS:
        p = 1.0 / torch.arange(1, size + 1, dtype=torch.float64) ** 1.3
        cols.append(torch.multinomial(p, batch, replacement=True))
    return torch.stack(cols, 1).to(dtype).to(DEVICE)


def _reference_steps(weight0, steps, kind, lr, eps=1e-8, betas=(0.9, 0.999)):
    """fp64 ground truth: dense reference gradient, then the formula on each touched row."""
    w = weight0.detach().double().clone()
    acc = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, (ids, upstream) in enumerate(steps, start=1):
        leaf = w.clone().requires_grad_()
        (grad,) = torch.autograd.grad(reference.embedding_lookup(ids, leaf, _offsets()), leaf, upstream.double())
        touched = torch.unique(ids.to(torch.int64) + _offsets())
        for r in touched.tolist():
            g = grad[r]
            if kind == "sgd":
                w[r] -= lr * g
            elif kind == "adagrad":
                acc[r] += (g * g).sum() / g.numel()
                w[r] -= lr * g / (acc[r].sqrt() + eps)
            else:
                m[r] = betas[0] * m[r] + (1 - betas[0]) * g
                v[r] = betas[1] * v[r] + (1 - betas[1]) * g * g
                w[r] -= lr * (m[r] / (1 - betas[0] ** t)) / ((v[r] / (1 - betas[1] ** t)).sqrt() + eps)
    return w


def _run_fused(weight0, steps, kind, backend, dtype=torch.float32):
    weight = weight0.detach().to(dtype).clone().requires_grad_()
    opt = SparseRowOptimizer(kind, **HYPER[kind])
    for ids, upstream in steps:
        out = fused_embedding_lookup(ids, weight, _offsets(), opt, backend=backend)
        out.backward(upstream.to(dtype))
    assert weight.grad is None
    return weight.detach(), opt


def _steps(num_steps, batch=40, id_dtype=torch.int64, dim=17):
    return [(_zipf_ids(batch, id_dtype), torch.randn(batch, len(FIELD_DIMS), dim, device=DEVICE))
            for _ in range(num_steps)]


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_fused_update_equals_reference_optimizer(kind, backend, id_dtype):
    weight0 = torch.randn(sum(FIELD_DIMS), 17, device=DEVICE)
    steps = _steps(3, id_dtype=id_dtype)
    expected = _reference_steps(weight0, steps, kind, **HYPER[kind])
    got, opt = _run_fused(weight0, steps, kind, backend)
    assert opt.step_count == 3
    # fp32 arithmetic on O(1) values over 3 steps; adagrad/adam normalise by the gradient scale.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-6)
    touched = torch.unique(torch.cat([ids.to(torch.int64) + _offsets() for ids, _ in steps]).reshape(-1))
    untouched = torch.ones(weight0.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[touched] = False
    assert untouched.any() and torch.equal(got[untouched], weight0[untouched])


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [64, 500])   # 500 x 3 positions: hot rows' runs cross programs
def test_triton_update_within_2x_of_torch_path(kind, batch):
    weight0 = torch.randn(sum(FIELD_DIMS), 3, device=DEVICE)
    steps = _steps(2, batch=batch, dim=3)
    expected = _reference_steps(weight0, steps, kind, **HYPER[kind])
    torch_err = (_run_fused(weight0, steps, kind, "torch")[0].double() - expected).abs().max().item()
    triton_w = _run_fused(weight0, steps, kind, "triton")[0]
    torch.testing.assert_close(triton_w.double(), expected, rtol=0, atol=2 * torch_err + 1e-6)


@pytest.fixture
def row_map_mode(monkeypatch):
    """SFG_FAST_SPARSE_DEDUP="map" for the test (the Triton update's sort-free path)."""
    from sfg_fast.ops import embedding_lookup as ops_lookup
    monkeypatch.setattr(ops_lookup, "SPARSE_DEDUP", "map")
    return ops_lookup


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [64, 500])
def test_triton_row_map_update_within_2x_of_torch_path(kind, batch, row_map_mode):
    """The sort-free update (row map, float atomics) against the fp64 ground truth by the 2x rule, with hot
    rows; the map is back to all UNCLAIMED after every step, and deterministic mode still sorts."""
    weight0 = torch.randn(sum(FIELD_DIMS), 3, device=DEVICE)
    steps = _steps(3, batch=batch, dim=3)
    expected = _reference_steps(weight0, steps, kind, **HYPER[kind])
    torch_err = (_run_fused(weight0, steps, kind, "torch")[0].double() - expected).abs().max().item()
    triton_w, opt = _run_fused(weight0, steps, kind, "triton")
    torch.testing.assert_close(triton_w.double(), expected, rtol=0, atol=2 * torch_err + 1e-6)
    assert opt._row_map is not None and opt._row_map.dtype == torch.int32
    assert bool((opt._row_map == 2 ** 31 - 1).all())


@pytest.mark.interpreter
def test_row_map_is_refilled_when_a_launch_fails_and_deterministic_mode_sorts(row_map_mode, monkeypatch):
    """A launch failing after the claim (here the accumulate) leaves no stale owner behind; under
    torch.use_deterministic_algorithms the sorted, repeatable path runs whatever SPARSE_DEDUP says."""
    weight = torch.randn(sum(FIELD_DIMS), 3, device=DEVICE)
    ids, grad = _zipf_ids(20), torch.randn(20, len(FIELD_DIMS), 3, device=DEVICE)
    opt = SparseRowOptimizer("adagrad", lr=0.1)
    opt.step_lookup_triton(weight, grad, ids, _offsets())
    row_map = opt._row_map

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("launch failed")
            return launch
    monkeypatch.setattr(row_map_mode, "_accumulate_rows_kernel", Broken())
    before = weight.clone()
    with pytest.raises(RuntimeError, match="launch failed"):
        opt.step_lookup_triton(weight, grad, ids, _offsets())
    assert bool((row_map == 2 ** 31 - 1).all()) and torch.equal(weight, before)
    monkeypatch.undo()
    monkeypatch.setattr(row_map_mode, "SPARSE_DEDUP", "map")
    claimed = []
    monkeypatch.setattr(row_map_mode, "_claim_rows_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (lambda *a, **k: claimed.append(1))})())
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        again = _run_fused(weight, [(ids, grad)], "adagrad", "triton")[0]
        sorted_ = _run_fused(weight, [(ids, grad)], "adagrad", "triton")[0]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert claimed == [] and torch.equal(again, sorted_)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_tables_update_in_fp32_then_round(dtype):
    weight0 = torch.randn(sum(FIELD_DIMS), 16, device=DEVICE).to(dtype).float()
    steps = _steps(2, batch=32, dim=16)
    for i, (ids, up) in enumerate(steps):
        steps[i] = (ids, up.to(dtype).float())
    expected = _reference_steps(weight0, steps, "adagrad", **HYPER["adagrad"])
    for backend in ("torch", "triton"):
        got = _run_fused(weight0, steps, "adagrad", backend, dtype=dtype)[0]
        assert got.dtype == dtype
        # each step's result is rounded to the table dtype once: two roundings of O(1) values.
        torch.testing.assert_close(got.double(), expected, rtol=3 * torch.finfo(dtype).eps, atol=1e-3)


def test_sgd_and_adam_match_torch_optim_when_every_row_is_touched():
    """With every row in every batch, lazy Adam is dense Adam and sparse SGD is dense SGD."""
    dims, dim = [4, 3], 5
    offsets = torch.tensor([0, 4], device=DEVICE)
    ids = torch.tensor([[0, 0], [1, 1], [2, 2], [3, 0], [0, 1]], device=DEVICE)
    for kind, torch_opt in (("sgd", lambda p: torch.optim.SGD([p], lr=0.3)),
                            ("adam", lambda p: torch.optim.Adam([p], lr=0.05, betas=(0.8, 0.9), eps=1e-8))):
        w0 = torch.randn(sum(dims), dim, device=DEVICE, dtype=torch.float64)
        mine = w0.clone().requires_grad_()
        theirs = w0.clone().requires_grad_()
        opt = SparseRowOptimizer(kind, lr=0.3 if kind == "sgd" else 0.05, betas=(0.8, 0.9), eps=1e-8)
        dense = torch_opt(theirs)
        for _ in range(4):
            up = torch.randn(5, 2, dim, device=DEVICE, dtype=torch.float64)
            fused_embedding_lookup(ids, mine, offsets, opt, backend="torch").backward(up)
            dense.zero_grad()
            reference.embedding_lookup(ids, theirs, offsets).backward(up)
            dense.step()
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_unique_row_grads_is_the_reference_gradient(id_dtype):
    ids = _zipf_ids(64, id_dtype)
    up = torch.randn(64, 3, 5, device=DEVICE, dtype=torch.float64)
    rows, grads = unique_row_grads(ids, _offsets(), up)
    assert rows.dtype == torch.int64 and torch.equal(rows, torch.unique(ids.to(torch.int64) + _offsets()))
    leaf = torch.randn(sum(FIELD_DIMS), 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    (dense,) = torch.autograd.grad(reference.embedding_lookup(ids, leaf, _offsets()), leaf, up)
    torch.testing.assert_close(grads, dense[rows], rtol=1e-12, atol=1e-12)
    again = unique_row_grads(ids, _offsets(), up)[1]
    assert torch.equal(grads, again)


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_triton_fused_update_is_bitwise_repeatable(kind):
    weight0 = torch.randn(sum(FIELD_DIMS), 17, device=DEVICE)
    steps = _steps(2, batch=64)
    first = _run_fused(weight0, steps, kind, "triton")[0]
    second = _run_fused(weight0, steps, kind, "triton")[0]
    assert torch.equal(first, second)


def test_bounds_modes_of_fused_lookup():
    weight = torch.randn(sum(FIELD_DIMS), 4, device=DEVICE, requires_grad=True)
    opt = SparseRowOptimizer("sgd", lr=1.0)
    bad = torch.tensor([[0, 3, 0]], device=DEVICE)
    with pytest.raises(IndexError, match=r"field 1\).*id 3"):
        fused_embedding_lookup(bad, weight, _offsets(), opt, backend="torch")
    out = fused_embedding_lookup(bad, weight, _offsets(), opt, bounds_check="clamp_to_oov", backend="torch")
    assert torch.equal(out[0, 1], weight[52].detach())       # field 1's last row, not row 0 of the field
    before = weight.detach().clone()
    out.backward(torch.ones_like(out))
    changed = (weight.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == [0, 52, 53]


def test_module_forward_matches_field_embedding_and_counts_clamps():
    fused = FusedFieldEmbedding(FIELD_DIMS, 6, optimizer="adagrad", bounds_check="clamp_to_oov", backend="torch")
    plain = FieldEmbedding(FIELD_DIMS, 6, bounds_check="clamp_to_oov", backend="torch")
    with torch.no_grad():
        plain.weight.copy_(fused.weight)
    fused, plain = fused.to(DEVICE), plain.to(DEVICE)
    ids = torch.tensor([[1, 2, 9], [60, 0, 6]], device=DEVICE)
    assert torch.equal(fused(ids), plain(ids))
    assert fused.num_clamped == plain.num_clamped == 2
    with pytest.raises(ValueError, match="ids must have shape"):
        fused(ids[:, :2])


@pytest.mark.parametrize("kind", KINDS)
def test_module_checkpoint_round_trip(kind):
    a = FusedFieldEmbedding(FIELD_DIMS, 5, optimizer=kind, lr=0.05, backend="torch").to(DEVICE)
    for _ in range(2):
        ids = _zipf_ids(16)
        a(ids).square().sum().backward()
    b = FusedFieldEmbedding(FIELD_DIMS, 5, optimizer=kind, lr=0.05, backend="torch").to(DEVICE)
    b.load_state_dict(a.state_dict())
    assert b.optimizer.step_count == 2 and torch.equal(a.weight, b.weight)
    ids = _zipf_ids(16)
    a(ids).square().sum().backward()
    b(ids).square().sum().backward()
    assert torch.equal(a.weight, b.weight)
    for name, tensor in a.optimizer.state.items():
        assert torch.equal(tensor, b.optimizer.state[name])


@pytest.mark.interpreter
def test_module_triton_backend_trains_like_torch_backend():
    torch.manual_seed(1)
    a = FusedFieldEmbedding(FIELD_DIMS, 3, optimizer="adam", lr=0.05, backend="torch").to(DEVICE)
    b = FusedFieldEmbedding(FIELD_DIMS, 3, optimizer="adam", lr=0.05, backend="triton").to(DEVICE)
    with torch.no_grad():
        b.weight.copy_(a.weight)
    for _ in range(2):
        ids, target = _zipf_ids(32), torch.randn(32, device=DEVICE)
        for module in (a, b):
            ((module(ids).sum((1, 2)) - target) ** 2).mean().backward()
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        SparseRowOptimizer("rmsprop")
    with pytest.raises(ValueError, match="lr"):
        SparseRowOptimizer("sgd", lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        SparseRowOptimizer("adam", betas=(0.9, 1.0))
    weight = torch.randn(60, 3, requires_grad=True)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match="optimizer"):
        fused_embedding_lookup(ids, weight, torch.tensor(OFFSETS), torch.optim.SGD([weight], lr=1.0))
    with pytest.raises(ValueError, match="backend"):
        fused_embedding_lookup(ids, weight, torch.tensor(OFFSETS), SparseRowOptimizer("sgd"), backend="reference")
    opt = SparseRowOptimizer("adam")
    fused_embedding_lookup(ids, weight, torch.tensor(OFFSETS), opt, backend="torch").sum().backward()
    other = torch.randn(61, 3, requires_grad=True)
    with pytest.raises(ValueError, match="exp_avg"):
        fused_embedding_lookup(ids, other, torch.tensor(OFFSETS), opt, backend="torch").sum().backward()
    assert math.isclose(SparseRowOptimizer("adagrad").eps, 1e-8)


@pytest.mark.parametrize("field,value,match", [("lr", float("nan"), "lr must be"), ("betas", (1.0, 1.0), "betas must"),
                                               ("eps", -1.0, "eps must"), ("step", -2, "step"),
                                               ("initial_accumulator_value", float("inf"), "initial_accumulator")])
def test_load_state_dict_validates_hyper_parameters_like_the_constructor(field, value, match):
    from sfg_fast.optim import SparseRowOptimizer
    good = SparseRowOptimizer("adam", lr=0.1)
    state = good.state_dict()
    state[field] = value
    target = SparseRowOptimizer("adam", lr=0.2)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert target.lr == 0.2 and target.step_count == 0   # nothing changed on failure


# ops whose result the host must read from the device (a sync on GPUs, illegal in CUDA graph capture)
_HOST_READS = ("aten._local_scalar_dense", "aten.unique", "aten._unique", "aten.unique_consecutive", "aten.nonzero",
               "aten.masked_select", "aten.is_nonzero", "aten.equal")


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records host reads of tensor data, except of the tensors in ``host_tensors`` (the optimizer's step
    counter: a CPU tensor by design, whose read is no device sync)."""

    def __init__(self, host_tensors=()):
        super().__init__()
        self.seen = []
        self.host_tensors = list(host_tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(_HOST_READS) and not any(args and args[0] is t for t in self.host_tensors):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", KINDS)
def test_triton_fused_update_never_reads_device_data_on_the_host(kind):
    """The segment reduction is sized by B * N, not by a count of unique rows, so the backward (sort,
    segment ends, one kernel) needs no host sync: on GPUs the host runs ahead, and a step can be
    captured in a CUDA graph. Checked by the ops dispatched (a GPU twin counts real syncs)."""
    import torch.utils._python_dispatch  # noqa: F401
    weight = torch.randn(sum(FIELD_DIMS), 5, device=DEVICE, requires_grad=True)
    opt = SparseRowOptimizer(kind, **HYPER[kind])
    ids, upstream = _steps(1, batch=32, dim=5)[0]
    out = fused_embedding_lookup(ids, weight, _offsets(), opt, bounds_check="off", backend="triton")
    assert opt._step.device.type == "cpu"
    with _HostReads(host_tensors=[opt._step]) as mode:
        out.backward(upstream)
    assert mode.seen == []
    # a sanity check of the probe itself: the torch path counts its unique rows on the host
    out = fused_embedding_lookup(ids, weight, _offsets(), opt, bounds_check="off", backend="torch")
    with _HostReads(host_tensors=[opt._step]) as mode:
        out.backward(upstream)
    assert mode.seen


@pytest.mark.gpu
def test_triton_fused_update_does_not_sync_with_the_host():
    import warnings
    weight = torch.randn(sum(FIELD_DIMS), 16, device=DEVICE, requires_grad=True)
    opt = SparseRowOptimizer("adagrad", lr=0.1)
    ids, upstream = _steps(1, batch=256, dim=16)[0]
    for attempt in range(2):   # the first compiles
        out = fused_embedding_lookup(ids, weight, _offsets(), opt, bounds_check="off", backend="triton")
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out.backward(upstream)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert syncs == []


# ------------------------------------------------------- state that follows the table; autograd; failed steps

def _fused_backends():
    from sfg_fast._backend import unavailable_reason
    out = ["torch"]
    if unavailable_reason("triton", "embedding_lookup", torch.device(DEVICE)) is None:
        out.append("triton")
    if DEVICE == "cpu" and unavailable_reason("cpu", "", torch.device("cpu")) is None:
        out.append("cpu")
    return out


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_state_follows_the_table_to_another_dtype(kind):
    """Steps on an fp32 table, then the module in fp64 (torch path), then back in fp32 on every fused backend:
    the state is converted with the table, and the fp64 steps equal the fp64 reference."""
    ids, upstream = _zipf_ids(20), torch.randn(20, len(FIELD_DIMS), 5, device=DEVICE)
    for backend in _fused_backends():
        module = FusedFieldEmbedding(FIELD_DIMS, 5, optimizer=kind, lr=0.1, backend="auto").to(DEVICE)
        module(ids).backward(upstream)
        module.double()
        module.backend = "torch"
        module(ids).backward(upstream.double())
        assert {v.dtype for v in module.optimizer.state.values()} == {torch.float64}
        module.float()
        module.backend = backend
        module(ids).backward(upstream)
        assert {v.dtype for v in module.optimizer.state.values()} == {torch.float32}, backend
        assert module.optimizer.step_count == 3 and torch.isfinite(module.weight).all()
        # a checkpoint of the fp64 module loads into an fp32 one and trains on
        fp64 = FusedFieldEmbedding(FIELD_DIMS, 5, optimizer=kind, lr=0.1, backend="torch", dtype=torch.float64).to(DEVICE)
        fp64(ids).backward(upstream.double())
        fp32 = FusedFieldEmbedding(FIELD_DIMS, 5, optimizer=kind, lr=0.1, backend=backend).to(DEVICE)
        fp32.load_state_dict(fp64.state_dict())
        fp32(ids).backward(upstream)
        assert fp32.optimizer.step_count == 2 and torch.isfinite(fp32.weight).all(), backend


def test_every_backend_tells_autograd_the_table_changed():
    """The fused update writes the table in place; a graph that also saved the table (an L2 term on it) must
    raise autograd's in-place error on every backend, as the torch path's index_copy_ makes it, instead of
    differentiating the regulariser at the updated table."""
    ids = _zipf_ids(8)
    for backend in _fused_backends():
        weight = torch.randn(60, 4, device=DEVICE, requires_grad=True)
        penalty = (weight * weight).sum()       # recorded first, so its backward runs after the update
        V = fused_embedding_lookup(ids, weight, _offsets(), SparseRowOptimizer("sgd", lr=1.0), backend=backend)
        loss = V.sum() + penalty
        with pytest.raises(RuntimeError, match="inplace"):
            loss.backward()


def test_a_failed_step_does_not_count(monkeypatch):
    """Adam's bias correction uses the step count: a backward that fails must not advance it."""
    ids, upstream = _zipf_ids(10), torch.randn(10, len(FIELD_DIMS), 4, device=DEVICE)
    weight = torch.randn(60, 4, device=DEVICE, requires_grad=True)
    opt = SparseRowOptimizer("adam", lr=0.1)
    fused_embedding_lookup(ids, weight, _offsets(), opt, backend="torch").backward(upstream)
    assert opt.step_count == 1

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")
    monkeypatch.setattr(torch.Tensor, "index_copy_", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        fused_embedding_lookup(ids, weight, _offsets(), opt, backend="torch").backward(upstream)
    monkeypatch.undo()
    assert opt.step_count == 1


def test_non_contiguous_table_falls_back_to_torch_or_is_refused_in_forward():
    ids, upstream = _zipf_ids(6), torch.randn(6, len(FIELD_DIMS), 4, device=DEVICE)
    weight = torch.randn(4, 60, device=DEVICE).t().requires_grad_()
    assert not weight.is_contiguous()
    opt = SparseRowOptimizer("adam", lr=0.1)
    before = weight.detach().clone()
    fused_embedding_lookup(ids, weight, _offsets(), opt, backend="auto").backward(upstream)
    assert opt.step_count == 1 and not torch.equal(weight.detach(), before)
    for backend in [b for b in _fused_backends() if b != "torch"]:
        with pytest.raises(ValueError, match="weight must be contiguous"):
            fused_embedding_lookup(ids, weight, _offsets(), opt, backend=backend)
    assert opt.step_count == 1


@pytest.mark.parametrize("kind,edit,match", [
    ("adagrad", lambda s: s["state"]["sum"].fill_(-1.0), "negative"),
    ("adam", lambda s: s["state"]["exp_avg"].fill_(float("nan")), "NaN"),
    ("adam", lambda s: s["state"]["exp_avg_sq"].fill_(-0.5), "negative"),
    ("adam", lambda s: s["state"].pop("exp_avg_sq"), "exactly"),
    ("adagrad", lambda s: s["state"].update(extra=torch.zeros(3)), "exactly"),
    ("adam", lambda s: s["state"].update(exp_avg=torch.zeros(3, 3)), "must both be"),
    ("adagrad", lambda s: s["state"].update(sum=torch.zeros(60, dtype=torch.int64)), "floating"),
    ("adagrad", lambda s: s.update(eps=0.0), "eps"),
])
def test_load_state_dict_checks_the_state_and_changes_nothing_on_failure(kind, edit, match):
    ids, upstream = _zipf_ids(10), torch.randn(10, len(FIELD_DIMS), 3, device=DEVICE)
    weight = torch.randn(60, 3, device=DEVICE, requires_grad=True)
    source = SparseRowOptimizer(kind, lr=0.3)
    for _ in range(2):
        fused_embedding_lookup(ids, weight, _offsets(), source, backend="torch").backward(upstream)
    state = source.state_dict()
    edit(state)
    target = SparseRowOptimizer(kind, lr=0.7)
    with pytest.raises((ValueError, TypeError), match=match):
        target.load_state_dict(state)
    assert target.lr == 0.7 and target.step_count == 0 and target.state == {}


def test_eps_must_be_positive():
    with pytest.raises(ValueError, match="eps"):
        SparseRowOptimizer("adagrad", eps=0.0)


def test_fused_cuda_backend_glue_with_a_stand_in_extension(monkeypatch):
    """backend="cuda" of the fused lookup: the dispatch, the optimizer state it hands the kernel, the step
    count and the autograd version bump, with the two CUDA entry points replaced by torch stand-ins
    (the kernels themselves are tested on a GPU in tests/test_cuda_ext.py)."""
    import types
    from helpers import offsets_of, zipf_ids
    from sfg_fast import optim
    from sfg_fast._backend import BackendUnavailableError
    from sfg_fast.ops import cpu_ext

    field_dims, dim = [7, 3, 11], 4
    offsets = offsets_of(field_dims)
    # without a CUDA build or device the backend is refused in forward, quoting why
    weight = torch.randn(sum(field_dims), dim).requires_grad_()
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable"):
        optim.fused_embedding_lookup(zipf_ids(5, field_dims), weight, offsets, optim.SparseRowOptimizer("adagrad"),
                                     backend="cuda")
    calls = []

    def lookup(ids, w, offs):
        calls.append("lookup")
        return w.detach()[ids.long() + offs].clone()

    def update(w, momentum, ids, offs, grad_V, lr, eps):
        calls.append("update")
        assert w.dtype == momentum.dtype == grad_V.dtype == torch.float32 and momentum.shape == (w.shape[0],)
        rows, grads = optim.unique_row_grads(ids, offs, grad_V)
        acc = momentum[rows] + (grads * grads).mean(1)
        momentum[rows] = acc
        # through .data: like the kernel's raw pointer, a write autograd's version counter does not see
        w.data[rows] -= (lr / (acc.sqrt() + eps))[:, None] * grads

    monkeypatch.setattr(cpu_ext, "_C", types.SimpleNamespace(embedding_lookup_cuda=lookup,
                                                             rowwise_adagrad_update_cuda=update))
    real_reason = optim.unavailable_reason
    monkeypatch.setattr(optim, "unavailable_reason",
                        lambda backend, op="", device=None: None if backend == "cuda" else real_reason(backend, op, device))
    for kind, dtype, width, match in (("sgd", torch.float32, dim, "Adagrad only"),
                                      ("adagrad", torch.bfloat16, dim, "float32"),
                                      ("adagrad", torch.float32, 257, "D <= 256")):
        table = torch.randn(sum(field_dims), width, dtype=dtype).requires_grad_()
        with pytest.raises(BackendUnavailableError, match=match):
            optim.fused_embedding_lookup(zipf_ids(5, field_dims), table, offsets, optim.SparseRowOptimizer(kind),
                                         backend="cuda")
    import sfg_fast.ops
    loads = []
    real_load = sfg_fast.ops.load_backends
    monkeypatch.setattr(sfg_fast.ops, "load_backends", lambda: loads.append(1) or real_load())
    module = optim.FusedFieldEmbedding(field_dims, dim, optimizer="adagrad", lr=0.05, backend="cuda")
    twin = optim.FusedFieldEmbedding(field_dims, dim, optimizer="adagrad", lr=0.05, backend="torch")
    twin.load_state_dict(module.state_dict())
    for step in range(3):
        ids = zipf_ids(40, field_dims, generator=torch.Generator().manual_seed(step))
        up = torch.randn(40, len(field_dims), dim)
        V = module(ids)
        saved = module.weight.pow(2)          # a graph that saved the table before the update
        V.backward(up)
        twin(ids).backward(up)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.sum().backward()
    assert calls == ["lookup", "update"] * 3 and module.optimizer.step_count == 3
    assert loads        # the extension's kernels are registered before the check (a fresh process has none)
    torch.testing.assert_close(module.weight, twin.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(module.optimizer.state["sum"], twin.optimizer.state["sum"], rtol=1e-6, atol=1e-9)


def test_meta_built_table_materialises_fresh_optimizer_state():
    """Built on the meta device (no memory) then materialised with to_empty: the state becomes zeros on the
    new device, and the step counter stays a CPU tensor (it is read on the host every step)."""
    with torch.device("meta"):
        table = FusedFieldEmbedding(FIELD_DIMS, 3, optimizer="adam")
    assert table.optimizer._step.device.type == "cpu"
    assert {v.device.type for v in table.optimizer.state.values()} == {"meta"}
    table = table.to_empty(device="cpu")
    with torch.no_grad():       # to_empty leaves every tensor uninitialised
        table.offsets.copy_(_offsets())
        table.field_sizes.copy_(torch.tensor(FIELD_DIMS))
        table.clamped_count.zero_()
        table.weight.normal_()
    for value in table.optimizer.state.values():
        assert value.device.type == "cpu" and not value.any()
    table(torch.zeros(2, len(FIELD_DIMS), dtype=torch.int64)).sum().backward()
    assert table.optimizer.step_count == 1


def test_a_shallow_copy_has_its_own_step_and_hyper_parameters():
    """copy.copy: the step counter and the hyper-parameter tensor a compiled graph reads are the copy's own
    (shared, the copy's lr or steps would change the original's compiled updates but not its eager ones)."""
    import copy
    opt = SparseRowOptimizer("adam", lr=0.1)
    opt.prepare(torch.zeros(4, 2))
    other = copy.copy(opt)
    other.lr, other.step_count = 0.7, 5
    assert opt.lr == float(opt._hyper[0]) == 0.1 and opt.step_count == 0
    assert other.lr == float(other._hyper[0]) == 0.7 and other.step_count == 5
    assert other.state["exp_avg"] is opt.state["exp_avg"] and other.state is not opt.state


def _trained_pair():
    ids = torch.tensor([[0, 1, 2], [2, 3, 4]])
    a = FusedFieldEmbedding([3, 4, 5], 4, lr=0.1)
    a(ids).sum().backward()
    b = FusedFieldEmbedding([3, 4, 9], 4, lr=0.5)
    b(ids).sum().backward()
    b(ids).sum().backward()
    return ids, a, b


def _snapshot(module):
    opt = module.optimizer
    return (module.weight.detach().clone(), opt.step_count, opt.lr,
            {k: v.clone() for k, v in opt.state.items()}, module.num_clamped)


def _assert_unchanged(before, module):
    after = _snapshot(module)
    assert torch.equal(before[0], after[0]) and before[1:3] == after[1:3] and before[4] == after[4]
    assert before[3].keys() == after[3].keys()
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])


def test_loading_another_tables_optimizer_state_changes_nothing():
    ids, a, b = _trained_pair()
    before = _snapshot(a)
    state = dict(b.state_dict())     # a plain dict: no field_dims metadata to refuse it first
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\['sum'\] has shape \[16\].*needs \[12\]"):
        a.load_state_dict(state, strict=False)
    _assert_unchanged(before, a)
    a(ids).sum().backward()          # still trains
    bad = dict(a.state_dict())
    bad["_extra_state"] = dict(bad["_extra_state"], num_clamped=-3)
    before = _snapshot(a)
    with pytest.raises(ValueError, match="num_clamped"):
        a.load_state_dict(bad)
    _assert_unchanged(before, a)


def test_assigning_an_optimizer_of_another_table_keeps_the_old_one():
    ids, a, b = _trained_pair()
    old = a.optimizer
    with pytest.raises(ValueError, match="optimizer state 'sum' has shape"):
        a.optimizer = b.optimizer
    assert a.optimizer is old
    a(ids).sum().backward()


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_overlapping_table_is_refused_in_forward_before_any_state_moves(kind):
    offsets = torch.tensor([0, 3, 7])
    ids = torch.tensor([[0, 1, 2], [2, 3, 4]])
    table = torch.randn(1, 4).expand(12, 4).requires_grad_()
    opt = SparseRowOptimizer(kind, lr=0.1)
    opt.prepare(torch.empty(12, 4))
    before = {k: v.clone() for k, v in opt.state.items()}
    with pytest.raises(ValueError, match="weight's elements overlap in memory"):
        fused_embedding_lookup(ids, table, offsets, opt)
    assert opt.step_count == 0 and all(torch.equal(before[k], opt.state[k]) for k in before)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_table_without_columns_is_refused_in_forward(backend):
    W = torch.randn(7, 0).requires_grad_()
    with pytest.raises(ValueError, match=r"weight must have at least one column \(D >= 1\)"):
        fused_embedding_lookup(torch.tensor([[0, 1]]), W, torch.tensor([0, 3]), SparseRowOptimizer("sgd"),
                               backend=backend)


def test_step_rows_checks_its_rows():
    W = torch.zeros(6, 2)
    opt = SparseRowOptimizer("sgd", lr=1.0)
    with pytest.raises(ValueError, match="rows must be unique"):
        opt.step_rows(W, torch.tensor([1, 1]), torch.ones(2, 2))
    with pytest.raises(IndexError, match=r"rows must lie in \[0, 6\)"):
        opt.step_rows(W, torch.tensor([1, 9]), torch.ones(2, 2))
    with pytest.raises(IndexError, match=r"rows must lie in \[0, 6\)"):
        opt.step_rows(W, torch.tensor([-1, 2]), torch.ones(2, 2))
    with pytest.raises(TypeError, match="rows must be a 1-D int64"):
        opt.step_rows(W, torch.tensor([1, 2], dtype=torch.int32), torch.ones(2, 2))
    assert opt.step_count == 0 and not W.any()
    opt.step_rows(W, torch.tensor([4, 1]), torch.ones(2, 2))
    assert opt.step_count == 1 and W[1].tolist() == [-1.0, -1.0] and W[4].tolist() == [-1.0, -1.0]


def test_a_bad_backend_variable_is_refused_by_fused_lookups(monkeypatch):
    monkeypatch.setenv("SFG_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SFG_FAST_BACKEND must be one of"):
        FusedFieldEmbedding([3, 4], 4)(torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize("field,value", [("lr", "0.1"), ("betas", "00"), ("initial_accumulator_value", "x"),
                                         ("initial_accumulator_value", None), ("init_std", "0.1")])
def test_numbers_given_as_strings_are_refused_by_name(field, value):
    with pytest.raises(TypeError, match=field):
        FusedFieldEmbedding([3], 4, optimizer="adam" if field == "betas" else "adagrad", **{field: value})
