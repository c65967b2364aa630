"""Compiled CPU backend (sfg_fast._C) vs the factored torch path and torch's own baselines.

Workloads at the Criteo shape (B=4096, N=39, D=16, Zipf ids), providers timed interleaved in one
run so the ratios survive a noisy shared machine:
  sfg_logits (inference, no grad): cpu fused tile pipeline | the same on the int8 row-wise quantised
                                   table (serving.sfg_logits_int8) | torch factored | literal reference,
                                   in fp32 and with every provider under torch.autocast("cpu", bfloat16)
  embedding_lookup (inference):   cpu gather | torch F.embedding
  sparse update from grad_V:      cpu fused sort+update | sfg_fast.optim torch path |
                                  torch.optim on nn.Embedding(sparse=True)-style sparse grads
  train_step (SFG, BCE, dense Adam on the encoder/decoder):  "fused cpu" = fused_embedding_lookup(
              backend="cpu") (C++ gather, C++ fused update in backward) + sfg_interaction(backend="cpu")
              (the fused C++ interaction forward + backward) | the same lookups with the factored torch
              interaction ("... + torch interaction") | torch's best: nn.Embedding(sparse=True) +
              factored interaction + torch.optim.Adagrad / SparseAdam
  FBGEMM (fbgemm-gpu-cpu, optional): embedding forward vs SplitTableBatchedEmbeddingBagsCodegen
              (one id per bag, pooling SUM == the lookup), fp32 and int8 (IntNBit inference TBE);
              forward + backward with fused update (rowwise Adagrad, SGD) vs the TBE's fused backward
Results go to bench/results/ (JSON + markdown) with versions, threads and git SHA.

    python bench/bench_cpu_ext.py --threads 2            # full run
    python bench/bench_cpu_ext.py --threads 2 --quick    # no literal reference (same reps)
    python bench/bench_cpu_ext.py --only train fbgemm    # a subset of the workloads
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (environment, field_dims_for, make_ids, markdown_table, set_threads,  # noqa: E402
                          time_interleaved, write_results)
from sfg_fast import factored, reference, serving  # noqa: E402
from sfg_fast.ops import cpu_ext  # noqa: E402
from sfg_fast.optim import SparseRowOptimizer, fused_embedding_lookup, unique_row_grads  # noqa: E402

WORKLOADS = ("logits", "lookup", "update", "train", "fbgemm", "gemm")


def _offsets(field_dims):
    return torch.tensor([0] + list(torch.tensor(field_dims).cumsum(0)[:-1].tolist()), dtype=torch.int64)


def _at_precision(fn, precision: str):
    """fn as is ("fp32"), or run under torch.autocast("cpu", bfloat16) ("bf16": bf16 GEMMs)."""
    if precision == "fp32":
        return fn

    def wrapped():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()
    return wrapped


def bench_logits(args, table, offsets, ids_list, rows):
    n, d = len(offsets), table.shape[1]
    width = n * d
    enc = torch.randn(width, width) / width ** 0.5
    decoders = {"identity": None, "scalar": torch.randn(n, n), "vector": torch.randn(n, n, d),
                "matrix": torch.randn(n, n, d, d) / d}
    qweight, scale_bias = serving.quantize_rowwise_int8(table)
    for kind in args.kinds:
        dec = decoders[kind]
        state = {"i": 0}

        def next_ids():
            state["i"] = (state["i"] + 1) % len(ids_list)
            return ids_list[state["i"]]

        common = (kind, "relu", 0.5, False, "upper", "left", False)
        # the GEMMs' FLOPs only (encoder, and the matrix decoder's): the scalar / vector mixing and the row dot
        # (6% more at the Criteo scalar shape; gpu_check.interaction_flops counts them) are left out
        flops = 2 * args.batch * width * width * (2 if kind == "matrix" else 1)
        # fp32, then every provider under torch.autocast("cpu", bf16) (bf16 GEMMs for all of them); the
        # speedup column compares with torch at the same precision
        for precision in args.precisions:
            suffix = "" if precision == "fp32" else "+autocast-bf16"
            fns = {
                "cpu" + suffix: lambda: cpu_ext.sfg_logits(next_ids(), table, offsets, enc, None, dec, *common),
                "torch" + suffix: lambda: factored.sfg_logits(next_ids(), table, offsets, enc, None, dec, *common),
                # bounds "off": like the cpu row's direct call, the kernel's own id scan is the only check
                "cpu int8 table" + suffix: lambda: serving.sfg_logits_int8(
                    next_ids(), qweight, scale_bias, offsets, enc, None, dec, *common, bounds_check="off",
                    backend="cpu"),
            }
            with_reference = False
            if not args.quick and kind in ("scalar", "matrix"):
                with_reference = True
                fns["reference" + suffix] = lambda: reference.sfg_logits(next_ids(), table, offsets, enc, None, dec,
                                                                         *common)
            fns = {name: _at_precision(fn, precision) for name, fn in fns.items()}
            with torch.no_grad():
                times = time_interleaved(fns, warmup=1,
                                         reps=max(3, args.reps // 3) if with_reference else args.reps)
            for name, t in times.items():
                rows.append({"workload": f"sfg_logits[{kind}]", "provider": name,
                             "median_ms": round(t["median_ms"], 3), "iqr_ms": round(t["iqr_ms"], 3), "reps": t["reps"],
                             "gflops": round(flops / t["median_ms"] / 1e6, 1),
                             "speedup_vs_torch": round(times["torch" + suffix]["median_ms"] / t["median_ms"], 2)})


def bench_lookup(args, table, offsets, ids_list, rows):
    state = {"i": 0}

    def next_ids():
        state["i"] = (state["i"] + 1) % len(ids_list)
        return ids_list[state["i"]]

    fns = {"cpu": lambda: cpu_ext.embedding_lookup(next_ids(), table, offsets, "off"),
           "torch": lambda: factored.embedding_lookup(next_ids(), table, offsets)}
    with torch.no_grad():
        times = time_interleaved(fns, warmup=2, reps=args.reps * 3)
    moved = 2 * args.batch * len(offsets) * table.shape[1] * table.element_size()
    for name, t in times.items():
        rows.append({"workload": "embedding_lookup", "provider": name, "median_ms": round(t["median_ms"], 3),
                     "iqr_ms": round(t["iqr_ms"], 3), "reps": t["reps"], "gb_per_s": round(moved / t["median_ms"] / 1e6, 2),
                     "speedup_vs_torch": round(times["torch"]["median_ms"] / t["median_ms"], 2)})


def bench_gemm(args, table, offsets, ids_list, rows):
    """The SFG encoder's GEMMs alone, the work every provider's training step shares: the [B, W] x [W, W]
    forward GEMM and its backward pair (dX = G W, dW = G^T X), W = N*D, in torch.mm (at::mm, which the
    extension calls for these GEMMs too) into preallocated outputs (no allocation or page faults timed).
    fp32 and bf16 operands are timed in separate interleaved groups."""
    width = len(offsets) * table.shape[1]
    gen = torch.Generator().manual_seed(3)
    for precision in args.precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        x, g = (torch.randn(args.batch, width, generator=gen).to(dtype) for _ in range(2))
        w = (torch.randn(width, width, generator=gen) * 0.05).to(dtype)
        out_f, out_x, out_w = (torch.empty(args.batch, width, dtype=dtype), torch.empty(args.batch, width, dtype=dtype),
                               torch.empty(width, width, dtype=dtype))
        suffix = "" if precision == "fp32" else " bf16 operands"
        fns = {"forward X W^T" + suffix: lambda: torch.mm(x, w.t(), out=out_f),
               "backward G W, G^T X" + suffix: lambda: (torch.mm(g, w, out=out_x), torch.mm(g.t(), x, out=out_w))}
        with torch.no_grad():
            times = time_interleaved(fns, warmup=2, reps=args.reps)
        for name, t in times.items():
            calls = 2 if name.startswith("backward") else 1
            rows.append({"workload": f"encoder_gemm[{width}]", "provider": name, "median_ms": round(t["median_ms"], 3),
                         "iqr_ms": round(t["iqr_ms"], 3), "reps": t["reps"],
                         "gflops": round(calls * 2.0 * args.batch * width * width / t["median_ms"] / 1e6, 1)})


def bench_update(args, table, offsets, ids_list, rows):
    d = table.shape[1]
    grads = [torch.randn(args.batch, len(offsets), d) for _ in ids_list]
    for kind in ("adagrad", "adam"):
        w_cpu, w_opt, w_torch = table.clone(), table.clone(), table.clone().requires_grad_()
        state_cpu = {}
        opt = SparseRowOptimizer(kind, lr=0.01)
        torch_opt = (torch.optim.Adagrad([w_torch], lr=0.01) if kind == "adagrad"
                     else torch.optim.SparseAdam([w_torch], lr=0.01))
        counter = {"cpu": 0, "opt": 0, "torch": 0}

        def step_cpu():
            i = counter["cpu"] = counter["cpu"] + 1
            k = i % len(ids_list)
            cpu_ext.sparse_row_update(kind, w_cpu, state_cpu, ids_list[k], offsets, grads[k], 0.01, 1e-8,
                                      (0.9, 0.999), i, "off")

        def step_opt():
            i = counter["opt"] = counter["opt"] + 1
            k = i % len(ids_list)
            r, g = unique_row_grads(ids_list[k], offsets, grads[k])
            opt.step_rows(w_opt, r, g)

        def step_torch():
            # What nn.Embedding(sparse=True) hands the optimizer: an uncoalesced sparse gradient.
            i = counter["torch"] = counter["torch"] + 1
            k = i % len(ids_list)
            idx = (ids_list[k] + offsets).reshape(1, -1)
            w_torch.grad = torch.sparse_coo_tensor(idx, grads[k].reshape(-1, d), w_torch.shape)
            torch_opt.step()

        times = time_interleaved({"cpu": step_cpu, "sfg_fast.optim torch": step_opt, "torch.optim sparse": step_torch},
                                 warmup=1, reps=args.reps)
        for name, t in times.items():
            rows.append({"workload": f"sparse_update[{kind}]", "provider": name, "median_ms": round(t["median_ms"], 3),
                         "iqr_ms": round(t["iqr_ms"], 3), "reps": t["reps"],
                         "speedup_vs_torch": round(times["torch.optim sparse"]["median_ms"] / t["median_ms"], 2)})


def _rotator(items):
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]
    return next_item


def bench_train(args, table, offsets, ids_list, rows):
    """One SFG training step: lookup -> encoder -> decoder -> BCE -> backward -> optimizers.

    Every provider runs the same dense Adam on (W_enc, decoder). "fused cpu" is the whole CPU path
    of sfg_fast: the C++ lookup with the fused sparse update in backward and the fused C++
    interaction (sfg_interaction). The "... + torch interaction" rows swap in the factored torch
    interaction, so they separate the two parts' gains; "interaction only" runs the factored
    interaction alone (a gather without any table update). Torch's best is nn.Embedding(sparse=True)
    + the factored interaction + torch.optim. Kinds: "scalar" / "matrix" (SFG: encoder + decoder)
    and "base-scalar" (FwFM, no encoder).
    """
    n, d = len(offsets), table.shape[1]
    width = n * d
    labels = [torch.randint(0, 2, (args.batch,), generator=torch.Generator().manual_seed(s)).float()
              for s in range(len(ids_list))]
    data = list(zip(ids_list, labels))

    def dense_params(kind):
        gen = torch.Generator().manual_seed(1)
        enc = (torch.randn(width, width, generator=gen) / width ** 0.5).requires_grad_()
        decoder = kind.replace("base-", "")
        dec = {"identity": None, "scalar": torch.randn(n, n, generator=gen),
               "vector": torch.randn(n, n, d, generator=gen),
               "matrix": torch.randn(n, n, d, d, generator=gen) / d}[decoder]
        if kind.startswith("base-"):
            enc = None
        params = ([enc] if enc is not None else []) + ([dec.requires_grad_()] if dec is not None else [])
        return enc, dec, torch.optim.Adam(params, lr=1e-3)

    def interaction_loss(V, enc, dec, kind, y, fused=False):
        decoder = kind.replace("base-", "")
        if fused:
            logit = cpu_ext.sfg_interaction(V, enc, None, dec, decoder, "relu", 0.5, False, "upper", "left", False)
        else:
            Z = V if enc is None else factored.sfg_encode(V, enc, None, "relu", 0.5, False)
            logit = factored.pairwise_decode(Z, V, dec, decoder, "upper", "left", False)
        return torch.nn.functional.binary_cross_entropy_with_logits(logit.float(), y)

    for kind, opt_kind, precision in [(k, o, p) for p in args.train_precisions for k in args.train_kinds
                                      for o in ("adagrad", "adam")]:
        fns = {}
        for name, backend, fused in (("fused cpu", "cpu", True),
                                     ("fused cpu lookup + torch interaction", "cpu", False),
                                     ("fused torch lookup + torch interaction", "torch", False)):
            weight = table.clone().requires_grad_()
            sparse = SparseRowOptimizer(opt_kind, lr=0.01)
            enc, dec, dense = dense_params(kind)
            batches = _rotator(data)

            def step(weight=weight, sparse=sparse, enc=enc, dec=dec, dense=dense, batches=batches,
                     backend=backend, fused=fused):
                ids, y = batches()
                V = fused_embedding_lookup(ids, weight, offsets, sparse, "off", backend=backend)
                loss = interaction_loss(V, enc, dec, kind, y, fused)
                dense.zero_grad(set_to_none=True)
                loss.backward()
                dense.step()
            fns[name] = step
        emb = torch.nn.Embedding(table.shape[0], d, sparse=True, _weight=table.clone())
        torch_sparse = (torch.optim.Adagrad(emb.parameters(), lr=0.01) if opt_kind == "adagrad"
                        else torch.optim.SparseAdam(emb.parameters(), lr=0.01))
        enc_t, dec_t, dense_t = dense_params(kind)
        batches_t = _rotator(data)

        def torch_step():
            ids, y = batches_t()
            V = emb(ids + offsets)
            loss = interaction_loss(V, enc_t, dec_t, kind, y)
            dense_t.zero_grad(set_to_none=True)
            torch_sparse.zero_grad(set_to_none=True)
            loss.backward()
            dense_t.step()
            torch_sparse.step()
        fns["torch nn.Embedding(sparse)+optim"] = torch_step
        enc_i, dec_i, dense_i = dense_params(kind)
        batches_i = _rotator(data)

        def interaction_only():
            ids, y = batches_i()
            V = torch.nn.functional.embedding(ids + offsets, table).requires_grad_()
            loss = interaction_loss(V, enc_i, dec_i, kind, y)
            dense_i.zero_grad(set_to_none=True)
            loss.backward()
            dense_i.step()
        fns["interaction only (shared part)"] = interaction_only
        fns = {name: _at_precision(fn, precision) for name, fn in fns.items()}
        times = time_interleaved(fns, warmup=2, reps=args.reps)
        base = times["torch nn.Embedding(sparse)+optim"]["median_ms"]
        torch_name = "SparseAdam" if opt_kind == "adam" else "Adagrad"
        tag = "" if precision == "fp32" else ", autocast-bf16"
        for name, t in times.items():
            rows.append({"workload": f"train_step[{kind}, {opt_kind}{tag}]",
                         "provider": name.replace("optim", f"optim.{torch_name}"),
                         "median_ms": round(t["median_ms"], 3), "iqr_ms": round(t["iqr_ms"], 3), "reps": t["reps"],
                         "speedup_vs_torch": round(base / t["median_ms"], 2)})


def _fbgemm():
    """(training TBE module, inference module, enums) or raise ImportError with the reason."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                        SplitTableBatchedEmbeddingBagsCodegen)
    return (SplitTableBatchedEmbeddingBagsCodegen, IntNBitTableBatchedEmbeddingBagsCodegen, EmbOptimType,
            SparseType, EmbeddingLocation, PoolingMode, ComputeDevice)


def bench_fbgemm(args, table, offsets, ids_list, rows):
    """FBGEMM's CPU table-batched embeddings at the same shape: one table per field, one id per
    bag (pooling SUM of one row == the lookup), inputs pre-laid out in TBE's table-major CSR form
    outside the timed region. Numerical agreement is checked before timing."""
    try:
        (Training, Inference, Optim, SparseType, Location, PoolingMode, ComputeDevice) = _fbgemm()
    except Exception as exc:  # optional benchmark dependency
        rows.append({"workload": "fbgemm", "provider": "fbgemm", "status": f"skipped: {exc!r}"})
        print(f"FBGEMM comparison skipped: {exc!r}")
        return
    n, d = len(offsets), table.shape[1]
    bounds = offsets.tolist() + [table.shape[0]]
    sizes = [bounds[f + 1] - bounds[f] for f in range(n)]
    tbe_inputs = [(ids.t().contiguous().reshape(-1), torch.arange(n * args.batch + 1, dtype=torch.int64))
                  for ids in ids_list]

    def make_training(optim):
        tbe = Training([(r, d, Location.HOST, ComputeDevice.CPU) for r in sizes], optimizer=optim,
                       learning_rate=0.01, eps=1e-8, pooling_mode=PoolingMode.SUM,
                       weights_precision=SparseType.FP32, output_dtype=SparseType.FP32)
        with torch.no_grad():
            for f, w in enumerate(tbe.split_embedding_weights()):
                w.copy_(table[bounds[f]:bounds[f + 1]])
        return tbe

    # ---- forward (inference), fp32
    tbe = make_training(Optim.EXACT_SGD)
    with torch.no_grad():
        got = tbe(*tbe_inputs[0]).view(args.batch, n, d)
        assert torch.equal(got, cpu_ext.embedding_lookup(ids_list[0], table, offsets, "off")), "FBGEMM forward differs"
    next_ids, next_tbe = _rotator(ids_list), _rotator(tbe_inputs)
    fns = {"cpu": lambda: cpu_ext.embedding_lookup(next_ids(), table, offsets, "off"),
           "fbgemm TBE fp32": lambda: tbe(*next_tbe())}
    # ---- forward (inference), int8 row-wise
    q, scale_bias = cpu_ext.quantize_rowwise_int8(table)
    try:
        int8 = Inference([("", r, d, SparseType.INT8, Location.HOST) for r in sizes], device="cpu",
                         pooling_mode=PoolingMode.SUM, output_dtype=SparseType.FP32)
        int8.fill_random_weights()
        for f, (w, scale, bias) in enumerate(int8.split_embedding_weights_with_scale_bias(split_scale_bias_mode=2)):
            w.copy_(q[bounds[f]:bounds[f + 1]])
            scale.copy_(scale_bias[bounds[f]:bounds[f + 1], 0].view(scale.shape))
            bias.copy_(scale_bias[bounds[f]:bounds[f + 1], 1].view(bias.shape))
        expect = cpu_ext.dequantize_rowwise_int8(q, scale_bias)
        got8 = int8(*(x.int() for x in tbe_inputs[0])).view(args.batch, n, d)
        # FBGEMM keeps scale/bias in fp16: compare at fp16 precision of the affine map.
        torch.testing.assert_close(got8, reference.embedding_lookup(ids_list[0], expect, offsets), rtol=2e-3, atol=2e-3)
        tbe_int_inputs = [tuple(x.int() for x in pair) for pair in tbe_inputs]
        next_int = _rotator(tbe_int_inputs)
        fns["cpu int8"] = lambda: cpu_ext.embedding_lookup_int8(next_ids(), q, scale_bias, offsets, "off")
        fns["fbgemm TBE int8"] = lambda: int8(*next_int())
    except Exception as exc:
        print(f"FBGEMM int8 inference skipped: {exc!r}")
        rows.append({"workload": "fbgemm_forward_int8", "provider": "fbgemm TBE int8", "status": f"skipped: {exc!r}"})
    with torch.no_grad():
        times = time_interleaved(fns, warmup=2, reps=args.reps * 3)
    moved = {"fp32": 2 * args.batch * n * d * table.element_size(),
             "int8": args.batch * n * (d + 8 + 4 * d)}   # uint8 row + fp32 scale/bias in, fp32 out
    for name, t in times.items():
        group = "int8" if "int8" in name else "fp32"
        other = "fbgemm TBE int8" if group == "int8" else "fbgemm TBE fp32"
        rows.append({"workload": f"embedding_forward[{group}] vs fbgemm", "provider": name,
                     "median_ms": round(t["median_ms"], 3), "iqr_ms": round(t["iqr_ms"], 3), "reps": t["reps"],
                     "gb_per_s": round(moved[group] / t["median_ms"] / 1e6, 2),
                     "speedup_vs_fbgemm": round(times[other]["median_ms"] / t["median_ms"], 2)})
    # ---- forward + backward with the fused optimizer update
    grads = [torch.randn(args.batch, n, d, generator=torch.Generator().manual_seed(s)) for s in range(len(ids_list))]
    for kind, optim in (("adagrad", Optim.EXACT_ROWWISE_ADAGRAD), ("sgd", Optim.EXACT_SGD)):
        tbe = make_training(optim)
        weight = table.clone().requires_grad_()
        sparse = SparseRowOptimizer(kind, lr=0.01)
        # one step each from the same start: the updated tables agree (same formulas, fp32)
        fused_embedding_lookup(ids_list[0], weight, offsets, sparse, "off", backend="cpu").backward(grads[0])
        tbe(*tbe_inputs[0]).backward(grads[0].reshape(args.batch, n * d))
        mine = torch.cat([w for w in tbe.split_embedding_weights()])
        torch.testing.assert_close(mine, weight.detach(), rtol=1e-5, atol=1e-6)
        pairs = _rotator(list(zip(ids_list, tbe_inputs, grads)))
        pairs_tbe = _rotator(list(zip(ids_list, tbe_inputs, grads)))

        def ours():
            ids, _, g = pairs()
            fused_embedding_lookup(ids, weight, offsets, sparse, "off", backend="cpu").backward(g)

        def theirs():
            _, (indices, bag_offsets), g = pairs_tbe()
            tbe(indices, bag_offsets).backward(g.view(args.batch, n * d))
        times = time_interleaved({"cpu fused_embedding_lookup": ours, "fbgemm TBE": theirs}, warmup=2,
                                 reps=args.reps * 2)
        for name, t in times.items():
            rows.append({"workload": f"lookup+fused_update[{kind}] vs fbgemm", "provider": name,
                         "median_ms": round(t["median_ms"], 3), "iqr_ms": round(t["iqr_ms"], 3), "reps": t["reps"],
                         "speedup_vs_fbgemm": round(times["fbgemm TBE"]["median_ms"] / t["median_ms"], 2)})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--fields", type=int, default=39)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab-scale", type=float, default=0.05,
                        help="scale of the Criteo vocabularies (1.0 = 33.8M rows, 2.2 GB fp32)")
    parser.add_argument("--kinds", nargs="+", default=["identity", "scalar", "vector", "matrix"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="sfg_logits: fp32, and/or every provider under torch.autocast('cpu', bfloat16)")
    parser.add_argument("--train-kinds", nargs="+", default=["scalar", "matrix", "base-scalar"],
                        help="decoder kinds of the training-step workload (base-*: no encoder)")
    parser.add_argument("--train-precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="training step: fp32, and/or every provider under torch.autocast('cpu', bfloat16)")
    parser.add_argument("--only", nargs="+", default=list(WORKLOADS), choices=WORKLOADS,
                        help="workloads to run (default all)")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if not cpu_ext.available():
        raise SystemExit("sfg_fast._C is not built: pip install --no-build-isolation -e .")
    set_threads(args.threads)
    torch.manual_seed(0)
    field_dims = field_dims_for(args.fields, args.vocab_scale)
    offsets = _offsets(field_dims)
    table = torch.randn(sum(field_dims), args.dim) * 0.1
    ids_list = [make_ids(args.batch, field_dims, "zipf", seed=s) for s in range(4)]   # rotate inputs
    rows = []
    runners = {"logits": bench_logits, "lookup": bench_lookup, "update": bench_update, "train": bench_train,
               "fbgemm": bench_fbgemm, "gemm": bench_gemm}
    for name in WORKLOADS:
        if name in args.only:
            runners[name](args, table, offsets, ids_list, rows)
    env = environment("cpu")
    env.update({"batch": args.batch, "fields": args.fields, "dim": args.dim, "table_rows": sum(field_dims)})
    cols = ["workload", "provider", "median_ms", "iqr_ms", "reps", "speedup_vs_torch", "speedup_vs_fbgemm", "gflops",
            "gb_per_s", "status"]
    table_md = markdown_table(rows, cols)
    command = "python bench/bench_cpu_ext.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = (f"# bench_cpu_ext: B={args.batch} N={args.fields} D={args.dim}, {args.threads} threads, "
               f"{sum(field_dims)} table rows\n\n{env['device_name']}, torch {env['torch']}, git {env['git_sha']}\n\n"
               f"command: `{command.strip()}`; medians of `reps` interleaved calls per provider\n\n" + table_md)
    print(summary)
    if not args.no_write:
        print("wrote", write_results("bench_cpu_ext", rows, env, summary, command=command.strip()))


if __name__ == "__main__":
    main()
