"""AddressSanitizer + UndefinedBehaviorSanitizer run of the compiled CPU kernels (csrc/*.cpp).

The test builds csrc/ with -fsanitize=address,undefined into build/sfg_fast_asan (ninja keeps the
objects, so a rerun after no source change only links) through torch.utils.cpp_extension.load,
then, in a subprocess where the sanitized build stands in for sfg_fast._C, calls every entry
point of the extension (lookup in every bounds mode, int8 lookup, the sparse update of every kind
with duplicate ids, sfg_logits on fp32, bf16 and int8 tables for every decoder kind, activation,
pair set and tile size, and the error paths) and runs the CPU tests (tests/test_cpu_ext.py,
tests/test_sparse_optim.py, tests/test_serving.py), and requires zero sanitizer reports.

Python is not instrumented, so the subprocess runs with LD_PRELOAD of gcc's libasan (ASan must be
the first library loaded) followed by libstdc++ (ASan resolves its C++ exception interceptor at
start-up; without libstdc++ loaded by then, the first C++ throw aborts with a CHECK failure).
Leak detection is off (ASAN_OPTIONS=detect_leaks=0): torch, pybind11 and the interpreter keep
global allocations alive until exit, which LeakSanitizer would report without any fault in this
package. A second run calls a deliberate one-past-the-end read compiled into sanitizer builds only
(`_sanitizer_canary`), which must be reported, so a build in which the sanitizer is not live fails
the test.

The sanitized build alone takes minutes on a 2-core machine, so the test runs only when
SFG_FAST_ASAN=1. The same check from a shell:

    SFG_FAST_ASAN=1 python -m pytest tests/test_asan.py -q

or, to install the sanitized extension in place of the normal one (then rebuild without it):

    SFG_FAST_SANITIZE=1 pip install --no-build-isolation -e .
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \\
        ASAN_OPTIONS=detect_leaks=0 \\
        python -m pytest tests/test_cpu_ext.py -q
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.path.join(ROOT, "build", "sfg_fast_asan")
MODULE = "sfg_fast_asan_C"
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
REPORT_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: ")


def _gcc_library(name):
    if shutil.which("gcc") is None:
        return None
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return os.path.realpath(path) if os.path.isabs(path) and os.path.exists(path) else None


def _preload():
    libs = [_gcc_library("libasan.so"), _gcc_library("libstdc++.so.6")]
    return None if None in libs else " ".join(libs)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SFG_FAST_ASAN") != "1",
                    reason="sanitizer build takes minutes: set SFG_FAST_ASAN=1 to run it")
@pytest.mark.skipif(_preload() is None, reason="gcc's libasan.so / libstdc++.so.6 not found (gcc -print-file-name)")
def test_cpu_extension_has_no_sanitizer_reports():
    log, returncode = _run_sanitized("--exercise")
    reports = [line for line in log.splitlines() if any(m in line for m in REPORT_MARKERS)]
    assert returncode == 0, f"sanitized run failed (rc {returncode}):\n{log[-8000:]}"
    assert not reports, "sanitizer reports:\n" + "\n".join(reports[:40])
    assert "exercised" in log and "CPU tests passed under the sanitizers" in log, log[-4000:]
    # The sanitizer is live: the sanitizer-only canary's one-past-the-end read is reported.
    log, returncode = _run_sanitized("--overflow")
    assert returncode != 0 and "heap-buffer-overflow" in log, log[-4000:]


def _run_sanitized(mode):
    env = dict(os.environ)
    env["LD_PRELOAD"] = _preload()
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1:detect_odr_violation=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["OMP_NUM_THREADS"] = "2"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    return proc.stdout + proc.stderr, proc.returncode


# ------------------------------------------------------------------ the sanitized subprocess body

def _build():
    """Build (or reuse) the sanitized extension and install it as sfg_fast._C for this process.
    Must run before anything imports sfg_fast, so that sfg_fast.ops.cpu_ext binds to it."""
    # The compilers must not inherit the ASan runtime: only this process needs it.
    os.environ.pop("LD_PRELOAD", None)
    import torch
    from torch.utils.cpp_extension import load
    assert "sfg_fast" not in sys.modules, "sfg_fast was imported before the sanitized extension"
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2] if x.isdigit())
    os.makedirs(BUILD_DIR, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    ext = load(name=MODULE, sources=sources, build_directory=BUILD_DIR, verbose=False,
               extra_cflags=["-O1", "-g", "-std=c++20" if version >= (2, 13) else "-std=c++17", "-fopenmp"]
               + SANITIZE, extra_ldflags=["-fopenmp"] + SANITIZE)
    sys.modules["sfg_fast._C"] = ext
    from sfg_fast.ops import cpu_ext
    assert cpu_ext._C is ext, "sfg_fast.ops.cpu_ext did not bind to the sanitized extension"
    return ext


def _run_cpu_tests():
    import pytest
    code = pytest.main(["-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "test_cpu_ext.py"),
                        os.path.join(ROOT, "tests", "test_sparse_optim.py"), os.path.join(ROOT, "tests", "test_serving.py")])
    if code != 0:
        raise SystemExit(f"CPU tests failed under the sanitizers (pytest exit code {code})")
    print("CPU tests passed under the sanitizers")


def _exercise(ext):
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import offsets_of, zipf_ids
    from sfg_fast import factored, reference
    from sfg_fast.ops.cpu_ext import dequantize_rowwise_int8, quantize_rowwise_int8

    torch.manual_seed(0)
    calls = 0

    def raises(exc, fn, *args):
        nonlocal calls
        calls += 1
        try:
            fn(*args)
        except exc:
            return
        raise AssertionError(f"{fn.__name__} did not raise {exc.__name__}")

    shapes = [(1, [3, 5], 1), (37, [7, 1, 300, 11], 17), (130, [11] * 7, 16)]
    for batch, field_dims, dim in shapes:
        offsets = offsets_of(field_dims)
        for id_dtype in (torch.int32, torch.int64):
            ids = zipf_ids(batch, field_dims, dtype=id_dtype)
            bad = ids.clone()
            bad[batch - 1, len(field_dims) - 1] = field_dims[-1]        # one past the field's end
            bad[0, 0] = -1
            for dtype in (torch.float32, torch.bfloat16):
                weight = torch.randn(sum(field_dims), dim).to(dtype)
                expect = reference.embedding_lookup(ids, weight, offsets)
                for mode in ("fatal", "clamp_to_oov", "off"):
                    assert torch.equal(ext.embedding_lookup(ids, weight, offsets, mode), expect)
                    calls += 1
                assert torch.equal(ext.embedding_lookup(bad, weight, offsets, "clamp_to_oov"),
                                   reference.embedding_lookup(bad, weight, offsets, "clamp_to_oov"))
                raises(IndexError, ext.embedding_lookup, bad, weight, offsets, "fatal")
                # sparse update: every kind, fp32/bf16 table x fp32/bf16 gradient, duplicates from Zipf
                for kind in ("sgd", "adagrad", "adam"):
                    for grad_dtype in (torch.float32, torch.bfloat16):
                        w = weight.clone()
                        s1 = (torch.zeros(w.shape[0]) if kind == "adagrad"
                              else torch.zeros(w.shape) if kind == "adam" else None)
                        s2 = torch.zeros(w.shape) if kind == "adam" else None
                        grad = torch.randn(batch, len(field_dims), dim).to(grad_dtype)
                        for step, mode in ((1, "fatal"), (2, "off"), (3, "clamp_to_oov")):
                            use = bad if mode == "clamp_to_oov" else ids
                            ext.sparse_row_update(kind, w, s1, s2, use, offsets, grad, 0.05, 1e-8, 0.9, 0.999, step,
                                                  mode)
                            calls += 1
                        assert bool(torch.isfinite(w.float()).all())
                        raises(IndexError, ext.sparse_row_update, kind, w, s1, s2, bad, offsets, grad, 0.05, 1e-8,
                               0.9, 0.999, 1, "fatal")
                raises(ValueError, ext.sparse_row_update, "rmsprop", weight.clone(), None, None, ids, offsets,
                       torch.randn(batch, len(field_dims), dim), 0.1, 1e-8, 0.9, 0.999, 1, "fatal")
            # int8 tables
            table = torch.randn(sum(field_dims), dim)
            q, scale_bias = quantize_rowwise_int8(table)
            deq = dequantize_rowwise_int8(q, scale_bias)
            for mode in ("fatal", "clamp_to_oov", "off"):
                out = ext.embedding_lookup_int8(ids, q, scale_bias, offsets, mode)
                torch.testing.assert_close(out, reference.embedding_lookup(ids, deq, offsets), rtol=1e-6, atol=1e-6)
                calls += 1
            ext.embedding_lookup_int8(bad, q, scale_bias, offsets, "clamp_to_oov")
            raises(IndexError, ext.embedding_lookup_int8, bad, q, scale_bias, offsets, "fatal")

        # fused sfg_logits: every kind, activation, pair set, side, symmetric, bias, encoder on/off, tile
        n = len(field_dims)
        width = n * dim
        table = torch.randn(sum(field_dims), dim)
        enc = torch.randn(width, width) / width ** 0.5
        bias = torch.randn(width)
        decoders = {"identity": None, "scalar": torch.randn(n, n), "vector": torch.randn(n, n, dim),
                    "matrix": torch.randn(n, n, dim, dim) / dim}
        ids = zipf_ids(batch, field_dims, dtype=torch.int32)
        acts = ["identity", "relu", "tanh", "sigmoid", "silu", "gelu"]
        for k, (kind, dec) in enumerate(decoders.items()):
            for pairs in ("upper", "all", "offdiag"):
                for side, symmetric in (("left", False), ("right", False), ("left", True)):
                    act = acts[(k + len(pairs) + len(side)) % len(acts)]
                    for use_enc, use_bias in ((True, True), (True, False), (False, False)):
                        args = (kind, act, 0.7, use_enc and k % 2 == 0, pairs, side, symmetric)
                        e = enc if use_enc else None
                        b = bias if use_bias else None
                        expect = factored.sfg_logits(ids, table, offsets, e, b, dec, *args)
                        for tile in (1, 3, 64):
                            out = ext.sfg_logits(ids, table, offsets, e, b, dec, *args, "fatal", tile)
                            torch.testing.assert_close(out, expect, rtol=1e-3, atol=1e-3)
                            calls += 1
            out = ext.sfg_logits(ids, table.to(torch.bfloat16), offsets, enc.to(torch.bfloat16), None,
                                 None if dec is None else dec.to(torch.bfloat16), kind, "relu", 1.0, False, "upper",
                                 "left", False, "clamp_to_oov", 64)
            assert bool(torch.isfinite(out).all())
            calls += 1
            # int8 row-wise quantised table: the dequantising gather as the pipeline's prologue
            q, scale_bias = quantize_rowwise_int8(table)
            expect = factored.sfg_logits(ids, dequantize_rowwise_int8(q, scale_bias), offsets, enc, None, dec, kind,
                                         "relu", 1.0, False, "upper", "left", False)
            for tile in (1, 64):
                for mode in ("fatal", "clamp_to_oov", "off"):
                    out = ext.sfg_logits(ids, q, offsets, enc, None, dec, kind, "relu", 1.0, False, "upper", "left",
                                         False, mode, tile, scale_bias=scale_bias)
                    torch.testing.assert_close(out, expect, rtol=1e-3, atol=1e-3)
                    calls += 1
        bad = ids.clone()
        bad[batch - 1, n - 1] = field_dims[-1]
        raises(IndexError, ext.sfg_logits, bad, table, offsets, enc, None, None, "identity", "relu", 1.0, False,
               "upper", "left", False, "fatal", 64)
        ext.sfg_logits(bad, table, offsets, enc, None, None, "identity", "relu", 1.0, False, "upper", "left", False,
                       "clamp_to_oov", 64)
        q, scale_bias = quantize_rowwise_int8(table)
        for mode in ("fatal", "off"):
            try:
                ext.sfg_logits(bad, q, offsets, enc, None, None, "identity", "relu", 1.0, False, "upper", "left",
                               False, mode, 64, scale_bias=scale_bias)
            except IndexError:
                calls += 1
            else:
                raise AssertionError(f"int8 sfg_logits did not raise IndexError on a bad id ({mode})")
        raises(ValueError, ext.sfg_logits, ids, table, offsets, enc, None, decoders["scalar"], "scalar", "swish",
               1.0, False, "upper", "left", False, "fatal", 64)
    print(f"exercised {calls} calls")


def _overflow(ext):
    # A deliberate one-past-the-end read compiled into sanitizer builds only. (It used to be a lookup
    # with bounds_check="off" and a bad id; the CPU kernels now range-check ids in every mode.)
    ext._sanitizer_canary()


if __name__ == "__main__" and "--exercise" in sys.argv:
    _exercise(_build())
    _run_cpu_tests()
if __name__ == "__main__" and "--overflow" in sys.argv:
    _overflow(_build())
