"""The fused training step without host syncs: what a CUDA graph capture of a whole step needs.

On CPU the capture branch of the data checks is exercised by pretending a capture is under way
(the checks then assert on the device, as they must inside a graph, instead of reading values on the
host); on a GPU the whole step (fused lookup with its sparse update, interaction, loss, backward, dense
optimizer) is captured and replayed, and must train exactly as the same steps run eagerly.
"""
import copy

import pytest
import torch

import sfg_fast.functional as SF
from sfg_fast import _checks
from sfg_fast.nn import PairwiseDecoder, SFGEncoder
from sfg_fast.optim import FusedFieldEmbedding
from test_sparse_optim import _HostReads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def pretend_capture(monkeypatch):
    monkeypatch.setattr(_checks, "capturing", lambda t: True)


def test_label_check_inside_a_capture_asserts_on_the_device(pretend_capture):
    logits = torch.randn(6)
    good = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5, 1.0])
    with _HostReads() as mode:
        SF.bce_with_logits(logits, good, backend="torch")
    assert mode.seen == []
    for bad in (float("nan"), 1.5, -0.1):
        labels = good.clone()
        labels[3] = bad
        with pytest.raises(RuntimeError, match="labels must be finite and lie in"):
            SF.bce_with_logits(logits, labels, backend="torch")


def test_fatal_bounds_check_inside_a_capture_asserts_on_the_device(pretend_capture):
    weight = torch.randn(7, 3)
    offsets = torch.tensor([0, 4], dtype=torch.int64)
    with _HostReads() as mode:
        SF.embedding_lookup(torch.tensor([[3, 2], [0, 0]]), weight, offsets, "fatal", backend="torch")
    assert mode.seen == []
    with pytest.raises(RuntimeError, match="ids outside their field"):
        SF.embedding_lookup(torch.tensor([[3, 3]]), weight, offsets, "fatal", backend="torch")


def test_outside_a_capture_the_checks_still_name_the_culprit():
    with pytest.raises(ValueError, match="labels must lie in"):
        SF.bce_with_logits(torch.randn(2), torch.tensor([0.0, 2.0]), backend="torch")
    with pytest.raises(IndexError, match=r"field 1\).*id 3"):
        SF.embedding_lookup(torch.tensor([[3, 3]]), torch.randn(7, 3), torch.tensor([0, 4]), "fatal",
                            backend="torch")


def _fwfm_step_parts(dims, dim, backend):
    torch.manual_seed(0)
    n = len(dims)
    embedding = FusedFieldEmbedding(dims, dim, optimizer="adagrad", lr=0.05, bounds_check="off",
                                    backend=backend).to(DEVICE)
    encoder = SFGEncoder(n, dim, backend=backend).to(DEVICE)
    decoder = PairwiseDecoder(n, dim, "scalar", backend=backend).to(DEVICE)
    return embedding, encoder, decoder


def _make_step(embedding, encoder, decoder, backend):
    opt = torch.optim.Adagrad(list(encoder.parameters()) + list(decoder.parameters()), lr=0.05)

    def step(ids, labels):
        V = embedding(ids)
        logit = SF.sfg_interaction(V, encoder.weight, encoder.bias, decoder.weight, "scalar", encoder.activation,
                                   encoder.gamma, encoder.residual, backend=backend)
        loss = SF.bce_with_logits(logit, labels, backend=backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def _capture(step):
    """``step()`` run once eagerly on a side stream (compiles the kernels and loads their modules, which a
    capture cannot), then recorded into a CUDA graph: ``(graph, the captured call's output)``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):           # records the step; nothing runs until replay
        out = step()
    return graph, out


def _spy_structured_dx(monkeypatch):
    """The calls of ops.sfg_gemm._structured_dx (one per backward that took the structured decoder)."""
    from sfg_fast.ops import sfg_gemm
    calls = []
    real = sfg_gemm._structured_dx
    monkeypatch.setattr(sfg_gemm, "_structured_dx", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _layer_params(seed, bias):
    """V [64, 6, 8], an encoder (with a bias when asked) and a scalar decoder, as leaves on the device."""
    gen = torch.Generator().manual_seed(seed)
    n, d, b = 6, 8, 64
    V = torch.randn(b, n, d, generator=gen).to(DEVICE).requires_grad_()
    enc = (torch.randn(n * d, n * d, generator=gen) / 7).to(DEVICE).requires_grad_()
    extra = [torch.randn(n * d, generator=gen).to(DEVICE).requires_grad_()] if bias else []
    dec = torch.randn(n, n, generator=gen).to(DEVICE).requires_grad_()
    return (V, enc, *extra, dec)


def _eager_and_replayed_fwfm_steps(seed, after_each_replay=lambda graph_parts: None):
    """The Triton FwFM step run eagerly on 4 batches, and a copy of its parts trained by a CUDA graph captured
    on the first batch (that step, eagerly, also builds the optimizer state) and replayed on the other three;
    ``after_each_replay(graph_parts)`` runs after each synchronized replay. Returns (eager_parts, graph_parts)."""
    dims, dim, batch = [300, 7, 50, 1000], 16, 512
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.stack([torch.randint(0, k, (batch,), generator=gen) for k in dims], 1).to(DEVICE),
                (torch.rand(batch, generator=gen) < 0.3).float().to(DEVICE)) for _ in range(4)]
    eager_parts = _fwfm_step_parts(dims, dim, "triton")
    graph_parts = copy.deepcopy(eager_parts)
    eager = _make_step(*eager_parts, "triton")
    for ids, labels in batches:
        eager(ids, labels)
    graphed = _make_step(*graph_parts, "triton")
    static_ids, static_labels = batches[0][0].clone(), batches[0][1].clone()
    graph, _ = _capture(lambda: graphed(static_ids, static_labels))
    for ids, labels in batches[1:]:
        static_ids.copy_(ids)
        static_labels.copy_(labels)
        graph.replay()
        torch.cuda.synchronize()
        after_each_replay(graph_parts)
    return eager_parts, graph_parts


def _assert_same_parameters(eager_parts, graph_parts):
    for a, b in zip(eager_parts, graph_parts):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_whole_fused_step_captured_in_a_cuda_graph_trains_like_eager_steps():
    _assert_same_parameters(*_eager_and_replayed_fwfm_steps(seed=1))


def test_the_capture_branches_build_no_tensor_from_host_data(pretend_capture, monkeypatch):
    """A tensor made from Python data on a GPU is a blocking host-to-device copy, which a capture refuses:
    the checks and the pair indices must build theirs on the device."""
    made = []
    real_tensor, real_new_tensor = torch.tensor, torch.Tensor.new_tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append("torch.tensor") or real_tensor(*a, **k))
    monkeypatch.setattr(torch.Tensor, "new_tensor",
                        lambda self, *a, **k: made.append("Tensor.new_tensor") or real_new_tensor(self, *a, **k))
    weight, offsets = torch.randn(7, 3), torch.arange(2, dtype=torch.int64) * 4
    ids = real_tensor([[3, 2], [0, 0]])
    SF.embedding_lookup(ids, weight, offsets, "fatal", backend="torch")
    labels = real_tensor([0.0, 1.0, 1.0, 0.0])
    SF.bce_with_logits(torch.randn(4), labels, backend="torch")
    assert made == []
    for pairs in ("upper", "all", "offdiag"):
        _checks.pair_index(5, pairs)
    SF.pairwise_products(torch.randn(2, 4, 3), torch.randn(2, 4, 3), backend="torch")
    assert made == []


@pytest.mark.gpu
def test_fatal_bounds_check_can_be_captured():
    weight = torch.randn(7, 3, device=DEVICE)
    offsets = torch.tensor([0, 4], dtype=torch.int64, device=DEVICE)
    ids = torch.tensor([[3, 2], [0, 0]], device=DEVICE)
    SF.embedding_lookup(ids, weight, offsets, "fatal", backend="triton")   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = SF.embedding_lookup(ids, weight, offsets, "fatal", backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, weight[ids + offsets])


@pytest.mark.gpu
def test_structured_decoder_inside_a_capture(monkeypatch):
    """Inside a CUDA-graph capture the exact-fp32 torch.mm path runs a scalar decoder by its structure
    (ops.sfg_gemm.STRUCTURED_DECODER "graphs"), eagerly the dense GEMM; the replayed forward and backward
    equal the eager ones to fp32 rounding."""
    from sfg_fast.ops import sfg_gemm
    if not sfg_gemm.torch_gemms(torch.zeros(1, device=DEVICE), "ieee"):
        pytest.skip("the torch.mm path is off here (torch's TF32 setting or deterministic mode)")
    assert sfg_gemm.STRUCTURED_DECODER == "graphs"
    calls = _spy_structured_dx(monkeypatch)
    V, enc, dec = _layer_params(5, bias=False)

    def forward_backward():
        for p in (V, enc, dec):
            p.grad = None
        out = SF.sfg_interaction(V, enc, None, dec, "scalar", backend="triton")
        out.backward(torch.ones_like(out))
        return out

    eager = forward_backward().detach().clone()
    eager_grads = [p.grad.clone() for p in (V, enc, dec)]
    assert calls == []                      # eagerly: the dense GEMM
    graph, out = _capture(forward_backward)
    # the side-stream warm-up (eager: dense) did not take it, the capture did
    assert len(calls) == 1, "the capture did not take the structured decoder (or the warm-up did)"
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for p, want in zip((V, enc, dec), eager_grads):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_structured_decoder_on_the_triton_gemms_captures_and_replays(monkeypatch, precision):
    """"auto" runs a scalar decoder by its structure on the Triton GEMMs (TF32; bf16 under autocast) in eager
    steps too, so their kernels are loaded before the capture (a capture cannot load a module); the replay
    computes what the eager step computed (the same kernels on the same inputs; cuBLAS's bmm of the mixing
    may pick another algorithm inside a capture, so to fp32 rounding, and bf16's gradients to bf16's)."""
    from sfg_fast.ops import sfg_gemm, sfg_logits
    monkeypatch.setattr(sfg_gemm, "STRUCTURED_DECODER", "auto")
    monkeypatch.setattr(sfg_logits, "DEFAULT_ALLOW_TF32", precision == "tf32")
    calls = _spy_structured_dx(monkeypatch)
    params = V, enc, bias, dec = _layer_params(6, bias=True)

    def forward_backward():
        for p in params:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = SF.sfg_interaction(V, enc, bias, dec, "scalar", backend="triton")
        out.backward(torch.ones_like(out))
        return out

    eager = forward_backward().detach().clone()
    eager_grads = [p.grad.clone() for p in params]
    assert calls, "the eager step did not take the structured decoder"
    graph, out = _capture(forward_backward)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for p, want in zip(params, eager_grads):
        if precision == "bf16":   # a last-bit change of T can move dH to the next bf16 value in the GEMMs
            torch.testing.assert_close(p.grad, want, rtol=2e-2, atol=1e-2 * max(1.0, want.abs().max().item()))
        else:
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_sort_free_sparse_update_captures_and_replays(monkeypatch):
    """SFG_FAST_SPARSE_DEDUP=map inside a captured step: the replays train as eager map steps do (to fp32
    rounding: its atomic sums have no fixed order), and the row map is left clean (all UNCLAIMED) after every
    replay, as the next step needs it."""
    from sfg_fast.ops import embedding_lookup as ops_lookup
    monkeypatch.setattr(ops_lookup, "SPARSE_DEDUP", "map")
    replays = []

    def row_map_is_clean(graph_parts):
        row_map = graph_parts[0].optimizer._row_map
        assert row_map is not None
        assert bool((row_map == 2 ** 31 - 1).all())
        replays.append(1)
    _assert_same_parameters(*_eager_and_replayed_fwfm_steps(seed=2, after_each_replay=row_map_is_clean))
    assert len(replays) == 3
