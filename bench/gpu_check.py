"""The one prepared GPU check: environment, GPU tests, then the Criteo-shape numbers in one table.

    bash bench/gpu_check.sh                 # on a CUDA machine (about 4-6 minutes on an H100)
    python bench/gpu_check.py --smoke       # CPU: tiny shapes, 1 rep, GPU-only parts skipped

Sections (every provider runs in try/except: a failure is a row with its error, never fatal):
  interaction  functional.sfg_logits per decoder kind (scalar, vector, matrix): fused ("triton") vs
               literal reference vs factored torch vs torch.compile of reference and factored (and of
               the fused op, which enters the graph as an sfg_fast:: custom op);
               forward and forward+backward; TFLOP/s from the model FLOP count; peak memory.
  interaction_v  the same for functional.sfg_interaction on gathered V (the SFG layer alone, backward to
               dV: no dense table gradient), fp32, TF32 and bf16 autocast each against torch.compile in the
               same precision.
  lookup       embedding_lookup forward GB/s against a measured device-to-device copy.
  step         a full SFG-FwFM training step (lookup with fused sparse rowwise Adagrad, encoder,
               scalar decoder, BCE, backward, dense Adagrad) in samples/s, vs the literal step; the fused step
               runs encoder and decoder as two ops and as one sfg_interaction (what the FM-family models run).
  graph        the one-op fused step captured whole in a CUDA graph and replayed (exact fp32, TF32, bf16
               autocast; dense and structured decoder), then the zoo FwFM compiled by Inductor (GPU only).
Targets of the Triton issue are evaluated at the end (benchmark, not test). Timings are
triton.testing.do_bench medians on CUDA (bench.common.time_gpu), wall-clock medians on CPU.
Results: JSON + markdown under $OUT (default bench/results/<device>/).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import sfg_fast  # noqa: E402,F401  (before anything starts CUDA: sfg_fast._cublas notes the cuBLAS setting)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton only runs on CPU through its interpreter, which must be on before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import common  # noqa: E402
from bench.envvars import env_var  # noqa: E402

KINDS = ("scalar", "vector", "matrix")
COLUMNS = ["section", "kind", "provider", "mode", "median_ms", "iqr_ms", "reps", "tflops", "gbps", "pct_copy_bw",
           "peak_mb", "samples_per_s", "speedup_vs_reference", "status", "note"]


class Budget:
    """Wall-clock budget of the benchmark part: later providers are skipped (with a reason) when spent."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _device_info(device: str) -> Dict:
    env = common.environment(device)
    env["cuda_runtime"] = torch.version.cuda
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["sm_count"] = props.multi_processor_count
        env["memory_gb"] = round(props.total_memory / 2**30, 1)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return env


def _device_dir(env: Dict) -> str:
    if env["device"] != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in env.get("device_name", "cuda")).strip("-").lower() or "cuda"


# ---------------------------------------------------------------------------------------------
# optional steps before the benchmarks


def run_gpu_tests(device: str, timeout_s: int) -> Dict:
    """``pytest -m "gpu or interpreter" -x -q`` on CUDA (interpreter tests then run natively)."""
    if device != "cuda":
        return {"status": "skipped", "note": "no CUDA device: the GPU tests run only on a GPU "
                                             "(the interpreter tests run in the CPU suite)"}
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)   # conftest sets it only without CUDA; never inherit it here
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu or interpreter", "-x", "-q", "-p", "no:cacheprovider"]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        out = (proc.stdout + proc.stderr).strip().splitlines()
        status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
        return {"status": status, "seconds": round(time.monotonic() - start, 1), "tail": out[-15:]}
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"status": f"timed out after {timeout_s} s", "tail": text.strip().splitlines()[-15:]}


def build_extension(timeout_s: int) -> Dict:
    """Build sfg_fast._C (CUDA when torch has CUDA) in place, within a time limit."""
    env = dict(os.environ, SFG_FAST_BUILD_EXT="1")
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
        return {"status": status, "seconds": round(time.monotonic() - start, 1),
                "tail": (proc.stdout + proc.stderr).strip().splitlines()[-10:]}
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout_s} s"}


# ---------------------------------------------------------------------------------------------
# measurement helpers


def _timer(device: str, reps: int) -> Callable[[Callable], Dict]:
    if device == "cuda":
        return lambda fn: common.time_gpu(fn, warmup=25, rep=max(20, reps))
    return lambda fn: common.time_cpu(fn, warmup=1 if reps > 1 else 0, reps=reps)


def _peak_mb(fn: Callable, device: str) -> Optional[float]:
    if device != "cuda":
        return None   # CPU peak memory needs the profiler: too slow for the smoke run, not the point here
    return common.peak_alloc_bytes(fn, device) / 2**20


def _skip(reason: str) -> Callable[[], Dict]:
    def body():
        raise common.Skip(reason)
    return body


def _row(section, kind, provider, mode, **fields) -> Dict:
    row = {"section": section, "kind": kind, "provider": provider, "mode": mode, "status": "ok", "note": ""}
    row.update(fields)
    return row


# set by main: rewrites the result files after every row, so a run stopped by its time limit keeps
# every measurement it made
_SAVE_HOOK: Optional[Callable[[], object]] = None


def _attempt(rows: List[Dict], budget: Budget, base: Dict, body: Callable[[], Dict], min_left: float = 5.0):
    """Run one provider: its fields go into a row; an exception or a spent budget becomes the row's status."""
    row = dict(base)
    if budget.left() < min_left:
        row.update(status="skipped", note="time budget spent")
    else:
        try:
            row.update(body())
        except common.Skip as exc:
            row.update(status="skipped", note=str(exc))
        except Exception as exc:  # one provider failing must not stop the check
            row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            traceback.print_exc(limit=3)
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except Exception as exc:   # a sticky CUDA error from the provider: keep the row, say so
            row["note"] = f"{row.get('note', '')} (then empty_cache: {type(exc).__name__})".strip()
    rows.append(row)
    _print_row(row)
    _save_now()
    return row


def _save_now() -> None:
    """Rewrite the JSON and markdown with the rows so far (rows added outside ``_attempt``)."""
    if _SAVE_HOOK is not None:
        _SAVE_HOOK()


_SHARED: Dict = {}


def _shared_table(dims, d: int, device: str):
    """The concatenated table (33.8M rows at the Criteo shape: seconds to build on the host), built
    once per run and shared by the sections; its gradient is dropped on every fetch."""
    from bench.providers import concatenated_table
    key = ("table", tuple(dims), d, device)
    if key not in _SHARED:
        _SHARED[key] = concatenated_table(dims, d, device)
    table, offsets = _SHARED[key]
    table.grad = None
    return table, offsets


def _shared_ids(batch: int, dims, device: str, seeds: int) -> List[torch.Tensor]:
    """Zipf id batches (seed 0..seeds-1), built once per run."""
    key = ("ids", batch, tuple(dims), device, seeds)
    if key not in _SHARED:
        _SHARED[key] = [common.make_ids(batch, dims, "zipf", device=device, seed=s) for s in range(seeds)]
    return _SHARED[key]


def _atomic_write(path: str, text: str) -> None:
    """Write through a temporary file and a rename: a run killed by its time limit mid-write leaves
    the previous complete file, never a truncated one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def _print_row(row: Dict) -> None:
    ms = row.get("median_ms")
    print(f"  {row['section']:<11} {row['kind']:<7} {row['provider']:<18} {row['mode']:<9} "
          f"{(f'{ms:9.4f} ms' if isinstance(ms, float) else row['status']):>12}  {row.get('note', '')}", flush=True)


def interaction_flops(batch: int, n: int, d: int, kind: str) -> float:
    """FLOPs of one sfg_logits forward: encoder GEMM + decoder mix + row dot (2 per MAC). The decoder is
    counted over all N x N field blocks; the upper pair set uses about half of those. A scalar / vector
    decoder counts as the mixing the factored path (and the structured decoder) runs, 2*B*N*N*D; the
    fused path's default dense [W, W] GEMM executes D times that. So TFLOP/s here are one common yardstick
    per kind, not each provider's executed FLOPs."""
    width = n * d
    encoder = 2.0 * batch * width * width
    decoder = {"scalar": 2.0 * batch * n * n * d, "vector": 2.0 * batch * n * n * d,
               "matrix": 2.0 * batch * width * width}[kind]
    return encoder + decoder + 2.0 * batch * width


# ---------------------------------------------------------------------------------------------
# sections

# every section, in the default order: what answers the open questions first; the CUDA extension's rows
# (a crash there would end the run) and the compiled zoo step (tens of seconds of compiling) late
SECTIONS = ("lookup", "step", "graph", "profile", "interaction_v", "interaction", "ext", "compiled_step", "sweep")


def _decoder_weight(kind: str, n: int, d: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    shape = {"scalar": (n, n), "vector": (n, n, d), "matrix": (n, n, d, d)}[kind]
    return (torch.randn(*shape, generator=gen) * 0.1).to(device).requires_grad_()


def bench_interaction(rows, args, device, budget, dims, source: str = "table") -> None:
    """Eager providers for every kind first; the torch.compile baselines last, most important first,
    because their compile time is what the budget runs out on.

    ``source="table"`` (section interaction): functional.sfg_logits from ids, so the backward also builds
    the dense [V, D] table gradient (2.16 GB zero-filled per step at the Criteo shape, the same for every
    provider). ``source="V"`` (section interaction_v): functional.sfg_interaction on gathered embeddings V
    [B, N, D] (a leaf), the SFG layer itself: its backward ends at dV, which the lookup's own backward
    (the lookup section) or a fused sparse update takes from there."""
    import sfg_fast.functional as SF
    section = "interaction" if source == "table" else "interaction_v"
    batch, d, n = args.batch, args.dim, len(dims)
    timer = _timer(device, args.reps)
    table, offsets = _shared_table(dims, d, device)
    gen = torch.Generator().manual_seed(1)
    enc = (torch.randn(n * d, n * d, generator=gen) / math.sqrt(n * d)).to(device).requires_grad_()
    decs = {kind: _decoder_weight(kind, n, d, device) for kind in KINDS}
    ids_list = _shared_ids(batch, dims, device, args.rotations)
    labels_list = [(torch.rand(batch, generator=gen) < 0.25).float().to(device) for _ in ids_list]
    if source == "V":        # the embeddings of each id batch, as leaves (dV is the layer's input gradient)
        inputs_list = [table.detach()[offsets + ids].requires_grad_() for ids in ids_list]
    else:
        inputs_list = ids_list
    counter = [0]

    def batch_inputs():
        i = counter[0] = (counter[0] + 1) % len(inputs_list)
        return inputs_list[i], labels_list[i]

    def logits_fn(kind, backend):
        dec = decs[kind]
        if source == "V":
            return lambda V: SF.sfg_interaction(V, enc, None, dec, kind, "relu", 1.0, False, "upper", "left", False,
                                                backend=backend)
        return lambda ids: SF.sfg_logits(ids, table, offsets, enc, None, dec, kind, "relu", 1.0, False,
                                         "upper", "left", False, bounds_check="off", backend=backend)

    def forward_call(fn):
        def call():
            with torch.no_grad():
                fn(batch_inputs()[0])
        return call

    def train_call(fn, kind):
        def call():
            inputs, labels = batch_inputs()
            for p in ((inputs,) if source == "V" else (table,)) + (enc, decs[kind]):
                p.grad = None
            SF.bce_with_logits(fn(inputs), labels, backend="torch").backward()
        return call

    def measure(kind, backend, mode, compiled=False, tf32=False, engine=False, gemms=None, structured=None,
                bf16=False):
        def body():
            with _tf32(tf32), _per_field_engine(engine), _torch_gemms(gemms), _structured(structured), \
                    torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                return inner()

        def inner():
            if compiled and device != "cuda" and not args.compile_on_cpu:
                raise common.Skip("torch.compile (Inductor) takes ~15 s per graph on CPU; GPU-only here "
                                  "(--compile-on-cpu to force)")
            if backend == "triton" and device != "cuda" and batch * n > 4096:
                raise common.Skip("the Triton interpreter at this shape would take minutes (use --smoke on CPU)")
            fn = logits_fn(kind, backend)
            if compiled:
                # Every row shares logits_fn's code object: without a reset, Dynamo's recompile limit (8)
                # would silently run the later rows eagerly. The graph count proves each row compiled.
                torch._dynamo.reset()
                fn = torch.compile(fn)
            call = forward_call(fn) if mode == "fwd" else train_call(fn, kind)
            graphs_before = _compiled_graphs()
            t0 = time.perf_counter()
            call()   # compile / JIT-compile outside the timing
            compile_s = time.perf_counter() - t0
            if compiled and _compiled_graphs() == graphs_before:
                raise RuntimeError("torch.compile produced no graph: the call ran eagerly")
            t = timer(call)
            work = interaction_flops(batch, n, d, kind) * (1 if mode == "fwd" else 3)
            out = {"median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"], "reps": t.get("reps"),
                   "tflops": work / (t["median_ms"] * 1e-3) / 1e12}
            if compiled:
                out["note"] = f"first call (compile) {compile_s:.1f} s"
            peak = _peak_mb(call, device)
            if peak is not None:
                out["peak_mb"] = peak
            return out
        return body

    # (name, backend, tf32): *_tf32 rows let the matrix units run in TF32 (ours through
    # SFG_FAST_ALLOW_TF32's switch, torch's through torch.backends.cuda.matmul.allow_tf32)
    # fused = the GEMM-shaped kernels (ops.sfg_gemm); fused_engine = the per-field engine they replace
    # fused_triton_gemm = every GEMM in the Triton kernels (ops.sfg_gemm.TORCH_GEMMS="never"); fused lets
    # "auto" hand the exact-fp32 GEMMs to cuBLAS on a GPU; compile_fused: the Triton kernels as sfg_fast::
    # custom ops inside an Inductor graph; fused_structured: scalar / vector decoders by their structure
    # (ops.sfg_gemm.STRUCTURED_DECODER); *_bf16: under torch.autocast(bfloat16), the GEMMs on bf16 operands
    # on both sides.
    # Rows in the order of what they answer, so that a budget running out costs the least: first the
    # targets' rows (fused, the literal reference and factored forward+backward, then torch.compile of the
    # factored path), then the precision-matched pairs, then diagnostics; compile_reference (80 s of
    # compiling a run, read by no target) last.
    if source == "V":
        # the layer alone, forward + backward only (what its targets read; the table section has the rest)
        order = [("fused", "triton", "fwd+bwd", False, False), ("reference", "reference", "fwd+bwd", False, False),
                 ("factored", "torch", "fwd+bwd", False, False), ("compile_factored", "torch", "fwd+bwd", False, True),
                 ("fused_bf16", "triton", "fwd+bwd", False, False), ("factored_bf16", "torch", "fwd+bwd", False, False),
                 ("compile_factored_bf16", "torch", "fwd+bwd", False, True),
                 ("fused_tf32", "triton", "fwd+bwd", True, False), ("factored_tf32", "torch", "fwd+bwd", True, False),
                 ("compile_factored_tf32", "torch", "fwd+bwd", True, True),
                 ("fused_structured", "triton", "fwd+bwd", False, False),
                 ("compile_fused", "triton", "fwd+bwd", False, True)]
    else:
        order = [("fused", "triton", "fwd+bwd", False, False), ("reference", "reference", "fwd+bwd", False, False),
                 ("factored", "torch", "fwd+bwd", False, False), ("compile_factored", "torch", "fwd+bwd", False, True),
                 ("fused_tf32", "triton", "fwd+bwd", True, False), ("factored_tf32", "torch", "fwd+bwd", True, False),
                 ("compile_factored_tf32", "torch", "fwd+bwd", True, True),
                 ("fused_triton_gemm", "triton", "fwd+bwd", False, False),
                 ("fused_engine", "triton", "fwd+bwd", False, False)]
        order += [(name, backend, "fwd", tf32, False) for name, backend, _, tf32, _ in order
                  if not name.startswith("compile")]
        order += [("compile_fused", "triton", "fwd+bwd", False, True), ("compile_factored", "torch", "fwd", False, True),
                  ("compile_reference", "reference", "fwd+bwd", False, True),
                  ("compile_reference", "reference", "fwd", False, True)]
    for name, backend, mode, tf32, compiled in order:
        bf16 = name.endswith("_bf16")
        for kind in KINDS:
            if compiled:
                _attempt(rows, budget, _row(section, kind, name, mode),
                         measure(kind, backend, mode, True, tf32=tf32, bf16=bf16), min_left=45.0)
                continue
            if ((tf32 or bf16) and device != "cuda") or (name == "fused_structured" and kind == "matrix"):
                continue
            _attempt(rows, budget, _row(section, kind, name, mode),
                     measure(kind, backend, mode, tf32=tf32, engine=name == "fused_engine",
                             gemms="never" if name == "fused_triton_gemm" else None,
                             structured="auto" if name == "fused_structured" else None, bf16=bf16))


@contextlib.contextmanager
def _patched(*settings):
    """Set (object, attribute, value) triples for the block; the previous values come back after."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in settings]
    try:
        for obj, name, value in settings:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _per_field_engine(on: bool):
    """Route the Triton sfg_logits through the per-field engine instead of ops.sfg_gemm."""
    from sfg_fast.ops import sfg_logits as ops_logits
    return _patched((ops_logits, "GEMM_PATH", ops_logits.GEMM_PATH and not on))


def _gemm_setting(name: str, mode: Optional[str]):
    """The ops.sfg_gemm setting ``name`` at ``mode`` for the block (None: as set)."""
    if mode is None:
        return contextlib.nullcontext()
    from sfg_fast.ops import sfg_gemm
    return _patched((sfg_gemm, name, mode))


def _torch_gemms(mode: Optional[str]):
    """ops.sfg_gemm.TORCH_GEMMS for the block: who runs the fused path's GEMMs (None: as set)."""
    return _gemm_setting("TORCH_GEMMS", mode)


def _with(context, body: Callable[[], Dict]) -> Dict:
    """``body()`` inside ``context``."""
    with context:
        return body()


def _structured(mode: Optional[str]):
    """ops.sfg_gemm.STRUCTURED_DECODER for the block (None: as set)."""
    return _gemm_setting("STRUCTURED_DECODER", mode)


def _sparse_dedup(mode: Optional[str]):
    """ops.embedding_lookup.SPARSE_DEDUP for the block: how the fused update finds each row's gradient sum
    ("sort" or the sort-free "map"; None: as set)."""
    if mode is None:
        return contextlib.nullcontext()
    from sfg_fast.ops import embedding_lookup as ops_lookup
    return _patched((ops_lookup, "SPARSE_DEDUP", mode))


def _tf32(on: bool):
    """TF32 matrix units on/off for torch (cuBLAS) and for sfg_fast's Triton kernels."""
    from sfg_fast.ops import sfg_logits as ops_logits
    return _patched((torch.backends.cuda.matmul, "allow_tf32", bool(on)), (ops_logits, "DEFAULT_ALLOW_TF32", bool(on)))


SWEEP = common.GEMM_SWEEP


def bench_sweep(rows, args, device, budget, dims) -> None:
    """Block sizes of the GEMM-shaped kernels (SFG_FAST_GEMM_BLOCKS=BM,BN,BK,warps,stages):
    fused fwd+bwd of the scalar decoder per precision."""
    import sfg_fast.functional as SF
    if device != "cuda":
        rows.append(_row("sweep", "-", "-", "-", status="skipped", note="block sizes only matter on a GPU"))
        return
    if budget.left() < 15:
        rows.append(_row("sweep", "-", "-", "-", status="skipped", note="time budget spent"))
        return
    timer = _timer(device, args.reps)
    batch, d, n = args.batch, args.dim, len(dims)
    table, offsets = _shared_table(dims, d, device)
    gen = torch.Generator().manual_seed(1)
    enc = (torch.randn(n * d, n * d, generator=gen) / math.sqrt(n * d)).to(device).requires_grad_()
    ids_list = _shared_ids(batch, dims, device, args.rotations)
    counter = [0]
    from sfg_fast.ops import sfg_gemm

    def measure(kind, dec, tf32, blocks=None, gather_in_gemm=False):
        def call():
            counter[0] = (counter[0] + 1) % len(ids_list)
            for p in (table, enc, dec):
                p.grad = None
            SF.sfg_logits(ids_list[counter[0]], table, offsets, enc, None, dec, kind, "relu", 1.0, False, "upper",
                          "left", False, bounds_check="off", backend="triton").sum().backward()

        def body():
            with env_var("SFG_FAST_GEMM_BLOCKS", blocks), _tf32(tf32), \
                    _patched((sfg_gemm, "GATHER_IN_GEMM", gather_in_gemm)):
                call()
                t = timer(call)
            return {"median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"], "reps": t.get("reps")}
        return body

    for kind in ("scalar",):
        dec = _decoder_weight(kind, n, d, device)
        for tf32 in (False, True):
            precision = "tf32" if tf32 else "ieee"
            for config in SWEEP:
                _attempt(rows, budget, _row("sweep", kind, "gemm" + config.replace(",", "_"), precision),
                         measure(kind, dec, tf32, blocks=config), min_left=10.0)
            # where V is gathered (ops.sfg_gemm.GATHER_IN_GEMM), at the default blocks
            for in_gemm in (False, True):
                _attempt(rows, budget, _row("sweep", kind, "gather_in_gemm" if in_gemm else "gather_first", precision),
                         measure(kind, dec, tf32, gather_in_gemm=in_gemm), min_left=10.0)


def _kernel_events(averages) -> list:
    """The kernels of a torch.profiler key_averages() (device-side events; the CPU ops that launched them
    carry the same time), longest first."""
    events = [e for e in averages if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
              and getattr(e, "device_time_total", 0) > 0]
    return sorted(events, key=lambda e: -e.device_time_total)


def _kernel_sequence(events, reps: int) -> List[str]:
    """The last of ``reps`` profiled steps' kernels in launch order, one line each with its duration: tells
    apart launches of one kernel that key_averages() merges (the backward's two _matmul_kernel GEMMs)."""
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
               and e.time_range.elapsed_us() > 0]
    if not kernels or len(kernels) % reps:
        return [f"  (no kernel sequence: {len(kernels)} kernels over {reps} steps)"]
    kernels.sort(key=lambda e: e.time_range.start)
    step = kernels[-(len(kernels) // reps):]
    lines = [f"  one step's {len(step)} kernels in launch order (the last step):"]
    lines += [f"  {i:4d} {e.time_range.elapsed_us():9.1f} us  {e.name[:90]}" for i, e in enumerate(step)]
    return lines


def _host_profile(step, reps: int) -> List[str]:
    """Python functions by own time over ``reps`` calls of ``step`` (cProfile), for host overhead."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof)
    entries = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])      # (cc, nc, tottime, cumtime, callers)
    total = sum(v[2] for _, v in entries) / reps * 1e6
    lines = [f"  host, Python functions by own time per step (cProfile; total {total:.1f} us):"]
    for (filename, line, name), (cc, nc, tt, ct, _) in entries[:16]:
        where = f"{os.path.basename(filename)}:{line}" if line else filename
        lines.append(f"  {tt / reps * 1e6:9.1f} us  x{nc / reps:<6.1f} {name[:50]} ({where[:60]})")
    return lines


def bench_profile(rows, args, device, budget, dims, out_dir) -> None:
    """Per-kernel GPU time of the fused forward+backward (torch.profiler), per decoder kind and
    precision: shows which pass dominates. Written to profile.txt; one row per kernel."""
    import sfg_fast.functional as SF
    if device != "cuda":
        rows.append(_row("profile", "-", "-", "-", status="skipped", note="needs CUDA"))
        return
    if budget.left() < 15:
        rows.append(_row("profile", "-", "-", "-", status="skipped", note="time budget spent"))
        return
    from torch.profiler import ProfilerActivity, profile
    batch, d, n = args.batch, args.dim, len(dims)
    table, offsets = _shared_table(dims, d, device)
    gen = torch.Generator().manual_seed(1)
    enc = (torch.randn(n * d, n * d, generator=gen) / math.sqrt(n * d)).to(device).requires_grad_()
    ids = _shared_ids(batch, dims, device, 1)[0]
    labels = (torch.rand(batch, generator=gen) < 0.25).float().to(device)
    lines = []
    for kind in ("scalar", "matrix"):
        dec = _decoder_weight(kind, n, d, device)
        for tf32 in (False, True):
            if budget.left() < 10:
                break
            try:   # one pass failing (e.g. a compile error in TF32) keeps the passes before and after it
                with _tf32(tf32):
                    def step():
                        for p in (table, enc, dec):
                            p.grad = None
                        logit = SF.sfg_logits(ids, table, offsets, enc, None, dec, kind, "relu", 1.0, False,
                                              "upper", "left", False, bounds_check="off", backend="triton")
                        SF.bce_with_logits(logit, labels, backend="torch").backward()
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                    reps = 10
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        step()
                    torch.cuda.synchronize()
                    wall_us = (time.perf_counter() - t0) / reps * 1e6
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(reps):
                            step()
                        torch.cuda.synchronize()
                    host = _host_profile(step, reps) if kind == "scalar" else []
            except Exception as exc:
                traceback.print_exc(limit=3)
                note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                lines.append(f"## {kind} tf32={tf32}: failed: {note}")
                rows.append(_row("profile", kind, "-", "tf32" if tf32 else "ieee", status="error", note=note))
                _save_now()
                continue
            averages = prof.key_averages()
            events = _kernel_events(averages)
            total = sum(e.device_time_total for e in events) / reps
            lines.append(f"## {kind} tf32={tf32}: {total:.1f} us of GPU time per fwd+bwd; {wall_us:.1f} us wall "
                         "(host clock, 10 steps then a sync, no profiler)")
            for e in events[:10]:
                us = e.device_time_total / reps
                lines.append(f"  {us:9.1f} us  {100 * us / max(total, 1e-9):5.1f}%  x{e.count // reps:<3} {e.key[:90]}")
                rows.append(_row("profile", kind, e.key[:40], "tf32" if tf32 else "ieee",
                                 median_ms=us / 1e3, note=f"{e.count // reps} launches per step"))
            _save_now()     # a kill later in the section keeps this pass's rows in the JSON
            try:        # (diagnostic lines: never at the cost of the pass's other lines)
                lines.extend(_kernel_sequence(prof.events(), reps))
            except Exception as exc:
                lines.append(f"  (no kernel sequence: {type(exc).__name__}: {exc})")
            # where the host's time goes: CPU-side ops and CUDA runtime calls (a sync or an allocation
            # inside the step shows here), then the Python functions (cProfile) for the scalar kind
            cpu = [e for e in averages if getattr(e, "self_cpu_time_total", 0) > 0]
            cpu.sort(key=lambda e: -e.self_cpu_time_total)
            lines.append(f"  host, top self CPU time per step (profiler on; total "
                         f"{sum(e.self_cpu_time_total for e in cpu) / reps:.1f} us):")
            for e in cpu[:14]:
                lines.append(f"  {e.self_cpu_time_total / reps:9.1f} us  x{e.count / reps:<5.1f} {e.key[:90]}")
            lines.extend(host)
            _atomic_write(os.path.join(out_dir, "profile.txt"), "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    _atomic_write(os.path.join(out_dir, "profile.txt"), "\n".join(lines) + "\n")


def bench_lookup(rows, args, device, budget, dims, facts: Dict, ext_only: bool = False) -> None:
    """Lookup forward and backward + rowwise Adagrad rows; ``facts`` (copy bandwidth, % of it) is updated
    as each row ends, so a section cut short keeps what it measured. ``ext_only``: only the CUDA
    extension's rows (section ``ext``, run last: a crash in-process, a segfault or a sticky CUDA error
    from a kernel that has not run on a GPU before, would end or spoil every later row)."""
    import sfg_fast.functional as SF
    timer = _timer(device, args.reps)

    def copy_body():
        megabytes = 8 if args.smoke else 1024
        gbps = common.copy_bandwidth_gbps(device, megabytes)
        facts["copy_gbps"] = gbps
        return {"gbps": gbps, "note": f"torch copy_ of a {megabytes} MB buffer (read + write bytes)"}
    if not ext_only or not facts.get("copy_gbps"):
        _attempt(rows, budget, _row("lookup", "-", "copy", "fwd"), copy_body)

    table, offsets = _shared_table(dims, args.dim, device)
    table = table.detach()
    ids_list = _shared_ids(args.batch, dims, device, args.rotations)
    counter = [0]
    # minimum bytes: every distinct row is read once (duplicate ids hit in cache), the [B, N, D] output
    # written, the ids read. Counting B*N row reads would inflate GB/s ~2x on Zipf ids.
    entries = args.batch * len(dims)
    unique_rows = sum(int(torch.unique(ids + offsets).numel()) for ids in ids_list) / len(ids_list)
    row_bytes = args.dim * table.element_size()
    moved = unique_rows * row_bytes + entries * (row_bytes + ids_list[0].element_size())
    facts["lookup_unique_rows_fraction"] = unique_rows / entries

    forward = (("ext-cuda", "cuda"),) if ext_only else (("fused", "triton"), ("factored", "torch"))
    for name, backend in forward:
        def body(backend=backend):
            from sfg_fast._backend import unavailable_reason
            if backend == "cuda" and args.skip_ext_cuda:
                raise common.Skip("--skip-ext-cuda (its tests failed before this run)")
            # (triton registers its kernels on first use, so only the extension is asked up front)
            reason = unavailable_reason(backend, "embedding_lookup", table.device) if backend == "cuda" else None
            if reason:
                raise common.Skip(reason)

            def call():
                counter[0] = (counter[0] + 1) % len(ids_list)
                SF.embedding_lookup(ids_list[counter[0]], table, offsets, "off", backend=backend)
            call()
            t = timer(call)
            gbps = moved / (t["median_ms"] * 1e-3) / 1e9
            out = {"median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"], "reps": t.get("reps"), "gbps": gbps}
            if facts.get("copy_gbps"):
                out["pct_copy_bw"] = 100.0 * gbps / facts["copy_gbps"]
            facts[f"lookup_{name}_pct"] = out.get("pct_copy_bw")
            return out
        _attempt(rows, budget, _row("lookup", "-", name, "fwd"), body)

    def graph_body():
        """The Triton lookup captured in CUDA graphs (one per id batch) and replayed: the kernel's own
        time. The eager row above is mostly Python launch cost at this size (10 MB out)."""
        if device != "cuda":
            raise common.Skip("CUDA graphs need a GPU")
        for ids in ids_list:          # compile and warm up outside the capture
            SF.embedding_lookup(ids, table, offsets, "off", backend="triton")
        torch.cuda.synchronize()
        graphs = []
        for ids in ids_list:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                SF.embedding_lookup(ids, table, offsets, "off", backend="triton")
            graphs.append(graph)

        def call():
            counter[0] = (counter[0] + 1) % len(graphs)
            graphs[counter[0]].replay()
        t = timer(call)
        gbps = moved / (t["median_ms"] * 1e-3) / 1e9
        out = {"median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"], "reps": t.get("reps"), "gbps": gbps,
               "note": "CUDA-graph replays (the kernel without Python launch cost)"}
        if facts.get("copy_gbps"):
            out["pct_copy_bw"] = 100.0 * gbps / facts["copy_gbps"]
        facts["lookup_fused_graph_pct"] = out.get("pct_copy_bw")
        return out
    if not ext_only:
        _attempt(rows, budget, _row("lookup", "-", "fused graph", "fwd"), graph_body)

    # backward + rowwise Adagrad from grad_V [B, N, D]: the Triton fused update, the CUDA extension's
    # sorted segment reduction (no atomics), and torch (unique rows + index_add + the update)
    from sfg_fast.optim import SparseRowOptimizer, unique_row_grads
    grads = [torch.randn(args.batch, len(dims), args.dim, device=device) for _ in ids_list]
    # minimum bytes: read grad_V and ids, read + write each distinct touched row and its accumulator
    update_bytes = entries * (args.dim * 4 + ids_list[0].element_size()) + unique_rows * 2 * (row_bytes + 4)

    def update_body(provider):
        def body():
            if provider == "fused map":
                return _with(_sparse_dedup("map"), update_body("fused"))
            weight = table.clone()
            opt = SparseRowOptimizer("adagrad", lr=0.01)
            momentum = torch.zeros(weight.shape[0], device=device)
            if provider == "ext-cuda":
                from sfg_fast.ops import cpu_ext
                if args.skip_ext_cuda:
                    raise common.Skip("--skip-ext-cuda (its tests failed before this run)")
                if device != "cuda" or not getattr(cpu_ext._C, "WITH_CUDA", False):
                    raise common.Skip("sfg_fast._C was not built with CUDA")

            def call():
                counter[0] = (counter[0] + 1) % len(ids_list)
                ids, g = ids_list[counter[0]], grads[counter[0]]
                if provider == "fused":
                    opt.step_lookup_triton(weight, g, ids, offsets)
                elif provider == "ext-cuda":
                    from sfg_fast.ops import cpu_ext
                    cpu_ext._C.rowwise_adagrad_update_cuda(weight, momentum, ids, offsets, g, 0.01, 1e-8)
                else:
                    rows_, summed = unique_row_grads(ids, offsets, g)
                    opt.step_rows(weight, rows_, summed)
            call()
            t = timer(call)
            return {"median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"], "reps": t.get("reps"),
                    "gbps": update_bytes / (t["median_ms"] * 1e-3) / 1e9,
                    "note": "rowwise Adagrad from grad_V; gbps: grad_V + ids + each distinct row and "
                            "accumulator read and written"}
        return body
    def update_graph_body(dedup="sort"):
        """The Triton fused update captured in CUDA graphs (one per id batch) and replayed: its GPU time
        (sort, segment ends, the two segment-reduction launches; or with ``dedup="map"`` the row map's
        claim, accumulate and update) without the launches' host cost."""
        if device != "cuda":
            raise common.Skip("CUDA graphs need a GPU")
        if dedup != "sort":
            with _sparse_dedup(dedup):
                out = update_graph_body()
            out["note"] += f"; SFG_FAST_SPARSE_DEDUP={dedup}"
            return out
        weight = table.clone()
        opt = SparseRowOptimizer("adagrad", lr=0.01)
        for ids, g in zip(ids_list, grads):       # compile and warm up outside the capture
            opt.step_lookup_triton(weight, g, ids, offsets)
        torch.cuda.synchronize()
        graphs = []
        for ids, g in zip(ids_list, grads):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step_lookup_triton(weight, g, ids, offsets)
            graphs.append(graph)

        def call():
            counter[0] = (counter[0] + 1) % len(graphs)
            graphs[counter[0]].replay()
        t = timer(call)
        return {"median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"], "reps": t.get("reps"),
                "gbps": update_bytes / (t["median_ms"] * 1e-3) / 1e9,
                "note": "CUDA-graph replays of the fused rowwise Adagrad update (bytes as above)"}
    for provider in ("ext-cuda",) if ext_only else ("fused", "fused map", "factored"):
        _attempt(rows, budget, _row("lookup", "-", provider, "bwd+adagrad"), update_body(provider))
    if not ext_only:
        _attempt(rows, budget, _row("lookup", "-", "fused graph", "bwd+adagrad"), update_graph_body)
        # the sort-free update (ops.embedding_lookup.SPARSE_DEDUP "map"): which one the default should be
        _attempt(rows, budget, _row("lookup", "-", "fused map graph", "bwd+adagrad"),
                 lambda: update_graph_body("map"))


def bench_step(rows, args, device, budget, dims, graph: bool = False, compiled: bool = False) -> None:
    """Full SFG-FwFM step: lookup (+ fused sparse Adagrad in backward), encoder, scalar decoder, BCE.
    ``graph``: the step captured in a CUDA graph; ``compiled``: the zoo FwFM compiled by Inductor (its
    compiles take tens of seconds of the budget: a section of its own, run late)."""
    import sfg_fast.functional as SF
    from sfg_fast import models
    from sfg_fast.nn import PairwiseDecoder, SFGEncoder
    from sfg_fast.optim import FusedFieldEmbedding
    timer = _timer(device, args.reps)
    batch, d, n = args.batch, args.dim, len(dims)
    ids_list = _shared_ids(batch, dims, device, args.rotations)
    gen = torch.Generator().manual_seed(2)
    labels_list = [(torch.rand(batch, generator=gen) < 0.25).float().to(device) for _ in ids_list]
    counter = [0]

    def next_batch():
        counter[0] = (counter[0] + 1) % len(ids_list)
        return ids_list[counter[0]], labels_list[counter[0]]

    def fused_body(one_op=False):
        backend = "triton"
        embedding = FusedFieldEmbedding(dims, d, optimizer="adagrad", lr=0.01, bounds_check="off",
                                        backend=backend).to(device)
        encoder = SFGEncoder(n, d, backend=backend).to(device)
        decoder = PairwiseDecoder(n, d, "scalar", backend=backend).to(device)
        dense = list(encoder.parameters()) + list(decoder.parameters())
        opt = torch.optim.Adagrad(dense, lr=0.01)

        def interaction(V):
            if not one_op:      # two ops: the encoder writes Z, the decoder scores it
                return decoder(encoder(V), V)
            # one op (what the FM-family models run): encoder and decoder in one GEMM pass
            return SF.sfg_interaction(V, encoder.weight, encoder.bias, decoder.weight, "scalar", encoder.activation,
                                      encoder.gamma, encoder.residual, backend=backend)

        def step():
            ids, labels = next_batch()
            V = embedding(ids)
            loss = SF.bce_with_logits(interaction(V), labels, backend=backend)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return _time_step(step)

    def graph_body(tf32=False, structured=None, bf16=False, dedup=None):
        """The one-op fused step captured whole in a CUDA graph (tests/test_cuda_graphs.py checks it
        trains like eager steps): replay cost is GPU time only, no Python or launch overhead. ``tf32``:
        captured with TF32 allowed (the Triton GEMMs in TF32); ``bf16``: the forward under
        torch.autocast(bfloat16) (the Triton GEMMs on bf16 operands, fp32 accumulation);
        ``structured``: ops.sfg_gemm.STRUCTURED_DECODER (default "graphs": the scalar decoder by its
        structure inside the capture on the exact-fp32 torch.mm path only; "never": the dense GEMM, the
        `fused cuda graph dense` row; "auto": by structure in the eager warm-up steps too, as the Triton
        GEMMs need, the `fused cuda graph tf32 structured` row)."""
        if device != "cuda":
            raise common.Skip("CUDA graphs need a GPU")
        from sfg_fast.ops import sfg_gemm
        with _tf32(tf32), _structured(structured):
            mode = sfg_gemm.STRUCTURED_DECODER
            label = {"never": " dense", "auto": " structured"}.get(structured, "")
            out = captured_step(label=label + (" bf16" if bf16 else "") + (f" {dedup}" if dedup else ""), bf16=bf16)
        if tf32:
            out["note"] += "; TF32 GEMMs"
        if bf16:
            out["note"] += "; forward under torch.autocast(bfloat16): bf16 GEMM operands"
        out["note"] += f"; STRUCTURED_DECODER={mode}"
        if dedup:
            out["note"] += f"; SFG_FAST_SPARSE_DEDUP={dedup} (the fused update without its sort)"
        return out

    def captured_step(label="", bf16=False):
        backend = "triton"
        embedding = FusedFieldEmbedding(dims, d, optimizer="adagrad", lr=0.01, bounds_check="off",
                                        backend=backend).to(device)
        encoder = SFGEncoder(n, d, backend=backend).to(device)
        decoder = PairwiseDecoder(n, d, "scalar", backend=backend).to(device)
        opt = torch.optim.Adagrad(list(encoder.parameters()) + list(decoder.parameters()), lr=0.01)
        static_ids, static_labels = (t.clone() for t in next_batch())

        def captured():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                V = embedding(static_ids)
                logit = SF.sfg_interaction(V, encoder.weight, encoder.bias, decoder.weight, "scalar",
                                           encoder.activation, encoder.gamma, encoder.residual, backend=backend)
                loss = SF.bce_with_logits(logit, static_labels, backend=backend)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                captured()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured()

        def step():
            ids, labels = next_batch()
            static_ids.copy_(ids)
            static_labels.copy_(labels)
            graph.replay()
        out = _time_step(step, peak=False)   # the graph's memory pool predates the peak counter's reset
        out["note"] = "fused sfg_interaction step captured in a CUDA graph; ids/labels copied in per step"
        _graph_kernels(step, ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee") + label)
        return out

    def _graph_kernels(step, precision, reps=10):
        """The kernels inside the replayed step (torch.profiler sees a graph's kernel nodes), as profile
        rows of kind step-graph: what the 20M samples/s target has to shrink. A failure here costs the
        rows, not the measurement above."""
        try:
            from torch.profiler import ProfilerActivity, profile
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    step()
                torch.cuda.synchronize()
            kernels = _kernel_events(prof.key_averages())
            total = sum(e.device_time_total for e in kernels) / reps
            rows.append(_row("profile", "step-graph", "all kernels", precision, median_ms=total / 1e3,
                             note="GPU time per replayed step, summed over its kernels"))
            for e in kernels[:12]:
                rows.append(_row("profile", "step-graph", e.key[:40], precision,
                                 median_ms=e.device_time_total / reps / 1e3,
                                 note=f"{e.count / reps:g} per step; {e.key[:120]}"))
        except Exception as exc:
            rows.append(_row("profile", "step-graph", "-", precision, status="error",
                             note=f"{type(exc).__name__}: {str(exc)[:200]}"))

    def deterministic(body):
        """The same step under torch.use_deterministic_algorithms(True, warn_only=True), the training job's
        default (sorted, atomic-free reductions): what exact repeatability costs."""
        def run():
            before = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled())
            torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                out = body()
            finally:
                torch.use_deterministic_algorithms(before[0], warn_only=before[1])
            from sfg_fast import _cublas
            out["note"] = ((out.get("note") or "") + "; exact-fp32 GEMMs in " +
                           ("cuBLAS (workspace fixed before CUDA started)" if _cublas.workspace_fixed() else
                            "Triton (cuBLAS workspace not fixed before CUDA started)")).lstrip("; ")
            return out
        return run

    def zoo_body(compiled=False, mode=None):
        """What `sfg-fast train --model fwfm --set embedding=fused` steps: the model zoo's FwFM with fused
        field and first-order tables (row-wise Adagrad in backward), Adam on the dense parameters;
        ``compiled``: the model under torch.compile(fullgraph=True), tables' lookup and update in the graph;
        ``mode``: an Inductor mode ("reduce-overhead": CUDA-graph trees, each step marked as a new one, as
        the training job's `compile: reduce-overhead` runs it)."""
        model = models.build("fwfm", dims, embedding_dim=d, generative=True, bounds_check="off",
                             embedding="fused").to(device)
        forward = model
        if compiled and device != "cuda" and not args.compile_on_cpu:
            raise common.Skip("torch.compile (Inductor) takes ~15 s per graph on CPU; GPU-only here "
                              "(--compile-on-cpu to force)")
        from sfg_fast.optim import GRAPH_ROW_UPDATE
        if compiled:
            torch._dynamo.reset()
            # torch < 2.13 cannot hold the tables' update in a graph: their lookups run between graphs
            forward = torch.compile(model, fullgraph=GRAPH_ROW_UPDATE, **({"mode": mode} if mode else {}))
        out = model_step(model, torch.optim.Adam(model.parameters(), lr=1e-3), forward,
                         mark_steps=mode in ("reduce-overhead", "max-autotune"))
        if compiled:
            out["note"] = ("torch.compile(model, fullgraph=True), Inductor" if GRAPH_ROW_UPDATE else
                           "torch.compile(model), Inductor; torch < 2.13: the fused lookups run between graphs")
            if mode:
                out["note"] += f"; mode={mode}"
        return out

    def literal_body():
        model = models.build("fwfm", dims, embedding_dim=d, generative=True, backend="reference",
                             bounds_check="off").to(device)
        out = model_step(model, torch.optim.Adagrad(model.parameters(), lr=0.01))
        out["note"] = ("the literal model with dense Adagrad over every parameter: its step sweeps the whole "
                       "table, which the fused rows' sparse update does not (speedups compare the two ways)")
        return out

    def model_step(model, opt, forward=None, mark_steps=False):
        forward = model if forward is None else forward

        def step():
            if mark_steps:
                torch.compiler.cudagraph_mark_step_begin()
            ids, labels = next_batch()
            loss = SF.bce_with_logits(forward(ids), labels, backend="torch")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return _time_step(step)

    def _time_step(step, peak=True):
        step()
        t = timer(step)
        out = {"median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"], "reps": t.get("reps"), "samples_per_s": batch / (t["median_ms"] * 1e-3)}
        peak_mb = _peak_mb(step, device) if peak else None
        if peak_mb is not None:
            out["peak_mb"] = peak_mb
        return out

    if graph:
        _attempt(rows, budget, _row("step", "scalar", "fused cuda graph", "train"), graph_body)
        _attempt(rows, budget, _row("step", "scalar", "fused cuda graph tf32", "train"),
                 lambda: graph_body(tf32=True))
        _attempt(rows, budget, _row("step", "scalar", "fused cuda graph dense", "train"),
                 lambda: graph_body(structured="never"))
        _attempt(rows, budget, _row("step", "scalar", "fused cuda graph tf32 structured", "train"),
                 lambda: graph_body(tf32=True, structured="auto"))
        _attempt(rows, budget, _row("step", "scalar", "fused cuda graph bf16 autocast", "train"),
                 lambda: graph_body(bf16=True))
        _attempt(rows, budget, _row("step", "scalar", "fused cuda graph bf16 autocast map", "train"),
                 lambda: _with(_sparse_dedup("map"), lambda: graph_body(bf16=True, dedup="map")))
        return
    if compiled:
        _attempt(rows, budget, _row("step", "scalar", "zoo fwfm embedding=fused compiled", "train"),
                 lambda: zoo_body(compiled=True), min_left=45.0)
        _attempt(rows, budget, _row("step", "scalar", "zoo fwfm embedding=fused reduce-overhead", "train"),
                 lambda: zoo_body(compiled=True, mode="reduce-overhead"), min_left=45.0)
        return

    _attempt(rows, budget, _row("step", "scalar", "fused", "train"), fused_body)
    _attempt(rows, budget, _row("step", "scalar", "fused sfg_interaction", "train"), lambda: fused_body(one_op=True))
    _attempt(rows, budget, _row("step", "scalar", "fused sfg_interaction structured", "train"),
             lambda: _with(_structured("auto"), lambda: fused_body(one_op=True)))
    _attempt(rows, budget, _row("step", "scalar", "fused sfg_interaction deterministic", "train"),
             deterministic(lambda: fused_body(one_op=True)))
    _attempt(rows, budget, _row("step", "scalar", "zoo fwfm embedding=fused", "train"), zoo_body)
    _attempt(rows, budget, _row("step", "scalar", "reference", "train"), literal_body)


# ---------------------------------------------------------------------------------------------
# summary


def add_speedups(rows: List[Dict]) -> None:
    ref = {(r["section"], r["kind"], r["mode"]): r["median_ms"] for r in rows
           if r["provider"] == "reference" and isinstance(r.get("median_ms"), float)}
    for r in rows:
        base = ref.get((r["section"], r["kind"], r["mode"]))
        if base and isinstance(r.get("median_ms"), float) and r["median_ms"] > 0:
            r["speedup_vs_reference"] = base / r["median_ms"]


def evaluate_targets(rows: List[Dict], facts: Dict, device: str) -> List[Dict]:
    """The Triton issue's targets, each with the measured value (None when not measured).

    They are GPU targets: on CPU the values are listed but ``met`` stays None."""
    def ms(kind, provider, mode, section="interaction"):
        for r in rows:
            if (r["section"], r["kind"], r["provider"], r["mode"]) == (section, kind, provider, mode) \
                    and isinstance(r.get("median_ms"), float):
                return r
        return None

    def ratio(slow, fast):
        return slow["median_ms"] / fast["median_ms"] if slow and fast else None

    out = []
    for kind in KINDS:
        fused, ref, comp = (ms(kind, p, "fwd+bwd") for p in ("fused", "reference", "compile_factored"))
        out.append({"target": f"{kind}: fused fwd+bwd >= 10x literal reference",
                    "value": ratio(ref, fused), "goal": 10.0})
        out.append({"target": f"{kind}: fused fwd+bwd >= 2x torch.compile(factored)",
                    "value": ratio(comp, fused), "goal": 2.0})
        if fused and ref and fused.get("peak_mb") and ref.get("peak_mb"):
            mem = ref["peak_mb"] / max(fused["peak_mb"], 1e-6)
        else:
            mem = None
        out.append({"target": f"{kind}: peak memory >= 20x below literal", "value": mem, "goal": 20.0})
    # the same 2x target on the SFG layer alone (from V, to dV: no dense table gradient on either side),
    # in exact fp32, with TF32 on both sides, and under bf16 autocast on both sides
    for kind in KINDS:
        for fused_name, comp_name, label in (("fused", "compile_factored", "fp32"),
                                            ("fused_tf32", "compile_factored_tf32", "tf32"),
                                            ("fused_bf16", "compile_factored_bf16", "bf16 autocast")):
            fused, comp = (ms(kind, p, "fwd+bwd", "interaction_v") for p in (fused_name, comp_name))
            out.append({"target": f"{kind} from V, {label}: fused fwd+bwd >= 2x torch.compile(factored)",
                        "value": ratio(comp, fused), "goal": 2.0})
    # the kernel's bandwidth (graph replays) where measured: the eager call at 10 MB is launch cost
    graphed = facts.get("lookup_fused_graph_pct")
    out.append({"target": "lookup fwd >= 60% of copy bandwidth" + (" (graph replay)" if graphed else ""),
                "value": graphed if graphed is not None else facts.get("lookup_fused_pct"), "goal": 60.0})
    steps = [r for r in rows if r["section"] == "step" and r["provider"].startswith("fused")
             and isinstance(r.get("samples_per_s"), float)]
    # the fastest fused form at any precision the issue allows (TF32 / bf16: the row's name says which),
    # and the fastest in exact fp32, so that a reduced-precision row alone never reads as the fp32 result
    exact = [r for r in steps if not any(word in r["provider"] for word in ("tf32", "bf16"))]
    for label, candidates in (("", steps), (", exact fp32", exact)):
        step = max(candidates, key=lambda r: r["samples_per_s"]) if candidates else None
        out.append({"target": f"SFG-FwFM step{label} >= 20M samples/s" + (f" ({step['provider']})" if step else ""),
                    "value": step["samples_per_s"] / 1e6 if step else None, "goal": 20.0})
    for t in out:
        t["met"] = None if (t["value"] is None or device != "cuda") else bool(t["value"] >= t["goal"])
    return out


def summary_markdown(env: Dict, shape: Dict, pre: Dict, rows: List[Dict], targets: List[Dict]) -> str:
    lines = [f"# GPU check: {env.get('device_name')}", "",
             f"torch {env['torch']} | triton {env['triton']} | CUDA {env.get('cuda_runtime')} | "
             f"git {env['git_sha']} | {env['date']}", "",
             "Shape: " + ", ".join(f"{k}={v}" for k, v in shape.items()), ""]
    for name, result in pre.items():
        lines.append(f"- {name}: {result.get('status')} {result.get('note', '')}".rstrip())
    lines += ["", common.markdown_table(rows, COLUMNS), "", "| target | value | goal | met |", "|---|---|---|---|"]
    for t in targets:
        value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {t['met']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 rep, CPU-runnable (for tests)")
    p.add_argument("--vocab-scale", type=float, default=None,
                   help="scale of the Criteo vocabularies (1.0 = 33.8M rows; default 1.0, smoke 1e-5)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 4096, smoke 16)")
    p.add_argument("--fields", type=int, default=None, help="number of fields (default 39, smoke 5)")
    p.add_argument("--dim", type=int, default=None, help="embedding dim (default 16, smoke 4)")
    p.add_argument("--reps", type=int, default=None, help="do_bench rep in ms on CUDA / repetitions on CPU")
    p.add_argument("--rotations", type=int, default=None, help="id batches cycled so caches don't flatter")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results/<device>/)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the GPU test suite first")
    p.add_argument("--pre", action="append", default=[], metavar="NAME=NOTE",
                   help="a fact from the caller recorded with the results, e.g. gpu_tests='rc=0 in 80 s' "
                        "(gpu_check.sh passes its test and build results); repeatable")
    p.add_argument("--skip-ext-cuda", action="store_true",
                   help="leave out the CUDA extension's rows (gpu_check.sh sets it when its tests failed: a "
                        "crash in-process would end every later section)")
    p.add_argument("--tests-timeout", type=int, default=120, help="seconds for the GPU tests (default 120)")
    p.add_argument("--build-ext", action="store_true", help="build sfg_fast._C first (optional)")
    p.add_argument("--build-timeout", type=int, default=120, help="seconds for the extension build")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the benchmarks; later providers are skipped when spent (default 180)")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the torch.compile baselines on CPU too")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated sections to run, in this order (graph: the step captured in CUDA "
                        "graphs; ext: the CUDA extension's lookup rows; compiled_step: the zoo FwFM step under "
                        "torch.compile, tens of seconds of compiling)")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(vocab_scale=1e-5 if smoke else 1.0, batch=16 if smoke else 4096, fields=5 if smoke else 39,
                    dim=4 if smoke else 16, reps=1 if smoke else 100, rotations=2 if smoke else 4,
                    budget=120.0 if smoke else 180.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cuda" if HAS_CUDA else "cpu"
    env = _device_info(device)
    print(f"device: {env.get('device_name')} ({device}) | torch {env['torch']} | triton {env['triton']} | "
          f"CUDA {env['cuda_runtime']} | git {env['git_sha']} | python {env['python']}", flush=True)
    if device != "cuda":
        print("no CUDA device: GPU timings (do_bench), peak GPU memory, the GPU tests and the torch.compile "
              "baselines are skipped; Triton runs through the interpreter on tiny shapes only", flush=True)
    pre: Dict[str, Dict] = {}
    if args.build_ext:
        pre["build_ext"] = build_extension(args.build_timeout)
        print(f"build_ext: {pre['build_ext']['status']}", flush=True)
    for item in args.pre:
        name, _, note = item.partition("=")
        pre[name.strip()] = {"status": "reported", "note": note.strip()}
    if args.skip_tests:
        pre.setdefault("gpu_tests", {"status": "skipped", "note": "--skip-tests"})
    else:
        pre["gpu_tests"] = run_gpu_tests(device, args.tests_timeout)
    print(f"gpu tests: {pre['gpu_tests']['status']} {pre['gpu_tests'].get('note', '')}", flush=True)
    for line in pre["gpu_tests"].get("tail", [])[-5:]:
        print(f"    {line}")

    dims = common.field_dims_for(args.fields, args.vocab_scale)
    shape = {"B": args.batch, "N": len(dims), "D": args.dim, "rows": sum(dims), "vocab_scale": args.vocab_scale,
             "ids": "zipf(1.05)", "dtype": "float32", "allow_tf32": os.environ.get("SFG_FAST_ALLOW_TF32", "0")}
    print("shape: " + ", ".join(f"{k}={v}" for k, v in shape.items()), flush=True)
    budget = Budget(args.budget)
    rows: List[Dict] = []
    facts: Dict = {}
    out_dir = args.out or os.environ.get("OUT") or os.path.join(ROOT, "bench", "results", _device_dir(env))
    os.makedirs(out_dir, exist_ok=True)
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    path = os.path.join(out_dir, f"gpu_check-{stamp}.json")

    def save(complete: bool) -> str:
        """Rewritten after every section, so a run cut short by its time limit still leaves results."""
        add_speedups(rows)
        targets = evaluate_targets(rows, facts, device)
        markdown = summary_markdown(env, shape, pre, rows, targets)
        _atomic_write(path, json.dumps({"benchmark": "gpu_check", "env": env, "shape": shape, "pre": pre,
                                        "rows": rows, "targets": targets, "smoke": args.smoke,
                                        "complete": complete}, indent=2, default=str))
        _atomic_write(path[:-5] + ".md", markdown)
        return markdown

    global _SAVE_HOOK
    _SAVE_HOOK = lambda: save(complete=False)  # noqa: E731
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for section in sections:
        try:
            if section == "interaction":
                bench_interaction(rows, args, device, budget, dims)
            elif section == "interaction_v":
                bench_interaction(rows, args, device, budget, dims, source="V")
            elif section == "lookup":
                bench_lookup(rows, args, device, budget, dims, facts)
            elif section == "ext":
                bench_lookup(rows, args, device, budget, dims, facts, ext_only=True)
            elif section == "compiled_step":
                bench_step(rows, args, device, budget, dims, compiled=True)
            elif section == "step":
                bench_step(rows, args, device, budget, dims)
            elif section == "graph":
                bench_step(rows, args, device, budget, dims, graph=True)
            elif section == "sweep":
                bench_sweep(rows, args, device, budget, dims)
            elif section == "profile":
                bench_profile(rows, args, device, budget, dims, out_dir)
            else:
                raise ValueError(f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
        except Exception as exc:   # a whole section failing (e.g. out of memory building its table)
            rows.append(_row(section, "-", "-", "-", status="error", note=f"{type(exc).__name__}: {exc}"[:240]))
            traceback.print_exc(limit=3)
        save(complete=False)
    markdown = save(complete=True)
    print()
    print(markdown)
    print(f"wrote {path}")
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        print(f"{len(errors)} rows failed (status error); see their notes above", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
