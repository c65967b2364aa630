"""`python -m sfg_fast.info` reports versions, the extension and every backend with a reason."""
import os
import subprocess
import sys

from sfg_fast import info


def test_collect_names_every_backend_and_reason():
    data = info.collect()
    assert data["torch"] and data["sfg_fast"]
    assert set(data["backends"]) == {"triton", "cuda", "cpu", "torch", "reference"}
    assert data["backends"]["torch"] is None and data["backends"]["reference"] is None
    for name, why in data["backends"].items():
        assert why is None or len(why) > 10, (name, why)
    assert data["extension"]["built"] == (data["backends"]["cpu"] is None)
    if data["extension"]["built"]:
        # which clone of the ISA-dispatched CPU loops runs here (baseline in sanitizer builds)
        assert data["extension"]["cpu_isa"] in ("x86-64-v4", "x86-64-v3", "baseline")
    assert data["serving_int8_auto"] == ("cpu" if data["extension"]["built"] else "torch")
    import torch
    assert data["fused_tables_in_graph"] == (tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 13))
    assert data["triton_path_gemms"] in ("auto", "always", "never")
    assert data["structured_decoder"] == os.environ.get("SFG_FAST_STRUCTURED_DECODER", "graphs")
    from sfg_fast import _cublas
    assert data["cublas_workspace_fixed"] is _cublas.workspace_fixed()
    for device, ops in data["auto"].items():
        assert set(ops) >= {"embedding_lookup", "sfg_encode", "pairwise_decode", "bce_with_logits",
                            "sfg_interaction"}


def test_module_runs():
    out = subprocess.run([sys.executable, "-m", "sfg_fast.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout and "auto ->" in out.stdout
    assert "fused tables under torch.compile:" in out.stdout and "GEMMs of the triton path:" in out.stdout
    if info.collect()["extension"]["built"]:
        # an available backend that lacks an op says why, on that op's line
        line = next(l for l in out.stdout.splitlines() if l.strip().startswith("sfg_encode "))
        assert "not cpu: backend 'cpu' has no kernel for 'sfg_encode'" in line, line
