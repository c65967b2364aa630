"""Factored "torch" backend vs the literal reference at the Criteo shape, forward + backward.

(a) ``pairwise_decode`` alone, per decoder kind; (b) the encode + decode + loss step
(``sfg_encode`` -> ``pairwise_decode`` -> ``bce_with_logits``) per kind. For each: median time and
IQR (the two providers alternate rep by rep so machine noise hits both alike), the bytes autograd
saves for backward, and the peak bytes torch allocates during one forward + backward.

    python -m bench.bench_foundation                  # B=4096, N=39, D=16, fp32, 2 threads
    python -m bench.bench_foundation --smoke          # tiny shapes, one rep
"""
from __future__ import annotations

from typing import Dict, List

import torch

from sfg_fast import functional as SF

from . import common

KINDS = ("identity", "scalar", "vector", "matrix")
PROVIDERS = {"literal": "reference", "torch": "torch"}


def decoder_weight(kind: str, n: int, d: int, gen: torch.Generator):
    if kind == "identity":
        return None
    shape = {"scalar": (n, n), "vector": (n, n, d), "matrix": (n, n, d, d)}[kind]
    scale = d ** -0.5 if kind == "matrix" else 1.0
    return (torch.randn(shape, generator=gen) * scale).requires_grad_()


def decode_closure(kind: str, batch: int, n: int, d: int, backend: str, seed: int = 0):
    """(step, forward) of pairwise_decode alone with gradients for Z, V and the decoder weight."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(batch, n, d, generator=gen).requires_grad_()
    V = torch.randn(batch, n, d, generator=gen).requires_grad_()
    W = decoder_weight(kind, n, d, gen)
    grad_out = torch.randn(batch, generator=gen)
    leaves = [t for t in (Z, V, W) if t is not None]

    def forward():
        return SF.pairwise_decode(Z, V, W, kind, backend=backend)

    def step():
        for t in leaves:
            t.grad = None
        forward().backward(grad_out)

    return step, forward


def encode_decode_loss_closure(kind: str, batch: int, n: int, d: int, backend: str, seed: int = 0):
    """(step, forward) of bce(pairwise_decode(sfg_encode(V), V)) with gradients for V and both weights."""
    gen = torch.Generator().manual_seed(seed)
    V = (torch.randn(batch, n, d, generator=gen) * 0.1).requires_grad_()
    W_enc = (torch.randn(n * d, n * d, generator=gen) * (n * d) ** -0.5).requires_grad_()
    W_dec = decoder_weight(kind, n, d, gen)
    labels = torch.randint(0, 2, (batch,), generator=gen).float()
    leaves = [t for t in (V, W_enc, W_dec) if t is not None]

    def forward():
        Z = SF.sfg_encode(V, W_enc, None, "relu", 1.0, backend=backend)
        logits = SF.pairwise_decode(Z, V, W_dec, kind, backend=backend)
        return SF.bce_with_logits(logits, labels, backend=backend)

    def step():
        for t in leaves:
            t.grad = None
        forward().backward()

    return step, forward


PARTS = {"decode": decode_closure, "encode+decode+loss": encode_decode_loss_closure}


def run(args) -> List[Dict]:
    batch, n, d = (64, 6, 4) if args.smoke else (args.batch, args.fields, args.dim)
    env = common.environment("cpu")
    rows: List[Dict] = []
    for part, make in PARTS.items():
        for kind in KINDS:
            closures = {name: make(kind, batch, n, d, backend) for name, backend in PROVIDERS.items()}
            times = common.time_interleaved({k: c[0] for k, c in closures.items()},
                                            warmup=0 if args.smoke else 1, reps=args.reps)
            for name, (step, forward) in closures.items():
                row = {"benchmark": "foundation", "part": part, "kind": kind, "B": batch, "N": n, "D": d,
                       "dtype": "float32", "provider": name, "backend": PROVIDERS[name], "status": "ok",
                       **times[name],
                       "saved_mb": common.saved_tensor_bytes(forward) / 2 ** 20,
                       "peak_mb": common.peak_alloc_bytes(step, "cpu") / 2 ** 20}
                for k in ("device", "device_name", "torch", "triton", "git_sha", "threads"):
                    row[k] = env.get(k)
                rows.append(row)
                print(common._one_line(row), flush=True)
            closures = None
    for r in rows:
        lit = next(x for x in rows if x["part"] == r["part"] and x["kind"] == r["kind"]
                   and x["provider"] == "literal")
        r["ratio_vs_literal"] = r["median_ms"] / lit["median_ms"]
    return rows


def comparison_table(rows: List[Dict]) -> str:
    """One line per (part, kind): literal vs torch side by side, with the ratios literal / torch."""
    cols = ["part", "kind", "literal ms (IQR)", "torch ms (IQR)", "speedup",
            "saved MB literal/torch", "saved ratio", "peak MB literal/torch", "peak ratio"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for part in PARTS:
        for kind in KINDS:
            lit = next(r for r in rows if r["part"] == part and r["kind"] == kind and r["provider"] == "literal")
            ours = next(r for r in rows if r["part"] == part and r["kind"] == kind and r["provider"] == "torch")
            lines.append("| " + " | ".join([
                part, kind,
                f"{lit['median_ms']:.1f} ({lit['iqr_ms']:.1f})", f"{ours['median_ms']:.2f} ({ours['iqr_ms']:.2f})",
                f"{lit['median_ms'] / ours['median_ms']:.1f}x",
                f"{lit['saved_mb']:.1f} / {ours['saved_mb']:.2f}", f"{lit['saved_mb'] / max(ours['saved_mb'], 1e-9):.0f}x",
                f"{lit['peak_mb']:.1f} / {ours['peak_mb']:.2f}", f"{lit['peak_mb'] / max(ours['peak_mb'], 1e-9):.1f}x",
            ]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--batch", type=int, default=4096)
        p.add_argument("--fields", type=int, default=39)
        p.add_argument("--dim", type=int, default=16)
    args = common.parse_args(__doc__.splitlines()[0], argv, extra)
    if args.device != "cpu":
        raise SystemExit("bench_foundation measures the CPU path; run it with --device cpu")
    rows = run(args)
    env = common.environment("cpu")
    env["mode"] = "smoke" if args.smoke else ("quick" if args.quick else "full")
    env["reps"] = args.reps
    import sys
    command = "python -m bench.bench_foundation " + " ".join(sys.argv[1:] if argv is None else argv)
    md = ["## Factored torch backend vs literal reference, forward + backward", "",
          f"device: {env['device_name']} (cpu, {env['threads']} threads); torch {env['torch']}, "
          f"sfg_fast {env['sfg_fast']}, git {env['git_sha']}, {env['date']}; "
          f"B={rows[0]['B']}, N={rows[0]['N']}, D={rows[0]['D']}, fp32; "
          f"{args.reps} reps per provider, providers alternating; medians (IQR) in ms.", "",
          f"command: `{command.strip()}`", "",
          "literal = `sfg_fast.reference` (materialised pairs); torch = the factored backend. "
          "speedup = literal / torch median time; saved = bytes autograd keeps for backward; "
          "peak = peak bytes torch allocates during one forward + backward above what was live before.", "",
          comparison_table(rows)]
    text = "\n".join(md)
    print(text)
    if not args.no_write:
        path = common.write_results("bench_foundation", rows, env, text, args.out_dir)
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
