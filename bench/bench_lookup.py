"""Multi-field embedding lookup: forward, and forward + backward + sparse Adam update.

Providers: literal (one nn.Embedding per field; update = dense torch.optim.Adam over every table,
the authors' setup), torch (``embedding_lookup`` forward; update = ``sfg_fast.optim`` fused
row-sparse Adam in backward), their torch.compile versions, triton (GPU), the compiled extension,
FBGEMM TBE (fused Adam in backward) and TorchRec EBC (dense Adam), when importable.
Criteo-like vocabularies (``--vocab-scale``, default 0.01 on CPU), uniform and Zipf ids. Every
provider cycles through ROTATIONS id batches, so no call finds the previous call's rows in cache
(a table small enough for the last-level cache, as at the CPU default, still is: pass a larger
``--vocab-scale`` for bandwidth figures).

    python -m bench.bench_lookup [--quick | --smoke] [--device cuda] [--vocab-scale 1]
"""
from __future__ import annotations

import itertools

from typing import Dict, List

import torch

from sfg_fast import functional as SF
from sfg_fast import optim as sfg_optim

from . import common, plots
from .common import Skip, Workload
from .providers import (FbgemmLookup, PerFieldEmbedding, TorchrecLookup, compile_available,
                        concatenated_table, extension_backend, triton_backend)

MODES = ("fwd", "fwd+bwd+update")
LR = 0.01
ROTATIONS = 4


def _cycle(items):
    """A callable returning ``items[0], items[1], ..., items[0], ...``: each provider its own rotation."""
    it = itertools.cycle(list(items))
    return lambda: next(it)


def _module_workload(module_fn, params, next_inputs, mode: str, grad_out, compiled=False) -> Workload:
    """Forward-only, or forward + backward + dense Adam step over ``params``; ``next_inputs()`` gives
    the argument tuple of each call (the rotation)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return module_fn(*next_inputs())
        return Workload(step=step, compiled=compiled)
    opt = torch.optim.Adam(params, lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        module_fn(*next_inputs()).backward(grad_out)
        opt.step()
    return Workload(step=step, forward=lambda: module_fn(*next_inputs()), compiled=compiled,
                    info={"optimizer": "adam (dense)"})


def providers(field_dims, d: int, ids_list: List[torch.Tensor], mode: str, device: str) -> Dict:
    batch, n = ids_list[0].shape
    grad_out = torch.randn(batch, n, d, generator=torch.Generator().manual_seed(1)).to(device)

    def literal(compiled=False):
        def factory():
            if compiled:
                compile_available(device)
            module = PerFieldEmbedding(field_dims, d).to(device)
            fn = torch.compile(module) if compiled else module
            return _module_workload(fn, list(module.parameters()), _cycle((i,) for i in ids_list), mode, grad_out,
                                    compiled)
        return factory

    def functional(backend_fn, compiled=False):
        def factory():
            backend = backend_fn()
            if compiled:
                compile_available(device)
            weight, offsets = concatenated_table(field_dims, d, device)
            if mode == "fwd":
                fn = lambda i: SF.embedding_lookup(i, weight, offsets, "off", backend=backend)  # noqa: E731
                fn = torch.compile(fn) if compiled else fn
                return _module_workload(fn, [weight], _cycle((i,) for i in ids_list), mode, grad_out, compiled)
            fused = {"torch": "torch", "triton": "triton", "cpu": "cpu"}.get(backend)
            if fused is None:
                raise Skip(f"sfg_fast.optim has no fused sparse update for backend {backend!r}")
            optimizer = sfg_optim.SparseRowOptimizer("adam", lr=LR)
            optimizer.prepare(weight)       # compiled, the update is a graph op that needs the state to exist
            fn = lambda i: sfg_optim.fused_embedding_lookup(i, weight, offsets, optimizer, "off",  # noqa: E731
                                                            backend=fused)
            fn = torch.compile(fn) if compiled else fn
            next_ids = _cycle(ids_list)

            def step():
                fn(next_ids()).backward(grad_out)
            return Workload(step=step, forward=lambda: fn(next_ids()), compiled=compiled,
                            info={"backend": backend, "optimizer": "adam (row-sparse, fused)"})
        return factory

    def fbgemm():
        tbe = FbgemmLookup(field_dims, d, device, optimizer="adam")
        next_inputs = _cycle(tbe.inputs(i) for i in ids_list)
        if mode == "fwd":
            def step():
                with torch.no_grad():
                    return tbe(*next_inputs())
            return Workload(step=step)

        def step():
            tbe(*next_inputs()).backward(grad_out)
        return Workload(step=step, forward=lambda: tbe(*next_inputs()),
                        info={"optimizer": f"{tbe.optimizer} (fbgemm fused)"})

    def torchrec():
        ebc = TorchrecLookup(field_dims, d, device)
        return _module_workload(ebc, list(ebc.module.parameters()), _cycle(ebc.inputs(i) for i in ids_list), mode,
                                grad_out)

    ext = f"ext-{device}"
    return {
        "literal": literal(),
        "torch": functional(lambda: "torch"),
        "literal+compile": literal(compiled=True),
        "torch+compile": functional(lambda: "torch", compiled=True),
        "triton": functional(lambda: triton_backend("embedding_lookup", device)),
        ext: functional(lambda: extension_backend("embedding_lookup", device)),
        "fbgemm-tbe": fbgemm,
        "torchrec-ebc": torchrec,
    }


def work_bytes(batch: int, n: int, d: int, mode: str, unique_rows: int) -> float:
    """Minimum traffic: ids, each distinct row read once (duplicate ids hit in cache) and the output
    written; the update adds reading dV and reading + writing each distinct touched row with Adam's
    two moments. Counting every (sample, field) as its own row would inflate GB/s ~2x on Zipf ids."""
    row = d * 4
    fwd = batch * n * (8 + row) + unique_rows * row
    return fwd if mode == "fwd" else fwd + batch * n * row + unique_rows * row * 6


def cases(args) -> List[common.Case]:
    if args.smoke:
        specs = [("smoke", 32, 4, 4, dist) for dist in ("uniform", "zipf")]
    elif args.quick:
        specs = [("criteo", 4096, 39, 16, dist) for dist in ("uniform", "zipf")]
    else:
        specs = [("criteo", b, 39, 16, dist) for b in (1024, 4096, 16384) for dist in ("uniform", "zipf")]
        specs += [("avazu", 10000, 24, 16, dist) for dist in ("uniform", "zipf")]
    out = []
    for shape, b, n, d, dist in specs:
        if shape == "smoke":
            dims = [50, 7, 300, 3]
        else:
            dims = common.field_dims_for(n, args.vocab_scale, "avazu" if shape == "avazu" else "criteo")
        ids_list = [common.make_ids(b, dims, dist, seed=k, device=args.device) for k in range(ROTATIONS)]
        offsets = torch.tensor([0] + list(itertools.accumulate(dims))[:-1], device=args.device)
        # the mean over the rotation: each call reads its own batch's distinct rows
        unique_rows = sum(int(torch.unique(i + offsets).numel()) for i in ids_list) / len(ids_list)
        for mode in MODES:
            out.append(common.Case({"shape": shape, "mode": mode, "dist": dist, "B": b, "N": n, "D": d,
                                    "rows": sum(dims)},
                                   providers(dims, d, ids_list, mode, args.device),
                                   bytes=work_bytes(b, n, d, mode, unique_rows)))
    return out


def run(args, env):
    return common.run_cases("bench_lookup", cases(args), args, env)


def main(argv=None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    env = common.bench_env(args)
    rows = run(args, env)
    common.finish("bench_lookup", "embedding lookup", rows, env, args,
                  plots=plots.batch_plots("embedding lookup", ["mode", "dist"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
