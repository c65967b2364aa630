"""Weak scaling of TorchRec-sharded SFG training: 1 vs K ranks, a fixed batch per rank.

Each configuration spawns K real processes (gloo on CPU; NCCL, one GPU per rank, when CUDA is available),
shards a Criteo-shaped model (N fields, dim D, vocabularies scaled from Criteo's) with
DistributedModelParallel and times full training steps (forward, backward with the fused table
optimizer, dense Adam step) on rank 0 after warm-up. Ideal weak scaling keeps the step time flat,
so global samples/s grows K-fold; ``efficiency`` = (samples/s at K) / (K x samples/s at 1).
An unsharded single-process step of the native model (same per-rank batch) is shown beside them; it
updates its table with dense Adam (torch's default route), not the fused row-wise Adagrad the sharded
runs use, so it bounds DMP's overhead only roughly.

    python bench/bench_distributed.py --worlds 1,2 --batch 1024 --steps 20

On a shared 2-core CPU machine two ranks compete for the same cores: expect little scaling there
(the numbers are reported as measured).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, field_dims_for, make_ids, markdown_table, write_results  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(args, embedding):
    from sfg_fast import models

    torch.manual_seed(0)
    dims = field_dims_for(args.fields, args.scale)
    hparams = {"hidden_units": tuple(args.hidden)} if args.model in ("deepfm", "ipnn", "dcnv2", "xdeepfm") else {}
    return models.build(args.model, dims, args.dim, embedding=embedding, **hparams), dims


def _batches(args, dims, rank):
    batches = []
    for i in range(4):  # rotate a few batches so caches do not flatter
        ids = make_ids(args.batch, dims, args.dist, seed=1000 * rank + i)
        labels = (torch.rand(args.batch, generator=torch.Generator().manual_seed(i)) < 0.25).float()
        batches.append((ids, labels))
    return batches


def _worker(rank, world, port, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads_per_rank)
    import torch.distributed as dist

    from sfg_fast import distributed as D

    _, _, device = D.init_distributed()
    model, dims = _model(args, "torchrec")
    session = D.shard_model(model, device, args.sharding, "rowwise_adagrad", 0.01, batch_size=args.batch)
    del model
    batches = _batches(args, dims, rank)
    times = []
    for step in range(args.warmup + args.steps):
        ids, labels = batches[step % len(batches)]
        dist.barrier()
        start = time.perf_counter()
        session.train_step(ids, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = times[args.warmup:]
    session.close(destroy=True)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump({"times": times}, fh)


def _unsharded(args):
    from sfg_fast import functional as SF

    torch.set_num_threads(args.threads_per_rank)
    model, dims = _model(args, "native")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = _batches(args, dims, 0)
    times = []
    for step in range(args.warmup + args.steps):
        ids, labels = batches[step % len(batches)]
        start = time.perf_counter()
        loss = SF.bce_with_logits(model(ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times[args.warmup:]


def _row(name, world, times, args):
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [median, median, median]
    return {"config": name, "ranks": world, "batch_per_rank": args.batch, "step_ms": median * 1e3,
            "iqr_ms": (q[2] - q[0]) * 1e3, "samples_per_s": world * args.batch / median}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument("--model", default="fm")
    p.add_argument("--fields", type=int, default=39)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--scale", type=float, default=0.01, help="Criteo vocabularies times this (default 0.01)")
    p.add_argument("--hidden", type=int, nargs="*", default=[400, 400, 400])
    p.add_argument("--batch", type=int, default=1024, help="rows per rank per step (default 1024)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dist", default="zipf", choices=("uniform", "zipf"))
    p.add_argument("--sharding", default="table_wise")
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--out", default=None, help="results directory (default bench/results/<device>/)")
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    rows = [_row("unsharded native (1 process)", 1, _unsharded(args), args)]
    for world in [int(x) for x in args.worlds.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "times.json")
            mp.spawn(_worker, args=(world, _free_port(), args, path), nprocs=world, join=True)
            with open(path) as fh:
                times = json.load(fh)["times"]
        rows.append(_row(f"DMP {args.sharding}", world, times, args))
    one = next((r for r in rows if r["ranks"] == 1 and r["config"].startswith("DMP")), None)
    for r in rows:
        r["efficiency"] = r["samples_per_s"] / (r["ranks"] * one["samples_per_s"]) if one and \
            r["config"].startswith("DMP") else None
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    import importlib.metadata as md
    env.update(torchrec=md.version("torchrec"), threads_per_rank=args.threads_per_rank, cpus=os.cpu_count())
    title = (f"Weak scaling, {args.model} SFG, N={args.fields}, D={args.dim}, vocab scale {args.scale}, "
             f"{args.dist} ids, {args.batch} rows/rank, {args.threads_per_rank} thread(s)/rank")
    table = markdown_table(rows, ["config", "ranks", "batch_per_rank", "step_ms", "iqr_ms", "samples_per_s",
                                 "efficiency"])
    summary = f"# {title}\n\n{env['device_name']}; torch {env['torch']}, torchrec {env['torchrec']}, " \
              f"git {env['git_sha']}\n\n{table}\n"
    print(summary)
    write_results("distributed", rows, env, summary, args.out)


if __name__ == "__main__":
    main()
