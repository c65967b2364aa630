"""sfg_encode forward + backward (the SFG generator GEMM + activation), every provider.

Literal: one field-wise linear layer per generated field (N GEMMs of [B, ND] x [ND, D]);
factored: one [B, ND] x [ND, ND] GEMM. Same FLOPs, different launch/packing cost.

    python -m bench.bench_encode [--quick | --smoke] [--device cuda]
"""
from __future__ import annotations

from typing import List

import torch

from sfg_fast import functional as SF

from . import common, plots
from .providers import functional_providers


def make_factory(batch: int, n: int, d: int, device: str, activation: str = "relu"):
    def make(backend: str):
        gen = torch.Generator().manual_seed(0)
        V = (torch.randn(batch, n, d, generator=gen) * 0.1).to(device).requires_grad_()
        W = (torch.randn(n * d, n * d, generator=gen) * (n * d) ** -0.5).to(device).requires_grad_()
        bias = torch.zeros(n * d).to(device).requires_grad_()
        grad_out = torch.randn(batch, n, d, generator=gen).to(device)
        return (lambda: SF.sfg_encode(V, W, bias, activation, 1.0, backend=backend)), [V, W, bias], grad_out
    return make


def shapes(args):
    if args.smoke:
        return [("smoke", 16, 5, 4)]
    if args.quick:
        return [("criteo", 4096, 39, 16)]
    return [("criteo", b, 39, 16) for b in (1024, 4096, 16384)] + [("avazu", 10000, 24, 16)]


def cases(args) -> List[common.Case]:
    out = []
    for shape, b, n, d in shapes(args):
        k = n * d
        flops = 3 * 2.0 * b * k * k
        nbytes = 3 * (2 * b * k * 4 + k * k * 4)
        out.append(common.Case({"shape": shape, "B": b, "N": n, "D": d},
                               functional_providers("sfg_encode", args.device, make_factory(b, n, d, args.device)),
                               flops=flops, bytes=nbytes))
    return out


def run(args, env):
    return common.run_cases("bench_encode", cases(args), args, env)


def main(argv=None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    env = common.bench_env(args)
    rows = run(args, env)
    common.finish("bench_encode", "sfg_encode forward + backward", rows, env, args,
                  plots=plots.batch_plots("sfg_encode fwd+bwd", ["N"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
