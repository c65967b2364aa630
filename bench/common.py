"""Shared benchmark harness: environment facts, timing, memory, result files.

Every result row carries the device, library versions and git SHA. CPU timings are medians of
repeated calls after warm-up (with the inter-quartile range); GPU timings use
triton.testing.do_bench when available. Compare providers only within one run.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import time
from typing import Callable, Dict, Iterable, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_sha() -> str:
    """Short SHA of HEAD, + "-dirty" when tracked files differ from it or files git does not ignore are
    untracked (result files under bench/results aside: a run must not make the next one dirty).

    SFG_FAST_GIT_SHA overrides it, marked "(given)": a copy of the working tree on a remote GPU machine
    can carry a stale .git, so the GPU check is started with the SHA spelled out; set it only to the
    commit of a clean tree."""
    if os.environ.get("SFG_FAST_GIT_SHA"):
        return os.environ["SFG_FAST_GIT_SHA"] + " (given)"
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                                      stderr=subprocess.DEVNULL).decode().strip()
        status = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=normal", "--", ".",
                                          ":(exclude)bench/results"], cwd=ROOT,
                                         stderr=subprocess.DEVNULL).decode().strip()
        return sha + ("-dirty" if status else "")
    except Exception:
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def environment(device: str = "cpu") -> Dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    import sfg_fast
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "sfg_fast": sfg_fast.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = f"{cpu_model()} ({os.cpu_count()} logical cpus)"
    return env


def time_cpu(fn: Callable[[], object], warmup: int = 2, reps: int = 7, min_seconds: float = 0.0) -> Dict:
    """Median and IQR (ms) of ``fn()`` wall time after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < reps or (time.perf_counter() - start) < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 10 * reps:
            break
    return median_iqr(samples)


def median_iqr(samples: List[float]) -> Dict:
    """``{"median_ms", "iqr_ms", "reps"}`` of timing samples. Quartiles by linear interpolation between
    the samples ("inclusive", numpy's default): the "exclusive" method reaches past the sample range, so
    one outlier among 5 reps would inflate the IQR (and the regression gate's noise) 25-fold."""
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) >= 2 else [samples[0]] * 3
    return {"median_ms": statistics.median(samples), "iqr_ms": q[2] - q[0], "reps": len(samples)}


def time_gpu(fn: Callable[[], object], warmup: int = 25, rep: int = 100, min_calls: int = 5) -> Dict:
    """Median and IQR (ms) from triton.testing.do_bench (flushes L2 between calls). ``warmup`` and
    ``rep`` are do_bench's milliseconds of warm-up and of measurement; ``reps`` in the result is the
    number of timed calls that fitted in them (what the regression gate's noise estimate needs). A call
    slower than ``rep / min_calls`` (the literal reference: ~100 ms) would be timed once or twice, a
    "median" of one sample: it is timed again with ``rep`` stretched to fit ``min_calls`` calls."""
    from triton.testing import do_bench
    times = [float(t) for t in do_bench(fn, warmup=warmup, rep=rep, return_mode="all")]
    if len(times) < min_calls:
        stretched = math.ceil(1.2 * min_calls * statistics.median(times)) + 1
        times = [float(t) for t in do_bench(fn, warmup=0, rep=stretched, return_mode="all")]
    return median_iqr(sorted(times))


def saved_tensor_bytes(fn: Callable[[], torch.Tensor], persistent: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward while running ``fn`` (exact activation memory). Tensors that share
    storage with ``persistent`` (parameters, buffers, optimizer state: saved by reference, they cost no
    memory) are not counted."""
    total = [0]
    seen = set()
    kept = {t.untyped_storage().data_ptr() for t in persistent if t.numel()}

    def pack(t):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.numel() and t.untyped_storage().data_ptr() in kept:
            return t
        if key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total[0]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB, Linux ru_maxrss is in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_results(name: str, rows: List[Dict], env: Dict, summary_md: str = "", out_dir: Optional[str] = None,
                  command: Optional[str] = None) -> str:
    """Write rows + env (+ the command line) as JSON under ``out_dir`` (default bench/results/<device>/)
    and a markdown twin. Returns the JSON path."""
    if out_dir is None:
        out_dir = os.path.join(ROOT, "bench", "results", env["device"])
    os.makedirs(out_dir, exist_ok=True)
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    path = os.path.join(out_dir, f"{name}-{stamp}.json")
    if command is None:
        import sys
        command = "python " + " ".join(sys.argv)
    with open(path, "w") as fh:
        json.dump({"benchmark": name, "command": command, "env": env, "rows": rows}, fh, indent=2)
    if summary_md:
        with open(path[:-5] + ".md", "w") as fh:
            fh.write(summary_md)
    return path


def print_and_save(name: str, lines: List[str], rows: List[Dict], env: Dict, save: bool = True) -> str:
    """Print the markdown report ``lines`` and, when ``save``, write it with ``rows`` (:func:`write_results`)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if save:
        print(f"saved {write_results(name, rows, env, text)}")
    return text


def _fmt(v: float) -> str:
    """3 significant digits without exponents in the usual range (1234.5 -> 1234, 0.01234 -> 0.0123)."""
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:.0f}"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.3g}"


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(_fmt(v) if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Suite harness shared by the bench_*.py scripts: arguments, providers, measurement, output.
# ---------------------------------------------------------------------------------------------

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

# Fields of every result row, in print order; scripts add their own shape fields before these.
ROW_FIELDS = ["provider", "status", "median_ms", "iqr_ms", "reps", "ratio_vs_literal", "saved_mb",
              "peak_mb", "gbps", "gflops", "pct_copy_bw", "pct_peak_flops", "compile_s", "reason"]

# Block configs (SFG_FAST_GEMM_BLOCKS = BM,BN,BK,warps,stages) of the GEMM-shaped Triton kernels that
# bench/gpu_check.py times and bench/triton_aot.py --sweep compiles. Kept here so that neither has to
# import the other (gpu_check turns the Triton interpreter on when it finds no GPU).
# 64,64,32,8,3: the default tiles on 8 warps, the one fp32 (ieee) config of these whose encoder+decoder
# forward kernel compiles without register spills for sm_90 (bench/triton_aot.py --sweep; the 4-warp
# default uses 255 registers and spills 52 bytes)
GEMM_SWEEP = ["64,64,32,4,3", "64,64,32,8,3", "128,64,32,4,3", "64,128,32,4,3", "128,128,32,8,3", "64,64,64,4,3",
              "128,64,64,8,3", "32,64,32,4,3", "64,64,16,4,4"]

# Nominal H100 SXM rooflines (HBM3 3.35 TB/s, dense fp32 67 and TF32 495 TFLOP/s). CPU rows are set against the measured copy bandwidth.
GPU_ROOFLINE = {"hbm_gbps": 3350.0, "fp32_gflops": 67000.0, "tf32_gflops": 495000.0}
LITERAL = "literal"


class Skip(Exception):
    """A provider cannot run here; the message is the reason shown in the results."""


def set_threads(threads: int) -> int:
    """Fix the intra-op thread count so CPU timings are comparable between runs."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def parse_args(description: str, argv: Optional[Sequence[str]] = None,
               extra: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    """The options every bench script shares (plus ``extra(parser)`` for its own)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"], help="where to run (default: cuda when available)")
    p.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (default 2)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, one timed iteration: checks that every provider runs")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (CPU)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    p.add_argument("--providers", default="", help="comma-separated provider names to run (default all)")
    p.add_argument("--vocab-scale", type=float, default=None,
                   help="scale of the Criteo-like vocabularies (default 1 on GPU, 0.01 on CPU)")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--out-dir", default=None, help="results folder (default bench/results/<device>)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    if args.reps is None:
        args.reps = 1 if args.smoke else (5 if args.quick else 15)
    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    if args.vocab_scale is None:
        args.vocab_scale = 1.0 if args.device == "cuda" else 0.01
    if not (args.vocab_scale > 0):
        p.error(f"--vocab-scale must be > 0, got {args.vocab_scale}")
    args.threads = set_threads(args.threads)
    return args


# Criteo's 39 fields (13 bucketised numeric + 26 categorical) with vocabularies summing to ~33.8M
# rows: mostly small fields plus a few of millions, the skew that decides gather cost.
CRITEO_FIELD_DIMS = [64, 101, 126, 51, 222, 142, 90, 78, 105, 37, 12, 52, 64,
                     1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
                     3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
AVAZU_FIELD_DIMS = [241, 8, 8, 3697, 4614, 25, 5481, 329, 31, 381763, 1611748, 6793, 6, 5, 2509, 9, 10,
                    432, 5, 68, 169, 61, 1000, 100]


def field_dims_for(num_fields: int, scale: float = 1.0, dataset: str = "criteo") -> List[int]:
    """Criteo-like (or Avazu-like) vocabularies for ``num_fields`` fields, scaled by ``scale``.

    More fields than the dataset has repeat its list; every field keeps at least 2 rows.
    """
    base = AVAZU_FIELD_DIMS if dataset == "avazu" else CRITEO_FIELD_DIMS
    dims = [base[f % len(base)] for f in range(num_fields)]
    return [max(2, int(round(x * scale))) for x in dims]


def make_ids(batch: int, field_dims: Sequence[int], dist: str = "uniform", alpha: float = 1.05,
             device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """int64 ``[B, N]`` field-local ids, uniform or Zipf(alpha)-skewed per field (hot ids first)."""
    if dist not in ("uniform", "zipf"):
        raise ValueError(f"dist must be 'uniform' or 'zipf', got {dist!r}")
    gen = torch.Generator().manual_seed(seed)
    cols = []
    for size in field_dims:
        if dist == "uniform":
            cols.append(torch.randint(0, size, (batch,), generator=gen))
        else:
            # Inverse-CDF sampling of a truncated Zipf law keeps this O(B) even for 10M-row fields.
            u = torch.rand(batch, generator=gen, dtype=torch.float64)
            if abs(alpha - 1.0) < 1e-9:
                rank = torch.exp(u * math.log(size))
            else:
                top = size ** (1.0 - alpha)
                rank = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - alpha))
            cols.append((rank.floor().to(torch.int64) - 1).clamp_(0, size - 1))
    return torch.stack(cols, dim=1).to(device)


def copy_bandwidth_gbps(device: str = "cpu", megabytes: int = 64) -> float:
    """Measured copy bandwidth (read + write bytes per second): the practical memory roofline here."""
    n = megabytes * (1 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    t = time_gpu(fn) if device == "cuda" else time_cpu(fn, warmup=2, reps=9)
    return 2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9


def peak_alloc_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated by torch while ``fn()`` runs, above what was live before it.

    GPU: torch.cuda.max_memory_allocated. CPU: the allocation/free events of the profiler, summed in
    time order (RSS cannot tell providers apart inside one process: it never goes down).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@dataclass
class Case:
    """One benchmark shape: ``params`` go into every row; ``providers`` maps name -> factory.

    A factory builds the inputs and returns a :class:`Workload` (or raises :class:`Skip`).
    ``flops`` / ``bytes`` model the minimum work of the measured call, the same for every provider,
    so GFLOP/s and GB/s compare providers on equal terms.
    """
    params: Dict[str, Any]
    providers: Dict[str, Callable[[], "Workload"]]
    flops: float = 0.0
    bytes: float = 0.0


@dataclass
class Workload:
    """``step()`` is what gets timed; ``forward()`` (optional) returns the autograd output whose saved
    tensors are counted; ``compiled`` marks torch.compile providers (first call timed as compile)."""
    step: Callable[[], object]
    forward: Optional[Callable[[], object]] = None
    compiled: bool = False
    info: Dict[str, Any] = field(default_factory=dict)
    persistent: Callable[[], Iterable[torch.Tensor]] = tuple   # tensors saved_mb does not count


def model_state_tensors(model: torch.nn.Module) -> List[torch.Tensor]:
    """A model's parameters, buffers and its fused tables' optimizer state (step counters included)."""
    out = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        optimizer = getattr(module, "optimizer", None)
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict):
            out += [t for t in state.values() if isinstance(t, torch.Tensor)]
            out += [t for t in (getattr(optimizer, "_step", None),) if isinstance(t, torch.Tensor)]
    return out


def compile_fn(fn: Callable, device: str) -> Callable:
    """torch.compile, turning a missing compiler toolchain into a Skip with its reason."""
    if not hasattr(torch, "compile"):
        raise Skip("torch.compile is not available in this torch build")
    if device == "cpu":
        import shutil
        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            raise Skip("torch.compile on CPU needs a C++ compiler (none on PATH)")
    return torch.compile(fn)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(work: Workload, args: argparse.Namespace, memory: bool = True) -> Dict[str, Any]:
    """Time ``work.step`` (median, IQR), plus saved-activation bytes and peak allocated bytes."""
    out: Dict[str, Any] = {}
    if work.compiled:
        t0 = time.perf_counter()
        try:
            work.step()
            sync(args.device)
        except Exception as exc:  # a compiler failure is a fact about the peer, not a bench error
            raise Skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        out["compile_s"] = time.perf_counter() - t0
    if args.device == "cuda":
        if args.smoke:
            t0 = time.perf_counter()
            work.step()
            sync("cuda")
            t = {"median_ms": (time.perf_counter() - t0) * 1e3, "iqr_ms": 0.0, "reps": 1}
        else:
            t = time_gpu(work.step, warmup=10 if args.quick else 25, rep=50 if args.quick else 100)
    else:
        t = time_cpu(work.step, warmup=0 if args.smoke else 2, reps=args.reps)
    out.update(t)
    if memory:
        if work.forward is not None:
            out["saved_mb"] = saved_tensor_bytes(work.forward, work.persistent()) / 2 ** 20
        out["peak_mb"] = peak_alloc_bytes(work.step, args.device) / 2 ** 20
    return out


def selected(name: str, args: argparse.Namespace) -> bool:
    if args.providers:
        wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
        if name not in wanted:
            return False
    if args.no_compile and "compile" in name.split("+"):    # torch+compile, torch+compile+fused-tables
        return False
    return True


def run_cases(benchmark: str, cases: Sequence[Case], args: argparse.Namespace, env: Dict,
              memory: bool = True, verbose: bool = True) -> List[Dict]:
    """Run every selected provider of every case; unavailable ones become 'skipped' rows with the reason.

    A provider that raises anything other than Skip becomes an 'error' row (the suite goes on, and
    the smoke test fails on it). On CPU the providers of a case are timed interleaved (rep by rep),
    so a noisy spell on a shared machine hits them alike; ratios are to the literal provider of
    the same case and run.
    """
    rows: List[Dict] = []
    for case in cases:
        case_rows, works = [], {}
        for name, factory in case.providers.items():
            if not selected(name, args):
                continue
            row = {"benchmark": benchmark, **case.params, "provider": name, "status": "ok"}
            try:
                work = factory()
                row.update(work.info)
                if work.compiled:
                    row["compile_s"] = _first_call(work, args.device)
                works[name] = work
            except Skip as exc:
                row.update(status="skipped", reason=str(exc))
            except Exception as exc:  # reported, not fatal: one broken provider must not hide the rest
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            case_rows.append(row)
        timings = _time_all(works, args)
        for row in case_rows:
            name = row["provider"]
            if row["status"] != "ok":
                continue
            try:
                if isinstance(timings.get(name), Exception):
                    raise timings[name]
                row.update(timings[name])
                if memory:
                    work = works[name]
                    if work.forward is not None:
                        row["saved_mb"] = saved_tensor_bytes(work.forward, work.persistent()) / 2 ** 20
                    row["peak_mb"] = peak_alloc_bytes(work.step, args.device) / 2 ** 20
            except Exception as exc:
                for k in ("median_ms", "iqr_ms", "reps", "saved_mb", "peak_mb"):
                    row.pop(k, None)
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        works = None
        for row in case_rows:
            _add_rates(row, case, args, env)
            for k in ("device", "device_name", "torch", "triton", "git_sha", "threads"):
                row[k] = env.get(k)
            if verbose:
                print(_one_line(row), flush=True)
        literal = next((r for r in case_rows if r["provider"] == LITERAL and r["status"] == "ok"), None)
        for r in case_rows:
            if literal is not None and r["status"] == "ok":
                r["ratio_vs_literal"] = r["median_ms"] / literal["median_ms"]
        rows.extend(case_rows)
    return rows


def _no_compile_caches():
    import contextlib
    try:
        from torch._inductor import config as inductor_config
        return inductor_config.patch(force_disable_caches=True)
    except (ImportError, AttributeError, RuntimeError):
        return contextlib.nullcontext()


def _first_call(work: Workload, device: str) -> float:
    """Run a torch.compile provider once (that call compiles); a compiler failure becomes a Skip."""
    # Drop graphs cached by an earlier case so compile_s is the real compile cost, not a cache hit.
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        # Inductor's on-disk caches would turn a repeated run's compile into a cache hit
        with _no_compile_caches():
            work.step()
        sync(device)
    except Exception as exc:  # a compiler failure is a fact about the peer, not a bench error
        raise Skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return time.perf_counter() - t0


def _time_all(works: Dict[str, Workload], args: argparse.Namespace) -> Dict[str, Any]:
    """Timing stats per provider (or the exception it raised while being timed)."""
    out: Dict[str, Any] = {}
    if args.device == "cuda":
        for name, work in works.items():
            try:
                if args.smoke:
                    t0 = time.perf_counter()
                    work.step()
                    sync("cuda")
                    out[name] = {"median_ms": (time.perf_counter() - t0) * 1e3, "iqr_ms": 0.0, "reps": 1}
                else:
                    out[name] = time_gpu(work.step, warmup=10 if args.quick else 25, rep=50 if args.quick else 100)
            except Exception as exc:
                out[name] = exc
        return out
    # Warm-up each alone first, so a provider that fails is reported without stopping the others.
    ready = {}
    for name, work in works.items():
        try:
            for _ in range(0 if args.smoke else 2):
                work.step()
            ready[name] = work.step
        except Exception as exc:
            out[name] = exc
    if ready:
        out.update(time_interleaved(ready, warmup=0, reps=args.reps))
    return out


def _add_rates(row: Dict, case: Case, args: argparse.Namespace, env: Dict) -> None:
    if row["status"] != "ok" or not row.get("median_ms"):
        return
    copy_bw = env.get("copy_gbps")
    sec = row["median_ms"] * 1e-3
    if case.bytes:
        row["gbps"] = case.bytes / sec / 1e9
        # against the copy bandwidth measured on this device in this run; the H100's nominal
        # HBM figure only when none was measured
        if copy_bw:
            row["pct_copy_bw"] = 100 * row["gbps"] / copy_bw
        elif args.device == "cuda":
            row["pct_copy_bw"] = 100 * row["gbps"] / GPU_ROOFLINE["hbm_gbps"]
    if case.flops:
        row["gflops"] = case.flops / sec / 1e9
        if args.device == "cuda":
            row["pct_peak_flops"] = 100 * row["gflops"] / GPU_ROOFLINE["fp32_gflops"]


def _one_line(row: Dict) -> str:
    shape = " ".join(f"{k}={v}" for k, v in row.items()
                     if k not in ROW_FIELDS and k not in ("benchmark", "device", "device_name", "torch",
                                                          "triton", "git_sha", "threads"))
    if row["status"] != "ok":
        return f"  [{row['benchmark']}] {shape} {row['provider']}: {row['status']} ({row.get('reason')})"
    extra = f" saved={row['saved_mb']:.1f}MB" if "saved_mb" in row else ""
    extra += f" peak={row['peak_mb']:.1f}MB" if "peak_mb" in row else ""
    extra += f" compile={row['compile_s']:.1f}s" if "compile_s" in row else ""
    return (f"  [{row['benchmark']}] {shape} {row['provider']}: {row['median_ms']:.3f} ms "
            f"(IQR {row['iqr_ms']:.3f}, n={row['reps']}){extra}")


def bench_env(args: argparse.Namespace) -> Dict:
    """environment() plus the measured copy bandwidth (skipped in smoke mode to keep it fast)."""
    env = environment(args.device)
    env["mode"] = "smoke" if args.smoke else ("quick" if args.quick else "full")
    env["reps"] = args.reps
    env["vocab_scale"] = args.vocab_scale
    if not args.smoke:
        env["copy_gbps"] = copy_bandwidth_gbps(args.device)
    return env


def shape_columns(rows: List[Dict]) -> List[str]:
    skip = set(ROW_FIELDS) | {"benchmark", "device", "device_name", "torch", "triton", "git_sha", "threads"}
    cols: List[str] = []
    for r in rows:
        for k in r:
            if k not in skip and k not in cols:
                cols.append(k)
    return cols


def summary_markdown(title: str, rows: List[Dict], env: Dict, command: str = "") -> str:
    """Markdown: environment line, the result table, then skipped providers with their reasons."""
    ok = [r for r in rows if r["status"] == "ok"]
    not_ok = [r for r in rows if r["status"] != "ok"]
    cols = shape_columns(rows) + [c for c in ["provider", "median_ms", "iqr_ms", "ratio_vs_literal",
                                              "saved_mb", "peak_mb", "gbps", "gflops", "pct_copy_bw",
                                              "pct_peak_flops", "compile_s"]
                                  if c == "provider" or c in shape_columns(rows) or any(c in r for r in ok)]
    md = [f"## {title}", ""]
    md.append(f"device: {env.get('device_name')} ({env.get('device')}, {env.get('threads')} threads); "
              f"torch {env.get('torch')}, triton {env.get('triton')}, sfg_fast {env.get('sfg_fast')}, "
              f"git {env.get('git_sha')}, {env.get('date')}, mode {env.get('mode')}"
              + (f", copy bandwidth {env['copy_gbps']:.1f} GB/s" if env.get("copy_gbps") else ""))
    if command:
        md += ["", f"command: `{command}`"]
    md += ["", markdown_table(ok, cols)]
    if not_ok:
        seen = set()
        md.append("Not measured:\n")
        for r in not_ok:
            key = (r["provider"], r["status"], r.get("reason"))
            if key not in seen:
                seen.add(key)
                md.append(f"- {r['provider']}: {r['status']} -- {r.get('reason')}")
        md.append("")
    return "\n".join(md)


def finish(name: str, title: str, rows: List[Dict], env: Dict, args: argparse.Namespace,
           plots: Optional[Callable[[List[Dict], str], List[str]]] = None) -> Optional[str]:
    """Print the markdown summary; write JSON + markdown (and plots) unless --no-write."""
    command = command_line(name, args)
    md = summary_markdown(title, rows, env, command)
    print(md)
    if args.no_write:
        return None
    path = write_results(name, rows, env, md, args.out_dir, command)
    if plots is not None and not args.no_plots and not args.smoke:
        try:
            for png in plots(rows, path[:-5]):
                print(f"plot: {png}")
        except ImportError as exc:
            print(f"plots skipped: {exc}")
    print(f"results: {path}")
    return path


def command_line(name: str, args: argparse.Namespace) -> str:
    """The command that produced a run: the argv given to the script's main() (sys.argv when None)."""
    import sys
    argv = getattr(args, "argv", None)
    return ("python -m bench." + name + " " + " ".join(sys.argv[1:] if argv is None else argv)).strip()


def time_interleaved(fns: Dict[str, Callable[[], object]], warmup: int = 1, reps: int = 15) -> Dict[str, Dict]:
    """Median and IQR (ms) of each ``fns[name]()``, alternating the callables rep by rep.

    On a shared, noisy machine a slow spell then hits every provider alike, so the ratios of the
    medians stay trustworthy even when the absolute times drift.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: median_iqr(s) for name, s in samples.items()}
