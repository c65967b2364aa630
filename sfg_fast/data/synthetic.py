"""Synthetic CTR data with a planted pairwise click model, shaped like Criteo and Avazu.

Ids of field ``f`` are Zipf-distributed over ``field_dims[f]`` values (rank ``r`` has probability
proportional to ``(r + 1) ** -zipf_a``; a seeded permutation scatters the hot ids over the table, as
hashing does in real logs). Labels follow the planted model

    logit(x) = bias + sum_f w_f[x_f] + sum_{i<j} <u_i[x_i], u_j[x_j]>,   y ~ Bernoulli(sigmoid(logit))

with ``w_f ~ N(0, linear_std^2 / N)`` and ``u_f ~ N(0, s^2)`` in ``embed_dim`` dimensions, where
``s^4 = pairwise_std^2 / (N (N - 1) / 2 * embed_dim)``, so the linear and pairwise parts each have a
standard deviation near ``linear_std`` and ``pairwise_std`` over uniform ids (the pairwise sum is
computed as ``(|sum_f u_f|^2 - sum_f |u_f|^2) / 2``). ``bias`` is set by bisection so the mean click
probability on a fixed calibration sample is ``target_ctr``. The model parameters depend only on
the seed and the arguments other than ``num_rows``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .common import finalize, split_assignment
from .schema import CTRData

# Distinct values per field in the real logs (Criteo: the 13 counts after log^2 bucketing, roughly,
# then the 26 categorical columns of the Kaggle set; Avazu: after the hour split).
CRITEO_CARDINALITIES = [49, 101, 126, 50, 223, 118, 84, 76, 95, 9, 30, 40, 75,
                        1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
                        27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
AVAZU_CARDINALITIES = [24, 7, 2, 7, 7, 4737, 7745, 26, 8552, 559, 36, 2686408, 6729486, 8251, 5, 4,
                       2626, 8, 9, 435, 4, 68, 172, 60]
DEFAULT_NUM_ROWS = 100_000
DEFAULT_VOCAB_SCALE = 0.6
DEFAULT_SPLIT = (8, 1, 1)
_BLOCK = 1 << 15
_CALIBRATION_ROWS = 20_000


def scaled_dims(cardinalities: Sequence[int], vocab_scale: float) -> List[int]:
    """Shrink cardinalities in log space: ``V -> min(V, max(2, round(V ** vocab_scale)))``.

    A power keeps the order and the heavy tail of the real sizes while shrinking the huge fields
    most (Criteo's 10M-value C3 becomes about 16k at the default 0.6); ``vocab_scale=1`` keeps them.
    """
    if not (isinstance(vocab_scale, (int, float)) and 0 < vocab_scale <= 1):
        raise ValueError(f"vocab_scale must be in (0, 1], got {vocab_scale!r}")
    return [min(int(v), max(2, int(round(v ** vocab_scale)))) for v in cardinalities]


@dataclass
class PlantedModel:
    """The click model behind :func:`generate`: ``logits(ids) = bias + linear + pairwise``."""

    bias: float
    weights: List[np.ndarray]   # per field, float64 [V_f]
    vectors: List[np.ndarray]   # per field, float64 [V_f, embed_dim]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """float64 ``[n]`` logits of raw ids ``[n, N]`` (each in ``[0, field_dims[f])``)."""
        ids = np.asarray(ids)
        out = np.empty(ids.shape[0], dtype=np.float64)
        for start in range(0, ids.shape[0], _BLOCK):
            block = ids[start:start + _BLOCK]
            linear = sum(w[block[:, f]] for f, w in enumerate(self.weights))
            vecs = np.stack([u[block[:, f]] for f, u in enumerate(self.vectors)], axis=1)  # [b, N, k]
            total = vecs.sum(axis=1)
            pairwise = 0.5 * ((total * total).sum(axis=1) - (vecs * vecs).sum(axis=(1, 2)))
            out[start:start + _BLOCK] = self.bias + linear + pairwise
        return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form: no overflow warnings for large |x|


def _sample_ids(rng: np.random.Generator, cdfs, perms, num_rows: int) -> np.ndarray:
    ids = np.empty((num_rows, len(cdfs)), dtype=np.int64)
    for f, (cdf, perm) in enumerate(zip(cdfs, perms)):
        ranks = np.searchsorted(cdf, rng.random(num_rows), side="right")
        ids[:, f] = perm[np.minimum(ranks, cdf.size - 1)]
    return ids


def _check_generate_args(field_dims, num_rows, zipf_a, embed_dim, target_ctr, linear_std, pairwise_std):
    dims = list(field_dims) if not isinstance(field_dims, (str, bytes)) else None
    if not dims or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in dims):
        raise ValueError(f"field_dims must be a non-empty sequence of integers >= 1, got {field_dims!r}")
    if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) or num_rows < 0:
        raise ValueError(f"num_rows must be an integer >= 0, got {num_rows!r}")
    if not (isinstance(zipf_a, (int, float)) and zipf_a >= 0 and math.isfinite(zipf_a)):
        raise ValueError(f"zipf_a must be a finite number >= 0 (0 = uniform ids), got {zipf_a!r}")
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, (int, np.integer)) or embed_dim < 1:
        raise ValueError(f"embed_dim must be an integer >= 1, got {embed_dim!r}")
    if not (isinstance(target_ctr, (int, float)) and 0 < target_ctr < 1):
        raise ValueError(f"target_ctr must be in (0, 1), got {target_ctr!r}")
    for name, value in (("linear_std", linear_std), ("pairwise_std", pairwise_std)):
        if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return [int(d) for d in dims]


def generate(field_dims: Sequence[int], num_rows: int, seed: int = 2018, zipf_a: float = 1.2,
             embed_dim: int = 4, target_ctr: float = 0.25, linear_std: float = 1.0, pairwise_std: float = 1.0,
             return_model: bool = False):
    """Draw ``(ids int64 [num_rows, N], labels float32 [num_rows])`` from the planted click model.

    Args:
        field_dims: values per field; raw ids of field ``f`` lie in ``[0, field_dims[f])``.
        num_rows: rows to draw.
        seed: fixes everything (model, popularity order, rows, labels).
        zipf_a: Zipf exponent of the id distribution (0 = uniform; real logs are about 1.1-1.3).
        embed_dim: dimension of the planted latent vectors.
        target_ctr: mean click probability the bias is calibrated to.
        linear_std, pairwise_std: scale of the first-order and pairwise parts of the logit.
        return_model: also return the :class:`PlantedModel` (its ``logits`` give the Bayes scores).
    """
    dims = _check_generate_args(field_dims, num_rows, zipf_a, embed_dim, target_ctr, linear_std, pairwise_std)
    num_fields = len(dims)
    model_seq, order_seq, row_seq, calib_seq, label_seq = np.random.SeedSequence(seed).spawn(5)
    model_rng = np.random.default_rng(model_seq)
    pairs = num_fields * (num_fields - 1) // 2
    vector_std = (pairwise_std ** 2 / (pairs * embed_dim)) ** 0.25 if pairs else 0.0
    weights = [model_rng.normal(0.0, linear_std / math.sqrt(num_fields), v) for v in dims]
    vectors = [model_rng.normal(0.0, vector_std, (v, embed_dim)) for v in dims]
    order_rng = np.random.default_rng(order_seq)
    perms = [order_rng.permutation(v) for v in dims]
    cdfs = []
    for v in dims:
        p = np.arange(1, v + 1, dtype=np.float64) ** -float(zipf_a)
        cdf = np.cumsum(p / p.sum())
        cdf[-1] = 1.0
        cdfs.append(cdf)
    model = PlantedModel(0.0, weights, vectors)
    calibration = model.logits(_sample_ids(np.random.default_rng(calib_seq), cdfs, perms, _CALIBRATION_ROWS))
    low, high = -30.0, 30.0
    for _ in range(80):
        mid = 0.5 * (low + high)
        if _sigmoid(mid + calibration).mean() < target_ctr:
            low = mid
        else:
            high = mid
    model.bias = 0.5 * (low + high)
    ids = _sample_ids(np.random.default_rng(row_seq), cdfs, perms, int(num_rows))
    probability = _sigmoid(model.logits(ids))
    labels = (np.random.default_rng(label_seq).random(int(num_rows)) < probability).astype(np.float32)
    return (ids, labels, model) if return_model else (ids, labels)


def load_synthetic(name: str, num_rows: Optional[int], seed: int, max_rows: Optional[int], min_count: int,
                   split=DEFAULT_SPLIT, vocab_scale: float = DEFAULT_VOCAB_SCALE, zipf_a: float = 1.2,
                   embed_dim: int = 4, target_ctr: float = 0.25, linear_std: float = 1.0,
                   pairwise_std: float = 1.0) -> CTRData:
    """``synthetic-criteo`` / ``synthetic-avazu``: generated rows run through the usual vocabulary step."""
    from . import avazu, criteo
    start = time.perf_counter()
    if name == "synthetic-criteo":
        names, cards = criteo.COLUMNS[1:], CRITEO_CARDINALITIES
    else:
        names, cards = avazu.FIELDS, AVAZU_CARDINALITIES
    rows = DEFAULT_NUM_ROWS if num_rows is None else num_rows
    if max_rows is not None:
        rows = min(rows, max_rows)
    dims = scaled_dims(cards, vocab_scale)
    ids, labels = generate(dims, rows, seed=seed, zipf_a=zipf_a, embed_dim=embed_dim, target_ctr=target_ctr,
                           linear_std=linear_std, pairwise_std=pairwise_std)
    where = split_assignment(rows, split, seed)
    chunks = [[(ids[where == s], labels[where == s])] for s in range(3)]
    del ids
    schema, splits, _ = finalize(name, names, [(f, None) for f in range(len(names))],
                              [range(v) for v in dims], chunks, min_count)
    info = {"dataset": name, "source": "synthetic", "rows": rows, "seed": seed, "split": list(split),
            "min_count": min_count, "max_rows": max_rows, "skipped_lines": 0, "from_cache": False,
            "generator": {"field_dims": dims, "vocab_scale": vocab_scale, "zipf_a": zipf_a,
                          "embed_dim": embed_dim, "target_ctr": target_ctr, "linear_std": linear_std,
                          "pairwise_std": pairwise_std},
            "positive_rate": float(labels.mean()) if rows else float("nan"),
            "build_seconds": round(time.perf_counter() - start, 3)}
    return CTRData(schema, *splits, info=info)
