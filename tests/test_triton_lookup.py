"""Triton multi-field embedding lookup: forward gather, table gradient (atomic and deterministic),
bounds modes, and the int64 addressing probe. Runs under TRITON_INTERPRET=1 on CPU (conftest)."""
import pytest
import torch

from helpers import assert_int64_pointer_offsets, offsets_of, zipf_ids
import sfg_fast.functional as SF
from sfg_fast import reference

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, field_dims, D): B=1, N=2, odd D (1, 3, 17), non-powers of 2, a hot field of 50 rows.
CASES = [(1, [3, 5], 1), (5, [2, 7, 1], 3), (33, [11, 4, 9, 2, 6], 17), (64, [50, 3], 16)]


def _ops():
    from sfg_fast.ops import embedding_lookup as ops
    return ops


def _table(field_dims, dim, dtype=torch.float32):
    return torch.randn(sum(field_dims), dim, device=DEVICE).to(dtype)


def _offsets(field_dims):
    starts = [0]
    for x in field_dims[:-1]:
        starts.append(starts[-1] + x)
    return torch.tensor(starts, dtype=torch.int64, device=DEVICE)


def _ids(batch, field_dims, dtype=torch.int64, zipf=True):
    """Zipf-like ids: most samples hit the first rows of each field, so duplicates are common."""
    cols = []
    for size in field_dims:
        if zipf:
            ranks = torch.arange(1, size + 1, dtype=torch.float64)
            col = torch.multinomial(1.0 / ranks ** 1.2, batch, replacement=True)
        else:
            col = torch.randint(0, size, (batch,))
        cols.append(col)
    return torch.stack(cols, 1).to(dtype).to(DEVICE)


def _max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_2x(kernel, ref64, torch_same_dtype, floor):
    """Kernel error vs the fp64 reference <= 2x torch's same-dtype error + floor."""
    bound = 2 * _max_err(torch_same_dtype, ref64) + floor
    torch.testing.assert_close(kernel.double(), ref64.double(), rtol=0, atol=bound)


@pytest.mark.parametrize("batch,field_dims,dim", CASES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_forward_is_exact_gather(batch, field_dims, dim, id_dtype, dtype):
    weight, offsets = _table(field_dims, dim, dtype), _offsets(field_dims)
    ids = _ids(batch, field_dims, id_dtype)
    out = SF.embedding_lookup(ids, weight, offsets, backend="triton")
    assert out.dtype == dtype and out.shape == (batch, len(field_dims), dim)
    assert torch.equal(out, reference.embedding_lookup(ids, weight, offsets))


def test_forward_writes_every_element_of_a_poisoned_output():
    field_dims, dim = [11, 4, 9], 17
    weight, offsets, ids = _table(field_dims, dim), _offsets(field_dims), _ids(7, field_dims)
    out = torch.full((7, 3, dim), float("nan"), device=DEVICE)
    _ops().embedding_lookup_fwd(ids, weight, offsets, out=out)
    assert torch.equal(out, reference.embedding_lookup(ids, weight, offsets))


def test_non_contiguous_ids_and_row_strided_table():
    field_dims, dim = [6, 5, 7], 3
    ids = _ids(9, field_dims).t().contiguous().t()          # column-major [B, N]
    assert not ids.is_contiguous()
    base = torch.randn(sum(field_dims), dim + 4, device=DEVICE)
    weight = base[:, 2:2 + dim]                              # row stride D + 4
    offsets = _offsets(field_dims)
    out = SF.embedding_lookup(ids, weight, offsets, backend="triton")
    assert torch.equal(out, reference.embedding_lookup(ids, weight, offsets))


def test_column_strided_table_gathers_like_the_reference():
    """A transposed table (rows not contiguous along D) is gathered too, with its gradient."""
    field_dims, dim = [6, 5, 7], 4
    ids = _ids(9, field_dims)
    weight = torch.randn(dim, sum(field_dims), device=DEVICE).t()   # strides (1, V)
    offsets = _offsets(field_dims)
    assert weight.stride(1) != 1
    out = SF.embedding_lookup(ids, weight, offsets, backend="triton")
    assert torch.equal(out, reference.embedding_lookup(ids, weight, offsets))
    upstream = torch.randn(9, 3, dim, device=DEVICE)
    torch.testing.assert_close(_grads(ids, weight, offsets, upstream, "triton"),
                               _grads(ids, weight, offsets, upstream, "reference"))


def _grads(ids, weight, offsets, upstream, backend):
    w = weight.detach().clone().requires_grad_()
    if backend == "reference":
        out = reference.embedding_lookup(ids, w, offsets)
    else:
        out = SF.embedding_lookup(ids, w, offsets, backend=backend)
    (grad,) = torch.autograd.grad(out, w, upstream.to(w.dtype))
    return grad


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("batch,field_dims,dim", CASES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mode", ["atomic", "sorted"])
def test_table_gradient_sums_duplicates(batch, field_dims, dim, id_dtype, mode, request):
    if mode == "sorted":
        request.getfixturevalue("deterministic")
    weight, offsets = _table(field_dims, dim), _offsets(field_dims)
    ids = _ids(batch, field_dims, id_dtype)
    upstream = torch.randn(batch, len(field_dims), dim, device=DEVICE)
    ref = _grads(ids, weight.double(), offsets, upstream.double(), "reference")
    torch32 = _grads(ids, weight, offsets, upstream, "torch")
    got = _grads(ids, weight, offsets, upstream, "triton")
    assert got.dtype == torch.float32 and got.shape == weight.shape
    assert_2x(got, ref, torch32, floor=1e-6)
    untouched = ref.abs().sum(1) == 0
    assert torch.equal(got[untouched], torch.zeros_like(got[untouched]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["atomic", "sorted"])
def test_half_table_gradient_accumulates_in_fp32(dtype, mode, request):
    if mode == "sorted":
        request.getfixturevalue("deterministic")
    field_dims, dim, batch = [50, 3], 16, 64
    weight, offsets, ids = _table(field_dims, dim, dtype), _offsets(field_dims), _ids(batch, field_dims)
    upstream = torch.randn(batch, 2, dim, device=DEVICE).to(dtype)
    ref = _grads(ids, weight.double(), offsets, upstream.double(), "reference")
    got = _grads(ids, weight, offsets, upstream, "triton")
    assert got.dtype == dtype
    # fp32 accumulation then one rounding: within one half-precision rounding of the exact sum.
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), ref, rtol=ulp, atol=1e-6)


def test_fp64_table_gradient():
    field_dims, dim, batch = [50, 3], 3, 64
    weight, offsets, ids = _table(field_dims, dim, torch.float64), _offsets(field_dims), _ids(batch, field_dims)
    upstream = torch.randn(batch, 2, dim, device=DEVICE, dtype=torch.float64)
    ref = _grads(ids, weight, offsets, upstream, "reference")
    torch.testing.assert_close(_grads(ids, weight, offsets, upstream, "triton"), ref, rtol=1e-12, atol=1e-12)


def test_sorted_backward_segments_cross_program_boundaries(deterministic):
    """Segments are owned by the position that starts them; with more positions than one program
    holds (1024 under the interpreter), hot rows' runs span several programs, and only the head's
    program may write the row (sum of the whole run), with no host-side count of unique rows."""
    from test_sparse_optim import _HostReads
    field_dims, dim, batch = [4, 300, 2], 3, 700           # 2100 positions: 3 programs
    weight, offsets = _table(field_dims, dim), _offsets(field_dims)
    ids = _ids(batch, field_dims)
    upstream = torch.randn(batch, 3, dim, device=DEVICE)
    ref = _grads(ids, weight.double(), offsets, upstream.double(), "reference")
    torch32 = _grads(ids, weight, offsets, upstream, "torch")
    w = weight.detach().clone().requires_grad_()
    out = SF.embedding_lookup(ids, w, offsets, bounds_check="off", backend="triton")
    with _HostReads() as mode:
        (got,) = torch.autograd.grad(out, w, upstream)
    assert mode.seen == []
    assert_2x(got, ref, torch32, floor=1e-6)


def _window_crossing_ids():
    """Field 0's rows occur in runs that start and end on and around the segment reduction's window
    boundaries of the sorted list: a run of exactly one window, one just past it, single ids, a run
    of over CHUNK windows (its pieces take two phase-1 steps), a run ending on a window's last position.
    Field 1 has 5 rows, so its runs cross windows too."""
    from sfg_fast.ops.embedding_lookup import _segment_blocks
    _, chunk, window = _segment_blocks(1 << 20, 16)
    counts = [window, window + 1, 1, (chunk + 2) * window + 5, window - 1, 1, 2 * window]
    col0 = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    col0 = col0[torch.randperm(col0.numel())]
    col1 = torch.randint(0, 5, (col0.numel(),))
    return torch.stack([col0, col1], 1).to(DEVICE), [len(counts), 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sorted_backward_sums_runs_across_windows(deterministic, dtype):
    ids, field_dims = _window_crossing_ids()
    dim = 3
    weight, offsets = _table(field_dims, dim, dtype), _offsets(field_dims)
    upstream = torch.randn(ids.shape[0], 2, dim, device=DEVICE, dtype=dtype)
    ref = _grads(ids, weight.double(), offsets, upstream.double(), "reference")
    got = _grads(ids, weight, offsets, upstream, "triton")
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    else:
        assert_2x(got, ref, _grads(ids, weight, offsets, upstream, "torch"), floor=1e-6)
    assert torch.equal(got, _grads(ids, weight, offsets, upstream, "triton"))


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_fused_update_sums_runs_across_windows(kind):
    from sfg_fast.optim import SparseRowOptimizer, fused_embedding_lookup
    ids, field_dims = _window_crossing_ids()
    dim, offsets = 5, _offsets(field_dims)
    weight0 = _table(field_dims, dim)
    upstream = torch.randn(ids.shape[0], 2, dim, device=DEVICE)

    def step(dtype, backend):
        weight = weight0.to(dtype).clone().requires_grad_()
        opt = SparseRowOptimizer(kind, lr=0.05, eps=1e-8)
        fused_embedding_lookup(ids, weight, offsets, opt, backend=backend).backward(upstream.to(dtype))
        return weight.detach()

    expected = step(torch.float64, "torch")
    assert_2x(step(torch.float32, "triton"), expected, step(torch.float32, "torch"), floor=1e-6)


def test_deterministic_backward_is_bitwise_repeatable(deterministic):
    field_dims, dim, batch = [50, 3, 7], 17, 128
    weight, offsets, ids = _table(field_dims, dim), _offsets(field_dims), _ids(batch, field_dims)
    upstream = torch.randn(batch, 3, dim, device=DEVICE)
    first = _grads(ids, weight, offsets, upstream, "triton")
    second = _grads(ids, weight, offsets, upstream, "triton")
    assert torch.equal(first, second)


def test_bounds_fatal_names_field_and_id():
    field_dims = [3, 5]
    weight, offsets = _table(field_dims, 3), _offsets(field_dims)
    ids = torch.tensor([[0, 1], [2, 5]], device=DEVICE)
    with pytest.raises(IndexError, match=r"field 1\).*id 5"):
        SF.embedding_lookup(ids, weight, offsets, backend="triton")
    with pytest.raises(IndexError, match=r"field 0\).*id -1"):
        SF.embedding_lookup(torch.tensor([[-1, 0]], device=DEVICE), weight, offsets, backend="triton")


def test_bounds_clamp_to_oov_and_off():
    field_dims = [3, 5]
    weight, offsets = _table(field_dims, 3), _offsets(field_dims)
    bad = torch.tensor([[0, 9], [7, -2], [1, 4]], device=DEVICE, dtype=torch.int32)
    out = SF.embedding_lookup(bad, weight, offsets, "clamp_to_oov", backend="triton")
    assert torch.equal(out, reference.embedding_lookup(bad, weight, offsets, "clamp_to_oov"))
    assert torch.equal(out[0, 1], weight[3 + 4]) and torch.equal(out[1, 0], weight[2])  # each field's last row
    good = torch.tensor([[2, 4], [0, 0]], device=DEVICE)
    out = SF.embedding_lookup(good, weight, offsets, "off", backend="triton")
    assert torch.equal(out, reference.embedding_lookup(good, weight, offsets))


def test_row_offsets_are_int64_in_generated_code():
    """int64 addressing (helpers.assert_int64_pointer_offsets) of the gather and the fused sparse
    update, whose segment reduction the deterministic backward shares."""
    assert_int64_pointer_offsets([
        ("sfg_fast.kernels.embedding_lookup", "_embedding_lookup_fwd_kernel",
         {"ids_ptr": "*i32", "offsets_ptr": "*i64", "weight_ptr": "*fp32", "out_ptr": "*fp32"},
         {"BLOCK_B": 4, "BLOCK_N": 4, "BLOCK_D": 16})] + [
        ("sfg_fast.kernels.sparse_update", "_sparse_update_kernel",
         {"weight_ptr": "*bf16", "grad_ptr": "*bf16", "perm_ptr": "*i64", "sorted_rows_ptr": keys,
          "seg_end_ptr": keys, "partial_ptr": "*fp32", "state1_ptr": "*fp32", "state2_ptr": "*fp32",
          "lr": "fp32", "eps": "fp32", "beta1": "fp32", "beta2": "fp32", "bias1": "fp32", "bias2": "fp32"},
         {"KIND": 2, "PHASE": phase, "BLOCK_P": 4, "CHUNK": 16, "WINDOW": 128, "BLOCK_D": 16})
        for phase in (0, 1) for keys in ("*i64", "*i32")] + [    # 32-bit keys below 2^31 rows (sorted_segments)
        ("sfg_fast.kernels.embedding_lookup", "_embedding_lookup_bwd_sorted_kernel",
         {"grad_ptr": "*fp32", "grad_weight_ptr": "*fp32", "perm_ptr": "*i64", "sorted_rows_ptr": keys,
          "seg_end_ptr": keys, "partial_ptr": "*fp32"},
         {"ACC_DTYPE": "tl.float32", "PHASE": phase, "BLOCK_P": 4, "CHUNK": 16, "WINDOW": 128, "BLOCK_D": 16})
        for phase in (0, 1) for keys in ("*i64", "*i32")] + [
        # the sort-free update (SFG_FAST_SPARSE_DEDUP=map): the map is indexed by row, the [B*N, D]
        # accumulator by position * D
        ("sfg_fast.kernels.sparse_update", "_claim_rows_kernel",
         {"ids_ptr": "*i32", "offsets_ptr": "*i64", "row_map_ptr": "*i32"}, {"BLOCK_P": 16}),
        ("sfg_fast.kernels.sparse_update", "_accumulate_rows_kernel",
         {"ids_ptr": "*i64", "offsets_ptr": "*i64", "row_map_ptr": "*i32", "grad_ptr": "*fp32", "acc_ptr": "*fp32"},
         {"BLOCK_P": 4, "BLOCK_D": 16}),
        ("sfg_fast.kernels.sparse_update", "_owner_update_kernel",
         {"ids_ptr": "*i32", "offsets_ptr": "*i64", "row_map_ptr": "*i32", "acc_ptr": "*fp32", "weight_ptr": "*fp32",
          "state1_ptr": "*fp32", "state2_ptr": "*fp32", "lr": "fp32", "eps": "fp32", "beta1": "fp32",
          "beta2": "fp32", "bias1": "fp32", "bias2": "fp32"},
         {"KIND": 2, "BLOCK_P": 4, "BLOCK_D": 16})])


@pytest.mark.gpu
def test_fatal_bounds_check_syncs_with_the_host_once():
    """"fatal" needs the ids on the host side once (to raise before a kernel reads a bad row); the
    offsets test rides in the same device reduction. "off" never syncs."""
    import warnings
    field_dims = [50, 7, 300]
    weight = _table(field_dims, 16)
    offsets = _offsets(field_dims)
    ids = _ids(64, field_dims, torch.int64)
    SF.embedding_lookup(ids, weight, offsets, bounds_check="fatal", backend="triton")   # compile first
    torch.cuda.synchronize()
    counts, where = {}, {}
    for mode in ("fatal", "off"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                SF.embedding_lookup(ids, weight, offsets, bounds_check=mode, backend="triton")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # (torch also warns, once, that the sync debug mode is a prototype: not a sync)
        syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
        counts[mode] = len(syncs)
        where[mode] = [f"{w.filename}:{w.lineno}: {str(w.message)[:120]}" for w in syncs]
    assert counts == {"fatal": 1, "off": 0}, where     # the lines that synced


def test_sorted_segments_take_32_bit_keys_below_2_31_rows():
    """Tables under 2^31 rows sort 32-bit keys (half a 64-bit radix sort's passes); the grouping (rows, the
    stable order of positions, the segment ends) is the one of 64-bit keys."""
    from sfg_fast.ops.embedding_lookup import sorted_segments
    field_dims = [7, 1, 50]
    ids = zipf_ids(300, field_dims)
    offsets = offsets_of(field_dims)
    narrow = sorted_segments(ids, offsets, sum(field_dims))
    wide = sorted_segments(ids, offsets, 2 ** 31)
    assert [t.dtype for t in narrow] == [torch.int32, torch.int64, torch.int32]
    assert [t.dtype for t in wide] == [torch.int64, torch.int64, torch.int64]
    for a, b in zip(narrow, wide):
        assert torch.equal(a.long(), b)
    flat = (ids + offsets).reshape(-1)
    assert torch.equal(flat[wide[1]], wide[0]) and bool((wide[0][1:] >= wide[0][:-1]).all())
