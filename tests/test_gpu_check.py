"""bench/gpu_check.py must run anywhere: its --smoke mode on CPU yields a well-formed table and JSON."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OUT=str(out))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--skip-tests", "--skip-ext-cuda",
                           "--pre", "gpu_tests=rc=0 in 80 s"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len([f for f in files if f.endswith(".json")]) == 1, files
    assert not [f for f in files if f.endswith(".tmp")], files      # written through a rename
    path = os.path.join(out, next(f for f in files if f.endswith(".json")))
    with open(path) as fh:
        data = json.load(fh)
    with open(path[:-5] + ".md") as fh:
        markdown = fh.read()
    return proc.stdout, data, markdown


def test_json_carries_environment(smoke):
    _, data, _ = smoke
    env = data["env"]
    for key in ("device", "device_name", "torch", "triton", "git_sha", "date", "cuda_runtime"):
        assert key in env, key
    assert env["torch"] == torch.__version__
    assert data["smoke"] is True and data["complete"] is True
    assert data["shape"]["N"] == 5 and data["shape"]["B"] == 16
    # what gpu_check.sh ran before (the tests) is recorded as reported, not as "skipped"
    assert data["pre"]["gpu_tests"] == {"status": "reported", "note": "rc=0 in 80 s"}


def test_every_section_kind_and_provider_has_a_row(smoke):
    _, data, _ = smoke
    rows = data["rows"]
    statuses = {r["status"] for r in rows}
    assert statuses <= {"ok", "skipped", "error"}
    assert not [r for r in rows if r["status"] == "error"], [r for r in rows if r["status"] == "error"]
    seen = {(r["section"], r["kind"], r["provider"], r["mode"]) for r in rows}
    for kind in ("scalar", "vector", "matrix"):
        for provider in ("fused", "reference", "factored", "compile_factored", "compile_reference", "compile_fused"):
            assert ("interaction", kind, provider, "fwd+bwd") in seen, (kind, provider)
        # the layer alone, from V: what its precision-matched 2x targets read
        for provider in ("fused", "reference", "factored", "compile_factored", "compile_factored_tf32"):
            assert ("interaction_v", kind, provider, "fwd+bwd") in seen, (kind, provider)
        # the structured decoder: scalar and vector only (a matrix decoder is the dense GEMM)
        assert (("interaction_v", kind, "fused_structured", "fwd+bwd") in seen) == (kind != "matrix")
    layer_rows = [r for r in rows if r["section"] == "interaction_v" and r["status"] == "ok"]
    assert {r["provider"] for r in layer_rows} >= {"fused", "reference", "factored"}
    targets = {t["target"] for t in data["targets"]}
    assert "matrix from V, fp32: fused fwd+bwd >= 2x torch.compile(factored)" in targets
    assert ("lookup", "-", "copy", "fwd") in seen and ("step", "scalar", "fused", "train") in seen
    assert ("step", "scalar", "fused sfg_interaction", "train") in seen
    assert ("step", "scalar", "fused sfg_interaction structured", "train") in seen
    assert ("step", "scalar", "fused sfg_interaction deterministic", "train") in seen
    det = next(r for r in rows if r["provider"] == "fused sfg_interaction deterministic")
    assert "exact-fp32 GEMMs in " in det["note"]          # which GEMMs the deterministic step ran
    assert ("step", "scalar", "zoo fwfm embedding=fused", "train") in seen
    assert ("step", "scalar", "zoo fwfm embedding=fused compiled", "train") in seen
    assert ("step", "scalar", "fused cuda graph", "train") in seen
    # the graph section's rows (the CUDA-graph step), then section compiled_step's Inductor compiles, which
    # spend the budget left
    assert [r["provider"] for r in rows if r["section"] == "step"][-8:] == [
        "fused cuda graph", "fused cuda graph tf32", "fused cuda graph dense", "fused cuda graph tf32 structured",
        "fused cuda graph bf16 autocast", "fused cuda graph bf16 autocast map", "zoo fwfm embedding=fused compiled",
        "zoo fwfm embedding=fused reduce-overhead"]
    ext = [r for r in rows if r["provider"] == "ext-cuda"]
    assert ext and all(r["status"] == "skipped" and "--skip-ext-cuda" in r["note"] for r in ext)
    for provider in ("fused", "fused map", "ext-cuda", "factored"):
        assert ("lookup", "-", provider, "bwd+adagrad") in seen, provider
    for provider in ("fused graph", "fused map graph"):                # (skipped on CPU: graphs need CUDA)
        assert ("lookup", "-", provider, "bwd+adagrad") in seen, provider
    # the sort-free update ran through the interpreter and measured
    assert next(r for r in rows if r["provider"] == "fused map" and r["mode"] == "bwd+adagrad")["status"] == "ok"
    for r in rows:
        if r["status"] == "ok" and r["provider"] != "copy":
            assert r["median_ms"] > 0 and r["iqr_ms"] >= 0, r
        if r["status"] == "skipped":
            assert r["note"], r   # a skip always says why
    if not torch.cuda.is_available():
        compiled = [r for r in rows if r["provider"].startswith("compile_")]
        assert compiled and all(r["status"] == "skipped" for r in compiled)


def test_derived_numbers_are_consistent(smoke):
    _, data, _ = smoke
    rows = data["rows"]
    ref = {(r["kind"], r["mode"]): r["median_ms"] for r in rows
           if r["section"] == "interaction" and r["provider"] == "reference" and r["status"] == "ok"}
    for r in rows:
        if r["section"] == "interaction" and r["status"] == "ok":
            assert r["speedup_vs_reference"] == pytest.approx(ref[(r["kind"], r["mode"])] / r["median_ms"])
            assert r["tflops"] > 0
    step = next(r for r in rows if r["section"] == "step" and r["provider"] == "fused")
    assert step["samples_per_s"] == pytest.approx(16 / (step["median_ms"] * 1e-3))
    copy = next(r for r in rows if r["provider"] == "copy")
    lookup = next(r for r in rows if r["section"] == "lookup" and r["provider"] == "fused" and r["mode"] == "fwd")
    assert lookup["pct_copy_bw"] == pytest.approx(100 * lookup["gbps"] / copy["gbps"])
    targets = data["targets"]
    assert all(set(t) == {"target", "value", "goal", "met"} for t in targets)
    layer = [t for t in targets if " from V, " in t["target"]]
    assert len(targets) - len(layer) == 12
    # the 20M samples/s target twice: the fastest fused step at any precision (named), and in exact fp32
    exact = next(t for t in targets if t["target"].startswith("SFG-FwFM step, exact fp32"))
    assert "tf32" not in exact["target"] and "bf16" not in exact["target"]
    # per kind, fp32, TF32 and bf16 autocast, each against torch.compile in the same precision (n/a where not
    # measured)
    assert len(layer) == 9
    for t in layer:
        kind, label = t["target"].split(" from V, ")[0], t["target"].split(", ")[1].split(":")[0]
        suffix = {"tf32": "_tf32", "bf16 autocast": "_bf16"}.get(label, "")
        fused, comp = (next((r for r in rows if (r["section"], r["kind"], r["provider"], r["mode"])
                             == ("interaction_v", kind, p + suffix, "fwd+bwd")), None)
                       for p in ("fused", "compile_factored"))
        if fused and comp and fused["status"] == comp["status"] == "ok":
            assert t["value"] == pytest.approx(comp["median_ms"] / fused["median_ms"])
        else:
            assert t["value"] is None         # torch.compile (and TF32) run on the GPU only
    if not torch.cuda.is_available():
        assert all(t["met"] is None for t in targets)   # GPU targets are not judged on CPU


def test_table_is_printed_and_written(smoke):
    stdout, data, markdown = smoke
    header = "| section | kind | provider | mode | median_ms |"
    assert header in stdout and header in markdown
    table = [line for line in markdown.splitlines()
             if line.startswith(("| interaction | ", "| interaction_v | ", "| lookup | ", "| step | ", "| profile | ",
                                 "| sweep | "))]
    assert len(table) == len(data["rows"])
    width = next(line for line in markdown.splitlines() if line.startswith(header)).count("|")
    assert all(line.count("|") == width for line in table)
    assert data["env"]["git_sha"] in markdown and "wrote " in stdout


def test_parse_args_defaults_are_the_criteo_shape():
    sys.path.insert(0, ROOT)
    from bench.gpu_check import interaction_flops, parse_args
    args = parse_args([])
    assert (args.batch, args.fields, args.dim, args.vocab_scale) == (4096, 39, 16, 1.0)
    from bench.common import field_dims_for
    assert 33_000_000 < sum(field_dims_for(args.fields, args.vocab_scale)) < 34_500_000
    # matrix decoder: two (ND x ND) GEMMs; scalar: one GEMM plus the N x N mix
    assert interaction_flops(2, 3, 4, "matrix") == 2 * 2 * 144 * 2 + 2 * 2 * 12
    assert interaction_flops(2, 3, 4, "scalar") == 2 * 2 * 144 + 2 * 2 * 9 * 4 + 2 * 2 * 12


def test_failed_rows_make_the_exit_code_nonzero(tmp_path):
    """A run whose providers failed must not look green to the script that called it."""
    env = dict(os.environ, OUT=str(tmp_path))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--skip-tests", "--sections", "lookup,nonsense"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "unknown section 'nonsense'" in proc.stdout + proc.stderr


def test_kernel_sequence_lists_the_last_steps_kernels_in_launch_order():
    """Kernel events of several profiled steps (as torch.profiler's events() returns them, unordered, with
    CPU ops mixed in): the lines list the last step's kernels by start time, with their durations."""
    from types import SimpleNamespace

    from bench.gpu_check import _kernel_sequence
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, us, device=cuda):
        span = SimpleNamespace(start=start, elapsed_us=lambda: us)
        return SimpleNamespace(name=name, device_type=device, time_range=span)
    steps = [[event("gemm", 100 * s + 1, 30.0 + s), event("fill", 100 * s + 2, 5.0), event("gemm", 100 * s + 3, 7.0)]
             for s in range(3)]
    events = [e for step in reversed(steps) for e in reversed(step)] + [event("aten::mm", 250, 9.0, cpu)]
    lines = _kernel_sequence(events, 3)
    assert "3 kernels" in lines[0]
    assert [line.split()[-1] for line in lines[1:]] == ["gemm", "fill", "gemm"]
    assert "32.0 us" in lines[1] and "7.0 us" in lines[3]       # the last step's first GEMM, then its second
    assert "no kernel sequence" in _kernel_sequence(events[:-2], 3)[0]   # a partial step is not guessed at
