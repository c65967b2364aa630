"""Property-based tests (hypothesis): shapes and options drawn at random, every backend that runs here
against the fp64 reference.

The parametrised tests of each op pin the shapes the suite requires (B=1, N=2, odd D, Zipf ids); these draw the combinations
nobody listed (odd B, N, D together with every decoder kind, pair set, side, activation, bias,
residual, id dtype, bounds mode and optimizer), as FBGEMM's and TorchRec's hypothesis tests do.
Draws are derandomised (the same examples every run, so CI is repeatable) and kept small: the Triton
backend runs under the interpreter on CPU machines. On a GPU the same tests run the CUDA backends.
A deeper local search: ``SFG_FAST_HYPOTHESIS_EXAMPLES=500 SFG_FAST_HYPOTHESIS_SEARCH=1 pytest
tests/test_properties.py`` (fresh random draws each run; a failure prints the example to replay).
"""
import functools
import math
import os

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from sfg_fast import _checks, factored, functional as SF, reference  # noqa: E402
from sfg_fast._backend import unavailable_reason  # noqa: E402
from sfg_fast.metrics import group_auc  # noqa: E402
from sfg_fast.ops import load_backends  # noqa: E402
from sfg_fast.optim import SparseRowOptimizer, fused_embedding_lookup  # noqa: E402

from helpers import assert_close_2x, offsets_of  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EXAMPLES = int(os.environ.get("SFG_FAST_HYPOTHESIS_EXAMPLES", "40"))
SEARCH = os.environ.get("SFG_FAST_HYPOTHESIS_SEARCH") == "1"
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=not SEARCH, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _backends(op):
    """The fast backends that can run ``op`` here (torch always; triton / cpu / cuda when available)."""
    load_backends()
    return [b for b in ("torch", "triton", "cpu", "cuda") if unavailable_reason(b, op, DEVICE) is None]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ the SFG interaction, every option

@st.composite
def interaction_cases(draw):
    n = draw(st.integers(1, 7))
    return dict(
        batch=draw(st.integers(1, 40)), n=n, dim=draw(st.integers(1, 20)),
        kind=draw(st.sampled_from(["identity", "scalar", "vector", "matrix"])),
        activation=draw(st.sampled_from(sorted(_checks.ACTIVATIONS))),
        gamma=draw(st.sampled_from([1.0, 0.37, 4.0])),
        residual=draw(st.booleans()), pairs=draw(st.sampled_from(["upper", "all", "offdiag"])),
        side=draw(st.sampled_from(["left", "right"])), symmetric=draw(st.booleans()),
        encode=draw(st.booleans()), bias=draw(st.booleans()), strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)))


def _interaction_tensors(case):
    gen, n, dim = _gen(case["seed"]), case["n"], case["dim"]
    width = n * dim
    V = torch.randn(case["batch"], n, dim, generator=gen, dtype=torch.float64)
    enc = torch.randn(width, width, generator=gen, dtype=torch.float64) / width ** 0.5 if case["encode"] else None
    bias = torch.randn(width, generator=gen, dtype=torch.float64) if case["encode"] and case["bias"] else None
    shape = {"identity": None, "scalar": (n, n), "vector": (n, n, dim), "matrix": (n, n, dim, dim)}[case["kind"]]
    dec = None if shape is None else torch.randn(*shape, generator=gen, dtype=torch.float64) / dim ** 0.5
    return [V, enc, bias, dec]


def _value_and_grads(fn, tensors, upstream, dtype, device, strided=False):
    """fn's output and the gradients of sum(upstream * out) for every tensor given (cast to dtype);
    ``strided``: the first tensor is passed as a non-contiguous view of the same values."""
    leaves = [None if t is None else t.detach().to(device, dtype).requires_grad_() for t in tensors]
    args = list(leaves)
    if strided:
        args[0] = leaves[0].transpose(0, -1).contiguous().transpose(0, -1)
    out = fn(*args)
    grads = torch.autograd.grad((out * upstream.to(device, out.dtype)).sum(), [t for t in leaves if t is not None],
                                allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip([t for t in leaves if t is not None], grads)]


@PROPERTY
@given(case=interaction_cases())
def test_interaction_every_backend_equals_the_reference(case):
    """sfg_interaction forward and every gradient (dV, dW_enc, d bias, d decoder) on every backend, by the
    2x rule against the fp64 reference (torch's own fp32 error of the same computation sets the bar)."""
    tensors = _interaction_tensors(case)
    options = (case["kind"], case["activation"], case["gamma"], case["residual"], case["pairs"], case["side"],
               case["symmetric"])
    upstream = torch.randn(case["batch"], generator=_gen(case["seed"] + 1), dtype=torch.float64)

    def run(backend):
        return lambda *t: SF.sfg_interaction(*t, *options, backend=backend)
    ref64, grads64 = _value_and_grads(run("reference"), tensors, upstream, torch.float64, "cpu")
    ref32, grads32 = _value_and_grads(run("reference"), tensors, upstream, torch.float32, "cpu")
    names = [name for name, t in zip(("dV", "d_enc_weight", "d_enc_bias", "d_dec_weight"), tensors) if t is not None]
    for backend in _backends("sfg_interaction"):
        out, grads = _value_and_grads(run(backend), tensors, upstream, torch.float32, DEVICE, case["strided"])
        assert out.shape == (case["batch"],) and out.dtype == torch.float32, backend
        assert_close_2x(out.cpu(), ref64, ref32, f"{backend} logit {case}", floor=1e-5)
        for name, g, g64, g32 in zip(names, grads, grads64, grads32):
            assert g.shape == g64.shape, (backend, name)
            assert_close_2x(g.cpu(), g64, g32, f"{backend} {name} {case}", floor=1e-5)


# ------------------------------------------------------------- the lookup, ids in and out of range

@st.composite
def lookup_cases(draw):
    field_dims = draw(st.lists(st.integers(1, 40), min_size=1, max_size=6))
    return dict(field_dims=field_dims, batch=draw(st.integers(1, 12)), dim=draw(st.integers(1, 9)),
                id_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                bad=draw(st.sampled_from(["none", "negative", "too_large"])),
                mode=draw(st.sampled_from(["fatal", "clamp_to_oov"])),
                transpose=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@PROPERTY
@given(case=lookup_cases())
def test_lookup_every_backend_gathers_exactly_and_checks_bounds(case):
    """Every backend returns exactly the reference's rows; a bad id raises IndexError naming its field in
    "fatal" and reads the field's OOV (last) row in "clamp_to_oov", never row 0 of the table."""
    gen, field_dims = _gen(case["seed"]), case["field_dims"]
    num_fields, batch = len(field_dims), case["batch"]
    sizes = torch.tensor(field_dims)
    ids = (torch.rand(batch, num_fields, generator=gen) * sizes).long()
    if case["bad"] != "none":
        b, f = (int(torch.randint(high, (1,), generator=gen)) for high in (batch, num_fields))
        ids[b, f] = -1 - b if case["bad"] == "negative" else field_dims[f] + b
    if case["transpose"]:                                   # a non-contiguous view of the same ids
        ids = ids.t().contiguous().t()
    ids = ids.to(case["id_dtype"])
    weight = torch.randn(sum(field_dims), case["dim"], generator=gen)
    offsets = offsets_of(field_dims)
    oov = ids.long().clamp(min=0)
    bad_mask = (ids.long() < 0) | (ids.long() >= sizes)
    want = weight[torch.where(bad_mask, sizes - 1, oov) + offsets]
    for backend in _backends("embedding_lookup"):
        args = (ids.to(DEVICE), weight.to(DEVICE), offsets.to(DEVICE), case["mode"])
        if case["bad"] != "none" and case["mode"] == "fatal":
            with pytest.raises(IndexError, match="field"):
                SF.embedding_lookup(*args, backend=backend)
            continue
        out = SF.embedding_lookup(*args, backend=backend)
        assert torch.equal(out.cpu(), want), backend


# ------------------------------------------------- the fused sparse update, against the reference optimizer

@st.composite
def update_cases(draw):
    return dict(field_dims=draw(st.lists(st.integers(1, 30), min_size=1, max_size=5)),
                batch=draw(st.integers(1, 24)), dim=draw(st.integers(1, 9)),
                kind=draw(st.sampled_from(["sgd", "adagrad", "adam"])), steps=draw(st.integers(1, 3)),
                hot=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _fused_backends():
    backends = ["torch"]
    if unavailable_reason("triton", "embedding_lookup", DEVICE) is None:
        backends.append("triton")
    if DEVICE.type == "cpu" and unavailable_reason("cpu", "", DEVICE) is None:
        backends.append("cpu")
    return backends


@PROPERTY
@given(case=update_cases())
def test_fused_sparse_update_equals_the_reference_optimizer(case):
    """The update fused into the lookup's backward, after several steps (state carries over, duplicate and
    hot ids), equals the fp64 reference optimizer applied to the reference lookup's gradient rows."""
    gen, field_dims, dim = _gen(case["seed"]), case["field_dims"], case["dim"]
    offsets, sizes = offsets_of(field_dims), torch.tensor(field_dims)
    hyper = dict(lr=0.05, eps=1e-8, betas=(0.8, 0.9))
    start = torch.randn(sum(field_dims), dim, generator=gen, dtype=torch.float64)
    steps = []
    for _ in range(case["steps"]):
        ids = (torch.rand(case["batch"], len(field_dims), generator=gen) * sizes).long()
        if case["hot"]:
            ids[: (case["batch"] + 1) // 2] = 0             # half the batch on one row per field
        steps.append((ids, torch.randn(case["batch"], len(field_dims), dim, generator=gen, dtype=torch.float64)))

    weight64, opt64 = start.clone(), SparseRowOptimizer(case["kind"], **hyper)
    for ids, upstream in steps:
        leaf = weight64.clone().requires_grad_()
        (grad,) = torch.autograd.grad(reference.embedding_lookup(ids, leaf, offsets), leaf, upstream)
        rows = torch.unique((ids + offsets).reshape(-1))
        opt64.step_rows(weight64, rows, grad[rows])

    results = {}
    for backend in _fused_backends():
        weight = start.float().to(DEVICE).requires_grad_()
        opt = SparseRowOptimizer(case["kind"], **hyper)
        for ids, upstream in steps:
            out = fused_embedding_lookup(ids.to(DEVICE), weight, offsets.to(DEVICE), opt, backend=backend)
            out.backward(upstream.float().to(DEVICE))
        assert weight.grad is None, backend
        results[backend] = (weight.detach().cpu(), {k: v.cpu() for k, v in opt.state.items()})
    torch_weight, torch_state = results["torch"]
    for backend, (weight, state) in results.items():
        assert_close_2x(weight, weight64, torch_weight, f"{backend} {case['kind']} weight", floor=1e-6)
        for name, value in opt64.state.items():
            assert_close_2x(state[name], value, torch_state[name], f"{backend} {case['kind']} {name}", floor=1e-6)


# ------------------------------------------------------------------------- loss and the cross layer

@PROPERTY
@given(batch=st.integers(1, 40), scale=st.sampled_from([1.0, 30.0, 200.0]),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**16))
def test_bce_every_backend_equals_the_reference(batch, scale, reduction, seed):
    """Loss and dlogit on every backend by the 2x rule, logits up to +-200 (where a sigmoid-then-log
    form would give inf)."""
    gen = _gen(seed)
    logits = torch.randn(batch, generator=gen, dtype=torch.float64) * scale
    labels = (torch.rand(batch, generator=gen) < 0.5).double()

    def run(backend, dtype, device):
        x = logits.to(device, dtype).requires_grad_()
        loss = SF.bce_with_logits(x, labels.to(device, dtype), reduction, backend=backend)
        (dx,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach().cpu(), dx.cpu()
    loss64, grad64 = run("reference", torch.float64, "cpu")
    loss32, grad32 = run("reference", torch.float32, "cpu")
    for backend in _backends("bce_with_logits"):
        loss, grad = run(backend, torch.float32, DEVICE)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), backend
        assert_close_2x(loss, loss64, loss32, f"{backend} loss", floor=1e-6)
        assert_close_2x(grad, grad64, grad32, f"{backend} dlogit", floor=1e-6)


@PROPERTY
@given(batch=st.integers(1, 9), width=st.integers(1, 40), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_generative_cross_every_backend_equals_the_reference(batch, width, bias, seed):
    gen = _gen(seed)
    tensors = [torch.randn(batch, width, generator=gen, dtype=torch.float64),
               torch.randn(batch, width, generator=gen, dtype=torch.float64),
               torch.randn(width, width, generator=gen, dtype=torch.float64) / width ** 0.5,
               torch.randn(width, generator=gen, dtype=torch.float64) if bias else None]
    upstream = torch.randn(batch, width, generator=_gen(seed + 1), dtype=torch.float64)

    def run(backend, dtype, device):
        leaves = [None if t is None else t.to(device, dtype).requires_grad_() for t in tensors]
        out = SF.generative_cross(*leaves, backend=backend)
        grads = torch.autograd.grad((out * upstream.to(device, dtype)).sum(), [t for t in leaves if t is not None])
        return out.detach().cpu(), [g.cpu() for g in grads]
    out64, grads64 = run("reference", torch.float64, "cpu")
    out32, grads32 = run("reference", torch.float32, "cpu")
    for backend in _backends("generative_cross"):
        out, grads = run(backend, torch.float32, DEVICE)
        assert_close_2x(out, out64, out32, f"{backend} cross", floor=1e-5)
        for name, g, g64, g32 in zip(("dx", "dx_gen", "dW", "db"), grads, grads64, grads32):
            assert_close_2x(g, g64, g32, f"{backend} cross {name}", floor=1e-5)


# ----------------------------------------------------------------------------------- gAUC

@settings(max_examples=max(60, EXAMPLES), deadline=None, derandomize=not SEARCH, database=None)
@given(n=st.integers(0, 80), num_groups=st.integers(1, 6), levels=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_group_auc_equals_impression_weighted_sklearn_auc(n, num_groups, levels, seed):
    """gAUC = sum over groups holding both classes of (group size x sklearn AUC) / their total size,
    with heavy score ties (few score levels)."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = rng.integers(0, levels, n).astype(np.float64)
    groups = rng.integers(0, num_groups, n) * 7 - 3           # arbitrary (negative, sparse) keys
    got, counted = group_auc(labels, scores, groups)
    total, weighted, kept = 0, 0.0, 0
    for key in np.unique(groups):
        member = groups == key
        if labels[member].min() != labels[member].max():
            weighted += member.sum() * roc_auc_score(labels[member], scores[member])
            total += member.sum()
            kept += 1
    assert counted == kept
    if kept == 0:
        assert got is None
    else:
        assert got == pytest.approx(weighted / total, abs=1e-12)


# ------------------------------------------------------- the whole pipeline from ids (sfg_logits)

@PROPERTY
@given(case=interaction_cases(), vocab=st.lists(st.integers(1, 25), min_size=7, max_size=7),
       mode=st.sampled_from(["fatal", "clamp_to_oov", "off"]), id_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_sfg_logits_every_backend_equals_the_reference(case, vocab, mode, id_dtype):
    """ids -> lookup -> encoder -> decoder on every backend, forward and the gradients of the table (duplicate
    rows summed), the encoder and the decoder, against the fp64 reference by the 2x rule."""
    field_dims = vocab[: case["n"]]
    gen = _gen(case["seed"] + 2)
    ids = (torch.rand(case["batch"], case["n"], generator=gen) * torch.tensor(field_dims)).long().to(id_dtype)
    offsets = offsets_of(field_dims)
    _, enc, bias, dec = _interaction_tensors(case)
    table = torch.randn(sum(field_dims), case["dim"], generator=gen, dtype=torch.float64)
    tensors = [table, enc, bias, dec]
    options = (case["kind"], case["activation"], case["gamma"], case["residual"], case["pairs"], case["side"],
               case["symmetric"], mode)
    upstream = torch.randn(case["batch"], generator=_gen(case["seed"] + 3), dtype=torch.float64)

    def run(backend, device):
        return lambda *t: SF.sfg_logits(ids.to(device), t[0], offsets.to(device), *t[1:], *options, backend=backend)
    ref64, grads64 = _value_and_grads(run("reference", "cpu"), tensors, upstream, torch.float64, "cpu")
    ref32, grads32 = _value_and_grads(run("reference", "cpu"), tensors, upstream, torch.float32, "cpu")
    names = [name for name, t in zip(("d_table", "d_enc_weight", "d_enc_bias", "d_dec_weight"), tensors) if t is not None]
    for backend in _backends("sfg_logits"):
        out, grads = _value_and_grads(run(backend, DEVICE), tensors, upstream, torch.float32, DEVICE)
        assert_close_2x(out.cpu(), ref64, ref32, f"{backend} sfg_logits {case}", floor=1e-5)
        for name, g, g64, g32 in zip(names, grads, grads64, grads32):
            assert_close_2x(g.cpu(), g64, g32, f"{backend} {name} {case}", floor=1e-5)


def _encode_by_hand(rows, num_fields, min_count):
    """Train-only vocabularies from ``rows`` ({split: [(label, tokens)]}): tokens seen at least
    ``min_count`` times in train, most frequent first (ties by token), everything else OOV (the last id).
    Returns ``(field_dims, [(ids, labels)] for train, valid, test)``."""
    vocabs, dims = [], []
    for f in range(num_fields):
        counts = {}
        for _, tokens in rows[0]:
            counts[tokens[f]] = counts.get(tokens[f], 0) + 1
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        vocabs.append({t: i for i, t in enumerate(kept)})
        dims.append(len(kept) + 1)
    out = []
    for s in range(3):
        ids = np.array([[vocabs[f].get(t[f], dims[f] - 1) for f in range(num_fields)] for _, t in rows[s]],
                       dtype=np.int64).reshape(-1, num_fields)
        out.append((ids, np.array([label for label, _ in rows[s]], dtype=np.float32)))
    return dims, out


# ------------------------------------------- the Criteo reader against a line-by-line re-derivation

_NUMERIC_POOL = ["", "0", "1", "2", "3", "7", "54", "55", "1000", "-1", "2.5"]
_CATEGORICAL_POOL = ["", "68fd1e64", "0a0a0a0a", "8cf07265", "b1", "zz", "OOV"]
_BAD_LINES = {"columns": "1\t2\t3", "label": "2" + "\t1" * 39, "numeric": "0\tabc" + "\tx" * 38}


@st.composite
def criteo_files(draw):
    n = draw(st.integers(0, 40))
    rows = [[draw(st.sampled_from(["0", "1"]))] + [draw(st.sampled_from(_NUMERIC_POOL)) for _ in range(13)]
            + [draw(st.sampled_from(_CATEGORICAL_POOL[: draw(st.integers(1, 7))])) for _ in range(26)]
            for _ in range(n)]
    lines = ["\t".join(r) for r in rows]
    for _ in range(draw(st.integers(0, 3))):       # blank and malformed lines at random places
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", *_BAD_LINES.values()])))
    return dict(lines=lines, eol=draw(st.sampled_from(["\n", "\r\n"])), final_eol=draw(st.booleans()),
                gz=draw(st.booleans()), chunk_rows=draw(st.integers(1, 50)), min_count=draw(st.integers(1, 3)),
                split=draw(st.sampled_from([(1, 0, 0), (7, 2, 1), (1, 1, 1)])), seed=draw(st.integers(0, 99)),
                max_rows=draw(st.one_of(st.none(), st.integers(0, 45))))


def _criteo_by_hand(text, split, seed, min_count, max_rows):
    """The Criteo preprocessing written out line by line: lines end at LF (a CR before it is dropped),
    bucketed counts, blank and malformed lines skipped (each still takes its split slot), vocabularies
    from train counts only (most frequent first, ties by token), everything else OOV."""
    from sfg_fast.data import common
    from sfg_fast.data.criteo import bucket_count
    lines = text.split("\n")
    if lines[-1] == "":                  # the text after the last LF is a line only when not empty
        lines.pop()
    lines = [line.rstrip("\r") for line in lines][:max_rows]
    where = common.split_assignment(len(lines), split, seed)
    rows = {0: [], 1: [], 2: []}
    for slot, line in enumerate(lines):
        values = line.split("\t")
        if not line.strip() or len(values) != 40 or values[0] not in ("0", "1"):
            continue
        try:
            tokens = [bucket_count(v) for v in values[1:14]] + values[14:]
        except ValueError:
            continue
        rows[int(where[slot])].append((float(values[0]), tokens))
    return _encode_by_hand(rows, 39, min_count)


@settings(max_examples=max(30, EXAMPLES), deadline=None, derandomize=not SEARCH, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=criteo_files())
def test_criteo_reader_equals_the_preprocessing_by_hand(tmp_path, case):
    """Any chunk size, LF or CRLF, a final newline or none, gzip or plain text, blank and malformed lines,
    max_rows: the streaming reader's splits, ids, labels and field_dims equal a line-by-line derivation."""
    import uuid
    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    text = case["eol"].join(case["lines"]) + (case["eol"] if case["final_eol"] and case["lines"] else "")
    _read_and_compare("criteo", folder / ("train.txt.gz" if case["gz"] else "train.txt"), text, case,
                      _criteo_by_hand(text, case["split"], case["seed"], case["min_count"], case["max_rows"]))


def _read_and_compare(name, path, text, case, by_hand):
    """Write ``text`` (gzipped when the case says so), read it with the streaming reader and compare its
    field_dims, ids and labels with ``by_hand`` (as :func:`_encode_by_hand` returns them)."""
    import gzip
    from sfg_fast.data import load_dataset
    with (gzip.open if case["gz"] else open)(path, "wb") as f:
        f.write(text.encode())
    read = functools.partial(load_dataset, name, data_dir=path, cache_dir=False, seed=case["seed"],
                             split=case["split"], min_count=case["min_count"], max_rows=case["max_rows"],
                             skip_bad_lines=True, chunk_rows=case["chunk_rows"])
    if sum(len(labels) for _, labels in by_hand[1]) == 0:
        with pytest.raises(ValueError, match="no data rows"):      # a file yielding no rows is an error
            read()
        return
    _assert_splits_equal(read(), *by_hand)


def _assert_splits_equal(data, dims, splits):
    assert data.schema.field_dims == dims
    for (ids, labels), got in zip(splits, (data.train, data.valid, data.test)):
        np.testing.assert_array_equal(got.ids, ids)
        np.testing.assert_array_equal(got.labels, labels)


# -------------------------------------------- the Avazu reader against a line-by-line re-derivation

_AVAZU_HOURS = {"14102100": ("00", 1, 0), "14102523": ("23", 5, 1), "14102616": ("16", 6, 1),
                "15030207": ("07", 0, 0)}               # YYMMDDHH -> (hour, weekday, weekend) by the calendar
_AVAZU_BAD_HOURS = ["14023012", "1410210", "14102124", "1410x100", ""]
_AVAZU_LABELS = {"0": 0.0, "1": 1.0, "1.0": 1.0, " 0": 0.0}     # lenient: any spelling of 0 or 1
_AVAZU_BAD_LABELS = ["2", "x", "", "0.5"]
_AVAZU_POOL = ["", "a", "b", "1005", "c", "zz"]


@st.composite
def avazu_files(draw):
    n = draw(st.integers(0, 40))
    hours = sorted(_AVAZU_HOURS)[: draw(st.integers(1, 4))]
    rows = [[str(draw(st.integers(0, 10**6))), draw(st.sampled_from(sorted(_AVAZU_LABELS))), draw(st.sampled_from(hours))]
            + [draw(st.sampled_from(_AVAZU_POOL[: draw(st.integers(1, 6))])) for _ in range(21)]
            for _ in range(n)]
    lines = [",".join(r) for r in rows]
    for _ in range(draw(st.integers(0, 3))):          # blank and malformed lines at random places
        bad = draw(st.sampled_from(["", "  ", "1,2,3", "bad-hour", "bad-label"]))
        if bad == "bad-hour":
            bad = ",".join(["7", "0", draw(st.sampled_from(_AVAZU_BAD_HOURS))] + ["a"] * 21)
        elif bad == "bad-label":
            bad = ",".join(["7", draw(st.sampled_from(_AVAZU_BAD_LABELS)), hours[0]] + ["a"] * 21)
        lines.insert(draw(st.integers(0, len(lines))), bad)
    return dict(lines=lines, eol=draw(st.sampled_from(["\n", "\r\n"])), final_eol=draw(st.booleans()),
                gz=draw(st.booleans()), chunk_rows=draw(st.integers(1, 50)), min_count=draw(st.integers(1, 3)),
                split=draw(st.sampled_from([(8, 1, 1), (1, 1, 1), (1, 0, 0)])), seed=draw(st.integers(0, 99)),
                max_rows=draw(st.one_of(st.none(), st.integers(0, 45))))


def _avazu_by_hand(text, split, seed, min_count, max_rows):
    """The Avazu preprocessing written out line by line: the header line, then data lines ending at LF
    (a CR before it dropped); ``id`` dropped; ``hour`` -> hour of day, weekday, is_weekend; blank and
    malformed lines skipped (each still takes its split slot); train-only vocabularies, most frequent
    first (ties by token), everything else OOV."""
    from sfg_fast.data import common
    from sfg_fast.data.avazu import COLUMNS
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    lines = [line.rstrip("\r") for line in lines]
    assert lines and lines[0] == ",".join(COLUMNS)
    lines = lines[1:][:max_rows]
    where = common.split_assignment(len(lines), split, seed)
    rows = {0: [], 1: [], 2: []}
    for slot, line in enumerate(lines):
        values = line.split(",")
        if len(values) != 24 or values[1] not in _AVAZU_LABELS or values[2] not in _AVAZU_HOURS:
            continue
        hour, weekday, weekend = _AVAZU_HOURS[values[2]]
        tokens = [hour, str(weekday), str(weekend)] + values[3:]
        rows[int(where[slot])].append((_AVAZU_LABELS[values[1]], tokens))
    return _encode_by_hand(rows, 3 + 21, min_count)


@settings(max_examples=max(30, EXAMPLES), deadline=None, derandomize=not SEARCH, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=avazu_files())
def test_avazu_reader_equals_the_preprocessing_by_hand(tmp_path, case):
    """As the Criteo property, for Avazu's csv: a header, the hour split into three fields by the
    calendar, lenient labels, bad dates, wrong widths and blank lines skipped."""
    import uuid
    from sfg_fast.data.avazu import COLUMNS
    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    lines = [",".join(COLUMNS)] + case["lines"]
    text = case["eol"].join(lines) + (case["eol"] if case["final_eol"] else "")
    _read_and_compare("avazu", folder / ("train.csv.gz" if case["gz"] else "train.csv"), text, case,
                      _avazu_by_hand(text, case["split"], case["seed"], case["min_count"], case["max_rows"]))


# ---------------------------------------- the MovieLens-100K reader against a line-by-line re-derivation

_ML_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
              "War", "Western"]                         # GroupLens' flag order, which also orders the tokens
_ML_AGES = ["7", "18", "24", "25", "34", "35", "49", "50", "56", "73", "x", ""]
_ML_RATINGS = ["1", "2", "3", "3.5", "4", "4.0", "5", "nan", "inf", "x"]


@st.composite
def movielens_files(draw):
    users = [[str(u), draw(st.sampled_from(_ML_AGES)), draw(st.sampled_from(["M", "F"])),
              draw(st.sampled_from(["writer", "other", "none"])), draw(st.sampled_from(["55105", "5510", "9", ""]))]
             for u in range(1, draw(st.integers(1, 10)) + 1)]
    if draw(st.booleans()):
        users.insert(draw(st.integers(0, len(users))), ["1", "30", "F", "other", "00000"])   # a duplicate id
    items = []
    for i in range(1, draw(st.integers(1, 6)) + 1):
        flags = [draw(st.sampled_from(["0", "0", "1"])) for _ in _ML_GENRES]
        if draw(st.integers(0, 9)) == 0:
            flags[draw(st.integers(0, 18))] = "2"           # a malformed flag
        items.append([str(i), f"Movie {i}", draw(st.sampled_from(["01-Jan-1995", "1996", "", "12-Mar-19x7"])),
                      flags])
    inters = [[str(draw(st.integers(1, 12))), str(draw(st.integers(1, 8))), draw(st.sampled_from(_ML_RATINGS)),
               str(draw(st.integers(874724710, 893286638)))] for _ in range(draw(st.integers(0, 40)))]
    return dict(users=users, items=items, inters=inters, layout=draw(st.sampled_from(["grouplens", "recbole"])),
                blank=draw(st.booleans()), eol=draw(st.sampled_from(["\n", "\r\n"])),
                genre=draw(st.sampled_from(["first", "combination"])), min_count=draw(st.integers(1, 3)),
                split=draw(st.sampled_from([(8, 1, 1), (1, 1, 1), (1, 0, 0)])), seed=draw(st.integers(0, 99)),
                threshold=draw(st.sampled_from([4.0, 3.5])), max_rows=draw(st.one_of(st.none(), st.integers(0, 45))))


def _write_movielens(folder, case):
    eol = case["eol"]

    def write(name, header, rows):
        lines = ([header] if header else []) + rows
        if case["blank"] and lines:
            lines.insert(len(lines) // 2 + (1 if header else 0), "")    # a blank line holds no row
        (folder / name).write_bytes((eol.join(lines) + eol).encode("latin-1"))
    if case["layout"] == "grouplens":
        write("u.user", None, ["|".join(u) for u in case["users"]])
        write("u.item", None, ["|".join([i, title, date, "", "http://x"] + flags)
                               for i, title, date, flags in case["items"]])
        write("u.data", None, ["\t".join(r) for r in case["inters"]])
    else:
        write("ml-100k.user", "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
              ["\t".join(u) for u in case["users"]])
        write("ml-100k.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
              ["\t".join([i, title, date[-4:], " ".join(g for g, f in zip(_ML_GENRES, flags) if f == "1")])
               for i, title, date, flags in case["items"]])
        write("ml-100k.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float",
              ["\t".join(r) for r in case["inters"]])


def _movielens_by_hand(case):
    """MovieLens-100K as CTR written out: rating >= threshold is a click; users and items joined by id
    (a repeated id keeps its first line; bad ages, bad genre flags, non-finite ratings and unknown ids
    drop their line); age in the 1/18/25/35/45/50/56 buckets, zip3, release year (else ''), genre token;
    a random split of the surviving rows; train-only vocabularies, most frequent first, ties by token."""
    from sfg_fast.data import common
    users = {}
    for uid, age, gender, occupation, zip_code in case["users"]:
        if uid in users or not age.strip().lstrip("-").isdigit():
            continue
        bucket = next((str(b) for b in (56, 50, 45, 35, 25, 18) if int(age) >= b), "1")
        users[uid] = [bucket, gender, occupation, zip_code[:3]]
    items = {}
    for iid, _, date, flags in case["items"]:
        if iid in items or (case["layout"] == "grouplens" and any(f not in ("0", "1") for f in flags)):
            continue
        year = date[-4:] if len(date) >= 4 and date[-4:].isdigit() else ""
        genres = [g for g, f in zip(_ML_GENRES, flags) if f == "1"]
        items[iid] = [year, (genres[:1] if case["genre"] == "first" else ["|".join(genres)])[0] if genres else ""]
    rows = []
    for uid, iid, rating, _ in case["inters"][:case["max_rows"]]:
        value = float(rating) if rating not in ("x",) else math.nan
        if not math.isfinite(value) or uid not in users or iid not in items:
            continue
        rows.append((1.0 if value >= case["threshold"] else 0.0, [uid, iid] + users[uid] + items[iid]))
    where = common.split_assignment(len(rows), case["split"], case["seed"])
    parts = {s: [r for r, w in zip(rows, where) if w == s] for s in range(3)}
    return _encode_by_hand(parts, 8, case["min_count"])


@settings(max_examples=max(30, EXAMPLES), deadline=None, derandomize=not SEARCH, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=movielens_files())
def test_movielens_reader_equals_the_preprocessing_by_hand(tmp_path, case):
    """Both layouts (GroupLens u.* and RecBole atomic files), LF or CRLF, blank lines, duplicate ids,
    bad ages, flags and ratings, unknown users and items, either genre mode and max_rows."""
    import uuid
    from sfg_fast.data import load_dataset
    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    _write_movielens(folder, case)
    dims, splits = _movielens_by_hand(case)
    read = functools.partial(load_dataset, "movielens100k", data_dir=folder, seed=case["seed"], split=case["split"],
                             min_count=case["min_count"], max_rows=case["max_rows"], skip_bad_lines=True,
                             genre=case["genre"], threshold=case["threshold"])
    if sum(len(labels) for _, labels in splits) == 0:
        with pytest.raises(ValueError, match="no data rows"):      # a file yielding no rows is an error
            read()
        return
    _assert_splits_equal(read(), dims, splits)


# ---------------------------------------------------------------- int8 serving tables

@PROPERTY
@given(rows=st.integers(1, 12), dim=st.integers(1, 20), log_scale=st.integers(-30, 30), seed=st.integers(0, 2**16),
       shape=st.sampled_from(["normal", "constant", "outlier", "offset"]))
def test_int8_quantiser_error_is_at_most_half_a_step(rows, dim, log_scale, seed, shape):
    """Every element dequantises within half its row's step (plus the fp32 rounding of the affine map)
    at any magnitude, for constant rows, one outlier per row, and rows far from zero."""
    from sfg_fast.serving import dequantize_rowwise_int8, quantize_rowwise_int8
    w = torch.randn(rows, dim, generator=_gen(seed), dtype=torch.float64)
    if shape == "constant":
        w = w[:, :1].expand(rows, dim).clone()
    elif shape == "outlier":
        w[:, 0] *= 1e3
    elif shape == "offset":
        w += 1e4
    w = (w * 10.0 ** log_scale).float()
    q, scale_bias = quantize_rowwise_int8(w)
    assert q.dtype == torch.uint8 and scale_bias.dtype == torch.float32
    back = dequantize_rowwise_int8(q, scale_bias).double()
    scale, low = scale_bias[:, 0].double(), scale_bias[:, 1].double()
    high = w.double().amax(1)
    eps = torch.finfo(torch.float32).eps
    bound = scale / 2 + 2 * eps * (low.abs() + high.abs() + (high - low))
    err = (back - w.double()).abs().amax(1)
    assert bool((err <= bound).all()), f"max error {err.max():.3e} over bound {bound[err.argmax()]:.3e}"


@PROPERTY
@given(case=interaction_cases(), vocab=st.lists(st.integers(1, 25), min_size=7, max_size=7),
       mode=st.sampled_from(["fatal", "clamp_to_oov", "off"]))
def test_int8_serving_backends_equal_the_reference_on_the_dequantised_table(case, vocab, mode):
    """sfg_logits_int8 on the cpu backend (the fused pipeline) and on its torch twin equal the fp64 reference
    of the same interaction on the dequantised table, by the 2x rule."""
    from sfg_fast import serving
    field_dims = vocab[: case["n"]]
    gen = _gen(case["seed"] + 4)
    ids = (torch.rand(case["batch"], case["n"], generator=gen) * torch.tensor(field_dims)).long()
    offsets = offsets_of(field_dims)
    _, enc, bias, dec = _interaction_tensors(case)
    qweight, scale_bias = serving.quantize_rowwise_int8(torch.randn(sum(field_dims), case["dim"], generator=gen))
    table = serving.dequantize_rowwise_int8(qweight, scale_bias)
    options = (case["kind"], case["activation"], case["gamma"], case["residual"], case["pairs"], case["side"],
               case["symmetric"])

    def ref(dtype):
        cast = [None if t is None else t.to(dtype) for t in (enc, bias, dec)]
        return reference.sfg_logits(ids, table.to(dtype), offsets, *cast, *options, mode)
    ref64, ref32 = ref(torch.float64), ref(torch.float32)
    backends = ["torch"] + (["cpu"] if DEVICE.type == "cpu" and unavailable_reason("cpu", "", DEVICE) is None else [])
    for backend in backends:
        cast = [None if t is None else t.float() for t in (enc, bias, dec)]
        out = serving.sfg_logits_int8(ids, qweight, scale_bias, offsets, *cast, *options, mode, backend=backend)
        assert out.dtype == torch.float32 and out.shape == (case["batch"],)
        assert_close_2x(out, ref64, ref32, f"int8 {backend} {case}", floor=1e-5)
