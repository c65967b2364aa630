"""A/B of two builds of the compiled CPU extension: this tree's against another checkout's.

A change inside ``csrc/`` cannot be timed against the old code in one process (one ``sfg_fast._C`` per
process), so this runs the same workload in fresh processes, alternating the two trees, each process timing
``--reps`` calls after warm-up; the table reports the median over processes of each process's median. The
workload is the fused interaction's training op (``functional.sfg_interaction`` on the cpu backend,
forward + backward to dV, W_enc and the decoder) at the Criteo shape (B=4096, N=39, D=16, fp32).

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace)
    python -m bench.ab_cpu_ext_builds --baseline /tmp/base [--threads 1,2] [--rounds 4] [--reps 9]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List

from . import common

WORKER = r"""
import json, sys, time, torch
import sfg_fast
from sfg_fast import functional as F
threads, batch, fields, dim, kind, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 16, sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
gen = torch.Generator().manual_seed(0)
width = fields * dim
V = torch.randn(batch, fields, dim, generator=gen, requires_grad=True)
W = (torch.randn(width, width, generator=gen) / width ** 0.5).requires_grad_()
shape = (fields, fields) if kind == "scalar" else (fields, fields, dim, dim)
dec = (torch.randn(*shape, generator=gen) * 0.1).requires_grad_()
g = torch.randn(batch, generator=gen)
def step():
    out = F.sfg_interaction(V, W, None, dec, kind=kind, backend="cpu")
    torch.autograd.grad(out, (V, W, dec), g)
for _ in range(3):
    step()
times = []
for _ in range(reps):
    t = time.perf_counter(); step(); times.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"median_ms": sorted(times)[len(times) // 2], "module": sfg_fast.__file__}))
"""


def _run(tree: str, args, threads: int, kind: str) -> Dict:
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.run([sys.executable, "-c", WORKER, str(threads), str(args.batch), str(args.fields), kind,
                           str(args.reps)], capture_output=True, text=True, env=env, cwd="/", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = os.path.realpath(os.path.join(tree, "sfg_fast", "__init__.py"))
    if os.path.realpath(result["module"]) != expected:
        raise RuntimeError(f"the worker imported {result['module']}, not {expected}")
    return result


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="checkout whose sfg_fast/_C*.so is built in place")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--kinds", default="scalar,matrix")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--fields", type=int, default=39)
    p.add_argument("--rounds", type=int, default=4, help="process pairs per case")
    p.add_argument("--reps", type=int, default=9, help="timed calls per process")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"baseline": os.path.abspath(args.baseline), "this tree": here}
    base_sha = subprocess.run(["git", "-C", trees["baseline"], "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "?"
    rows: List[Dict] = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for kind in args.kinds.split(","):
            per: Dict[str, List[float]] = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    per[name].append(_run(tree, args, threads, kind)["median_ms"])
            base = statistics.median(per["baseline"])
            for name in trees:
                med = statistics.median(per[name])
                rows.append({"kind": kind, "threads": threads, "tree": name, "median_ms": med,
                             "process_medians_ms": per[name], "speedup_vs_baseline": base / med})
    env = common.environment("cpu")
    lines = [f"# CPU extension builds A/B: this tree (git {env['git_sha']}) vs baseline (git {base_sha})", "",
             f"`functional.sfg_interaction(backend='cpu')` forward + backward (dV, W_enc, decoder), B={args.batch}, "
             f"N={args.fields}, D=16, fp32; {args.rounds} alternating process pairs per case, each the median of "
             f"{args.reps} calls after 3 warm-up calls; {env['device_name']}; torch {env['torch']}.", "",
             "| decoder | threads | tree | median ms | per-process medians ms | speedup vs baseline |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['threads']} | {r['tree']} | {r['median_ms']:.1f} | "
              f"{', '.join(f'{t:.1f}' for t in r['process_medians_ms'])} | {r['speedup_vs_baseline']:.3f}x |"
              for r in rows]
    common.print_and_save("ab_cpu_ext_builds", lines, rows, env, save=not args.no_save)
    return rows


if __name__ == "__main__":
    main()
