"""The models with PyTorch's module tooling: hooks, hook-based reparametrisations, dynamic quantisation,
DistributedDataParallel, and a clear refusal of torch.jit.trace."""
import copy
import warnings

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils.prune is a submodule)

from sfg_fast import functional as SF
from sfg_fast import models, optim

IDS = torch.tensor([[0, 1, 2], [4, 2, 3]])
FIELD_DIMS = [5, 3, 4]


def test_hooks_on_the_encoder_and_decoder_run():
    model = models.build("fwfm", FIELD_DIMS, 8, init_std=0.1).eval()
    plain = model(IDS)
    handle = model.encoder.register_forward_hook(lambda module, inputs, out: out * 0)
    # a zero Z zeroes every pair score: only the first-order part is left
    torch.testing.assert_close(model(IDS), model.linear(IDS), rtol=0, atol=1e-6)
    handle.remove()
    fired = []
    handle = model.decoder.register_forward_hook(lambda *args: fired.append(1))
    model(IDS)
    handle.remove()
    assert fired == [1] and torch.equal(model(IDS), plain)      # unhooked: the fused op again, same bits


@pytest.mark.parametrize("name,layer", [("fwfm", "encoder"), ("dcnv2", "cross.0"), ("xdeepfm", "convs.0")])
def test_hook_based_reparametrisations_train_the_layer(name, layer):
    """Legacy spectral_norm / pruning recompute the weight in a forward pre-hook; a layer that read its
    parameters directly would leave weight_orig without a gradient (or backward through a stale graph)."""
    torch.manual_seed(0)
    model = models.build(name, FIELD_DIMS, 8, init_std=0.1)
    module = model.get_submodule(next(n for n, _ in model.named_modules() if n.endswith(layer)))
    if name == "fwfm":
        torch.nn.utils.prune.l1_unstructured(module, "weight", 0.3)
        original = module.weight_orig
    else:
        torch.nn.utils.spectral_norm(module)
        original = module.weight_orig
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(IDS).sum().backward()
        assert original.grad is not None and original.grad.abs().sum() > 0
        opt.step()


def test_dynamic_quantisation_of_the_cross_layers_runs():
    model = models.build("dcnv2", FIELD_DIMS, 8, init_std=0.1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantised = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear})
    out = quantised(IDS)
    assert out.shape == (2,) and torch.isfinite(out).all()
    torch.testing.assert_close(out, model(IDS), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("embedding", ["native", "fused"])
def test_jit_trace_is_refused_naming_export(embedding):
    model = models.build("fwfm", FIELD_DIMS, 8, embedding=embedding).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="torch.jit.trace.*torch.export.export"):
        torch.jit.trace(model, (IDS,))
    exported = torch.export.export(model, (IDS,))         # what the message points to works
    torch.testing.assert_close(exported.module()(IDS), model(IDS))


def test_ddp_leaves_fused_tables_alone(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = models.build("fm", FIELD_DIMS, 8, embedding="fused")
        wrapped = copy.deepcopy(plain)
        assert wrapped._ddp_params_and_buffers_to_ignore == ["embedding.weight", "linear.table.weight"]
        ddp = DDP(wrapped)
        opts = [torch.optim.AdamW(m.parameters(), 1e-2, weight_decay=0.1) for m in (plain, wrapped)]
        labels = torch.tensor([1.0, 0.0])
        for _ in range(3):
            for module, opt in zip((plain, ddp), opts):
                opt.zero_grad()
                SF.bce_with_logits(module(IDS), labels).backward()
                opt.step()
        # without the ignore list DDP hands the tables zero gradients and AdamW decays every row
        for p, q in zip(plain.parameters(), wrapped.parameters()):
            assert torch.equal(p, q)
        assert wrapped.embedding.weight.grad is None
    finally:
        dist.destroy_process_group()
    wrapped._ddp_params_and_buffers_to_ignore = ["mine"]       # DDP's own helper sets it: kept beside ours
    assert wrapped._ddp_params_and_buffers_to_ignore == ["embedding.weight", "linear.table.weight", "mine"]


def test_fused_tables_warn_once_under_data_parallelism(monkeypatch):
    table = optim.FusedFieldEmbedding(FIELD_DIMS, 4)
    monkeypatch.setattr(optim, "_data_parallel_world", lambda: 2)
    with pytest.warns(RuntimeWarning, match="ranks' copies drift apart"):
        table(IDS).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table(IDS).sum().backward()           # once per table
        table.eval()
        table(IDS)


def test_hooked_cross_and_cin_layers_promote_dtypes_as_the_fused_path():
    from sfg_fast import nn as snn
    cin = snn.CIN(3, 4, [5, 5])
    cin.convs[0].register_forward_hook(lambda *args: None)
    assert cin(torch.randn(2, 3, 4, dtype=torch.float64)).dtype == torch.float64
    cross = snn.GenerativeCrossNet(3, 4, 2)
    x = torch.randn(2, 12)
    plain = cross(x)
    cross.cross[0].register_forward_hook(lambda *args: None)
    torch.testing.assert_close(cross(x), plain, rtol=1e-6, atol=1e-6)      # the same layer, called
    assert cross(x.double()).dtype == torch.float64
