"""End-to-end training throughput (samples/s): every model of the zoo, SFG vs its base model.

One step = ``model(ids)`` -> BCE -> backward -> ``torch.optim.Adam`` over all parameters (dense,
as the authors train). Providers: literal (the models on the reference backend), torch (the
factored backend), their torch.compile versions, triton (GPU) and the compiled extension (when they
implement every op the model calls). ``+fused-tables``: the same model with ``embedding="fused"``,
whose field and first-order tables update their looked-up rows in backward with row-wise Adagrad
(the training job's ``embedding: fused``); Adam then steps the dense parameters only. The two
differ in the tables' optimizer as well as in its cost. ``torch+compile+fused-tables`` compiles such a
model whole (the tables' lookup and update are custom ops in the graph).

    python -m bench.bench_train [--quick | --smoke] [--device cuda] [--models fm,dcnv2] [--shape movielens]
"""
from __future__ import annotations

from typing import List

import torch

from sfg_fast import functional as SF
from sfg_fast import models as M
from sfg_fast._backend import BackendUnavailableError

from . import common
from .common import Skip, Workload
from .providers import EXTENSION, compile_available

SMALL_HPARAMS = {"deepfm": {"hidden_units": (32, 32)}, "ipnn": {"hidden_units": (32, 32)},
                 "xdeepfm": {"hidden_units": (32, 32), "cin_layer_units": (8, 8)},
                 "dcnv2": {"hidden_units": (32, 32)}}


def providers(name: str, generative: bool, dims, d: int, ids, labels, device: str, hparams):
    def factory_for(backend: str, compiled: bool = False, embedding: str = "native"):
        def factory():
            if compiled:
                compile_available(device)
            torch.manual_seed(0)
            model = M.build(name, dims, d, generative, backend=backend, embedding=embedding, **hparams).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            forward = torch.compile(model) if compiled else model
            loss_backend = "reference" if backend == "reference" else "torch"

            def loss():
                return SF.bce_with_logits(forward(ids), labels, backend=loss_backend)

            def step():
                opt.zero_grad(set_to_none=True)
                loss().backward()
                opt.step()
            if not compiled:
                try:
                    step()
                except BackendUnavailableError as exc:
                    raise Skip(str(exc)) from None
            return Workload(step=step, forward=loss, compiled=compiled,
                            persistent=lambda: common.model_state_tensors(model),
                            info={"backend": backend, "params_m": sum(p.numel() for p in model.parameters()) / 1e6})
        return factory

    ext = EXTENSION[device]
    return {
        "literal": factory_for("reference"),
        "torch": factory_for("torch"),
        "literal+compile": factory_for("reference", compiled=True),
        "torch+compile": factory_for("torch", compiled=True),
        "triton": _gpu_only(factory_for("triton"), device),
        f"ext-{ext}": factory_for(ext),
        f"ext-{ext}+compile": factory_for(ext, compiled=True),
        "torch+fused-tables": factory_for("torch", embedding="fused"),
        "torch+compile+fused-tables": factory_for("torch", compiled=True, embedding="fused"),
        f"ext-{ext}+fused-tables": factory_for(ext, embedding="fused"),
    }


def _gpu_only(factory, device):
    def wrapped():
        if device != "cuda":
            raise Skip("Triton needs a GPU; on CPU it runs only in the interpreter (TRITON_INTERPRET=1), "
                       "whose timings mean nothing")
        return factory()
    return wrapped


def cases(args) -> List[common.Case]:
    wanted = getattr(args, "models", "")
    names = [m.strip().lower() for m in wanted.split(",") if m.strip()] if wanted else sorted(M.MODELS)
    unknown = [m for m in names if m not in M.MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown model(s) {unknown}; choose from {sorted(M.MODELS)}")
    labels = None
    if args.smoke:
        b, n, d, dims = 16, 4, 4, [50, 7, 300, 3]
        shape = "smoke"
    elif getattr(args, "shape", "criteo") == "movielens":
        # the main job's task: the embedded MovieLens-100K, its batch size, its first training rows
        from sfg_fast.data import load_dataset
        data = load_dataset("movielens100k")
        b, d = 2048, 16
        dims = list(data.schema.field_dims)
        n = len(dims)
        ids = torch.from_numpy(data.train.ids[:b]).to(args.device)
        labels = torch.from_numpy(data.train.labels[:b]).float().to(args.device)
        shape = "movielens"
    else:
        b = 1024 if args.quick else 4096
        n, d = 39, 16
        dims = common.field_dims_for(n, args.vocab_scale, "criteo")
        shape = "criteo"
    if labels is None:
        ids = common.make_ids(b, dims, "zipf", device=args.device)
        labels = torch.randint(0, 2, (b,), generator=torch.Generator().manual_seed(3)).float().to(args.device)
    out = []
    for name in names:
        hparams = SMALL_HPARAMS.get(name, {}) if args.smoke else {}
        for generative in (False, True):
            out.append(common.Case({"shape": shape, "model": name, "sfg": generative, "B": b, "N": n, "D": d},
                                   providers(name, generative, dims, d, ids, labels, args.device, hparams)))
    return out


def run(args, env):
    rows = common.run_cases("bench_train", cases(args), args, env, memory=not args.smoke)
    for r in rows:
        if r["status"] == "ok":
            r["samples_per_s"] = r["B"] / (r["median_ms"] * 1e-3)
    # SFG's cost over the base model, same provider, same run.
    for r in rows:
        if r["status"] == "ok" and r["sfg"]:
            base = next((x for x in rows if x["model"] == r["model"] and not x["sfg"]
                         and x["provider"] == r["provider"] and x["status"] == "ok"), None)
            if base is not None:
                r["time_vs_base"] = r["median_ms"] / base["median_ms"]
    return rows


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--models", default="", help="comma-separated model names (default: all eight)")
        p.add_argument("--shape", choices=("criteo", "movielens"), default="criteo",
                       help="criteo: B=4096 (1024 with --quick), N=39, D=16, Criteo-like vocabularies and Zipf ids; "
                            "movielens: the main job's task (embedded MovieLens-100K, its first 2048 training "
                            "rows, D=16)")
    args = common.parse_args(__doc__.splitlines()[0], argv, extra)
    env = common.bench_env(args)
    rows = run(args, env)
    common.finish("bench_train", "training throughput (samples/s), SFG vs base", rows, env, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
