"""Compiled CPU backend (sfg_fast._C) vs the factored torch path and torch's own baselines.

Workloads at the Criteo shape (B=4096, N=39, D=16, Zipf ids), providers timed interleaved in one
run so the ratios survive a noisy shared machine:
  sfg_logits (inference, no grad): cpu fused tile pipeline | torch factored | literal reference
  embedding_lookup (inference):   cpu gather | torch F.embedding
  sparse update from grad_V:      cpu fused sort+update | sfg_fast.optim torch path |
                                  torch.optim on nn.Embedding(sparse=True)-style sparse grads
Results go to bench/results/ (JSON + markdown) with versions, threads and git SHA.

    python bench/bench_cpu_ext.py --threads 2            # full run
    python bench/bench_cpu_ext.py --threads 2 --quick    # fewer reps, no literal reference
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (environment, field_dims_for, make_ids, markdown_table, set_threads,  # noqa: E402
                          time_interleaved, write_results)
from sfg_fast import factored, reference  # noqa: E402
from sfg_fast.ops import cpu_ext  # noqa: E402
from sfg_fast.optim import SparseRowOptimizer, unique_row_grads  # noqa: E402


def _offsets(field_dims):
    return torch.tensor([0] + list(torch.tensor(field_dims).cumsum(0)[:-1].tolist()), dtype=torch.int64)


def bench_logits(args, table, offsets, ids_list, rows):
    n, d = len(offsets), table.shape[1]
    width = n * d
    enc = torch.randn(width, width) / width ** 0.5
    decoders = {"identity": None, "scalar": torch.randn(n, n), "vector": torch.randn(n, n, d),
                "matrix": torch.randn(n, n, d, d) / d}
    for kind in args.kinds:
        dec = decoders[kind]
        state = {"i": 0}

        def next_ids():
            state["i"] = (state["i"] + 1) % len(ids_list)
            return ids_list[state["i"]]

        common = (kind, "relu", 0.5, False, "upper", "left", False)
        fns = {
            "cpu": lambda: cpu_ext.sfg_logits(next_ids(), table, offsets, enc, None, dec, *common),
            "torch": lambda: factored.sfg_logits(next_ids(), table, offsets, enc, None, dec, *common),
        }
        if not args.quick and kind in ("scalar", "matrix"):
            fns["reference"] = lambda: reference.sfg_logits(next_ids(), table, offsets, enc, None, dec, *common)
        with torch.no_grad():
            times = time_interleaved(fns, warmup=1, reps=args.reps if "reference" not in fns else max(3, args.reps // 3))
        flops = 2 * args.batch * width * width * (2 if kind == "matrix" else 1)
        for name, t in times.items():
            rows.append({"workload": f"sfg_logits[{kind}]", "provider": name, "median_ms": round(t["median_ms"], 3),
                         "iqr_ms": round(t["iqr_ms"], 3), "gflops": round(flops / t["median_ms"] / 1e6, 1),
                         "speedup_vs_torch": round(times["torch"]["median_ms"] / t["median_ms"], 2)})


def bench_lookup(args, table, offsets, ids_list, rows):
    state = {"i": 0}

    def next_ids():
        state["i"] = (state["i"] + 1) % len(ids_list)
        return ids_list[state["i"]]

    fns = {"cpu": lambda: cpu_ext.embedding_lookup(next_ids(), table, offsets, "off"),
           "torch": lambda: factored.embedding_lookup(next_ids(), table, offsets)}
    with torch.no_grad():
        times = time_interleaved(fns, warmup=2, reps=args.reps * 3)
    moved = 2 * args.batch * len(offsets) * table.shape[1] * table.element_size()
    for name, t in times.items():
        rows.append({"workload": "embedding_lookup", "provider": name, "median_ms": round(t["median_ms"], 3),
                     "iqr_ms": round(t["iqr_ms"], 3), "gb_per_s": round(moved / t["median_ms"] / 1e6, 2),
                     "speedup_vs_torch": round(times["torch"]["median_ms"] / t["median_ms"], 2)})


def bench_update(args, table, offsets, ids_list, rows):
    d = table.shape[1]
    grads = [torch.randn(args.batch, len(offsets), d) for _ in ids_list]
    for kind in ("adagrad", "adam"):
        w_cpu, w_opt, w_torch = table.clone(), table.clone(), table.clone().requires_grad_()
        state_cpu = {}
        opt = SparseRowOptimizer(kind, lr=0.01)
        torch_opt = (torch.optim.Adagrad([w_torch], lr=0.01) if kind == "adagrad"
                     else torch.optim.SparseAdam([w_torch], lr=0.01))
        counter = {"cpu": 0, "opt": 0, "torch": 0}

        def step_cpu():
            i = counter["cpu"] = counter["cpu"] + 1
            k = i % len(ids_list)
            cpu_ext.sparse_row_update(kind, w_cpu, state_cpu, ids_list[k], offsets, grads[k], 0.01, 1e-8,
                                      (0.9, 0.999), i, "off")

        def step_opt():
            i = counter["opt"] = counter["opt"] + 1
            k = i % len(ids_list)
            r, g = unique_row_grads(ids_list[k], offsets, grads[k])
            opt.step_rows(w_opt, r, g)

        def step_torch():
            # What nn.Embedding(sparse=True) hands the optimizer: an uncoalesced sparse gradient.
            i = counter["torch"] = counter["torch"] + 1
            k = i % len(ids_list)
            idx = (ids_list[k] + offsets).reshape(1, -1)
            w_torch.grad = torch.sparse_coo_tensor(idx, grads[k].reshape(-1, d), w_torch.shape)
            torch_opt.step()

        times = time_interleaved({"cpu": step_cpu, "sfg_fast.optim torch": step_opt, "torch.optim sparse": step_torch},
                                 warmup=1, reps=args.reps)
        for name, t in times.items():
            rows.append({"workload": f"sparse_update[{kind}]", "provider": name, "median_ms": round(t["median_ms"], 3),
                         "iqr_ms": round(t["iqr_ms"], 3),
                         "speedup_vs_torch": round(times["torch.optim sparse"]["median_ms"] / t["median_ms"], 2)})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--fields", type=int, default=39)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab-scale", type=float, default=0.05,
                        help="scale of the Criteo vocabularies (1.0 = 33.8M rows, 2.2 GB fp32)")
    parser.add_argument("--kinds", nargs="+", default=["identity", "scalar", "vector", "matrix"])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if not cpu_ext.available():
        raise SystemExit("sfg_fast._C is not built: pip install --no-build-isolation -e .")
    set_threads(args.threads)
    torch.manual_seed(0)
    field_dims = field_dims_for(args.fields, args.vocab_scale)
    offsets = _offsets(field_dims)
    table = torch.randn(sum(field_dims), args.dim) * 0.1
    ids_list = [make_ids(args.batch, field_dims, "zipf", seed=s) for s in range(4)]   # rotate inputs
    rows = []
    bench_logits(args, table, offsets, ids_list, rows)
    bench_lookup(args, table, offsets, ids_list, rows)
    bench_update(args, table, offsets, ids_list, rows)
    env = environment("cpu")
    env.update({"batch": args.batch, "fields": args.fields, "dim": args.dim, "table_rows": sum(field_dims)})
    cols = ["workload", "provider", "median_ms", "iqr_ms", "speedup_vs_torch", "gflops", "gb_per_s"]
    table_md = markdown_table(rows, cols)
    summary = (f"# bench_cpu_ext: B={args.batch} N={args.fields} D={args.dim}, {args.threads} threads, "
               f"{sum(field_dims)} table rows\n\n{env['device_name']}, torch {env['torch']}, git {env['git_sha']}\n\n"
               + table_md)
    print(summary)
    if not args.no_write:
        print("wrote", write_results("bench_cpu_ext", rows, env, summary))


if __name__ == "__main__":
    main()
