"""``python -m sfg_fast.info``: versions, devices, and which backends can run each op (and why not)."""
from __future__ import annotations

import platform
import sys


def collect() -> dict:
    import torch

    import sfg_fast
    from sfg_fast import _backend
    from sfg_fast.functional import __all__ as ops
    from sfg_fast.ops import LOAD_ERRORS, load_backends

    load_backends()
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not installed ({type(exc).__name__})"
    cpu = torch.device("cpu")
    devices = [cpu] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    table = {}
    for device in devices:
        for op in ops:
            for backend in _backend.BACKENDS[1:]:
                why = _backend.unavailable_reason(backend, op, device)
                table.setdefault(device.type, {}).setdefault(op, {})[backend] = why or "available"
    auto = {d.type: {op: _backend.resolve("auto", op, d) for op in ops} for d in devices}
    try:
        from sfg_fast import _C
        extension = {"built": True, "with_cuda": bool(getattr(_C, "WITH_CUDA", False)),
                     "path": getattr(_C, "__file__", None),
                     "cpu_isa": _C.hot_loop_isa() if hasattr(_C, "hot_loop_isa") else "unknown"}
    except Exception as exc:
        extension = {"built": False, "why": f"{type(exc).__name__}: {exc}"}
    return {
        "sfg_fast": sfg_fast.__version__,
        "extension": extension,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "backends": _backend.status(),
        "op_backends": table,
        "auto": auto,
        "backend_module_errors": dict(LOAD_ERRORS),
        # sfg_fast.serving's int8-table ops (sfg_logits_int8, embedding_lookup_int8) on CPU tensors
        "serving_int8_auto": _serving_backend(),
        # whether torch.compile holds a fused table's update in the graph (torch >= 2.13) or runs its
        # lookup between graphs
        "fused_tables_in_graph": _fused_tables_in_graph(),
        # who runs the Triton path's GEMMs (ops.sfg_gemm.TORCH_GEMMS; "auto": cuBLAS for exact fp32 on a GPU)
        "triton_path_gemms": _triton_path_gemms(),
        # how scalar/vector decoders run (ops.sfg_gemm.STRUCTURED_DECODER: "graphs" by their structure while
        # a CUDA graph is captured on the exact-fp32 torch.mm path, "auto" always on that path and on the
        # Triton GEMMs in TF32 / under autocast, "never": the dense [W, W] GEMM)
        "structured_decoder": _module_setting("STRUCTURED_DECODER"),
        # how the Triton fused sparse update sums each touched row (ops.embedding_lookup.SPARSE_DEDUP: "sort",
        # the segment reduction, or "map", the sort-free row map; deterministic runs always sort)
        "sparse_dedup": _module_setting("SPARSE_DEDUP", "embedding_lookup"),
        # whether cuBLAS's workspace setting was fixed before CUDA started (sfg_fast._cublas): deterministic
        # runs hand the fused path's exact-fp32 GEMMs to cuBLAS only then
        "cublas_workspace_fixed": _cublas_fixed(),
    }


def _fused_tables_in_graph() -> bool:
    from sfg_fast.optim import GRAPH_ROW_UPDATE
    return bool(GRAPH_ROW_UPDATE)


def _triton_path_gemms() -> str:
    return _module_setting("TORCH_GEMMS")


def _cublas_fixed() -> bool:
    from sfg_fast import _cublas
    return _cublas.workspace_fixed()


def _module_setting(name: str, module: str = "sfg_gemm") -> str:
    """A setting of ``sfg_fast.ops.<module>`` (read from its environment variable at import)."""
    import importlib
    try:
        ops_module = importlib.import_module(f"sfg_fast.ops.{module}")
    except Exception as exc:    # triton missing
        return f"n/a ({type(exc).__name__})"
    return getattr(ops_module, name)


def _serving_backend() -> str:
    import torch

    from sfg_fast import serving
    return serving._backend("auto", torch.device("cpu"))


def main() -> None:
    info = collect()
    print(f"sfg_fast {info['sfg_fast']}  python {info['python']}  torch {info['torch']} "
          f"(cuda {info['torch_cuda']})  triton {info['triton']}")
    print(f"platform {info['platform']}  threads {info['threads']}  cuda device: {info['cuda_device']}")
    ext = info["extension"]
    if ext["built"]:
        isa = {"x86-64-v4": "x86-64-v4, AVX-512", "x86-64-v3": "x86-64-v3, AVX2"}.get(ext["cpu_isa"], ext["cpu_isa"])
        print(f"extension sfg_fast._C: built (CUDA kernels: {'yes' if ext['with_cuda'] else 'no'}; CPU hot loops: "
              f"{isa}) at {ext['path']}")
    else:
        print(f"extension sfg_fast._C: not built ({ext['why']})")
    print("\nbackends:")
    for name, why in info["backends"].items():
        print(f"  {name:10s} {'available' if why is None else 'unavailable: ' + why}")
    for device, ops in info["op_backends"].items():
        print(f"\nops on {device} (auto -> chosen backend):")
        for op, per_backend in ops.items():
            have = [b for b, s in per_backend.items() if s == "available"]
            # backends that run but lack this op, with the reason (a whole missing backend is listed above)
            lacking = [f"{b}: {s}" for b, s in per_backend.items()
                       if s != "available" and info["backends"].get(b) is None]
            print(f"  {op:18s} auto -> {info['auto'][device][op]:9s} available: {', '.join(have)}"
                  + (f"  (not {'; '.join(lacking)})" if lacking else ""))
        if device == "cpu":
            print("  (while torch.compile traces on CPU, auto takes the torch ops, which Inductor fuses; "
                  "torch.export keeps the table above)")
    print("\nfused tables under torch.compile: " + (
        "lookup and update inside the graph" if info["fused_tables_in_graph"] else
        "the lookup runs between graphs (torch < 2.13 cannot compile a backward that writes a parameter)"))
    gemms = info["triton_path_gemms"]
    print(f"GEMMs of the triton path: {gemms}" + (" (cuBLAS for exact fp32 on a GPU, else Triton; "
                                                  "SFG_FAST_TORCH_GEMMS)" if gemms == "auto" else ""))
    print(f"scalar/vector decoders by their structure: {info['structured_decoder']} "
          "(SFG_FAST_STRUCTURED_DECODER: graphs = inside CUDA-graph captures on the exact-fp32 cuBLAS path, "
          "auto = also eagerly there and on the Triton GEMMs in TF32 / under autocast, never = the dense GEMM)")
    print(f"the Triton fused sparse update sums each row by: {info['sparse_dedup']} (SFG_FAST_SPARSE_DEDUP: sort = "
          "the segment reduction, bitwise repeatable; map = a 4-byte-a-row map and float atomics, no sort; "
          "deterministic runs sort)")
    print("cuBLAS workspace fixed before CUDA started: " + ("yes (deterministic runs use cuBLAS GEMMs)"
          if info["cublas_workspace_fixed"] else "no (deterministic runs use the Triton GEMMs; the training "
          "job fixes it, or export CUBLAS_WORKSPACE_CONFIG=:4096:8)"))
    print(f"\nserving with int8 tables (sfg_fast.serving) on cpu: auto -> {info['serving_int8_auto']} "
          f"({'the fused C++ pipeline' if info['serving_int8_auto'] == 'cpu' else 'dequantise + factored torch'})")
    if info["backend_module_errors"]:
        print("\nbackend modules that failed to load:")
        for name, err in info["backend_module_errors"].items():
            print(f"  sfg_fast.ops.{name}: {err}")


if __name__ == "__main__":
    main()
