"""Ranking metrics of the training job beyond sklearn's: group AUC.

gAUC (Zhou et al., DIN, KDD 2018; FuxiCTR's ``gAUC``) is the mean of per-group AUCs weighted by each
group's number of samples, over the groups that hold both classes:

    gAUC = sum_g n_g * AUC_g / sum_g n_g,   g over groups with at least one click and one non-click.

A group is usually a user: gAUC then measures how well each user's own items are ranked, which a
global AUC mixes with how users are ranked against each other.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def _as_array(values, dtype) -> np.ndarray:
    """A numpy array of ``values`` (sequences, numpy arrays or tensors of any device, dtype or grad)."""
    try:
        import torch
    except ImportError:     # pragma: no cover (torch is a dependency; the metric itself needs only numpy)
        torch = None
    if torch is not None and isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.is_floating_point() and values.dtype != torch.float64:
            values = values.to(torch.float64)     # bf16 / fp16 have no numpy dtype
        values = values.numpy()
    return np.asarray(values, dtype=dtype)


def group_auc(labels, scores, groups, exclude=None) -> Tuple[Optional[float], int]:
    """``(gAUC, number of groups that counted)``; gAUC is None when no group holds both classes.

    Args:
        labels: ``[n]`` 0/1 labels. scores: ``[n]`` real scores (logits or probabilities; ranks only).
        groups: ``[n]`` integer group keys (e.g. the user-id field of the ids).
        exclude: a group key whose samples are left out: the field's OOV id, which stands for every
            unseen or rare user at once (scored as one group, their cross-user AUC would count as a
            user's, weighted by all their rows).

    Per group, AUC is the Mann-Whitney statistic with tied scores given their average rank (as
    ``sklearn.metrics.roc_auc_score``); everything is vectorised over one sort of the n samples.
    """
    y, s, g = (_as_array(x, dtype) for x, dtype in ((labels, np.float64), (scores, np.float64), (groups, None)))
    # one value per sample: [n], [n, 1] or [1, n] alike, never a [2, 3] that flattening would pair up anew
    if not (y.size == s.size == g.size) or any(a.ndim > 1 and a.size != max(a.shape) for a in (y, s, g)):
        raise ValueError(f"labels, scores and groups must have one value per sample ([n] or [n, 1]), got "
                         f"shapes {y.shape}, {s.shape}, {g.shape}")
    y, s, g = y.reshape(-1), s.reshape(-1), g.reshape(-1)
    if exclude is not None:
        keep = g != exclude
        y, s, g = y[keep], s[keep], g[keep]
    n = y.size
    if n == 0:
        return None, 0
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1 for gAUC")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite for gAUC")
    order = np.lexsort((s, g))                      # by group, then by score
    g, s, y = g[order], s[order], y[order]
    # runs of equal (group, score): tied samples share the average of their positions
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], n)
    position = ((run_start + run_end - 1) / 2.0)[run_id]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    group_start = np.flatnonzero(new_group)
    group_id = np.cumsum(new_group) - 1
    rank = position - group_start[group_id] + 1.0   # 1-based rank inside the group
    size = np.diff(np.append(group_start, n)).astype(np.float64)
    positives = np.add.reduceat(y, group_start)
    negatives = size - positives
    counted = (positives > 0) & (negatives > 0)
    if not counted.any():
        return None, 0
    rank_sum = np.add.reduceat(rank * y, group_start)[counted]
    p, q = positives[counted], negatives[counted]
    auc = (rank_sum - p * (p + 1) / 2.0) / (p * q)
    weights = size[counted]
    return float((auc * weights).sum() / weights.sum()), int(counted.sum())
