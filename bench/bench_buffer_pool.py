"""The fused CPU training step with and without the op's buffer pool (csrc/buffer_pool.h).

The pool changes how memory is obtained, so the two variants cannot share a process: glibc's heap
state after one variant's steps shapes the other's page faults (an interleaved run in one process
hides most of the effect). Each variant therefore runs in its own fresh process, alternating
(pool, no pool, pool, ...), and each process reports the median of its steps. The step is the whole
`fused cpu` path of bench_cpu_ext at the Criteo shape: C++ lookup with the fused sparse Adagrad update in
backward, the fused sfg_interaction, BCE, and dense Adam on (W_enc, decoder).

    python bench/bench_buffer_pool.py --threads 2 --runs 3          # scalar + matrix, bf16 + fp32
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, markdown_table, write_results  # noqa: E402


def one_process(kind: str, precision: str, steps: int, threads: int) -> float:
    """Median step time (ms) of `steps` steps in this process."""
    import time

    import torch

    from bench.bench_cpu_ext import _offsets
    from bench.common import field_dims_for, make_ids
    from sfg_fast.ops import cpu_ext
    from sfg_fast.optim import SparseRowOptimizer, fused_embedding_lookup

    torch.set_num_threads(threads)
    batch, n, d = 4096, 39, 16
    field_dims = field_dims_for(n, 0.05)
    offsets = _offsets(field_dims)
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(sum(field_dims), d, generator=gen) * 0.01).requires_grad_()
    data = [(make_ids(batch, field_dims, "zipf", seed=s),
             torch.randint(0, 2, (batch,), generator=gen).float()) for s in range(4)]
    width = n * d
    enc = (torch.randn(width, width, generator=gen) / width ** 0.5).requires_grad_()
    dec = (torch.randn(n, n, generator=gen) if kind == "scalar"
           else torch.randn(n, n, d, d, generator=gen) / d).requires_grad_()
    dense = torch.optim.Adam([enc, dec], lr=1e-3)
    sparse = SparseRowOptimizer("adagrad", lr=0.01)
    times = []
    for step in range(steps):
        ids, y = data[step % len(data)]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            V = fused_embedding_lookup(ids, weight, offsets, sparse, "off", backend="cpu")
            logit = cpu_ext.sfg_interaction(V, enc, None, dec, kind, "relu", 0.5, False, "upper", "left", False)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit.float(), y)
        dense.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[5:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="processes per variant (alternating)")
    p.add_argument("--steps", type=int, default=40, help="steps per process (the first 5 are warm-up)")
    p.add_argument("--kinds", nargs="+", default=["scalar", "matrix"], choices=["scalar", "matrix"])
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--child", nargs=2, metavar=("KIND", "PRECISION"), help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 6:
        p.error("--steps must be >= 6 (5 warm-up steps)")
    if args.child:
        print(f"{one_process(args.child[0], args.child[1], args.steps, args.threads):.4f}")
        return 0
    rows = []
    for precision in args.precisions:
        for kind in args.kinds:
            samples = {"pool": [], "no pool": []}
            for _ in range(args.runs):
                for variant in samples:
                    env = dict(os.environ, SFG_FAST_NO_BUFFER_POOL="1" if variant == "no pool" else "0")
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, precision,
                                          "--steps", str(args.steps), "--threads", str(args.threads)],
                                         env=env, check=True, capture_output=True, text=True)
                    samples[variant].append(float(out.stdout.strip().splitlines()[-1]))
            base = statistics.median(samples["no pool"])
            for variant, values in samples.items():
                rows.append({"workload": f"train_step[{kind}, adagrad, {precision}]", "variant": variant,
                             "median_ms": round(statistics.median(values), 2),
                             "per_process_ms": " / ".join(f"{v:.1f}" for v in values),
                             "speedup_vs_no_pool": round(base / statistics.median(values), 2)})
    env = environment()
    env["threads"] = args.threads
    title = (f"bench_buffer_pool: fused CPU training step, B=4096 N=39 D=16, {args.threads} threads, "
             f"{args.runs} processes per variant, {args.steps} steps each")
    md = f"# {title}\n\n{env.get('device_name')}, torch {env.get('torch')}, git {env.get('git_sha')}\n\n" + \
        markdown_table(rows, ["workload", "variant", "median_ms", "per_process_ms", "speedup_vs_no_pool"])
    print(md)
    if not args.no_write:
        print("wrote", write_results("bench_buffer_pool", rows, env, md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
