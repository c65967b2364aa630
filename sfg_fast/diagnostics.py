"""Embedding diagnostics used to tune SFG: singular spectrum, information abundance, RankMe, redundancy.

All of them look at a matrix ``R: [n, K]`` of embeddings, one row per sample (e.g. 50k validation
samples): the raw concatenation ``e = V.reshape(n, N*D)`` for a base model, the generated
``Z.reshape(n, N*D)`` for SFG (the diagnostics the SFG paper tunes it with).

- Singular spectrum ``s``: singular values of the covariance of the centred ``R``, descending.
  The covariance is symmetric positive semi-definite, so these are its eigenvalues (the variance
  along each principal direction).
- Information abundance ``IA = sum(s) / max(s)`` (Guo et al., ICML 2024): 1 for fully collapsed
  embeddings, K when all K directions carry equal variance.
- ``RankMe = exp(H(p))`` with ``p = s / sum(s)``: the effective number of directions.
- Redundancy: the Pearson correlation matrix between the two interaction operands (raw ``e`` vs
  generated ``Z``) and its mean absolute off-diagonal entry.

Math is done in float64 with torch on the input's device; plots use matplotlib's Agg canvas.
"""
from __future__ import annotations

import io
import json
import math
import os
import textwrap
from typing import Dict, Optional

import numpy as np
import torch

__all__ = ["singular_spectrum", "information_abundance", "rankme", "correlation_matrix", "redundancy",
           "plot_spectrum", "plot_correlation", "analyze_embeddings"]

TOP_SINGULAR_VALUES = 10


def _as_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be a real floating or integer tensor, got dtype {x.dtype}")
    return x


def _check_finite(name: str, x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise ValueError(f"{name} contains {int(bad.sum())} NaN/inf values")


def _check_matrix(name: str, x) -> torch.Tensor:
    """Validate an ``[n, K]`` sample matrix (reads the data for the finiteness check)."""
    x = _as_tensor(name, x)
    if x.dim() != 2:
        hint = " (flatten [n, N, D] embeddings with .reshape(n, N*D))" if x.dim() == 3 else ""
        raise ValueError(f"{name} must have shape [n, K] (samples x features), got {list(x.shape)}{hint}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples (rows) for a covariance, got shape {list(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} needs at least 1 feature (column), got shape {list(x.shape)}")
    _check_finite(name, x)
    return x


def _check_spectrum(name: str, s) -> torch.Tensor:
    """Validate a spectrum: 1-D, non-empty, finite, non-negative. Returns it as float64 on the CPU."""
    if isinstance(s, (list, tuple)):
        s = torch.tensor(s, dtype=torch.float64)
    s = _as_tensor(name, s)
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of singular values, got shape {list(s.shape)}")
    s = s.detach().to(device="cpu", dtype=torch.float64)
    _check_finite(name, s)
    if bool((s < 0).any()):
        raise ValueError(f"{name} must be non-negative (singular values), got min {float(s.min())}")
    return s


def _centred(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().to(torch.float64)
    return x - x.mean(dim=0, keepdim=True)


def singular_spectrum(R: torch.Tensor) -> torch.Tensor:
    """Singular values of the covariance of the centred ``R``, descending.

    ``s = svdvals(Rc^T Rc / (n - 1))`` with ``Rc = R - mean(R, 0)``.

    The covariance is formed in float64 and diagonalised with ``eigvalsh``: for a symmetric PSD
    matrix the singular values are the eigenvalues, and the ``K x K`` Gram route is about ten times
    faster than an SVD of the tall ``n x K`` matrix at the sizes these diagnostics run on.
    Eigenvalues below zero are roundoff of a PSD matrix and are clamped to 0.

    Args:
        R: real ``[n, K]`` samples x features, ``n >= 2``, finite; any device.
    Returns:
        float64 ``[K]`` on ``R``'s device, descending; at most ``n - 1`` of them are non-zero.
    """
    return _spectrum_of(_covariance(_check_matrix("R", R)))


def _covariance(R: torch.Tensor) -> torch.Tensor:
    Rc = _centred(R)
    return (Rc.T @ Rc) / (R.shape[0] - 1)


def _spectrum_of(cov: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0.0)
    # Eigenvalues below the decomposition's rounding (about K * eps * max) are zero: a rank-deficient
    # covariance (fewer samples than coordinates, low-cardinality fields) otherwise reports them as
    # directions with log(s / max s) near -35..-80, squashing the real spectrum in the plot.
    floor = float(s[0]) * s.numel() * torch.finfo(torch.float64).eps if s.numel() else 0.0
    return torch.where(s > floor, s, torch.zeros_like(s))


def _constant_columns(x: torch.Tensor) -> torch.Tensor:
    # Exact equality decides "constant": the centred values of a constant fp column are tiny
    # roundoff, not zero, and normalising them would turn noise into correlations of +-1.
    return x.amax(dim=0) == x.amin(dim=0)


def information_abundance(s) -> float:
    """Information abundance ``IA = sum(s) / max(s)`` of a spectrum.

    Ranges from 1 (one direction carries all the variance: collapse) to ``len(s)`` (flat spectrum).
    An all-zero spectrum (constant embeddings) has no information; it is defined as 0.

    Args:
        s: non-negative 1-D singular values (tensor, array or sequence), e.g. from ``singular_spectrum``.
    """
    s = _check_spectrum("s", s)
    top = float(s.max())
    if top == 0.0:
        return 0.0
    return float(s.sum()) / top


def rankme(s, eps: float = 1e-12) -> float:
    """RankMe effective rank ``exp(-sum_k p_k log p_k)`` with ``p_k = s_k / sum(s) + eps``.

    ``eps`` follows the RankMe definition (Garrido et al., ICML 2023) and keeps ``log`` finite for
    zero singular values; its effect is of order ``len(s) * eps * log(1 / eps)``. Here, as in the SFG
    paper's diagnostics, RankMe is applied to the covariance spectrum (variances), not to the singular values of ``R``
    itself as in the RankMe paper. An all-zero spectrum (constant embeddings) is defined as 0.

    Args:
        s: non-negative 1-D singular values (tensor, array or sequence).
        eps: non-negative smoothing added to each share.
    """
    s = _check_spectrum("s", s)
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a real number, got {eps!r}") from None
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total + eps
    # xlogy takes 0 * log(0) = 0, the entropy's limit, so eps = 0 is allowed.
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


def correlation_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between every column of ``a`` and every column of ``b``.

    ``C[i, j] = cov(a[:, i], b[:, j]) / (std(a[:, i]) * std(b[:, j]))``, computed in float64.

    A constant column (all values exactly equal: zero variance) has an undefined Pearson
    correlation; it is defined here as 0 against every column, so the result never holds NaN.
    Values are clamped to [-1, 1] against roundoff.

    Args:
        a: real ``[n, K_a]``, ``n >= 2``, finite.
        b: real ``[n, K_b]`` with the same ``n`` and device as ``a`` (usually ``K_b == K_a``).
    Returns:
        float64 ``[K_a, K_b]`` on ``a``'s device.
    """
    a = _check_matrix("a", a)
    b = _check_matrix("b", b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"b must have as many rows (samples) as a ({a.shape[0]}), got shape {list(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"b is on {b.device} but a is on {a.device}")

    def unit_columns(x: torch.Tensor) -> torch.Tensor:
        constant = _constant_columns(x)
        # Pearson's r does not depend on scale: bring the values near 1 first, so that squared sums neither
        # overflow nor underflow at extreme (finite) scales
        x = x.detach().to(torch.float64)
        top = x.abs().max()
        if float(top) > 0:
            # a power of two: the division is exact
            x = x / torch.exp2(torch.floor(torch.log2(top)))
        xc = _centred(x)
        norm = xc.norm(dim=0)
        norm = torch.where(constant, torch.ones_like(norm), norm)
        return torch.where(constant, torch.zeros_like(xc), xc / norm)

    return (unit_columns(a).T @ unit_columns(b)).clamp_(-1.0, 1.0)


def redundancy(corr, defined=None) -> float:
    """Mean absolute off-diagonal correlation: ``mean_{i != j} |corr[i, j]|`` over the defined pairs.

    The diagonal is excluded: ``corr[i, i]`` pairs a coordinate of the raw operand with the same
    coordinate of the generated one (identically 1 when both operands are the raw ``e``, as in a
    base model), so it measures alignment rather than redundancy between different coordinates
    and would swamp the off-diagonal signal.

    A coordinate that is constant over the samples (a dead ReLU unit of the encoder) has no
    correlation with anything: ``correlation_matrix`` shows 0 there, and those pairs must be left out
    of the mean (counting them as 0 would bias redundancy low, in favour of the model with more dead
    units). ``defined`` says which pairs count; ``None`` counts every pair.

    Args:
        corr: square ``[K, K]`` correlation matrix with ``K >= 2``, e.g. from ``correlation_matrix``.
        defined: optional boolean ``[K, K]``: True where ``corr[i, j]`` is defined (both columns vary),
            e.g. ``~(constant_a[:, None] | constant_b[None, :])``.
    Returns:
        The mean, or NaN when no off-diagonal pair is defined.
    """
    corr = _as_tensor("corr", corr)
    if corr.dim() != 2 or corr.shape[0] != corr.shape[1] or corr.shape[0] < 2:
        raise ValueError(f"corr must be a square [K, K] matrix with K >= 2 (it has off-diagonal entries), "
                         f"got shape {list(corr.shape)}")
    corr = corr.detach().to(torch.float64)
    _check_finite("corr", corr)
    k = corr.shape[0]
    off = ~torch.eye(k, dtype=torch.bool, device=corr.device)
    if defined is not None:
        defined = torch.as_tensor(defined).to(device=corr.device)
        if defined.shape != corr.shape or defined.dtype != torch.bool:
            raise ValueError(f"defined must be a boolean mask of corr's shape {list(corr.shape)}, got "
                             f"{defined.dtype} {list(defined.shape)}")
        off = off & defined
    if not bool(off.any()):
        return float("nan")
    return float(corr.abs()[off].mean())


def _figure(width: float, height: float):
    # A figure bound directly to an Agg canvas renders off-screen without pyplot: it neither
    # switches the user's global backend nor leaks figures into pyplot's registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _prepare_path(path) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return path


def plot_spectrum(spectra: Dict[str, torch.Tensor], path, title: str = "") -> str:
    """Plot ``log(s / max s)`` against the index, one line per entry of ``spectra``; write a PNG.

    Zero singular values have ``log = -inf`` and are left out of their line (the line stops where
    the rank ends).

    Args:
        spectra: ``{label: s}`` with each ``s`` a non-negative 1-D spectrum with a positive maximum.
        path: output PNG file; parent directories are created.
        title: figure title.
    Returns:
        ``path``.
    """
    if not isinstance(spectra, dict) or not spectra:
        raise ValueError(f"spectra must be a non-empty dict {{label: spectrum}}, got {spectra!r}")
    lines = {}
    for label, s in spectra.items():
        s = _check_spectrum(f"spectra[{label!r}]", s)
        top = float(s.max())
        if top == 0.0:
            raise ValueError(f"spectra[{label!r}] is all zero: log(s / max s) is undefined")
        ratio = (s / top).numpy()
        with np.errstate(divide="ignore"):
            lines[str(label)] = np.where(ratio > 0, np.log(ratio), np.nan)
    path = _prepare_path(path)
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for label, y in lines.items():
        # a collapsed operand (one non-zero singular value) is a single point: a line alone would not show it
        marker = "o" if np.count_nonzero(~np.isnan(y)) < 2 else None
        ax.plot(np.arange(1, y.size + 1), y, label=label, linewidth=1.5, marker=marker)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("log(s / max s)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(textwrap.fill(title, 70), fontsize=9)   # long run names would be clipped
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def plot_correlation(corr, path, title: str = "", *, xlabel: str = "generated Z coordinate",
                     ylabel: str = "raw e coordinate") -> str:
    """Heatmap of a correlation matrix on a fixed [-1, 1] diverging colour scale; write a PNG.

    Args:
        corr: 2-D correlation matrix, rows = columns of the first operand (raw ``e``),
            columns = columns of the second (generated ``Z``).
        path: output PNG file; parent directories are created.
        title: figure title.
        xlabel, ylabel: axis labels.
    Returns:
        ``path``.
    """
    corr = _as_tensor("corr", corr)
    if corr.dim() != 2 or corr.numel() == 0:
        raise ValueError(f"corr must be a non-empty 2-D matrix, got shape {list(corr.shape)}")
    corr = corr.detach().to(device="cpu", dtype=torch.float64)
    _check_finite("corr", corr)
    path = _prepare_path(path)
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(corr.numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest",
                      aspect="auto")
    fig.colorbar(image, ax=ax, label="Pearson correlation")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(textwrap.fill(title, 70), fontsize=9)   # long run names would be clipped
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def _operand_summary(R: torch.Tensor) -> dict:
    # One covariance serves both the spectrum and the self-correlation: the n x K x K product is
    # the dominant cost at realistic sizes (n ~ 50k samples).
    cov = _covariance(R)
    s = _spectrum_of(cov).cpu()
    values = [float(v) for v in s]
    summary = {
        "information_abundance": information_abundance(s),
        "rankme": rankme(s),
        "top_singular_values": values[:TOP_SINGULAR_VALUES],
        "singular_values": values,
    }
    if R.shape[1] >= 2:
        # Correlation between distinct coordinates of one operand: the base-model counterpart of
        # the raw-vs-generated redundancy.
        constant = _constant_columns(R)
        std = torch.where(constant, torch.ones_like(cov.diagonal()), cov.diagonal().sqrt())
        corr = cov / (std[:, None] * std[None, :])
        undefined = constant[:, None] | constant[None, :]
        corr = corr.masked_fill(undefined, 0.0).clamp_(-1.0, 1.0)
        summary["self_redundancy"] = _json_number(redundancy(corr, ~undefined))
    summary["constant_columns"] = int(_constant_columns(R).sum())
    return summary


def _json_number(value: float):
    """A float for the JSON, or None where it is undefined (NaN)."""
    return None if value != value else value


def analyze_embeddings(raw: torch.Tensor, generated: Optional[torch.Tensor], out_dir: str,
                       title: str = "") -> dict:
    """Run every diagnostic on one model's embeddings and write plots plus ``diagnostics.json``.

    Scalars: ``num_samples``, ``dim``; per operand (``raw``, and ``generated`` when given):
    ``information_abundance``, ``rankme``, ``top_singular_values`` (the largest 10),
    ``singular_values`` (all K, so spectra of different runs can be re-plotted together) and
    ``self_redundancy`` (mean |off-diagonal| of the operand's correlation with itself).
    With ``generated``: ``redundancy`` = mean |off-diagonal| of ``correlation_matrix(raw, generated)``.
    Without it (a base model), both interaction operands are the raw ``e``; ``redundancy`` is null and
    ``correlation`` says so instead of a heatmap of ``corr(e, e)``.

    Files in ``out_dir`` (created): ``spectrum.png``, ``correlation.png`` (only with ``generated``),
    ``diagnostics.json``.

    Args:
        raw: real ``[n, K]`` raw embeddings ``e`` (``V.reshape(n, N*D)``), ``n >= 2``, finite.
        generated: ``None`` for a base model, else real ``[n, K]`` generated ``Z`` for the same samples.
        out_dir: output directory.
        title: prefix for plot titles, also stored in the JSON.
    Returns:
        The dict written to ``diagnostics.json``.
    """
    raw = _check_matrix("raw", raw)
    if generated is not None:
        generated = _check_matrix("generated", generated)
        if generated.shape != raw.shape:
            raise ValueError(f"generated must have the shape of raw {list(raw.shape)}, got {list(generated.shape)}")
        if generated.device != raw.device:
            raise ValueError(f"generated is on {generated.device} but raw is on {raw.device}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    result = {
        "title": title,
        "model": "base" if generated is None else "sfg",
        "num_samples": int(raw.shape[0]),
        "dim": int(raw.shape[1]),
        "raw": _operand_summary(raw),
    }
    spectra = {"raw e": torch.tensor(result["raw"]["singular_values"], dtype=torch.float64)}
    files = {}
    prefix = f"{title}: " if title else ""

    if generated is None:
        result["redundancy"] = None
        result["correlation"] = ("not computed: base model, both interaction operands are the raw "
                                 "embeddings e, so corr(e, e) has a unit diagonal by construction; "
                                 "see raw.self_redundancy for the correlation between distinct coordinates")
    else:
        result["generated"] = _operand_summary(generated)
        spectra["generated Z"] = torch.tensor(result["generated"]["singular_values"], dtype=torch.float64)
        if raw.shape[1] >= 2:
            corr = correlation_matrix(raw, generated)
            defined = ~(_constant_columns(raw)[:, None] | _constant_columns(generated)[None, :])
            result["redundancy"] = _json_number(redundancy(corr, defined))
            result["redundancy_pairs_left_out"] = int((~defined).sum())
            if result["redundancy"] is None:
                result["correlation"] = ("not computed: every coordinate of raw e or of generated Z is constant "
                                         "over the samples (dead units), so no correlation is defined")
            else:
                result["correlation"] = ("correlation.png: Pearson corr(raw e [rows], generated Z [columns]); "
                                         "pairs with a constant coordinate are shown as 0 and left out of "
                                         "redundancy")
                files["correlation"] = plot_correlation(
                    corr, os.path.join(out_dir, "correlation.png"),
                    title=f"{prefix}corr(raw e, generated Z), redundancy {result['redundancy']:.3f}")
        else:
            result["redundancy"] = None
            result["correlation"] = "not computed: dim 1 has no off-diagonal entries"

    if any(float(s.max()) > 0 for s in spectra.values()):
        files["spectrum"] = plot_spectrum({k: s for k, s in spectra.items() if float(s.max()) > 0},
                                          os.path.join(out_dir, "spectrum.png"),
                                          title=f"{prefix}singular spectrum of the covariance")
        constant = [k for k, s in spectra.items() if float(s.max()) == 0]
        if constant:
            result["spectrum"] = f"{', '.join(constant)} not plotted: constant embeddings (all-zero spectrum)"
    else:
        result["spectrum"] = "not plotted: every embedding is constant (all-zero spectrum)"
    files["diagnostics"] = os.path.join(out_dir, "diagnostics.json")
    result["files"] = {k: os.path.basename(v) for k, v in files.items()}
    for name in ("spectrum.png", "correlation.png"):
        # an earlier analysis's plot that this one does not produce must not sit beside it looking current
        stale = os.path.join(out_dir, name)
        if name not in result["files"].values() and os.path.exists(stale):
            os.remove(stale)
    _write_atomically(files["diagnostics"], json.dumps(result, indent=2, allow_nan=False).encode())
    return result


def _write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (the training job's writer): a
    reader, or an interrupted run, sees the old file or the new one, never a truncated one."""
    from ._io import atomic_write_bytes
    atomic_write_bytes(data, path)


def _save_figure(fig, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _write_atomically(path, buffer.getvalue())
