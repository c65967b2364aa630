"""PNG plots of bench results (matplotlib, Agg backend): time vs batch, speedup vs N."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def time_vs_batch(rows: List[Dict], path: str, group: Sequence[str], title: str,
                  shape: str = "criteo") -> List[str]:
    """One panel per value of ``group`` keys: median ms vs B per provider, log-log. Returns written paths."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("shape") == shape]
    panels: Dict[tuple, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        panels[tuple(r.get(k) for k in group)][r["provider"]].append((r["B"], r["median_ms"]))
    if not panels or all(len({b for b, _ in pts}) < 2 for p in panels.values() for pts in p.values()):
        return []
    plt = _pyplot()
    keys = sorted(panels, key=str)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for provider, pts in sorted(panels[key].items()):
            pts.sort()
            ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("median ms")
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(group, key)), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def speedup_vs(rows: List[Dict], path: str, axis: str, shape: str, title: str) -> List[str]:
    """literal time / provider time vs ``axis`` (N or D) for each kind and provider."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("shape") == shape and r.get("ratio_vs_literal")]
    series: Dict[str, list] = defaultdict(list)
    for r in ok:
        if r["provider"] != "literal":
            series[f"{r['provider']} ({r.get('kind')})"].append((r[axis], 1.0 / r["ratio_vs_literal"]))
    if not series:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([x for x, _ in pts], [s for _, s in pts], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(axis)
    ax.set_ylabel("speedup over literal (x)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def decode_plots(rows: List[Dict], stem: str) -> List[str]:
    out = time_vs_batch(rows, stem + "-time-vs-batch.png", ["kind"], "pairwise_decode fwd+bwd")
    out += speedup_vs(rows, stem + "-speedup-vs-N.png", "N", "sweep-N", "pairwise_decode: speedup vs N (D=16)")
    out += speedup_vs(rows, stem + "-speedup-vs-D.png", "D", "sweep-D", "pairwise_decode: speedup vs D (N=39)")
    return out


def batch_plots(name: str, group: Sequence[str]):
    def make(rows: List[Dict], stem: str) -> List[str]:
        return time_vs_batch(rows, stem + "-time-vs-batch.png", group, name)
    return make
