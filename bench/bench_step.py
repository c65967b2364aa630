"""The full SFG interaction step per FM-family model: lookup + encode + decode + BCE, forward + backward.

Models (the SFG paper's forms, as in sfg_fast.models): FM (identity decoder), FwFM (scalar), FvFM (vector), FmFM (matrix,
generated operand on the right as the authors do). Providers: literal (one nn.Embedding per field +
``sfg_fast.reference`` ops), torch (``functional.sfg_logits`` on the factored backend), their
torch.compile versions, triton (GPU) and the compiled extension when they implement ``sfg_logits``.
Gradients flow to the table, the encoder and the decoder weights (no optimizer step).

    python -m bench.bench_step [--quick | --smoke] [--device cuda] [--vocab-scale 1]
"""
from __future__ import annotations

from typing import List

import torch

from sfg_fast import functional as SF
from sfg_fast import reference as R
from sfg_fast._backend import unavailable_reason

from . import common, plots
from .common import Workload
from .providers import PerFieldEmbedding, compile_available, concatenated_table, extension_backend, triton_backend

MODELS = {"FM": ("identity", "left"), "FwFM": ("scalar", "left"), "FvFM": ("vector", "right"),
          "FmFM": ("matrix", "right")}


def _weights(kind: str, n: int, d: int, device: str):
    gen = torch.Generator().manual_seed(2)
    enc = (torch.randn(n * d, n * d, generator=gen) * (n * d) ** -0.5).to(device).requires_grad_()
    dec = None
    if kind != "identity":
        shape = {"scalar": (n, n), "vector": (n, n, d), "matrix": (n, n, d, d)}[kind]
        dec = (torch.randn(shape, generator=gen) * (d ** -0.5 if kind == "matrix" else 1.0)).to(device)
        dec.requires_grad_()
    return enc, dec


def providers(model: str, dims, d: int, ids, labels, device: str):
    kind, side = MODELS[model]
    n = len(dims)

    def literal(compiled=False):
        def factory():
            if compiled:
                compile_available(device)
            emb = PerFieldEmbedding(dims, d).to(device)
            enc, dec = _weights(kind, n, d, device)

            def forward():
                V = emb(ids)
                Z = R.sfg_encode(V, enc, None, "relu", 1.0)
                logits = R.pairwise_decode(Z, V, dec, kind, "upper", side)
                return R.bce_with_logits(logits, labels)
            return _workload(torch.compile(forward) if compiled else forward,
                             list(emb.parameters()) + [t for t in (enc, dec) if t is not None], compiled,
                             "reference")
        return factory

    def fused(backend_fn, compiled=False):
        def factory():
            backend = backend_fn()
            if compiled:
                compile_available(device)
            table, offsets = concatenated_table(dims, d, device)
            enc, dec = _weights(kind, n, d, device)
            # A backend without its own loss kernel pairs with the factored BCE.
            loss_backend = backend if unavailable_reason(backend, "bce_with_logits", table.device) is None \
                else "torch"

            def forward():
                logits = SF.sfg_logits(ids, table, offsets, enc, None, dec, kind, "relu", 1.0, False, "upper",
                                       side, False, "off", backend=backend)
                return SF.bce_with_logits(logits, labels, backend=loss_backend)
            return _workload(torch.compile(forward) if compiled else forward,
                             [t for t in (table, enc, dec) if t is not None], compiled, backend)
        return factory

    ext = f"ext-{device}"
    return {
        "literal": literal(),
        "torch": fused(lambda: "torch"),
        "literal+compile": literal(compiled=True),
        "torch+compile": fused(lambda: "torch", compiled=True),
        "triton": fused(lambda: triton_backend("sfg_logits", device)),
        ext: fused(lambda: extension_backend("sfg_logits", device)),
    }


def _workload(forward, leaves, compiled, backend) -> Workload:
    def step():
        for t in leaves:
            t.grad = None
        forward().backward()
    return Workload(step=step, forward=forward, compiled=compiled, info={"backend": backend},
                    persistent=lambda: leaves)


def work_model(kind: str, batch: int, n: int, d: int):
    """(flops, bytes): encoder GEMM and decoder work x3 for backward; gather, dV, the weights' traffic."""
    k = n * d
    pairs = n * (n - 1) // 2
    dec_flops = batch * pairs * (2 * d * (d + 1) if kind == "matrix" else 2 * d)
    flops = 3.0 * (2 * batch * k * k + dec_flops)
    nbytes = batch * n * (8 + 2 * d * 4) + 3 * (2 * batch * k * 4 + k * k * 4) + batch * 8
    return flops, nbytes


def cases(args) -> List[common.Case]:
    if args.smoke:
        specs = [("smoke", 16, 4, 4, "uniform")]
    elif args.quick:
        specs = [("criteo", 1024, 39, 16, "zipf")]
    else:
        specs = [("criteo", b, 39, 16, "zipf") for b in (1024, 4096, 16384)] + [("avazu", 10000, 24, 16, "zipf")]
    out = []
    for shape, b, n, d, dist in specs:
        dims = [50, 7, 300, 3] if shape == "smoke" else \
            common.field_dims_for(n, args.vocab_scale, "avazu" if shape == "avazu" else "criteo")
        ids = common.make_ids(b, dims, dist, device=args.device)
        labels = torch.randint(0, 2, (b,), generator=torch.Generator().manual_seed(3)).float().to(args.device)
        for model, (kind, _) in MODELS.items():
            flops, nbytes = work_model(kind, b, n, d)
            out.append(common.Case({"shape": shape, "model": model, "kind": kind, "dist": dist, "B": b, "N": n,
                                    "D": d}, providers(model, dims, d, ids, labels, args.device),
                                   flops=flops, bytes=nbytes))
    return out


def run(args, env):
    return common.run_cases("bench_step", cases(args), args, env)


def main(argv=None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    env = common.bench_env(args)
    rows = run(args, env)
    common.finish("bench_step", "SFG step (lookup + encode + decode + BCE), forward + backward", rows, env, args,
                  plots=plots.batch_plots("SFG step fwd+bwd", ["model"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
