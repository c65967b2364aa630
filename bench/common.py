"""Shared benchmark harness: environment facts, timing, memory, result files.

Every result row carries the device, library versions and git SHA. CPU timings are medians of
repeated calls after warm-up (with the inter-quartile range); GPU timings use
triton.testing.do_bench when available. Compare providers only within one run.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_sha() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                                      stderr=subprocess.DEVNULL).decode().strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, stderr=subprocess.DEVNULL)
        return sha + ("-dirty" if dirty else "")
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
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"median_ms": statistics.median(samples), "iqr_ms": q[2] - q[0], "reps": len(samples)}


def time_gpu(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> Dict:
    """Median and quartiles (ms) from triton.testing.do_bench (flushes L2 between calls)."""
    from triton.testing import do_bench
    q1, med, q3 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.25, 0.5, 0.75])
    return {"median_ms": med, "iqr_ms": q3 - q1, "reps": rep}


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves for backward while running ``fn`` (exact activation memory)."""
    total = [0]
    seen = set()

    def pack(t):
        key = (t.data_ptr(), t.numel(), t.dtype)
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


def write_results(name: str, rows: List[Dict], env: Dict, summary_md: str = "") -> str:
    """Write rows + env as JSON under bench/results/<device>/ and a markdown twin. Returns the JSON path."""
    device_dir = env["device"] if env["device"] != "cpu" else "cpu"
    out_dir = os.path.join(ROOT, "bench", "results", device_dir)
    os.makedirs(out_dir, exist_ok=True)
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    path = os.path.join(out_dir, f"{name}-{stamp}.json")
    with open(path, "w") as fh:
        json.dump({"benchmark": name, "env": env, "rows": rows}, fh, indent=2)
    if summary_md:
        with open(path[:-5] + ".md", "w") as fh:
            fh.write(summary_md)
    return path


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
