"""bce_with_logits forward + backward (mean reduction), every provider. Memory-bound: GB/s is the metric.

    python -m bench.bench_loss [--quick | --smoke] [--device cuda]
"""
from __future__ import annotations

from typing import List

import torch

from sfg_fast import functional as SF

from . import common, plots
from .providers import functional_providers


def make_factory(batch: int, device: str):
    def make(backend: str):
        gen = torch.Generator().manual_seed(0)
        logits = (torch.randn(batch, generator=gen) * 3).to(device).requires_grad_()
        labels = torch.randint(0, 2, (batch,), generator=gen).float().to(device)
        return (lambda: SF.bce_with_logits(logits, labels, backend=backend)), [logits], None
    return make


def cases(args) -> List[common.Case]:
    if args.smoke:
        batches = [("smoke", 16)]
    elif args.quick:
        batches = [("criteo", 4096)]
    else:
        batches = [("criteo", b) for b in (1024, 4096, 16384)] + [("avazu", 10000)]
    # Bytes: forward reads logits + labels; backward reads them again and writes the gradient.
    return [common.Case({"shape": shape, "B": b},
                        functional_providers("bce_with_logits", args.device, make_factory(b, args.device)),
                        flops=0.0, bytes=5.0 * b * 4)
            for shape, b in batches]


def run(args, env):
    return common.run_cases("bench_loss", cases(args), args, env)


def main(argv=None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    env = common.bench_env(args)
    rows = run(args, env)
    common.finish("bench_loss", "bce_with_logits forward + backward", rows, env, args,
                  plots=plots.batch_plots("bce_with_logits fwd+bwd", []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
