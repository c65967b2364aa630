"""Shared test helpers: the 2x error rule and random inputs."""
import torch


def assert_close_2x(out, ref64, ref_same_dtype, name="", floor=1e-6):
    """The 2x rule (flash-attention's): |out - ref64| may be at most 2x |torch same-dtype - ref64| plus a small floor."""
    out = out.detach().double()
    ref64 = ref64.detach().double()
    base = (ref_same_dtype.detach().double() - ref64).abs().max().item()
    err = (out - ref64).abs().max().item()
    scale = max(ref64.abs().max().item(), 1.0)
    tol = 2 * base + floor * scale
    assert err <= tol, f"{name}: max error {err:.3e} > 2 x torch error {base:.3e} + floor ({tol:.3e})"


def zipf_ids(batch, field_dims, a=1.2, generator=None, dtype=torch.int64):
    """Zipf-skewed field-local ids: a few hot ids per field, many duplicates."""
    cols = []
    for size in field_dims:
        ranks = torch.arange(1, size + 1, dtype=torch.float64)
        probs = ranks ** (-a)
        cols.append(torch.multinomial(probs / probs.sum(), batch, replacement=True, generator=generator))
    return torch.stack(cols, dim=1).to(dtype)


def decoder_weight(kind, n, dim, dtype=torch.float64):
    """A random decoder weight of ``kind`` for N=n fields of dim D (None for identity), scaled by 1/sqrt(D)."""
    shape = {"identity": None, "scalar": (n, n), "vector": (n, n, dim), "matrix": (n, n, dim, dim)}[kind]
    return None if shape is None else torch.randn(*shape, dtype=dtype) / dim ** 0.5


def offsets_of(field_dims):
    out = [0]
    for size in field_dims[:-1]:
        out.append(out[-1] + size)
    return torch.tensor(out, dtype=torch.int64)


_TTIR_PROBE = r"""
import importlib, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
result = {}
for i, (module, name, signature, constexprs) in enumerate(json.loads(sys.argv[1])):
    kernel = getattr(importlib.import_module(module), name)
    # a dtype constexpr travels through JSON as "tl.<dtype>"
    constexprs = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                  for k, v in constexprs.items()}
    full = {arg: signature.get(arg, "constexpr" if arg in constexprs else "i32") for arg in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, full, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    result[f"{name}#{i}"] = compiled.asm["ttir"]
json.dump(result, sys.stdout)
"""


def assert_int64_pointer_offsets(probes):
    """int64 addressing probe for Triton kernels. A table with row * D >= 2^31 elements needs
    gigabytes, so instead of running one, compile each kernel for an sm_90 target (no GPU needed)
    with every integer argument typed i32 (as Triton specialises small ints; unlisted arguments
    default to i32) and check that every pointer offset in the generated TTIR is an i64 tensor: an
    int32 ``row * stride`` would show up as an i32 addptr offset and wrap past 2^31. Compiled in a
    child process because kernels imported under TRITON_INTERPRET=1 are interpreter objects.

    probes: [(module, kernel name, {arg: type} for pointers and floats, {arg: value} constexprs)].
    """
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _TTIR_PROBE, json.dumps(probes)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ttirs = json.loads(done.stdout)
    assert len(ttirs) == len(probes)
    for name, ttir in ttirs.items():
        addptrs = [line.split(" loc(")[0] for line in ttir.splitlines() if "tt.addptr" in line]
        assert addptrs, f"{name}: no pointer arithmetic found in the generated code"
        narrow = [line for line in addptrs if not line.rstrip().endswith(("i64>", ", i64"))]   # tensor / scalar
        assert not narrow, f"{name}: pointer offsets not in int64: {narrow}"
        # a product formed in i32 and only then widened (``W * B`` of two int arguments) wraps before the
        # widening: the addptr offset is i64, yet wrong past 2^31
        lines = [line.split(" loc(")[0] for line in ttir.splitlines()]
        products = {line.split("=")[0].strip() for line in lines
                    if "arith.muli" in line and "=" in line and line.rstrip().endswith("i32")}
        widened = [line for line in lines if "arith.extsi" in line
                   and line.split("arith.extsi")[1].split(":")[0].strip() in products]
        assert not widened, f"{name}: i32 products widened to i64 after they may have wrapped: {widened}"
