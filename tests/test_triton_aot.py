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
