"""Model zoo: identity reduction (SFG with an identity encoder == base model), base formulas, learning."""
import itertools

import pytest
import torch
from sklearn.metrics import roc_auc_score

from sfg_fast import functional as SF
from sfg_fast import models

from helpers import zipf_ids

FIELD_DIMS = [7, 3, 11, 5, 2]
SMALL = dict(hidden_units=(8, 8))
HPARAMS = {"deepfm": SMALL, "ipnn": SMALL, "dcnv2": SMALL,
           "xdeepfm": dict(hidden_units=(8,), cin_layer_units=(4, 3))}


def _identity_pair(name, dtype=torch.float32):
    torch.manual_seed(1)
    extra = dict(HPARAMS.get(name, {}))
    if name in ("dcnv2", "crossnet"):
        extra["regenerate_from"] = "x_0"
    base = models.build(name, FIELD_DIMS, 4, generative=False, init_std=0.3, **extra).to(dtype).eval()
    gen = models.build(name, FIELD_DIMS, 4, generative=True, init_std=0.3, activation="identity", gamma=1.0,
                       **extra).to(dtype).eval()
    missing, unexpected = gen.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(".weight" in k or ".bias" in k for k in missing)
    for enc in gen.encoders():
        enc.reset_to_identity()
    assert len(gen.encoders()) >= 1 and not base.encoders()
    return base, gen


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_identity_encoder_reduces_to_base_model_exactly(name):
    base, gen = _identity_pair(name)
    ids = zipf_ids(9, FIELD_DIMS)
    with torch.no_grad():
        assert torch.equal(gen(ids), base(ids))


@pytest.mark.parametrize("name", ["dcnv2", "crossnet"])
def test_identity_generator_fed_x_l_gives_the_self_gated_cross_network(name):
    # regenerate_from="x_l" (the default): an identity G_l returns x_l, so layer l is x + x * (W_l x);
    # the first layer (x_l = x_0) is the base layer, the later ones are not
    torch.manual_seed(2)
    extra = dict(HPARAMS.get(name, {}))
    gen = models.build(name, FIELD_DIMS, 4, generative=True, init_std=0.3, activation="identity", gamma=1.0,
                       num_cross_layers=3, **extra).double().eval()
    assert gen.crossnet.regenerate_from == "x_l"
    for enc in gen.encoders():
        enc.reset_to_identity()
    ids = zipf_ids(9, FIELD_DIMS)
    with torch.no_grad():
        x0 = gen.embedding(ids).reshape(9, -1)
        x, base = x0, x0
        for linear in gen.crossnet.cross:
            x = x + x * (x @ linear.weight.T)
            base = base + x0 * (base @ linear.weight.T)
        torch.testing.assert_close(gen.crossnet(x0), x, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(gen.crossnet(x0), base)
        one = models.build(name, FIELD_DIMS, 4, generative=False, num_cross_layers=1, **extra).double().eval()
        first = gen.crossnet.cross[0]
        torch.testing.assert_close(x0 + x0 * (x0 @ first.weight.T), x0 + gen.crossnet.gate(0, x0, x0)
                                   * (x0 @ first.weight.T), rtol=0, atol=0)
        assert one.crossnet.gate(0, x0, x0) is x0


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_generative_model_differs_from_base_with_a_real_encoder(name):
    base, gen = _identity_pair(name)
    for enc in gen.encoders():
        torch.nn.init.normal_(enc.weight, std=0.5)
    ids = zipf_ids(9, FIELD_DIMS)
    with torch.no_grad():
        assert not torch.allclose(gen(ids), base(ids))


def _lr(model, ids):
    table = model.linear.table
    return table(ids).sum((1, 2)) + model.linear.bias


def test_fm_family_base_formulas():
    ids = zipf_ids(6, FIELD_DIMS)
    n = len(FIELD_DIMS)
    for name in ["fm", "fwfm", "fmfm"]:
        m = models.build(name, FIELD_DIMS, 3, generative=False, init_std=0.5).double()
        with torch.no_grad():
            if m.decoder.weight is not None:
                m.decoder.weight.normal_()
            V = m.embedding(ids)
            want = _lr(m, ids)
            for i, j in itertools.combinations(range(n), 2):
                if name == "fm":
                    want = want + (V[:, i] * V[:, j]).sum(-1)
                elif name == "fwfm":
                    want = want + m.decoder.weight[i, j] * (V[:, i] * V[:, j]).sum(-1)
                else:
                    want = want + ((V[:, i] @ m.decoder.weight[i, j]) * V[:, j]).sum(-1)
            torch.testing.assert_close(m(ids), want)


def test_sfg_fm_family_formulas():
    ids = zipf_ids(6, FIELD_DIMS)
    n = len(FIELD_DIMS)
    for name in ["fm", "fwfm", "fmfm"]:
        m = models.build(name, FIELD_DIMS, 3, generative=True, init_std=0.5, gamma=0.8, activation="tanh").double()
        with torch.no_grad():
            if m.decoder.weight is not None:
                m.decoder.weight.normal_()
            V = m.embedding(ids)
            e = V.reshape(len(ids), -1)
            Z = (0.8 * torch.tanh(e @ m.encoder.weight.t())).view_as(V)
            want = _lr(m, ids)
            for i, j in itertools.combinations(range(n), 2):
                if name == "fm":
                    want = want + (Z[:, i] * V[:, j]).sum(-1)
                elif name == "fwfm":
                    want = want + m.decoder.weight[i, j] * (Z[:, i] * V[:, j]).sum(-1)
                else:   # the authors' FmFM generates the right operand: (v_i M_ij) . z_j
                    want = want + ((V[:, i] @ m.decoder.weight[i, j]) * Z[:, j]).sum(-1)
            torch.testing.assert_close(m(ids), want)


def test_ipnn_and_deepfm_formulas():
    ids = zipf_ids(5, FIELD_DIMS)
    n = len(FIELD_DIMS)
    for generative in (False, True):
        m = models.build("ipnn", FIELD_DIMS, 3, generative=generative, hidden_units=(6,), init_std=0.5).double()
        with torch.no_grad():
            V = m.embedding(ids)
            Z = m.encoder(V) if generative else V
            p = torch.stack([(Z[:, i] * V[:, j]).sum(-1) for i, j in itertools.combinations(range(n), 2)], 1)
            torch.testing.assert_close(m(ids), m.dnn(torch.cat([V.reshape(5, -1), p], 1)).squeeze(1))
        d = models.build("deepfm", FIELD_DIMS, 3, generative=generative, hidden_units=(6,), init_std=0.5).double()
        with torch.no_grad():
            V = d.embedding(ids)
            Z = d.encoder(V) if generative else V
            fm = sum((Z[:, i] * V[:, j]).sum(-1) for i, j in itertools.combinations(range(n), 2))
            torch.testing.assert_close(d(ids), _lr(d, ids) + fm + d.dnn(V.reshape(5, -1)).squeeze(1))


def test_cross_network_formulas():
    ids = zipf_ids(5, FIELD_DIMS)
    for name in ["crossnet", "dcnv2"]:
        for generative, source in [(False, "x_l"), (True, "x_l"), (True, "x_0")]:
            m = models.build(name, FIELD_DIMS, 3, generative=generative, regenerate_from=source, init_std=0.5,
                             **HPARAMS.get(name, {})).double()
            with torch.no_grad():
                x0 = m.embedding(ids).reshape(5, -1)
                x = x0
                for layer, lin in enumerate(m.crossnet.cross):
                    if generative:
                        src = x if source == "x_l" else x0
                        gate = torch.relu(src @ m.crossnet.generators[layer].weight.t())
                    else:
                        gate = x0
                    x = x + gate * (x @ lin.weight.t())
                parts = [x] + ([m.dnn(x0)] if name == "dcnv2" else [])
                torch.testing.assert_close(m(ids), m.head(torch.cat(parts, 1)).squeeze(1))


def test_xdeepfm_cin_formula():
    ids = zipf_ids(4, FIELD_DIMS)
    for generative in (False, True):
        m = models.build("xdeepfm", FIELD_DIMS, 3, generative=generative, hidden_units=(), cin_layer_units=(4, 2),
                         init_std=0.5).double()
        with torch.no_grad():
            V = m.embedding(ids)
            x, pooled = V, []
            for k, conv in enumerate(m.cin.convs):
                g = m.cin.generators[k](V) if generative else V
                hk = torch.zeros(4, conv.out_channels, 3, dtype=torch.float64)
                w = conv.weight[:, :, 0].view(conv.out_channels, x.shape[1], V.shape[1])
                for h in range(x.shape[1]):
                    for mm in range(V.shape[1]):
                        hk += w[None, :, h, mm, None] * (x[:, h] * g[:, mm])[:, None, :]
                x = hk + conv.bias[None, :, None]
                pooled.append(x.sum(2))
            want = _lr(m, ids) + m.cin_fc(torch.cat(pooled, 1)).squeeze(1)
            torch.testing.assert_close(m(ids), want)


def _planted_data(num_rows, field_dims, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, s, (num_rows,), generator=g) for s in field_dims], 1)
    latent = [torch.randn(s, 3, generator=g) for s in field_dims]
    logit = torch.zeros(num_rows)
    for i, j in itertools.combinations(range(len(field_dims)), 2):
        logit += (latent[i][ids[:, i]] * latent[j][ids[:, j]]).sum(-1)
    logit = 3.0 * logit / logit.std()
    labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
    return ids, labels


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("generative", [False, True])
def test_tiny_training_learns_planted_pairwise_signal(name, generative):
    field_dims = [12, 9, 15, 10, 8]
    ids, labels = _planted_data(5000, field_dims, seed=3)
    train_ids, train_y, test_ids, test_y = ids[:4000], labels[:4000], ids[4000:], labels[4000:]
    torch.manual_seed(0)
    model = models.build(name, field_dims, 8, generative=generative, init_std=0.01, **HPARAMS.get(name, {}))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for epoch in range(6):
        perm = torch.randperm(len(train_ids))
        for k in range(0, len(perm), 250):
            idx = perm[k:k + 250]
            loss = SF.bce_with_logits(model(train_ids[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        auc = roc_auc_score(test_y.numpy(), model(test_ids).numpy())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    print(f"{name} generative={generative}: test AUC {auc:.3f}")
    assert auc > 0.7, f"{name} generative={generative}: test AUC {auc:.3f}"


def test_xdeepfm_honours_encoder_dropout():
    """encoder_dropout is a shared hyper-parameter recorded in config: xDeepFM's CIN generators use it."""
    m = models.build("xdeepfm", FIELD_DIMS, 3, generative=True, encoder_dropout=0.5, **HPARAMS["xdeepfm"])
    assert m.config["encoder_dropout"] == 0.5
    rates = [enc.dropout.p if enc.dropout is not None else 0.0 for enc in m.encoders()]
    assert rates == [0.5] * len(m.cin.layer_sizes)
    ids = zipf_ids(16, FIELD_DIMS)
    m.train()
    torch.manual_seed(2)
    first = m(ids)
    torch.manual_seed(3)
    assert not torch.equal(first, m(ids))          # dropout is live in training
    m.eval()
    assert torch.equal(m(ids), m(ids))



@pytest.mark.parametrize("option", [{"hidden_units": (8,)}, {"dropout": 0.5}, {"batch_norm": True}])
def test_crossnet_refuses_dnn_options_dcnv2_records_them(option):
    """CrossNet has no DNN: its options are refused like any unknown hyper-parameter (not ignored)."""
    with pytest.raises(TypeError, match=next(iter(option))):
        models.build("crossnet", [3, 4, 5], 4, **option)
    dcn = models.build("dcnv2", [3, 4, 5], 4, **option)
    assert dcn.dnn is not None
    key, value = next(iter(option.items()))
    assert dcn.config[key] == (list(value) if isinstance(value, tuple) else value)


@pytest.mark.parametrize("name", ["crossnet", "dcnv2"])
def test_sfg_cross_network_without_cross_layers_has_nothing_to_analyse(name):
    from sfg_fast import models as zoo
    model = zoo.build(name, [3, 4, 5], embedding_dim=4, num_cross_layers=0)
    out = model.analysis_embeddings(torch.zeros(2, 3, dtype=torch.long))
    assert out["generated"] is None and out["raw"].shape == (2, 12)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_fused_tables_score_like_native_ones_and_step_their_own_optimizer(name):
    """embedding="fused": the same model on tables that train themselves in backward. Forward equals the
    native model with the same weights; one backward updates both tables (main and first-order) exactly as
    the row-wise Adagrad of sfg_fast.optim applied to the native model's gradients."""
    from sfg_fast.optim import SparseRowOptimizer
    extra = dict(HPARAMS.get(name, {}))
    torch.manual_seed(3)
    native = models.build(name, FIELD_DIMS, 4, init_std=0.3, **extra).double()
    after_native = torch.rand(1)
    torch.manual_seed(3)
    fused = models.build(name, FIELD_DIMS, 4, init_std=0.3, embedding="fused", embedding_lr=0.05, **extra).double()
    # the same seed gives the same initial model and leaves the RNG where the native build does
    assert torch.equal(torch.rand(1), after_native)
    fused_state = {k: v for k, v in fused.state_dict().items() if not k.endswith("_extra_state")}
    assert fused_state.keys() == native.state_dict().keys()
    assert all(torch.equal(v, native.state_dict()[k]) for k, v in fused_state.items())
    assert fused.config["embedding"] == "fused" and fused.config["embedding_optimizer"] == "rowwise_adagrad"
    ids = zipf_ids(9, FIELD_DIMS)
    native.eval(), fused.eval()
    torch.testing.assert_close(fused(ids), native(ids), rtol=0, atol=0)
    fused(ids).sum().backward()
    native(ids).sum().backward()
    tables = [(n, m) for n, m in native.named_modules() if type(m).__name__ == "FieldEmbedding"]
    assert tables
    for path, table in tables:
        want = table.weight.detach().clone()
        SparseRowOptimizer("adagrad", lr=0.05).step_rows(want, *_touched(table.weight.grad))
        got = fused.get_submodule(path)
        assert type(got).__name__ == "FusedFieldEmbedding" and got.weight.grad is None
        torch.testing.assert_close(got.weight.detach(), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="embedding='fused'"):
        models.build(name, FIELD_DIMS, 4, embedding_lr=0.1, **extra)


def _touched(grad):
    rows = torch.nonzero(grad.abs().sum(1)).flatten()
    return rows, grad[rows]


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_scores_an_empty_batch(name):
    """B = 0 (the last, empty batch of a sharded split) gives [0] logits, not a reshape error."""
    for generative in (False, True):
        model = models.build(name, [3, 4, 5], 4, generative=generative)
        assert model(torch.zeros(0, 3, dtype=torch.long)).shape == (0,)
        assert model.analysis_embeddings(torch.zeros(0, 3, dtype=torch.long))["raw"].shape == (0, 12)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("generative", [True, False])
@pytest.mark.parametrize("name", ["fm", "fwfm", "fmfm", "deepfm", "ipnn", "xdeepfm", "dcnv2", "crossnet"])
def test_a_table_in_another_dtype_than_the_layers_trains(name, generative, table_dtype):
    """A bf16 (or fp64) table under fp32 layers, e.g. FusedFieldEmbedding(dtype=...) passed as ``embedding``:
    the interaction ops promote, and the MLPs and heads now take their input in their own dtype (DeepFM,
    xDeepFM, DCNv2, CrossNet and base IPNN failed with "mat1 and mat2 must have the same dtype")."""
    from sfg_fast.optim import FusedFieldEmbedding
    torch.manual_seed(0)
    table = FusedFieldEmbedding(FIELD_DIMS, 4, dtype=table_dtype, init_std=0.1)
    model = models.build(name, FIELD_DIMS, 4, generative=generative, embedding=table, **HPARAMS.get(name, {}))
    ids = zipf_ids(6, FIELD_DIMS)
    logits = model(ids)
    loss = SF.bce_with_logits(logits, torch.tensor([0.0, 1, 1, 0, 1, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    for key, param in model.named_parameters():
        if param is not table.weight:
            assert param.grad is not None and param.grad.dtype == param.dtype, key
