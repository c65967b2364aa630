"""Compile every Triton kernel the GPU path launches, for an sm_90 (H100/H200) target, on a machine
without a GPU, and report each compiled kernel's resources.

The Triton interpreter (how CPU CI runs the kernels) never compiles them, so a kernel that is correct
there can still fail on a GPU: a construct the compiler rejects, a tile that needs more shared memory
than an SM has, a block size that spills registers. This tool runs the package's own launchers at the
Criteo shape (B=4096, N=39, D=16), and the SFG interaction also at wide embeddings (D=128, 256), in the
configurations a GPU would use (``TRITON_INTERPRET`` unset),
with a stand-in driver that reports an sm_90 target, and turns every launch into a compile only
(Triton's ``warmup``), so nothing executes. Each distinct kernel specialisation goes through Triton's
whole pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin); ``ptxas -v`` then reports registers and spills.

    python -m bench.triton_aot                  # markdown table on stdout, exit 1 on a failure
    python -m bench.triton_aot --json out.json  # also the rows as JSON
    python -m bench.triton_aot --sweep          # also every GEMM block config of bench/gpu_check.py

A failure is a workload whose launch raised (a compile error), or a kernel needing more shared memory
than an H100/H200 block may use (227 KB). Spills are reported, not failed: they cost speed, not
correctness. The kernels' outputs are never written, so values computed after a launch are garbage;
the launchers only read shapes, dtypes and strides from them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Tuple

from bench.envvars import env_var

# Shared memory one block may use on sm_90 (227 KB with the opt-in attribute).
SM90_MAX_SHARED = 232448
BATCH, FIELDS, DIM = 4096, 39, 16
# Embedding dims at which the table kernels also compile: small tiles are where Triton versions differ
# (triton 3.6 broke the segment reduction at BLOCK_D <= 4, which D = 1 first-order tables hit).
TABLE_DIMS = (1, 3)


def _fake_driver():
    """Just enough of a Triton driver for compiling: an sm_90 target, device 0, stream 0."""
    import torch
    from triton.backends.compiler import GPUTarget

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    return CompileOnlyDriver()


class Recorder:
    """Turns ``kernel[grid](...)`` into a compile of that specialisation (no launch)."""

    def __init__(self):
        self.kernels: Dict[str, dict] = {}
        self.workload = ""

    def __enter__(self):
        from triton.runtime import driver
        from triton.runtime.jit import KernelInterface
        self._saved = KernelInterface.__getitem__
        recorder = self

        def getitem(kernel, grid):
            def launch(*args, **kwargs):
                compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
                entry = recorder.kernels.setdefault(compiled.hash, {"kernel": kernel.fn.__name__, "compiled": compiled,
                                                                    "workloads": []})
                if recorder.workload not in entry["workloads"]:
                    entry["workloads"].append(recorder.workload)
            return launch

        KernelInterface.__getitem__ = getitem
        driver.set_active(_fake_driver())
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import KernelInterface
        KernelInterface.__getitem__ = self._saved
        return False


@contextlib.contextmanager
def _triton_backend_on_cpu():
    """Let the functional ops pick backend="triton" for CPU tensors without the interpreter."""
    from sfg_fast import _backend
    saved = _backend.unavailable_reason

    def reason(backend, op="", device=None):
        if backend == "triton":
            return None if not op or op in _backend._IMPLEMENTED["triton"] else f"no triton kernel for {op!r}"
        return saved(backend, op, device)

    _backend.unavailable_reason = reason
    try:
        yield
    finally:
        _backend.unavailable_reason = saved


@contextlib.contextmanager
def _no_data_checks():
    """Kernels whose own outputs feed a check (the BCE kernel's count of bad labels) leave garbage there
    when only compiled: that check is off for the run (nothing executes, so nothing is checked)."""
    from sfg_fast import _checks
    saved = _checks.raise_on_bad_labels
    _checks.raise_on_bad_labels = lambda bad, labels: None
    try:
        yield
    finally:
        _checks.raise_on_bad_labels = saved


@contextlib.contextmanager
def _deterministic(on: bool):
    import torch
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def _tf32(on: bool):
    from sfg_fast.ops import sfg_logits as ops_logits
    saved = ops_logits.DEFAULT_ALLOW_TF32
    ops_logits.DEFAULT_ALLOW_TF32 = on
    try:
        yield
    finally:
        ops_logits.DEFAULT_ALLOW_TF32 = saved


def workloads(sweep: bool = False, table_dims: Tuple[int, ...] = TABLE_DIMS) -> List[Tuple[str, Callable[[], None]]]:
    """(name, fn) pairs; each fn runs forward and backward of one op through backend="triton".
    ``table_dims``: more embedding dims at which the table kernels (lookup, its backward both ways, the
    fused sparse updates) compile; the zoo's first-order tables have D = 1."""
    import torch

    import sfg_fast.functional as SF
    from sfg_fast.ops import sfg_logits as ops_logits
    from sfg_fast.optim import FusedFieldEmbedding

    gen = torch.Generator().manual_seed(0)
    dims = [50] * FIELDS
    n, d, batch = FIELDS, DIM, BATCH
    offsets = torch.arange(n, dtype=torch.int64) * 50
    ids = torch.randint(0, 50, (batch, n), generator=gen)
    labels = (torch.rand(batch, generator=gen) < 0.3).float()
    width = n * d

    def dec_weight(kind, dtype=torch.float32):
        shape = {"identity": None, "scalar": (n, n), "vector": (n, n, d), "matrix": (n, n, d, d)}[kind]
        return None if shape is None else torch.randn(*shape, dtype=dtype, generator=gen).requires_grad_()

    def enc(dtype=torch.float32):
        return (torch.randn(width, width, dtype=dtype, generator=gen).requires_grad_(),
                torch.randn(width, dtype=dtype, generator=gen).requires_grad_())

    def table(dtype, dim=d):
        return torch.randn(sum(dims), dim, generator=gen).to(dtype).requires_grad_()

    def backward(out):
        out.float().sum().backward()

    out: List[Tuple[str, Callable[[], None]]] = []
    for td in (d,) + tuple(x for x in table_dims if x != d):
        tag = "" if td == d else f" D={td}"
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            name = str(dtype).replace("torch.", "") + tag
            for deterministic in (False, True):
                def lookup(dtype=dtype, deterministic=deterministic, td=td):
                    with _deterministic(deterministic):
                        backward(SF.embedding_lookup(ids, table(dtype, td), offsets, bounds_check="off",
                                                     backend="triton"))
                out.append((f"embedding_lookup {name}{' deterministic' if deterministic else ''}", lookup))
            for optimizer in ("sgd", "adagrad", "adam"):
                for dedup in ("sort", "map"):
                    def fused(dtype=dtype, optimizer=optimizer, td=td, dedup=dedup):
                        from sfg_fast.ops import embedding_lookup as ops_lookup
                        emb = FusedFieldEmbedding(dims, td, optimizer=optimizer, bounds_check="off", backend="triton")
                        emb.weight.data = emb.weight.data.to(dtype)
                        before, ops_lookup.SPARSE_DEDUP = ops_lookup.SPARSE_DEDUP, dedup
                        try:
                            backward(emb(ids))
                        finally:
                            ops_lookup.SPARSE_DEDUP = before
                    out.append((f"fused sparse {optimizer} {name}{' row map' if dedup == 'map' else ''}", fused))
    for kind in ("identity", "scalar", "vector", "matrix"):
        for tf32 in (False, True):
            for vdtype in (torch.float32, torch.bfloat16):
                tag = f"{kind}{' tf32' if tf32 else ''} {str(vdtype).replace('torch.', '')}"

                def interaction(kind=kind, tf32=tf32, vdtype=vdtype):
                    V = torch.randn(batch, n, d, generator=gen).to(vdtype).requires_grad_()
                    w, b = enc()
                    with _tf32(tf32):
                        backward(SF.sfg_interaction(V, w, b, dec_weight(kind), kind, "relu", 1.0, False,
                                                    backend="triton"))
                out.append((f"sfg_interaction {tag}", interaction))

                def logits(kind=kind, tf32=tf32, vdtype=vdtype):
                    # the launchers with the loss fused into the forward's epilogue, then the backward
                    w, b = enc()
                    args = (ids, table(vdtype).detach(), offsets, w.detach(), b.detach(),
                            dec_weight(kind) if kind == "identity" else dec_weight(kind).detach(), kind)
                    _, _, dlogit = ops_logits.sfg_logits_fwd(*args, "relu", 1.0, True, labels=labels,
                                                             allow_tf32=tf32, bounds_check="off")
                    ops_logits.sfg_logits_bwd(dlogit, *args, "relu", 1.0, True, allow_tf32=tf32, bounds_check="off")
                out.append((f"sfg_logits+loss launchers {tag}", logits))
        for engine in (False, True):
            def variants(kind=kind, engine=engine):
                saved = ops_logits.GEMM_PATH
                ops_logits.GEMM_PATH = saved and not engine
                try:
                    t = table(torch.float32)
                    backward(SF.sfg_logits(ids, t, offsets, None, None, dec_weight(kind), kind,
                                           backend="triton", bounds_check="off"))                  # base model
                    w, _ = enc()
                    backward(SF.sfg_logits(ids, t, offsets, w, None, dec_weight(kind), kind, "silu", 0.5,
                                           symmetric=True, generated_side="right", pairs="all",
                                           backend="triton", bounds_check="off"))
                finally:
                    ops_logits.GEMM_PATH = saved
            out.append((f"sfg_logits {kind} base/symmetric{' per-field engine' if engine else ''}", variants))
        out.append((f"pairwise_decode {kind}", lambda kind=kind: backward(SF.pairwise_decode(
            torch.randn(batch, n, d, generator=gen, requires_grad=True),
            torch.randn(batch, n, d, generator=gen, requires_grad=True), dec_weight(kind), kind, backend="triton"))))
    for half in (torch.bfloat16, torch.float16):
        for kind in ("scalar", "matrix"):
            # under torch.autocast the GEMMs take bf16 / fp16 operands (kernels.sfg_interaction._mma)
            def autocast(kind=kind, half=half):
                V = torch.randn(batch, n, d, generator=gen).requires_grad_()
                w, b = enc()
                with torch.autocast("cpu", dtype=half):
                    out_ = SF.sfg_interaction(V, w, b, dec_weight(kind), kind, "relu", 1.0, False, backend="triton")
                    logit = SF.sfg_logits(ids, table(torch.float32), offsets, w, b, dec_weight(kind), kind,
                                          backend="triton", bounds_check="off")
                backward(out_)
                backward(logit)
            out.append((f"sfg_interaction + sfg_logits {kind} {str(half).replace('torch.', '')} autocast", autocast))

    # Wide embeddings (N = 4 fields, 64 rows: shapes only set the block sizes): the per-field engine at its
    # largest D (128, whose default 3-stage pipelining overflowed shared memory), and the GEMM-shaped path
    # at D = 256, including a transposed table (it used to fall back to the engine).
    wide_ids, wide_offsets = ids[:64, :4], torch.arange(4, dtype=torch.int64) * 50

    def wide(kind, dim, engine, transposed=False):
        saved = ops_logits.GEMM_PATH
        ops_logits.GEMM_PATH = not engine      # D = 256 is past the engine's limit whatever SFG_FAST_GEMM_PATH says
        try:
            t = torch.randn(dim, 200, generator=gen).t() if transposed else torch.randn(200, dim, generator=gen)
            t.requires_grad_()
            w = torch.randn(4 * dim, 4 * dim, generator=gen).requires_grad_()
            shape = {"scalar": (4, 4), "vector": (4, 4, dim), "matrix": (4, 4, dim, dim)}[kind]
            dec = torch.randn(*shape, generator=gen).requires_grad_()
            backward(SF.sfg_logits(wide_ids, t, wide_offsets, w, None, dec, kind, backend="triton",
                                   bounds_check="off"))
            backward(SF.sfg_logits(wide_ids, t, wide_offsets, None, None, dec, kind, backend="triton",
                                   bounds_check="off"))                                           # base model
            backward(SF.sfg_logits(wide_ids, t, wide_offsets, w, None, dec, kind, symmetric=True, backend="triton",
                                   bounds_check="off"))
        finally:
            ops_logits.GEMM_PATH = saved
    for kind in ("scalar", "vector", "matrix"):
        out.append((f"wide D=128 {kind} per-field engine", lambda kind=kind: wide(kind, 128, True)))
    out.append(("wide D=256 matrix", lambda: wide("matrix", 256, False)))
    out.append(("wide D=256 matrix transposed table", lambda: wide("matrix", 256, False, transposed=True)))

    def torch_gemms(kind):
        """The GPU's exact-fp32 split: torch.mm GEMMs (not compiled here), the Triton epilogue and backward."""
        from sfg_fast.ops import sfg_gemm
        saved = sfg_gemm.TORCH_GEMMS
        sfg_gemm.TORCH_GEMMS = "always"
        try:
            t = table(torch.float32)
            w, b = enc()
            backward(SF.sfg_logits(ids, t, offsets, w, b, dec_weight(kind), kind, "relu", 1.0, True,
                                   backend="triton", bounds_check="off"))
            backward(SF.sfg_logits(ids, t, offsets, w, None, dec_weight(kind), kind, "silu", 0.5,
                                   symmetric=True, backend="triton", bounds_check="off"))   # encoder alone, decoder alone
        finally:
            sfg_gemm.TORCH_GEMMS = saved
    for kind in ("scalar", "matrix"):
        out.append((f"sfg_logits {kind} torch.mm GEMMs", lambda kind=kind: torch_gemms(kind)))
    for act in ("identity", "relu", "tanh", "sigmoid", "silu", "gelu"):
        out.append((f"sfg_encode {act}", lambda act=act: backward(SF.sfg_encode(
            torch.randn(batch, n, d, generator=gen, requires_grad=True), *enc(), activation=act, gamma=2.0,
            residual=True, backend="triton"))))
    out.append(("generative_cross", lambda: backward(SF.generative_cross(
        torch.randn(batch, width, generator=gen, requires_grad=True),
        torch.randn(batch, width, generator=gen, requires_grad=True), enc()[0], backend="triton"))))
    for reduction in ("mean", "sum", "none"):
        out.append((f"bce_with_logits {reduction}", lambda reduction=reduction: backward(SF.bce_with_logits(
            torch.randn(batch, generator=gen, requires_grad=True), labels, reduction=reduction, backend="triton"))))
    many = torch.rand(3 * batch + 5, generator=gen)           # several programs: partial sums, then a sum
    out.append(("bce_with_logits mean of partial sums", lambda: backward(SF.bce_with_logits(
        torch.randn(many.numel(), generator=gen, requires_grad=True), many, backend="triton"))))
    if sweep:
        from bench.common import GEMM_SWEEP
        for blocks in GEMM_SWEEP:
            for tf32 in (False, True):
                def swept(blocks=blocks, tf32=tf32):
                    with env_var("SFG_FAST_GEMM_BLOCKS", blocks):
                        w, b = enc()
                        with _tf32(tf32):
                            backward(SF.sfg_logits(ids, table(torch.float32), offsets, w, b, dec_weight("scalar"),
                                                   "scalar", backend="triton", bounds_check="off"))
                out.append((f"sweep {blocks}{' tf32' if tf32 else ''}", swept))
    return out


def _ptxas() -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else "ptxas"


def resources(ptx: str) -> Dict[str, int]:
    """Registers and spill bytes of one kernel, from ``ptxas -v`` on its PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr[-2000:]}")

    def grab(pattern):
        found = re.search(pattern, done.stderr)
        return int(found.group(1)) if found else 0
    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads")}


def ptx_facts(ptx: str) -> Dict[str, int]:
    """What a kernel's PTX says about its memory traffic:

    - ``cp_async_4B`` / ``cp_async_16B``: asynchronous global-to-shared copies (``cp.async``) by width. A
      GEMM whose operand tile is not contiguous along K copies 4 bytes at a time, strided, where a
      K-contiguous one copies 16 (the TF32 weight-gradient GEMM did so before 1a4477c; with the dX GEMM
      it ran at 34 TFLOP/s on an H200, against 188 for the forward's K-major pair).
    - ``wgmma``: Hopper matrix-unit instructions.
    - ``ordered_atomics``: atomics with acquire/release ordering (Triton's default for tl.atomic_add):
      each orders the thread's memory traffic around it; the gradient scatters need atomicity only
      (``sem="relaxed"``, as Inductor emits)."""
    widths = re.findall(r"cp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)", ptx)
    sizes = [int(w, 0) for w in widths]
    return {"cp_async_4B": sum(1 for w in sizes if w <= 4), "cp_async_16B": sum(1 for w in sizes if w >= 16),
            "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "ordered_atomics": len(re.findall(r"\b(?:atom|red)\.[\w.]*\.(?:acq_rel|acquire|release)\b", ptx))}


def run(sweep: bool = False, table_dims: Tuple[int, ...] = TABLE_DIMS,
        only: Tuple[str, ...] = ()) -> Tuple[List[dict], List[dict]]:
    """Compile everything; returns (kernel rows, failures)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("bench.triton_aot compiles the kernels: run it with TRITON_INTERPRET unset")
    import triton  # noqa: F401  (fail early, with the import error, when Triton is missing)
    failures: List[dict] = []
    with _triton_backend_on_cpu(), _no_data_checks(), Recorder() as recorder:
        from sfg_fast.ops import load_backends
        load_backends()
        for name, fn in workloads(sweep, table_dims):
            if only and not name.startswith(only):
                continue
            recorder.workload = name
            try:
                fn()
            except Exception as exc:   # a compile error: record it and go on with the others
                failures.append({"workload": name, "error": f"{type(exc).__name__}: {str(exc)[:1500]}"})
    if os.environ.get("TRITON_INTERPRET") == "1":   # something imported mid-run switched the interpreter on
        raise RuntimeError("TRITON_INTERPRET was set during the run: the launchers picked interpreter block sizes")
    rows = []
    for entry in recorder.kernels.values():
        compiled = entry["compiled"]
        meta = compiled.metadata
        row = {"kernel": entry["kernel"], "workloads": entry["workloads"], "num_warps": meta.num_warps,
               "num_stages": meta.num_stages, "shared_bytes": meta.shared}
        row.update(resources(compiled.asm["ptx"]))
        row.update(ptx_facts(compiled.asm["ptx"]))
        if meta.shared > SM90_MAX_SHARED:
            failures.append({"workload": ", ".join(entry["workloads"]),
                             "error": f"{entry['kernel']} needs {meta.shared} bytes of shared memory, "
                                      f"more than the {SM90_MAX_SHARED} an sm_90 block may use"})
        rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], -r["registers"]))
    return rows, failures


def markdown(rows: List[dict], failures: List[dict]) -> str:
    import triton
    lines = [f"# Triton kernels compiled for sm_90 without a GPU (triton {triton.__version__})", "",
             f"Shape B={BATCH}, N={FIELDS}, D={DIM} (table kernels, and the \"wide\" workloads at N=4, "
             f"also at the D named in their workload); {len(rows)} distinct compiled kernels; "
             f"{len(failures)} failures.", "",
             "| kernel | warps | stages | shared KB | registers | spill stores B | spill loads B | wgmma | "
             "cp.async 4B / 16B | first workload (of n) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['num_warps']} | {r['num_stages']} | {r['shared_bytes'] / 1024:.1f} | "
                     f"{r['registers']} | {r['spill_stores']} | {r['spill_loads']} | {r['wgmma']} | "
                     f"{r['cp_async_4B']} / {r['cp_async_16B']} | {r['workloads'][0]} ({len(r['workloads'])}) |")
    if failures:
        lines += ["", "Failures:", ""] + [f"- {f['workload']}: {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows and failures to this JSON file")
    parser.add_argument("--sweep", action="store_true", help="also compile every block config of gpu_check's sweep")
    parser.add_argument("--table-dims", default=",".join(map(str, TABLE_DIMS)),
                        help="more embedding dims for the table kernels (comma-separated; default %(default)s; "
                             "'' for none)")
    parser.add_argument("--only", default="",
                        help="compile only the workloads whose name starts with one of these comma-separated "
                             "prefixes (e.g. 'embedding_lookup,fused sparse')")
    args = parser.parse_args(argv)
    try:
        table_dims = tuple(int(x) for x in args.table_dims.split(",") if x.strip())
    except ValueError:
        parser.error(f"--table-dims must be comma-separated integers, got {args.table_dims!r}")
    if any(x < 1 for x in table_dims):
        parser.error(f"--table-dims must be positive, got {args.table_dims!r}")
    rows, failures = run(args.sweep, table_dims, tuple(p.strip() for p in args.only.split(",") if p.strip()))
    print(markdown(rows, failures), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
