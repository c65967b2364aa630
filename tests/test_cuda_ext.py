"""The CUDA kernels of sfg_fast._C (csrc/embedding_cuda.cu) against the reference, on a GPU.

Skipped (by conftest's cuda_ext rule) unless the extension was built against a CUDA torch and a
CUDA device is present. Gathers compare exactly; the fused rowwise Adagrad is compared with an
fp64 update written out here (the 2x rule of tests/helpers.py against the same update in fp32 torch), checked for
untouched rows and for bitwise repeatability (it uses no atomics).
"""
import pytest
import torch

from helpers import assert_close_2x, offsets_of, zipf_ids
from sfg_fast import functional, reference

pytestmark = pytest.mark.cuda_ext
DEVICE = "cuda"


def _ext():
    from sfg_fast import _C
    return _C


def _table(field_dims, dim, dtype=torch.float32):
    return torch.randn(sum(field_dims), dim, dtype=torch.float64).to(dtype).to(DEVICE)


SHAPES = [(1, [3, 5], 1), (37, [7, 1, 300, 11], 17), (256, [50] * 6, 16), (1000, [100_000, 7, 3000], 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch,field_dims,dim", SHAPES)
def test_cuda_lookup_matches_reference_exactly(dtype, id_dtype, batch, field_dims, dim):
    weight = _table(field_dims, dim, dtype)
    offsets = offsets_of(field_dims).to(DEVICE)
    ids = zipf_ids(batch, field_dims, dtype=id_dtype).to(DEVICE)
    out = _ext().embedding_lookup_cuda(ids, weight, offsets)
    torch.cuda.synchronize()
    expected = reference.embedding_lookup(ids.cpu(), weight.cpu(), offsets.cpu())
    assert out.dtype == dtype and out.shape == (batch, len(field_dims), dim)
    assert torch.equal(out.cpu(), expected)


def test_cuda_lookup_misaligned_rows_and_strided_ids():
    # D = 3 fp32 rows (12 bytes) take the 4-byte path; ids as a transposed (non-contiguous) view
    field_dims = [40, 9, 123]
    weight = _table(field_dims, 3)
    offsets = offsets_of(field_dims).to(DEVICE)
    ids = zipf_ids(64, field_dims).to(DEVICE).t().contiguous().t()
    assert not ids.is_contiguous()
    out = _ext().embedding_lookup_cuda(ids, weight, offsets)
    assert torch.equal(out.cpu(), reference.embedding_lookup(ids.cpu(), weight.cpu(), offsets.cpu()))


def test_cuda_backend_through_functional_and_bounds():
    field_dims = [10, 20]
    weight = _table(field_dims, 16)
    offsets = offsets_of(field_dims).to(DEVICE)
    ids = torch.tensor([[0, 19], [9, 0]], device=DEVICE)
    out = functional.embedding_lookup(ids, weight, offsets, backend="cuda")
    assert torch.equal(out, weight[torch.tensor([[0, 29], [9, 10]], device=DEVICE)])
    with pytest.raises(IndexError, match="field 1"):
        functional.embedding_lookup(torch.tensor([[0, 20]], device=DEVICE), weight, offsets, backend="cuda")


def _adagrad(weight, momentum, ids, offsets, grad_V, lr, eps, dtype):
    """Row-wise Adagrad on the unique rows computed by torch in ``dtype`` (FBGEMM's formula); returns
    new (weight, momentum)."""
    w, m = weight.to(dtype).clone(), momentum.to(dtype).clone()
    rows = (ids.to(torch.int64) + offsets).reshape(-1)
    uniq, inverse = torch.unique(rows, return_inverse=True)
    g = torch.zeros(uniq.numel(), w.shape[1], dtype=dtype, device=w.device)
    g.index_add_(0, inverse, grad_V.reshape(-1, w.shape[1]).to(dtype))
    acc = m[uniq] + (g * g).mean(dim=1)
    m[uniq] = acc
    w[uniq] = w[uniq] - lr * g / (acc.sqrt() + eps)[:, None]
    return w, m


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch,field_dims,dim", SHAPES + [(512, [4, 4], 16), (64, [30, 30], 40)])
def test_cuda_rowwise_adagrad_matches_fp64(id_dtype, batch, field_dims, dim):
    weight = _table(field_dims, dim)
    momentum = torch.rand(weight.shape[0], device=DEVICE)
    offsets = offsets_of(field_dims).to(DEVICE)
    ids = zipf_ids(batch, field_dims, dtype=id_dtype).to(DEVICE)     # hot rows repeat many times
    grad_V = torch.randn(batch, len(field_dims), dim, device=DEVICE)
    w64, m64 = _adagrad(weight, momentum, ids, offsets, grad_V, 0.05, 1e-8, torch.float64)
    w, m = weight.clone(), momentum.clone()
    _ext().rowwise_adagrad_update_cuda(w, m, ids, offsets, grad_V, 0.05, 1e-8)
    torch.cuda.synchronize()
    wt, mt = _adagrad(weight, momentum, ids, offsets, grad_V, 0.05, 1e-8, torch.float32)   # torch's fp32 twin
    assert_close_2x(m, m64, mt, "momentum")
    assert_close_2x(w, w64, wt, "weight")


def test_cuda_rowwise_adagrad_touches_only_looked_up_rows_and_is_bitwise_repeatable():
    field_dims = [1000, 50, 7]
    weight = _table(field_dims, 16)
    momentum = torch.zeros(weight.shape[0], device=DEVICE)
    offsets = offsets_of(field_dims).to(DEVICE)
    ids = zipf_ids(4096, field_dims, a=1.5).to(DEVICE)
    grad_V = torch.randn(4096, 3, 16, device=DEVICE)
    results = []
    for _ in range(3):
        w, m = weight.clone(), momentum.clone()
        _ext().rowwise_adagrad_update_cuda(w, m, ids, offsets, grad_V, 0.1, 1e-8)
        results.append((w, m))
    for w, m in results[1:]:
        assert torch.equal(w, results[0][0]) and torch.equal(m, results[0][1])
    touched = torch.zeros(weight.shape[0], dtype=torch.bool, device=DEVICE)
    touched[(ids + offsets).reshape(-1)] = True
    w, m = results[0]
    assert torch.equal(w[~touched], weight[~touched]) and torch.equal(m[~touched], momentum[~touched])
    assert bool((m[touched] > 0).all())


def test_cuda_rowwise_adagrad_matches_triton_fused_update():
    from sfg_fast.optim import SparseRowOptimizer
    field_dims = [5000, 300, 20]
    weight = _table(field_dims, 16)
    offsets = offsets_of(field_dims).to(DEVICE)
    ids = zipf_ids(2048, field_dims).to(DEVICE)
    grad_V = torch.randn(2048, 3, 16, device=DEVICE)
    opt = SparseRowOptimizer("adagrad", lr=0.05)
    w_triton = weight.clone()
    opt.step_lookup_triton(w_triton, grad_V, ids, offsets)
    w_cuda, m_cuda = weight.clone(), torch.zeros(weight.shape[0], device=DEVICE)
    _ext().rowwise_adagrad_update_cuda(w_cuda, m_cuda, ids, offsets, grad_V, 0.05, 1e-8)
    torch.testing.assert_close(m_cuda, opt.state["sum"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w_cuda, w_triton, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_fused_lookup_cuda_backend_trains_like_the_torch_backend(id_dtype):
    """backend="cuda" of optim.fused_embedding_lookup / FusedFieldEmbedding: the CUDA gather forward and
    the sorted row-wise Adagrad in backward, three steps with hot rows, against the torch backend."""
    from sfg_fast.optim import FusedFieldEmbedding
    field_dims = [5000, 300, 20, 1]
    cuda = FusedFieldEmbedding(field_dims, 16, optimizer="adagrad", lr=0.05, backend="cuda").to(DEVICE)
    twin = FusedFieldEmbedding(field_dims, 16, optimizer="adagrad", lr=0.05, backend="torch").to(DEVICE)
    twin.load_state_dict(cuda.state_dict())
    for step in range(3):
        ids = zipf_ids(1024, field_dims, generator=torch.Generator().manual_seed(step), dtype=id_dtype).to(DEVICE)
        up = torch.randn(1024, len(field_dims), 16, device=DEVICE)
        V = cuda(ids)
        if step == 0:      # one table: the gathers agree exactly
            assert torch.equal(V, twin(ids).detach())
        else:              # the two updates' sums round differently (sorted segments vs index_add)
            torch.testing.assert_close(V, twin(ids).detach(), rtol=1e-5, atol=1e-6)
        V.backward(up)
        twin(ids).backward(up)
    torch.cuda.synchronize()
    assert cuda.optimizer.step_count == 3 and cuda.weight.grad is None
    torch.testing.assert_close(cuda.optimizer.state["sum"], twin.optimizer.state["sum"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cuda.weight, twin.weight, rtol=1e-5, atol=1e-6)


def test_cuda_ext_rejects_bad_arguments():
    weight = _table([4, 4], 16)
    offsets = offsets_of([4, 4]).to(DEVICE)
    ids = torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError, match="ids"):
        _ext().embedding_lookup_cuda(ids.float(), weight, offsets)
    with pytest.raises(ValueError, match="offsets"):
        _ext().embedding_lookup_cuda(ids, weight, offsets[:1])
    with pytest.raises(ValueError, match="one CUDA device"):
        _ext().embedding_lookup_cuda(ids.cpu(), weight, offsets)
    with pytest.raises(ValueError, match="grad_V"):
        _ext().rowwise_adagrad_update_cuda(weight, torch.zeros(8, device=DEVICE), ids, offsets,
                                           torch.zeros(2, 2, 8, device=DEVICE), 0.1, 1e-8)
    with pytest.raises(ValueError, match="momentum"):
        _ext().rowwise_adagrad_update_cuda(weight, torch.zeros(7, device=DEVICE), ids, offsets,
                                           torch.zeros(2, 2, 16, device=DEVICE), 0.1, 1e-8)
