"""A/B of the torch backend's CPU table gradient: ATen's embedding backward against one index_add_.

The torch backend's CPU lookup (``sfg_fast.factored._CpuGather``) sums the table gradient with one
``index_add_``; before, ``F.embedding``'s own backward added one row at a time. Both give the same bits
(tests/test_functional.py), so only time differs. This times whole training steps (forward, backward,
dense Adam) of zoo models with native tables, the two ways interleaved step by step in one process, and
the table gradient alone.

    python -m bench.ab_cpu_table_grad [--threads 1] [--batch 2048] [--reps 40]
"""
from __future__ import annotations

import argparse
from typing import Dict, List

import torch
import torch.nn.functional as F

from sfg_fast import factored, models
from sfg_fast import functional as SF
from sfg_fast.data import load_dataset

from . import common


def _aten_gather(rows, weight):
    return F.embedding(rows, weight)


def _step_fn(model, ids, labels, gather):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        real = factored._CpuGather.apply
        factored._CpuGather.apply = gather
        try:
            opt.zero_grad()
            SF.bce_with_logits(model(ids), labels).backward()
            opt.step()
        finally:
            factored._CpuGather.apply = real
    return step


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--models", default="fwfm,deepfm,dcnv2")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    field_dims = [int(d) for d in load_dataset("movielens100k").schema.field_dims]
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, d, (args.batch,), generator=gen) for d in field_dims], dim=1)
    labels = torch.randint(0, 2, (args.batch,), generator=gen).float()
    rows: List[Dict] = []
    for name in args.models.split(","):
        fns = {}
        for label, gather in (("aten embedding backward", staticmethod(_aten_gather)),
                              ("index_add_", factored._CpuGather.apply)):
            torch.manual_seed(0)
            fns[label] = _step_fn(models.build(name, field_dims, 16), ids, labels, gather)
        timed = common.time_interleaved(fns, warmup=3, reps=args.reps)
        for label, t in timed.items():
            rows.append({"case": f"{name} SFG training step", "provider": label, **t,
                         "speedup": timed["aten embedding backward"]["median_ms"] / t["median_ms"]})
    # the table gradient alone, at the main job's table ([sum(field_dims), 16]) and the same ids
    offsets = torch.tensor([0] + list(torch.tensor(field_dims).cumsum(0)[:-1].tolist()))
    weight = torch.randn(sum(field_dims), 16, requires_grad=True)
    grad = torch.randn(args.batch, len(field_dims), 16)
    fns = {"aten embedding backward": lambda: torch.autograd.grad(F.embedding(ids + offsets, weight), weight, grad),
           "index_add_": lambda: torch.autograd.grad(factored.embedding_lookup(ids, weight, offsets), weight, grad)}
    timed = common.time_interleaved(fns, warmup=3, reps=args.reps)
    for label, t in timed.items():
        rows.append({"case": "lookup forward + table gradient", "provider": label, **t,
                     "speedup": timed["aten embedding backward"]["median_ms"] / t["median_ms"]})
    env = common.environment("cpu")
    lines = [f"# CPU table gradient: ATen's embedding backward vs index_add_ (git {env['git_sha']})", "",
             f"MovieLens-100K field sizes ({sum(field_dims)} rows, D=16), batch {args.batch}, {args.threads} "
             f"thread(s), {args.reps} interleaved reps, {env['device_name']}; torch {env['torch']}.", "",
             "| case | provider | median ms | IQR ms | speedup vs ATen |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['provider']} | {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | {r['speedup']:.2f}x |"
              for r in rows]
    common.print_and_save("ab_cpu_table_grad", lines, rows, env, save=not args.no_save)
    return rows


if __name__ == "__main__":
    main()
