"""pairwise_decode forward + backward, per decoder kind, every provider; plus the N and D sweep.

The literal path materialises ``[B, P, D]`` pair tensors (P = N(N-1)/2), so its time and saved
activations grow with N^2 * D; the factored path keeps O(B*N*D) (plus one (ND)^2 GEMM for matrix).

    python -m bench.bench_decode [--quick | --smoke] [--device cuda]
"""
from __future__ import annotations

from typing import List

import torch

from sfg_fast import functional as SF

from . import common, plots
from .providers import functional_providers

KINDS = ("identity", "scalar", "vector", "matrix")
SWEEP_KINDS = ("scalar", "matrix")


def make_factory(kind: str, batch: int, n: int, d: int, device: str):
    def make(backend: str):
        gen = torch.Generator().manual_seed(0)
        Z = torch.randn(batch, n, d, generator=gen).to(device).requires_grad_()
        V = torch.randn(batch, n, d, generator=gen).to(device).requires_grad_()
        W = None
        if kind != "identity":
            shape = {"scalar": (n, n), "vector": (n, n, d), "matrix": (n, n, d, d)}[kind]
            W = (torch.randn(shape, generator=gen) * (d ** -0.5 if kind == "matrix" else 1.0)).to(device)
            W.requires_grad_()
        grad_out = torch.randn(batch, generator=gen).to(device)
        leaves = [t for t in (Z, V, W) if t is not None]
        return (lambda: SF.pairwise_decode(Z, V, W, kind, backend=backend)), leaves, grad_out
    return make


def work_model(kind: str, batch: int, n: int, d: int):
    """(flops, bytes) of the minimum forward + backward work (3x the forward), equal for all providers."""
    pairs = n * (n - 1) // 2
    # matrix: a @ W (2d^2) + the dot (2d); vector: a * w (d) + the dot (2d); identity/scalar: the dot
    per_pair = {"matrix": 2 * d * (d + 1), "vector": 3 * d}.get(kind, 2 * d)
    weight = {"identity": 0, "scalar": n * n, "vector": n * n * d, "matrix": n * n * d * d}[kind] * 4
    return 3.0 * batch * pairs * per_pair, 3.0 * (2 * batch * n * d * 4 + weight) + batch * 4


def cases(args) -> List[common.Case]:
    out = []
    if args.smoke:
        shapes = [("smoke", 16, 5, 4)]
        sweep = []
    else:
        batches = (1024,) if args.quick else (1024, 4096, 16384)
        shapes = [("criteo", b, 39, 16) for b in batches]
        sweep = []
        if not args.quick:
            shapes.append(("avazu", 10000, 24, 16))
            sb = 4096 if args.device == "cuda" else 512
            sweep = [("sweep-N", sb, n, 16) for n in (8, 16, 32, 64)] + \
                    [("sweep-D", sb, 39, d) for d in (8, 16, 32, 64)]
    grid = [(shape, kind) for shape in shapes for kind in KINDS] + \
           [(shape, kind) for shape in sweep for kind in SWEEP_KINDS]
    for (shape, b, n, d), kind in grid:
        flops, nbytes = work_model(kind, b, n, d)
        out.append(common.Case({"shape": shape, "kind": kind, "B": b, "N": n, "D": d},
                               functional_providers("pairwise_decode", args.device,
                                                    make_factory(kind, b, n, d, args.device)),
                               flops=flops, bytes=nbytes))
    return out


def run(args, env):
    return common.run_cases("bench_decode", cases(args), args, env)


def main(argv=None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    env = common.bench_env(args)
    rows = run(args, env)
    common.finish("bench_decode", "pairwise_decode forward + backward", rows, env, args, plots=plots.decode_plots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
