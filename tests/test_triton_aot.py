"""Every Triton kernel the GPU path launches compiles for sm_90 (through ptxas) at the configurations a
GPU would use, on this CPU-only machine (bench/triton_aot.py): the interpreter, which runs the kernels
in CI, never compiles them, so this is the guard against a kernel that only fails on a GPU."""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launchable_kernels():
    """Names of the ``_..._kernel`` functions in kernels/ (the jit entry points; helpers excluded)."""
    names = set()
    for name in os.listdir(os.path.join(ROOT, "kernels")):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "kernels", name)) as f:
                names |= set(re.findall(r"^def (_\w+_kernel)\(", f.read(), flags=re.M))
    return names


def test_every_kernel_compiles_for_sm90_within_its_resources(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, "-m", "bench.triton_aot", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["failures"] == []
    compiled = {row["kernel"] for row in data["rows"]}
    assert compiled == _launchable_kernels()
    for row in data["rows"]:
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= 232448, row
    assert "| _sparse_update_kernel |" in done.stdout
    # every GEMM on the TF32 matrix units fills shared memory with 16-byte copies: an operand tile not
    # contiguous along K copies 4 bytes at a time (the TF32 weight-gradient GEMM did, before 1a4477c)
    tensor_core = [row for row in data["rows"] if row["wgmma"]]
    assert {row["kernel"] for row in tensor_core} >= {"_matmul_kernel", "_sfg_gemm_fwd_kernel"}
    for row in tensor_core:
        assert row["cp_async_4B"] == 0 and row["cp_async_16B"] > 0, row
    # the gradient scatters' atomics are relaxed: acquire/release ordering would fence every one of them
    assert [row["kernel"] for row in data["rows"] if row["ordered_atomics"]] == []


def test_ptx_facts_read_copy_widths_matrix_units_and_atomic_ordering():
    from bench.triton_aot import ptx_facts
    ptx = """
        cp.async.cg.shared.global [ %r10 + 0 ], [ %rd24 + 0 ], 0x10, %r11;
        @%p1 cp.async.ca.shared.global [ %r12 + 0 ], [ %rd25 + 0 ], 0x4, %r13;
        cp.async.ca.shared.global [ %r14 + 0 ], [ %rd26 + 0 ], 4, %r13;
        wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%f1}, %rd1, %rd2, p, 1, 1;
        @%p2 atom.global.gpu.acq_rel.add.v4.f32 {%f1, %f2, %f3, %f4}, [%rd3], {%f5, %f6, %f7, %f8};
        atom.global.gpu.relaxed.add.v4.f32 {%f1, %f2, %f3, %f4}, [%rd3], {%f5, %f6, %f7, %f8};
        red.global.gpu.release.add.f32 [%rd3], %f1;
    """
    assert ptx_facts(ptx) == {"cp_async_4B": 2, "cp_async_16B": 1, "wgmma": 1, "ordered_atomics": 2}


# The oldest torch/triton pair a GPU machine may carry (BUILD.md: torch 2.11 + triton 3.6). install.sh
# puts that triton beside the venv's own; its compiler rejected kernels that 3.7.1 compiles.
COMPAT_TRITON = os.path.join(ROOT, ".venv", "compat", "triton-3.6.0")


def test_every_kernel_compiles_with_the_oldest_supported_triton(tmp_path):
    if not os.path.isdir(COMPAT_TRITON):
        assert os.environ.get("SFG_FAST_REQUIRE_EXT") != "1", f"install.sh did not install {COMPAT_TRITON}"
        pytest.skip(f"no {COMPAT_TRITON} (./install.sh puts triton 3.6.0 there)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = COMPAT_TRITON
    out = tmp_path / "aot36.json"
    done = subprocess.run([sys.executable, "-m", "bench.triton_aot", "--table-dims", "1,3", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert "(triton 3.6.0)" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["failures"] == []
    workloads = {w for row in data["rows"] for w in row["workloads"]}
    for name in ("fused sparse adagrad float32 D=1", "embedding_lookup float32 D=3 deterministic",
                 "fused sparse adam bfloat16", "embedding_lookup float16"):
        assert name in workloads, sorted(workloads)
    assert {row["kernel"] for row in data["rows"]} == _launchable_kernels()
