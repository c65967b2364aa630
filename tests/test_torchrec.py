"""TorchRec adapter: KJT construction, KeyedTensor -> [B, N, D] by key, TorchRecFieldEmbedding vs FieldEmbedding,
and the eight models built with ``embedding="torchrec"`` against their native twins."""
import pytest
import torch

from sfg_fast import models
from sfg_fast.integrations import torchrec_unavailable_reason
from sfg_fast.nn import FieldEmbedding

_REASON = torchrec_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"TorchRec integration unavailable: {_REASON}")

if _REASON is None:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedTensor

    from sfg_fast.integrations.torchrec import (TorchRecFieldEmbedding, check_versions, convert_native_state_dict,
                                                ids_to_kjt, keyed_tensor_to_fields)


def _ids(field_dims, batch, dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, d, (batch,), generator=gen) for d in field_dims], dim=1).to(dtype)


def test_versions_are_the_tested_lock_step_set():
    found = check_versions()
    assert found["torchrec"].split(".")[:2] == found["fbgemm_gpu"].split(".")[:2]
    assert found["torch"].split(".")[:2] == ["2", "13"] or found["torchrec"].split(".")[:2] != ["1", "8"]


def test_version_mismatch_is_explained(monkeypatch):
    import sfg_fast.integrations.torchrec as trec

    real = trec._installed
    monkeypatch.setattr(trec, "_installed", lambda name: "1.9.0" if name.startswith("fbgemm") else real(name))
    with pytest.raises(ImportError, match=r"torchrec 1\.8\.0 and fbgemm_gpu 1\.9\.0 differ.*lock-step"):
        trec.check_versions()
    monkeypatch.setattr(trec, "_installed", real)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cpu")
    with pytest.raises(ImportError, match=r"built for torch 2\.13\.x but torch 2\.11\.0\+cpu"):
        trec.check_versions()
    monkeypatch.setattr(trec, "_installed", lambda name: None if name == "torchrec" else real(name))
    with pytest.raises(ImportError, match="torchrec is not installed"):
        trec.check_versions()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_ids_to_kjt_holds_one_id_per_feature_per_sample(dtype):
    ids = _ids([5, 3, 9], 4, dtype)
    kjt = ids_to_kjt(ids, ["a", "b", "c"])
    assert kjt.keys() == ["a", "b", "c"]
    assert kjt.values().dtype == torch.int64
    per_key = kjt.to_dict()
    for f, name in enumerate(["a", "b", "c"]):
        assert torch.equal(per_key[name].values(), ids[:, f].to(torch.int64))
        assert torch.equal(per_key[name].lengths(), torch.ones(4, dtype=per_key[name].lengths().dtype))


def test_ids_to_kjt_rejects_bad_input():
    ids = _ids([5, 3], 2)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        ids_to_kjt(ids.float(), ["a", "b"])
    with pytest.raises(ValueError, match=r"ids must have shape \[B, N\]"):
        ids_to_kjt(ids[0], ["a", "b"])
    with pytest.raises(ValueError, match="feature_names must name each of the 2 fields"):
        ids_to_kjt(ids, ["a"])
    with pytest.raises(ValueError, match="feature_names must be unique"):
        ids_to_kjt(ids, ["a", "a"])


def test_keyed_tensor_is_stacked_by_key_not_by_position():
    batch, dim = 3, 4
    columns = {name: torch.randn(batch, dim) for name in ("x", "y", "z")}
    # keys stored in an order different from the field order asked for
    kt = KeyedTensor.from_tensor_list(["z", "x", "y"], [columns["z"], columns["x"], columns["y"]])
    V = keyed_tensor_to_fields(kt, ["x", "y", "z"])
    assert V.shape == (batch, 3, dim)
    for f, name in enumerate(["x", "y", "z"]):
        assert torch.equal(V[:, f], columns[name])
    with pytest.raises(KeyError, match="lacks features"):
        keyed_tensor_to_fields(kt, ["x", "w"])
    odd = KeyedTensor.from_tensor_list(["x", "y"], [torch.randn(batch, 4), torch.randn(batch, 2)])
    with pytest.raises(ValueError, match="one embedding width"):
        keyed_tensor_to_fields(odd, ["x", "y"])


def test_ebc_declared_in_another_order_still_lands_in_field_order():
    names = ["f0", "f1", "f2"]
    dims = [4, 6, 5]
    # tables declared in reverse, so the EBC's output keys come out reversed
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=dims[i], feature_names=[names[i]])
              for i in (2, 1, 0)]
    ebc = EmbeddingBagCollection(tables=tables)
    ids = _ids(dims, 5)
    kt = ebc(ids_to_kjt(ids, names))
    assert kt.keys() == ["f2", "f1", "f0"]
    V = keyed_tensor_to_fields(kt, names)
    for f in range(3):
        assert torch.equal(V[:, f], ebc.embedding_bags[f"t{f}"].weight[ids[:, f]])


@pytest.mark.parametrize("field_dims,dim,batch", [([5, 3], 3, 1), ([7, 2, 11, 4], 8, 6), ([4, 9, 3], 17, 5)])
def test_module_matches_field_embedding_forward_and_backward(field_dims, dim, batch):
    native = FieldEmbedding(field_dims, dim)
    trec = TorchRecFieldEmbedding(field_dims, dim, feature_names=[f"c{i}" for i in range(len(field_dims))])
    trec.load_concatenated(native.weight.detach())
    assert torch.equal(trec.concatenated(), native.weight.detach())
    ids = _ids(field_dims, batch)
    ids[0, 0] = ids[-1, 0]  # a duplicate id
    v_native, v_trec = native(ids), trec(ids)
    assert v_trec.shape == (batch, len(field_dims), dim) and v_trec.is_contiguous()
    assert torch.equal(v_trec, v_native)
    grad = torch.randn_like(v_native)
    v_native.backward(grad)
    v_trec.backward(grad)
    got = torch.cat([t.grad.to_dense()[:, :dim] if t.grad.is_sparse else t.grad[:, :dim] for t in trec.tables()])
    torch.testing.assert_close(got, native.weight.grad)


def test_module_bounds_check_names_field_and_id():
    trec = TorchRecFieldEmbedding([5, 3], 4)
    ids = torch.tensor([[1, 2], [4, 3]])
    with pytest.raises(IndexError, match=r"field 1\).*id 3 outside \[0, 3\)"):
        trec(ids)
    with pytest.raises(IndexError, match=r"field 0\).*id -1"):
        trec(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match=r"ids must have shape \[B, N\]=\[B, 2\]"):
        trec(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="int32 or int64"):
        trec(ids.float())


def test_module_clamp_to_oov_matches_native():
    native = FieldEmbedding([5, 3], 4, bounds_check="clamp_to_oov")
    trec = TorchRecFieldEmbedding([5, 3], 4, bounds_check="clamp_to_oov")
    trec.load_concatenated(native.weight.detach())
    ids = torch.tensor([[1, 7], [9, 2], [-2, 0]])
    assert torch.equal(trec(ids), native(ids))
    assert trec.num_clamped == native.num_clamped == 3


def test_module_rejects_bad_construction():
    with pytest.raises(ValueError, match="field_dims"):
        TorchRecFieldEmbedding([5, 0], 4)
    with pytest.raises(ValueError, match="bounds_check"):
        TorchRecFieldEmbedding([5], 4, bounds_check="warn")
    with pytest.raises(ValueError, match="feature_names must be unique"):
        TorchRecFieldEmbedding([5, 3], 4, feature_names=["a", "a"])


_SMALL = {"deepfm": dict(hidden_units=(8,)), "ipnn": dict(hidden_units=(8,)), "dcnv2": dict(hidden_units=(8,)),
          "xdeepfm": dict(hidden_units=(8,), cin_layer_units=(4,))}


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_runs_on_torchrec_tables_exactly_like_native(name):
    field_dims, dim = [6, 3, 8], 4
    torch.manual_seed(1)
    native = models.build(name, field_dims, dim, **_SMALL.get(name, {}))
    with torch.no_grad():
        for p in native.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trec = models.build(name, field_dims, dim, embedding="torchrec", **_SMALL.get(name, {}))
    assert trec.config["embedding"] == "torchrec" and "embedding" not in native.config
    tables = [m for m in trec.modules() if isinstance(m, TorchRecFieldEmbedding)]
    assert len(tables) == (1 if name in ("ipnn", "dcnv2", "crossnet") else 2)
    assert not any(isinstance(m, FieldEmbedding) for m in trec.modules())
    trec.load_state_dict(convert_native_state_dict(native.state_dict(), trec))
    ids = _ids(field_dims, 5, seed=3)
    out_native, out_trec = native(ids), trec(ids)
    torch.testing.assert_close(out_trec, out_native, rtol=1e-6, atol=1e-7)
    out_native.sum().backward()
    out_trec.sum().backward()
    torch.testing.assert_close(trec.embedding.concatenated(), native.embedding.weight.detach())
    got = torch.cat([t.grad[:, :dim] for t in trec.embedding.tables()])
    torch.testing.assert_close(got, native.embedding.weight.grad, rtol=1e-5, atol=1e-7)


def test_build_embedding_choices():
    custom = FieldEmbedding([4, 4], 4)
    model = models.build("fm", [4, 4], 4, embedding=custom)
    assert model.embedding is custom
    with pytest.raises(ValueError, match="embedding must be one of"):
        models.build("fm", [4, 4], 4, embedding="fbgemm")


def test_empty_batch_and_converting_the_embedding_module_itself():
    native = FieldEmbedding([5, 3], 4)
    trec = TorchRecFieldEmbedding([5, 3], 4, feature_names=["a", "b"])
    empty = torch.zeros(0, 2, dtype=torch.int64)
    assert native(empty).shape == trec(empty).shape == (0, 2, 4)
    # the module as the whole model: its state keys have no "<name>." prefix
    trec.load_state_dict(convert_native_state_dict(native.state_dict(), trec))
    assert torch.equal(trec.concatenated(), native.weight.detach())


def test_module_materialised_from_meta_keeps_its_field_sizes():
    """to_empty() leaves every buffer uninitialised: the field sizes the bounds check uses are rebuilt
    (they are a function of field_dims), so good ids pass and bad ones are named as natively."""
    with torch.device("meta"):
        lazy = TorchRecFieldEmbedding([5, 7], 4)
    lazy = lazy.to_empty(device="cpu")
    real = TorchRecFieldEmbedding([5, 7], 4)
    lazy.load_state_dict(real.state_dict())
    assert torch.equal(lazy.field_sizes, torch.tensor([5, 7])) and torch.equal(lazy.offsets, torch.tensor([0, 5]))
    ids = torch.tensor([[4, 6], [0, 0]])
    assert torch.equal(lazy(ids), real(ids))
    with pytest.raises(IndexError, match="field 0"):
        lazy(torch.tensor([[5, 0]]))


def test_native_state_of_other_field_dims_is_refused():
    """[5, 7] and [7, 5] concatenate to the same shape: split by the wrong sizes every field would read
    another field's rows, so the field_dims the native state recorded must match."""
    native = FieldEmbedding([5, 7], 4)
    with pytest.raises(ValueError, match=r"field_dims=\[5, 7\].*field_dims=\[7, 5\]"):
        convert_native_state_dict(native.state_dict(), TorchRecFieldEmbedding([7, 5], 4))
    target = TorchRecFieldEmbedding([5, 7], 4)
    target.load_state_dict(convert_native_state_dict(native.state_dict(), target))
    model = models.build("fm", [5, 7, 3], 4)
    with pytest.raises(ValueError, match="field_dims"):
        convert_native_state_dict(model.state_dict(), models.build("fm", [7, 5, 3], 4, embedding="torchrec"))


def test_module_returns_the_tables_dtype_and_checks_its_arguments():
    table = TorchRecFieldEmbedding([5, 7], 3).double()
    ids = torch.tensor([[1, 2], [3, 4]])
    assert table(ids).dtype == torch.float64 == table(ids[:0]).dtype
    torch.testing.assert_close(table(ids), torch.stack([table.tables()[0][ids[:, 0], :3],
                                                        table.tables()[1][ids[:, 1], :3]], dim=1))
    for kwargs, error in (({"init_std": float("inf")}, ValueError), ({"init_std": True}, TypeError),
                          ({"backend": "bogus"}, ValueError)):
        with pytest.raises(error, match=next(iter(kwargs))):
            TorchRecFieldEmbedding([5, 7], 4, **kwargs)


def test_a_model_built_on_meta_imports_torchrec_outside_the_meta_device():
    # a fresh process: the integration's first import happens inside the meta context
    import subprocess
    import sys
    code = ("import torch\nfrom sfg_fast import models\n"
            "with torch.device('meta'):\n    m = models.build('fm', [10, 20], 8, embedding='torchrec')\n"
            "m.to_empty(device='cpu')\n"
            "[x.reset_parameters() for x in m.modules() if x is not m and hasattr(x, 'reset_parameters')]\n"
            "out = m(torch.tensor([[1, 2], [3, 4]]))\nassert out.shape == (2,) and torch.isfinite(out).all()\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
