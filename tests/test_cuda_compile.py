"""Compile-check every torch-free CUDA source in csrc/ for sm_90a with nvcc (no GPU needed), the
torch glue of the CUDA kernels against stand-ins for torch's CUDA headers, and the rule that error
messages in csrc/ are assembled by sfg::msg (no numbers streamed, see csrc/message.h).

Runs the exact command CI documents; fails on any nvcc error or warning. Skipped, with the reason,
when nvcc is not on PATH.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (CUDA toolkit not installed)")
@pytest.mark.parametrize("source", CU_SOURCES, ids=[os.path.basename(p) for p in CU_SOURCES])
def test_cu_compiles_for_sm90a_without_warnings(source, tmp_path):
    cmd = ["nvcc", "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wall",
           "-gencode", "arch=compute_90a,code=sm_90a", source, "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{log}"
    assert "warning" not in log.lower(), f"nvcc warnings on {source}:\n{log}"
    assert (tmp_path / "out.o").stat().st_size > 0


def test_cuda_sources_exist_and_are_torch_free():
    assert CU_SOURCES, "csrc/ has no .cu sources"
    for source in CU_SOURCES:
        text = open(source).read()
        for header in ("torch/", "ATen/", "c10/"):
            assert f"#include <{header}" not in text, f"{source} includes {header} (must stay torch-free)"


def _cuda_include():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    candidates = [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")]
    candidates += [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += sorted(glob.glob("/usr/local/cuda*/include"), reverse=True)
    return next((c for c in candidates if os.path.exists(os.path.join(c, "cuda_runtime.h"))), None)


_STUBS = {
    # the two torch CUDA headers the glue includes, reduced to what it uses (a CPU torch lacks them)
    "ATen/cuda/CUDAContext.h": "#pragma once\n#include <cuda_runtime.h>\n"
                               "namespace at { namespace cuda {\n"
                               "inline cudaStream_t getCurrentCUDAStream() { return nullptr; }\n}}\n",
    "c10/cuda/CUDAGuard.h": "#pragma once\n#include <c10/core/Device.h>\n"
                            "namespace c10 { namespace cuda {\n"
                            "struct CUDAGuard { explicit CUDAGuard(c10::Device) {} };\n}}\n",
}


@pytest.mark.slow
@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA toolkit headers (nvcc not on PATH)")
def test_cuda_glue_compiles_with_stand_in_torch_cuda_headers(tmp_path):
    """csrc/embedding_cuda_glue.cpp is built only against a CUDA torch (never on CPU CI): check our
    code in it with g++, torch's CPU headers, the CUDA toolkit's headers and stand-ins for the two
    torch CUDA headers; fails on any error, or any warning located in csrc/."""
    torch_utils = pytest.importorskip("torch.utils.cpp_extension")
    import sysconfig
    import torch
    for rel, text in _STUBS.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    std = "-std=c++20" if version >= (2, 13) else "-std=c++17"
    cmd = ["g++", "-fsyntax-only", std, "-Wall", "-Wextra", "-DSFG_FAST_WITH_CUDA=1", f"-I{tmp_path}"]
    cmd += [f"-I{p}" for p in torch_utils.include_paths()]
    cmd += [f"-I{_cuda_include()}", f"-I{sysconfig.get_paths()['include']}", "-Icsrc",
            os.path.join("csrc", "embedding_cuda_glue.cpp")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    ours = [line for line in log.splitlines() if line.startswith("csrc/") and "warning" in line]
    assert not ours, "\n".join(ours)


def _torch_checks(text):
    """(macro, [top-level arguments]) of every TORCH_CHECK* call in a C++ source."""
    for match in re.finditer(r"TORCH_CHECK\w*\(", text):
        depth, i, quote, args, current = 1, match.end(), None, [], ""
        while depth:
            c = text[i]
            if quote:
                if c == "\\":
                    current += c
                    i += 1
                    c = text[i]
                elif c == quote:
                    quote = None
            elif c in "\"'":
                quote = c
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if not depth:
                    break
            elif c == "," and depth == 1:
                args.append(current)
                current = ""
                i += 1
                continue
            current += c
            i += 1
        yield match.group(0)[:-1], args + [current]


def test_csrc_error_messages_are_single_strings():
    """Every TORCH_CHECK in csrc/ takes (condition, message) with the message one string literal or
    one sfg::msg(...), and no source streams into an ostream: numbers formatted by streams inside
    the extension crashed on a mismatched toolchain (csrc/message.h)."""
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "*.h")))
    checks = 0
    for source in sources:
        # comments out (string literals in csrc/ hold no "//")
        text = re.sub(r"//[^\n]*|/\*.*?\*/", "", open(source).read(), flags=re.S)
        assert "ostringstream" not in text and "std::cout" not in text, source
        for macro, args in _torch_checks(text):
            checks += 1
            message = args[-1].strip() if len(args) == 2 else None
            ok = message is not None and (re.fullmatch(r'("[^"]*"\s*)+', message) or message.startswith("sfg::msg("))
            assert ok, f"{os.path.basename(source)}: {macro}({', '.join(a.strip() for a in args)[:160]})"
    assert checks > 30
