"""generative_cross forward + backward (one DCNv2 cross layer with a generated gate), every provider.

``x + x_gen * (x @ W.T + b)`` with x, x_gen ``[B, K]``, K = N*D.

    python -m bench.bench_cross [--quick | --smoke] [--device cuda]
"""
from __future__ import annotations

from typing import List

import torch

from sfg_fast import functional as SF

from . import common, plots
from .bench_encode import shapes
from .providers import functional_providers


def make_factory(batch: int, k: int, device: str):
    def make(backend: str):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, k, generator=gen).to(device).requires_grad_()
        x_gen = torch.randn(batch, k, generator=gen).to(device).requires_grad_()
        W = (torch.randn(k, k, generator=gen) * k ** -0.5).to(device).requires_grad_()
        bias = torch.zeros(k).to(device).requires_grad_()
        grad_out = torch.randn(batch, k, generator=gen).to(device)
        return (lambda: SF.generative_cross(x, x_gen, W, bias, backend=backend)), [x, x_gen, W, bias], grad_out
    return make


def cases(args) -> List[common.Case]:
    out = []
    for shape, b, n, d in shapes(args):
        k = n * d
        out.append(common.Case({"shape": shape, "B": b, "N": n, "D": d},
                               functional_providers("generative_cross", args.device, make_factory(b, k, args.device)),
                               flops=3 * 2.0 * b * k * k, bytes=3 * (4 * b * k * 4 + k * k * 4)))
    return out


def run(args, env):
    return common.run_cases("bench_cross", cases(args), args, env)


def main(argv=None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    env = common.bench_env(args)
    rows = run(args, env)
    common.finish("bench_cross", "generative_cross forward + backward", rows, env, args,
                  plots=plots.batch_plots("generative_cross fwd+bwd", ["N"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
