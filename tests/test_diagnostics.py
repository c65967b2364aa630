"""Diagnostics: spectrum, information abundance, RankMe, correlation, plots, report."""
import json
import math
import os

import matplotlib
import numpy as np
import pytest
import torch

from sfg_fast import diagnostics as dg

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _orthonormal(rows: int, cols: int, generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator))
    return q


def _data_with_variances(variances, n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """[n, dim] data whose covariance has exactly the given eigenvalues (plus zeros up to dim).

    Centred orthonormal sample scores times sqrt(n - 1) give unit sample variance per direction;
    a random orthonormal basis then embeds the directions in dim coordinates.
    """
    g = torch.Generator().manual_seed(seed)
    k = len(variances)
    scores = torch.randn(n, k, dtype=torch.float64, generator=g)
    scores = scores - scores.mean(0, keepdim=True)
    scores, _ = torch.linalg.qr(scores)
    scores = scores * math.sqrt(n - 1) * torch.tensor(variances, dtype=torch.float64).sqrt()
    basis = _orthonormal(dim, k, g).T  # [k, dim], orthonormal rows
    return scores @ basis + torch.randn(dim, dtype=torch.float64, generator=g)  # offset: centring must remove it


@pytest.mark.parametrize("k", [1, 3, 7])
def test_equal_variance_directions_give_ia_and_rankme_k(k):
    R = _data_with_variances([2.5] * k, n=300, dim=17)
    s = dg.singular_spectrum(R)
    assert s.dtype == torch.float64 and s.shape == (17,)
    torch.testing.assert_close(s[:k], torch.full((k,), 2.5, dtype=torch.float64), rtol=1e-9, atol=0)
    assert float(s[k:].abs().max()) < 1e-12
    assert dg.information_abundance(s) == pytest.approx(k, rel=1e-9)
    assert dg.rankme(s) == pytest.approx(k, rel=1e-6)
    assert dg.rankme(s, eps=0.0) == pytest.approx(k, rel=1e-9)


def test_rank_one_data_is_collapsed():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 1, dtype=torch.float64, generator=g)
    direction = torch.randn(1, 12, dtype=torch.float64, generator=g)
    s = dg.singular_spectrum(x @ direction)
    assert dg.information_abundance(s) == pytest.approx(1.0, abs=1e-9)
    assert dg.rankme(s) == pytest.approx(1.0, abs=1e-6)


def test_unequal_spectrum_matches_formulas():
    variances = [4.0, 1.0, 0.25]
    s = dg.singular_spectrum(_data_with_variances(variances, n=200, dim=5, seed=3))
    torch.testing.assert_close(s[:3], torch.tensor(variances, dtype=torch.float64), rtol=1e-9, atol=0)
    p = np.array(variances) / sum(variances)
    assert dg.information_abundance(s) == pytest.approx(sum(variances) / max(variances), rel=1e-9)
    assert dg.rankme(s, eps=0.0) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    # lists and numpy arrays are accepted as spectra
    assert dg.information_abundance(variances) == pytest.approx(5.25 / 4.0)
    assert dg.rankme(np.array(variances), eps=0.0) == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_zero_spectrum_is_defined_as_zero():
    s = dg.singular_spectrum(torch.full((10, 4), 3.0))
    assert torch.equal(s, torch.zeros(4, dtype=torch.float64))
    assert dg.information_abundance(s) == 0.0
    assert dg.rankme(s) == 0.0


@pytest.mark.parametrize("n,dim", [(64, 9), (5, 12), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectrum_matches_numpy_svd_of_covariance(n, dim, dtype):
    R = (torch.randn(n, dim) * torch.linspace(0.1, 3.0, dim)).to(dtype)
    expected = np.linalg.svd(np.cov(R.double().numpy(), rowvar=False), compute_uv=False)
    s = dg.singular_spectrum(R)
    assert s.shape == (dim,) and s.dtype == torch.float64
    assert bool((s[:-1] >= s[1:]).all()), "spectrum must be descending"
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-9, atol=1e-12 * expected.max())
    # at most n - 1 non-zero values after centring
    assert np.abs(s.numpy()[min(n - 1, dim):]).max(initial=0.0) <= 1e-12 * expected.max()


def test_spectrum_accepts_non_contiguous_and_integer_input():
    R = torch.randn(40, 20)[:, ::2]
    assert not R.is_contiguous()
    expected = np.linalg.svd(np.cov(R.double().numpy(), rowvar=False), compute_uv=False)
    np.testing.assert_allclose(dg.singular_spectrum(R).numpy(), expected, rtol=1e-9, atol=1e-12)
    Ri = torch.randint(-5, 5, (30, 4))
    expected = np.linalg.svd(np.cov(Ri.double().numpy(), rowvar=False), compute_uv=False)
    np.testing.assert_allclose(dg.singular_spectrum(Ri).numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ka,kb", [(6, 6), (3, 8)])
def test_correlation_matches_numpy_corrcoef(ka, kb):
    a = torch.randn(100, ka) * torch.rand(ka) * 5 + 3.0
    b = 0.7 * a[:, :1] + torch.randn(100, kb)  # some real correlation with a's first column
    corr = dg.correlation_matrix(a, b)
    expected = np.corrcoef(a.double().numpy(), b.double().numpy(), rowvar=False)[:ka, ka:]
    assert corr.shape == (ka, kb) and corr.dtype == torch.float64
    np.testing.assert_allclose(corr.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_correlation_does_not_depend_on_the_scale(scale):
    """Pearson's r is scale-free: float64 values near the ends of the range (finite) give the same matrix,
    not zeros from overflowing squares or NaN from underflowing ones."""
    a = torch.randn(80, 3, dtype=torch.float64)
    b = 0.5 * a[:, :1] + torch.randn(80, 2, dtype=torch.float64)
    corr = dg.correlation_matrix(a * scale, b * scale)
    torch.testing.assert_close(corr, dg.correlation_matrix(a, b), rtol=1e-12, atol=1e-12)


def test_constant_columns_correlate_zero_without_nan():
    a = torch.randn(50, 4)
    a[:, 1] = 0.1  # constant in float32: centring leaves roundoff, which must not become +-1
    b = torch.randn(50, 4)
    b[:, 2] = -7.0
    corr = dg.correlation_matrix(a, b)
    assert bool(torch.isfinite(corr).all())
    assert torch.equal(corr[1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(corr[:, 2], torch.zeros(4, dtype=torch.float64))
    with np.errstate(invalid="ignore", divide="ignore"):  # numpy gives NaN for the constant columns
        expected = np.corrcoef(a.double().numpy(), b.double().numpy(), rowvar=False)[:4, 4:]
    keep_rows, keep_cols = [0, 2, 3], [0, 1, 3]
    np.testing.assert_allclose(corr.numpy()[np.ix_(keep_rows, keep_cols)],
                               expected[np.ix_(keep_rows, keep_cols)], rtol=1e-10, atol=1e-12)
    self_corr = dg.correlation_matrix(a, a)
    assert self_corr[1, 1] == 0.0 and self_corr[0, 0] == pytest.approx(1.0)


def test_redundancy_excludes_diagonal_and_averages_absolute_values():
    corr = torch.tensor([[1.0, 0.5, -0.2], [-0.3, 1.0, 0.0], [0.1, 0.6, 1.0]])
    expected = (0.5 + 0.2 + 0.3 + 0.0 + 0.1 + 0.6) / 6
    assert dg.redundancy(corr) == pytest.approx(expected)
    changed = corr.clone()
    changed.diagonal().fill_(-0.9)
    assert dg.redundancy(changed) == pytest.approx(expected)


def test_redundancy_identical_vs_independent_operands():
    n, dim = 4000, 8
    shared = torch.randn(n, 1)
    a = shared + 0.5 * torch.randn(n, dim)  # coordinates share one factor: strongly inter-correlated
    identical = dg.redundancy(dg.correlation_matrix(a, a))
    independent = dg.redundancy(dg.correlation_matrix(a, torch.randn(n, dim)))
    assert identical == pytest.approx(1.0 / 1.25, abs=0.05)  # corr = var(shared) / (var(shared) + 0.25)
    assert independent < 4.0 / math.sqrt(n)


def _read_png(path):
    assert os.path.isfile(path)
    with open(path, "rb") as handle:
        data = handle.read()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    return data


def test_plots_write_png_without_switching_backend(tmp_path):
    backend = matplotlib.get_backend()
    s_full = dg.singular_spectrum(torch.randn(50, 10))
    s_low = dg.singular_spectrum(torch.randn(50, 3) @ torch.randn(3, 10))  # zeros in the tail
    path = dg.plot_spectrum({"full": s_full, "rank 3": s_low}, tmp_path / "sub" / "spectrum.png", title="t")
    _read_png(path)
    corr = dg.correlation_matrix(torch.randn(30, 6), torch.randn(30, 6))
    _read_png(dg.plot_correlation(corr, str(tmp_path / "corr.png"), title="corr"))
    assert matplotlib.get_backend() == backend


def test_analyze_embeddings_with_generated(tmp_path):
    raw = torch.randn(200, 12)
    generated = torch.relu(raw @ torch.randn(12, 12))
    out = tmp_path / "sfg"
    result = dg.analyze_embeddings(raw, generated, str(out), title="toy SFG")
    with open(out / "diagnostics.json") as handle:
        saved = json.load(handle)
    assert saved == result
    assert saved["num_samples"] == 200 and saved["dim"] == 12 and saved["model"] == "sfg"
    for name, R in (("raw", raw), ("generated", generated)):
        s = dg.singular_spectrum(R)
        part = saved[name]
        assert part["information_abundance"] == pytest.approx(dg.information_abundance(s))
        assert part["rankme"] == pytest.approx(dg.rankme(s))
        assert part["top_singular_values"] == pytest.approx(s[:10].tolist())
        assert len(part["singular_values"]) == 12
        assert part["self_redundancy"] == pytest.approx(dg.redundancy(dg.correlation_matrix(R, R)))
    assert saved["redundancy"] == pytest.approx(dg.redundancy(dg.correlation_matrix(raw, generated)))
    assert 0.0 < saved["redundancy"] < 1.0
    _read_png(out / "spectrum.png")
    _read_png(out / "correlation.png")
    assert saved["files"] == {"correlation": "correlation.png", "spectrum": "spectrum.png",
                              "diagnostics": "diagnostics.json"}


def test_analyze_embeddings_base_model(tmp_path):
    raw = torch.randn(100, 6, dtype=torch.float64)
    result = dg.analyze_embeddings(raw, None, tmp_path)
    assert result["model"] == "base" and "generated" not in result
    assert result["redundancy"] is None and "base model" in result["correlation"]
    assert not (tmp_path / "correlation.png").exists()
    _read_png(tmp_path / "spectrum.png")
    with open(tmp_path / "diagnostics.json") as handle:
        assert json.load(handle) == result


def test_analyze_embeddings_collapsed_generated(tmp_path):
    raw = torch.randn(64, 5)
    raw[:, 1] += raw[:, 0]
    raw[:, 2] = 0.1  # a constant coordinate must not turn into NaN or +-1 correlations
    dead = torch.zeros(64, 5)  # e.g. every ReLU unit dead
    (tmp_path / "correlation.png").write_bytes(b"an earlier analysis's plot")
    result = dg.analyze_embeddings(raw, dead, tmp_path)
    live = np.corrcoef(raw[:, [0, 1, 3, 4]].double().numpy(), rowvar=False)   # the constant column has none
    want = np.abs(live[~np.eye(4, dtype=bool)]).mean()
    assert result["raw"]["self_redundancy"] == pytest.approx(want, rel=1e-9)
    assert result["raw"]["constant_columns"] == 1 and result["generated"]["constant_columns"] == 5
    # every generated unit dead: no correlation is defined, so there is no redundancy to report (not 0)
    assert result["generated"]["self_redundancy"] is None and result["redundancy"] is None
    assert result["redundancy_pairs_left_out"] == 25
    assert result["generated"]["information_abundance"] == 0.0 and result["generated"]["rankme"] == 0.0
    _read_png(tmp_path / "spectrum.png")
    assert not (tmp_path / "correlation.png").exists()       # the stale plot is gone
    assert "generated" in result["spectrum"] and "not plotted" in result["spectrum"]   # why its line is missing


def test_redundancy_leaves_dead_units_out_instead_of_counting_them_as_zero(tmp_path):
    """Dead ReLU units (constant columns of Z) have no correlation; counting them as 0 biased redundancy low,
    in favour of the model with more dead units."""
    base = torch.randn(200, 1, dtype=torch.float64)
    raw = base.repeat(1, 8) + 1e-3 * torch.randn(200, 8, dtype=torch.float64)
    generated = raw.clone()
    values = []
    for dead in (0, 2, 4, 6):
        generated[:, :dead] = 0.0
        result = dg.analyze_embeddings(raw, generated, tmp_path / str(dead))
        values.append(result["redundancy"])
        assert result["redundancy_pairs_left_out"] == dead * 8
    assert min(values) > 0.99 and max(values) - min(values) < 1e-3


def test_spectrum_of_a_rank_deficient_covariance_has_exact_zeros():
    """Fewer samples than coordinates: at most n - 1 directions carry variance; the rest are exactly 0,
    not rounding noise at log(s / max s) ~ -40 that would squash the plotted spectrum."""
    R = torch.randn(10, 3, dtype=torch.float64) @ torch.randn(3, 40, dtype=torch.float64)
    s = dg.singular_spectrum(R)
    assert int((s > 0).sum()) == 3
    R = torch.randn(12, 50, dtype=torch.float64)
    assert int((dg.singular_spectrum(R) > 0).sum()) == 11


def test_analysis_files_are_written_whole_with_the_usual_mode(tmp_path):
    import os
    import stat
    dg.analyze_embeddings(torch.randn(30, 4), torch.randn(30, 4), tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("diagnostics.json", "spectrum.png", "correlation.png"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~mask, name
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_input_validation_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"R must have shape \[n, K\]"):
        dg.singular_spectrum(torch.randn(10))
    with pytest.raises(ValueError, match="reshape"):
        dg.singular_spectrum(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="R needs at least 2 samples"):
        dg.singular_spectrum(torch.randn(1, 5))
    bad = torch.randn(5, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="R contains 1 NaN/inf"):
        dg.singular_spectrum(bad)
    with pytest.raises(TypeError, match="R must be a torch.Tensor"):
        dg.singular_spectrum([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="R must be a real"):
        dg.singular_spectrum(torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="b must have as many rows"):
        dg.correlation_matrix(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="a contains"):
        dg.correlation_matrix(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), torch.randn(2, 2))
    with pytest.raises(ValueError, match="s must be non-negative"):
        dg.information_abundance(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="s must be a non-empty 1-D"):
        dg.rankme(torch.ones(2, 2))
    with pytest.raises(ValueError, match="eps must be finite"):
        dg.rankme(torch.ones(3), eps=-1.0)
    with pytest.raises(ValueError, match="corr must be a square"):
        dg.redundancy(torch.ones(2, 3))
    with pytest.raises(ValueError, match="corr must be a square"):
        dg.redundancy(torch.ones(1, 1))
    with pytest.raises(ValueError, match="spectra must be a non-empty dict"):
        dg.plot_spectrum({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"spectra\['zero'\] is all zero"):
        dg.plot_spectrum({"zero": torch.zeros(3)}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="corr must be a non-empty 2-D"):
        dg.plot_correlation(torch.ones(3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="generated must have the shape of raw"):
        dg.analyze_embeddings(torch.randn(5, 3), torch.randn(5, 4), tmp_path)
    with pytest.raises(ValueError, match="raw needs at least 2 samples"):
        dg.analyze_embeddings(torch.randn(1, 3), None, tmp_path)
    assert not (tmp_path / "x.png").exists()
