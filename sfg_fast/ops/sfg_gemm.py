"""Launchers of the GEMM-shaped SFG interaction (``sfg_fast.kernels.sfg_gemm``).

The fast path of the Triton ``sfg_logits`` when an encoder generates the scored side from the
gathered V (``symmetric=False``, the configuration of every SFG model here). The forward is one
kernel (gather -> encoder GEMM and decoder GEMM sharing each A tile -> bias/act/gamma/residual ->
row dot) plus a tiny reduce (+ fused BCE); the backward is one elementwise pass and two GEMMs.

Saved for backward: X (the gathered V, in the table's dtype), H and T ([B, N*D] fp32) -- O(B*N*D),
about 10 MB each at the Criteo shape, in exchange for no recomputation; nothing under no_grad. The
decoder is handed to the kernels as the dense [N*D, N*D] matrix ``decoder_matrix`` builds with
differentiable torch ops, so its gradient reaches the scalar / vector / matrix weight (masked to P)
through autograd.

Block sizes: ``SFG_FAST_GEMM_BLOCKS="BM,BN,BK,warps,stages"`` overrides the GPU defaults (for
tuning sweeps); under the Triton interpreter blocks are as large as the problem allows.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional, Tuple

import torch
from ._higher_order import create_graph_requested, refuse
from .. import _checks, _cublas
from .._constants import constant, device_key
from ._launch import cdiv, next_pow2

try:
    import triton
    from ..kernels import sfg_gemm as G
    from ..kernels import sfg_interaction as K
except Exception:  # triton missing: sfg_logits reports the backend as unavailable
    triton = None
    G = K = None

POISON_VALUE: Optional[float] = None   # tests set NaN: an element a kernel fails to write shows up

# Where sfg_logits gathers V: False (default) runs the lookup kernel once and the GEMM kernel on the
# dense [B, N, D] result; True gathers inside the GEMM's K-loop, which re-reads each table row once
# per output column tile (cdiv(N*D, BLOCK_N) times). Measured on an H200 at the Criteo shape, the
# in-kernel gather made the forward 3x slower per FLOP than the plain GEMM kernel
# (bench/results/nvidia-h200/profile-20261128T052622.txt); SFG_FAST_GATHER_IN_GEMM=1 restores it.
GATHER_IN_GEMM = _checks.env_flag("SFG_FAST_GATHER_IN_GEMM", False)

# Who runs the GEMMs: "auto" hands them to torch.mm (cuBLAS) on a GPU for the exact fp32 path, and keeps
# the fused Triton kernels otherwise; "always" / "never" force one way (tests, benchmarks). On an H200
# at the Criteo shape tl.dot's exact-fp32 path ran the forward GEMM pair at 5.5 TFLOP/s and the backward
# pair at 9 (bench/results/nvidia-h200/profile-20261128T212156.txt), several times under cuBLAS's SGEMM;
# in TF32 the Triton kernels ran at 90 and stay. The epilogue and the backward's elementwise middle stay
# Triton kernels either way; the extra traffic is H and T ([B, W] fp32, saved for backward anyway).
# "auto" keeps the Triton GEMMs where cuBLAS would not compute the exact-fp32 product repeatably: under
# torch's own TF32 setting (e.g. set_float32_matmul_precision("high")), and in deterministic mode unless
# cuBLAS's workspace setting was fixed before CUDA started (sfg_fast._cublas).
TORCH_GEMMS = os.environ.get("SFG_FAST_TORCH_GEMMS", "auto")
_TORCH_GEMM_MODES = ("auto", "always", "never")


def _cublas_fp32_is_tf32() -> bool:
    """Whether torch's cuBLAS matmuls of fp32 run in TF32 now (set_float32_matmul_precision("high"),
    ``allow_tf32``, or the newer ``fp32_precision`` settings, whose "none" defers to the global one)."""
    try:
        matmul = torch.backends.cuda.matmul
        precision = getattr(matmul, "fp32_precision", None)
        if precision is None:                # torch before the fp32_precision settings
            return bool(matmul.allow_tf32)
        if precision == "none":
            precision = getattr(torch.backends, "fp32_precision", "none")
        return precision == "tf32"
    except Exception:        # a setting this torch cannot report: assume TF32, keep the exact Triton GEMMs
        return True


def torch_gemms(t: torch.Tensor, precision: str) -> bool:
    """Whether this pass's GEMMs go to torch.mm (see TORCH_GEMMS)."""
    mode = TORCH_GEMMS
    if mode not in _TORCH_GEMM_MODES:
        raise ValueError(f"SFG_FAST_TORCH_GEMMS must be one of {_TORCH_GEMM_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "always"
    # only where cuBLAS computes what was asked: exact fp32 (torch's TF32 off for cuBLAS); and in
    # deterministic mode only when cuBLAS is known to repeat (sfg_fast._cublas: its workspace setting was
    # in place before CUDA started, as the training job arranges): the Triton GEMMs always repeat
    return (t.is_cuda and precision == "ieee"
            and (not torch.are_deterministic_algorithms_enabled() or _cublas.workspace_fixed())
            and not _cublas_fp32_is_tf32())


# How a scalar or vector decoder runs: as the dense [W, W] GEMM of every decoder kind (on the Triton path fused
# into the encoder's pass), or by its structure (T_b = sum_k Blk(o, k) applied to X_b: the batched [N, N]
# mixing of the factored path, in fp32, D times fewer FLOPs than the dense GEMM, so half of the four GEMMs'
# work at the Criteo shape; the encoder's GEMMs then run alone) at the cost of more launches (einsum's
# copies). Fewer FLOPs pay where the GPU is the bottleneck; more launches cost where the host is (eager
# steps at CTR shapes). So, by mode:
#   "graphs" (default): on the torch.mm path (exact fp32 on a GPU) by structure while a CUDA graph is being
#                       captured (its launches cost nothing on replay), the dense GEMM otherwise; never in
#                       deterministic mode, where a step must round the same whether it is captured or not
#                       (Inductor's CUDA-graph mode runs a first step uncaptured, so a resumed run would
#                       round that step differently). Not on the Triton GEMMs (TF32, autocast's half types):
#                       there the structured path launches Triton kernels the dense one never does, and a
#                       kernel's first launch loads its module, which a capture forbids;
#   "auto":   by structure wherever the torch.mm path or the Triton GEMMs on the matrix units run (eager
#             steps load the kernels before any capture);   "never": always the dense GEMM;
#   "always": by structure wherever the op runs (tests).
# gpu_check's `fused cuda graph` / `fused cuda graph dense` / `fused cuda graph tf32 structured` rows and the
# eager `fused_structured` rows measure both sides.
STRUCTURED_DECODER = os.environ.get("SFG_FAST_STRUCTURED_DECODER", "graphs")
_STRUCTURED_MODES = ("graphs", "auto", "always", "never")


def structured_decoder(t: torch.Tensor, precision: str, kind: str) -> bool:
    """Whether a scalar / vector decoder runs by its structure (see STRUCTURED_DECODER) for tensors like ``t``."""
    mode = STRUCTURED_DECODER
    if mode not in _STRUCTURED_MODES:
        raise ValueError(f"SFG_FAST_STRUCTURED_DECODER must be one of {_STRUCTURED_MODES}, got {mode!r}")
    if kind not in ("scalar", "vector") or mode == "never":
        return False
    if mode == "always":
        return True
    if not torch_gemms(t, precision):
        return mode == "auto" and _matrix_unit_gemms(t, precision)
    if mode == "auto":
        return True
    return (t.is_cuda and not torch.are_deterministic_algorithms_enabled()
            and torch.cuda.is_current_stream_capturing())


def _matrix_unit_gemms(t: torch.Tensor, precision: str) -> bool:
    """The Triton GEMMs on a GPU's matrix units (TF32, or autocast's half type), where the structured
    decoder also pays: there the dense decoder's half of the GEMM work runs on tensor cores too, but the
    step's other work is small enough that it is a large share. Its mixing (einsum, a cuBLAS bmm, kept in
    fp32) is kept out of deterministic mode unless cuBLAS repeats (sfg_fast._cublas)."""
    return (t.is_cuda and precision != "ieee"
            and (not torch.are_deterministic_algorithms_enabled() or _cublas.workspace_fixed()))


_MIX = {"scalar": ("ok,bkq->boq", "ok,boq->bkq", "boq,bkq->ok"),
        "vector": ("okq,bkq->boq", "okq,boq->bkq", "boq,bkq->okq")}


def _fp32(t: torch.Tensor):
    """Autocast off: the structured decoder's out-of-place torch products stay in fp32 (the dense path's
    torch.mm calls write ``out=`` buffers, which autocast leaves alone)."""
    return torch.autocast(t.device.type, enabled=False)


def _mix(kind: str, which: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The structured decoder's products (``which``): 0 T = X through the blocks, 1 the dT -> dX map,
    2 the decoder's gradient. ``Blk(o, k)`` is ``dec[o, k] * I`` (scalar) or ``diag(dec[o, k])`` (vector)."""
    with _fp32(a):
        return torch.einsum(_MIX[kind][which], a, b)


# Layout of the weight-gradient GEMM's operands when the Triton kernel runs it: None decides by precision
# (see k_major_weight_grad); True / False force it (tests run both ways under the interpreter).
WEIGHT_GRAD_K_MAJOR: Optional[bool] = None


def k_major_weight_grad(t: torch.Tensor, precision: str) -> bool:
    """Whether the backward hands the weight-gradient GEMM G^T @ X (K = B) K-contiguous copies of G and X.

    Its operands are the transposes of [B, ...] tensors. TF32 matrix units (wgmma) take fp32 operands
    only K-major from shared memory, so on the transposed views Triton copies 4 bytes at a time from
    global memory, strided (16-byte copies on the K-major ones: compare the PTX of both with
    bench/triton_aot.py). In TF32 on an H200 the backward's two GEMMs (this one and the dX GEMM, 12.8
    GFLOP) took 380 us, 34 TFLOP/s, against 188 for the forward's K-major pair
    (bench/results/nvidia-h200/profile-20261128T213757.txt; how the 380 us split is not measured). The
    exact-fp32 path
    multiplies on CUDA cores and copies 16 bytes at a time either way (with fewer shared-memory loads on
    the views, by its PTX), and torch.mm (cuBLAS) transposes for free: both keep the views. Under autocast
    (bf16 / fp16 operands) the copies are made too: the global loads are fp32 either way, and the sm_90
    compile check (bench/triton_aot.py) shows 16-byte copies with them; whether the half types would also
    copy 16 bytes from the views is not checked."""
    if WEIGHT_GRAD_K_MAJOR is not None:
        return WEIGHT_GRAD_K_MAJOR
    return precision != "ieee" and not torch_gemms(t, precision)


def _empty(*shape, **kwargs) -> torch.Tensor:
    out = torch.empty(*shape, **kwargs)
    if POISON_VALUE is not None:
        out.fill_(POISON_VALUE)
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(max(int(x), 1))))


def gemm_blocks(m: int, n: int, k: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an [m, k] @ [k, n] pass."""
    if _interpreting():
        # each program costs milliseconds in the interpreter: few, large ones (tl.dot needs >= 16)
        return _pow2(m, 16, 64), _pow2(n, 16, 64), _pow2(k, 16, 64), 4, 1
    override = os.environ.get("SFG_FAST_GEMM_BLOCKS")
    if override:
        try:
            bm, bn, bk, warps, stages = (int(v) for v in override.split(","))
        except ValueError:
            raise ValueError(f"SFG_FAST_GEMM_BLOCKS must be 'BM,BN,BK,warps,stages' (five integers), "
                             f"got {override!r}") from None
        blocks_ok = all(b >= 16 and b & (b - 1) == 0 for b in (bm, bn, bk))   # tl.dot: powers of 2, >= 16
        if not (blocks_ok and warps in (1, 2, 4, 8, 16) and stages >= 1):
            raise ValueError(f"SFG_FAST_GEMM_BLOCKS: BM, BN, BK must be powers of 2 >= 16, warps a power of 2 "
                             f"up to 16 and stages >= 1, got {override!r}")
        return bm, bn, bk, warps, stages
    return 64, 64, 32, 4, 3


def decoder_matrix(dec: Optional[torch.Tensor], kind: str, n: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """Wd [N*D, N*D] with Wd[k*D + p, o*D + q] = Blk(o, k)[p, q] from the decoder in Blk orientation
    (``[N, N]`` scalar/identity, ``[N, N, D]`` vector, ``[N, N, D, D]`` matrix). Differentiable.

    Returned as the transpose of a contiguous Wd^T (K-contiguous): the forward GEMM reads it in
    [K, N] tiles, and K-contiguous operands are what the matrix units load without a transpose."""
    if kind == "matrix":
        blocks = dec
    else:
        eye = (torch.eye(d, dtype=dec.dtype, device=dec.device) if torch.compiler.is_compiling() else
               constant(("eye", int(d), dec.dtype, device_key(dec.device)),
                        lambda: torch.eye(d, dtype=dec.dtype, device=dec.device)))
        blocks = torch.diag_embed(dec) if kind == "vector" else dec[:, :, None, None] * eye
    return blocks.to(like.dtype).permute(0, 3, 1, 2).reshape(n * d, n * d).t()


_PAIR_CODES = {"upper": 0, "offdiag": 1, "all": 2}


def oriented(weight: torch.Tensor, kind: str, orientation: str) -> torch.Tensor:
    """The decoder weight as a view in Blk orientation, indexed (o, k[, p[, q]]) (no copy; what
    ``sfg_logits.decoder_operand`` applies after the pair mask)."""
    if orientation == "left":
        return weight.permute(0, 1, 3, 2) if kind == "matrix" else weight
    if kind == "matrix":
        return weight.permute(1, 0, 2, 3)
    if kind == "vector":
        return weight.permute(1, 0, 2)
    return weight.t()


def _block_strides(view: torch.Tensor):
    """(o, k, p, q) strides of an oriented view; 0 for the dimensions its kind lacks."""
    strides = list(view.stride()) + [0] * (4 - view.dim())
    return strides[:4]


# Largest D the decoder-matrix kernels take (one D x D block per program); beyond it the torch ops build Wd.
DECODER_MATRIX_MAX_D = 256


class DecoderMatrixFunction(torch.autograd.Function):
    """Wd [W, W] (as the transpose of a contiguous fp32 Wd^T, like ``decoder_matrix``) straight from the
    raw scalar / vector / matrix decoder weight: one kernel forward, one backward, where the torch ops
    (mask, identity blocks, permuted copy, and their backward) took six. Entries outside P, and off the
    diagonal of scalar / vector blocks, are exactly 0 whatever the weight holds there (the torch ops
    multiply by 0, so a NaN or inf weight spreads NaN into them; the reference reads only the pairs of
    P); the weight's gradient is 0 outside P."""

    @staticmethod
    def forward(ctx, weight, kind, pairs, orientation, n, d):
        width = n * d
        out = _empty(width, width, dtype=torch.float32, device=weight.device)
        ctx.meta = (kind, pairs, orientation, n, d, weight.shape, weight.dtype)
        if n > 0 and d > 0:
            G._decoder_matrix_kernel[(n, n)](
                weight, out, d, width, *_block_strides(oriented(weight, kind, orientation)),
                KIND=K.KIND_CODES[kind], PAIRS=_PAIR_CODES[pairs], SWAP=orientation == "right",
                BLOCK_D=max(16, next_pow2(d)))
        return out.t()

    @staticmethod
    def backward(ctx, grad):
        if create_graph_requested():
            refuse("the decoder matrix", "triton")
        kind, pairs, orientation, n, d, shape, dtype = ctx.meta
        dw = _empty(shape, dtype=dtype, device=grad.device)
        g = grad.t()                                   # dL/dWd^T
        if n > 0 and d > 0:
            G._decoder_matrix_bwd_kernel[(n, n)](
                g, dw, d, g.stride(0), g.stride(1), *_block_strides(oriented(dw, kind, orientation)),
                KIND=K.KIND_CODES[kind], PAIRS=_PAIR_CODES[pairs], SWAP=orientation == "right",
                BLOCK_D=max(16, next_pow2(d)))
        return dw, None, None, None, None, None


def _matmul(a, b, c, scale=None, addend=None, ids=None, offsets=None, d=1, precision="ieee"):
    """c = a @ b (+ scale[:, None] * addend, or + addend when scale is None); with ids/offsets, c is the
    table gradient and the product is atomically scattered into it (see the kernel)."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return c
    if ids is None and torch_gemms(a, precision):
        torch.mm(a.to(torch.float32), b.to(torch.float32), out=c)
        if addend is not None:
            if scale is not None:
                c.addcmul_(scale.to(torch.float32)[:, None], addend)
            else:
                c.add_(addend)
        return c
    bm, bn, bk, warps, stages = gemm_blocks(m, n, k)
    scatter = ids is not None
    add = 0 if addend is None else (1 if scale is not None else 2)
    dummy = a
    G._matmul_kernel[(cdiv(m, bm), cdiv(n, bn))](
        a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        scale if scale is not None else dummy, addend if addend is not None else dummy,
        addend.stride(0) if addend is not None else 0, addend.stride(1) if addend is not None else 0,
        ids if scatter else dummy, offsets if scatter else dummy, d,
        ids.stride(0) if scatter else 0, ids.stride(1) if scatter else 0,
        ADD=add, SCATTER=scatter,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, num_warps=warps, num_stages=stages)
    return c


def _x_strides(x, ids, gather):
    if gather:
        return ids.stride(0), ids.stride(1), x.stride(0), 0, x.stride(1)
    return 0, 0, x.stride(0), x.stride(1), x.stride(2)


def forward(plan, x, ids, offsets, y, enc_w, enc_b, wd, labels=None, store=False):
    """One forward pass. x: the table [V, D] (plan.gather, with ids/offsets) or dense [B, N, D];
    y: dense Y [B, N, D] when there is no encoder, else None; enc_w/enc_b the encoder (or None);
    wd the decoder matrix [W, W] (or None: encoder only).

    Returns (logit [B] or None, loss, dlogit, z [B, N, D] or None, saved) with fp32 outputs; saved
    = (X [B, W] when gathered, H, T) for ``backward`` when ``store``."""
    batch, n = ids.shape if plan.gather else x.shape[:2]
    d = x.shape[-1]
    width = n * d
    has_enc, has_dec = enc_w is not None, wd is not None
    f32 = dict(dtype=torch.float32, device=x.device)
    # the kernels index offsets and the bias with unit stride
    offsets = offsets.contiguous() if offsets is not None else None
    enc_b = enc_b.contiguous() if enc_b is not None else None
    gathered = None
    if plan.gather and ((not GATHER_IN_GEMM and x.stride(1) == 1) or plan.structured):
        # one pass of the lookup kernel (it wants unit-stride rows); the GEMM then reads a dense X (saved
        # for backward as is). The structured decoder runs on torch ops: they need X gathered in any case.
        from .embedding_lookup import embedding_lookup_fwd
        gathered = (embedding_lookup_fwd(ids, x, offsets) if x.stride(1) == 1
                    else x[ids.to(torch.int64) + offsets].contiguous())
        x, ids, offsets = gathered, None, None
        plan = replace(plan, gather=False)
    bm, bn, bk, warps, stages = gemm_blocks(batch, width, width)
    tiles_n = cdiv(width, bn) if width > 0 else 1
    logit = _empty(batch, **f32) if has_dec else None
    loss = _empty(batch, **f32) if labels is not None else None
    dlogit = _empty(batch, **f32) if labels is not None else None
    z = _empty(batch, n, d, **f32) if not has_dec else None
    saved = None
    if store:
        x_saved = gathered.view(batch, width) if gathered is not None else (
            _empty(batch, width, **f32) if plan.gather else None)
        saved = (x_saved, _empty(batch, width, **f32) if has_enc else None,
                 _empty(batch, width, **f32) if has_dec else None)
    if batch == 0:
        return logit, loss, dlogit, z, saved
    if width == 0:
        # no fields: every logit is 0 (and the reduce kernel still writes loss and dlogit)
        part = torch.zeros(batch, 1, **f32)
        tiles_n = 1
    else:
        part = _empty(batch, tiles_n, **f32)
    dummy = part
    xs, hs, ts = saved if store else (None, None, None)
    if gathered is not None:
        xs = None                     # nothing for the kernel to store: X is the gathered tensor
    ys = (y.stride(0), y.stride(1), y.stride(2)) if y is not None else (0, 0, 0)
    if width > 0 and not plan.gather and (plan.structured or torch_gemms(x, plan.precision)):
        _split_forward(plan, x, y, enc_w, enc_b, wd, hs, ts, z, part, bn, f32)
    elif width > 0:
        G._sfg_gemm_fwd_kernel[(cdiv(batch, bm), tiles_n)](
            x, ids if plan.gather else dummy, offsets if plan.gather else dummy, y if y is not None else dummy,
            enc_w if has_enc else dummy, enc_b if enc_b is not None else dummy, wd if has_dec else dummy,
            part, xs if xs is not None else dummy, hs if hs is not None else dummy, ts if ts is not None else dummy,
            z if z is not None else dummy,
            batch, width, d, float(plan.gamma), *_x_strides(x, ids, plan.gather), *ys,
            enc_w.stride(0) if has_enc else 0, enc_w.stride(1) if has_enc else 0,
            wd.stride(0) if has_dec else 0, wd.stride(1) if has_dec else 0,
            ACT=K.ACT_CODES[plan.activation], HAS_BIAS=enc_b is not None, RESIDUAL=plan.residual,
            GATHER=plan.gather, HAS_ENC=has_enc, HAS_DEC=has_dec, STORE=store, STORE_Z=not has_dec,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=plan.precision, num_warps=warps, num_stages=stages)
    if has_dec:
        block_b = 16 if _interpreting() else 128
        G._sfg_logit_reduce_kernel[(cdiv(batch, block_b),)](
            part, labels if labels is not None else dummy, logit, loss if loss is not None else dummy,
            dlogit if dlogit is not None else dummy, batch, tiles_n,
            HAS_LABELS=labels is not None, BLOCK_B=block_b, BLOCK_P=next_pow2(tiles_n))
    return logit, loss, dlogit, z, saved


def _k_major(b: torch.Tensor, precision: str) -> torch.Tensor:
    """A weight as the B operand [K, N] of a Triton GEMM: a K-contiguous copy where the GEMM wants one
    (on the matrix units: TF32, autocast's half types; see k_major_weight_grad), as is otherwise."""
    if b.stride(0) == 1 or not k_major_weight_grad(b, precision):
        return b
    return b.t().contiguous().t()


def _split_forward(plan, x, y, enc_w, enc_b, wd, hs, ts, z, part, block_n, f32) -> None:
    """The forward as separate products on a dense X: H = X @ We^T + b and T = X @ Wd, or T by the
    decoder's structure (``plan.structured``), into the saved buffers when given; then the Triton
    epilogue, which writes the partial logits ``part`` [B, cdiv(W, block_n)] for _sfg_logit_reduce_kernel
    (the layout the fused kernel writes). The GEMMs are torch.mm where TORCH_GEMMS says so, else the
    Triton GEMM (the structured decoder in TF32 or under autocast)."""
    has_enc, has_dec = enc_w is not None, wd is not None
    batch, width = part.shape[0], x.shape[-2] * x.shape[-1]
    x2d = x.reshape(batch, width)
    x32 = x2d.to(torch.float32)
    h = t = None
    if has_enc:
        h = hs if hs is not None else _empty(batch, width, **f32)
        if not torch_gemms(x32, plan.precision):
            bias = enc_b.to(torch.float32).expand(batch, width) if enc_b is not None else None
            _matmul(x32, _k_major(enc_w.to(torch.float32).t(), plan.precision), h, addend=bias,
                    precision=plan.precision)
        elif enc_b is not None:
            torch.addmm(enc_b.to(torch.float32), x32, enc_w.to(torch.float32).t(), out=h)
        else:
            torch.mm(x32, enc_w.to(torch.float32).t(), out=h)
    if has_dec:
        t = ts if ts is not None else _empty(batch, width, **f32)
        if plan.structured:
            n = x.shape[-2]
            t.view(batch, n, -1).copy_(_mix(plan.kind, 0, wd.to(torch.float32), x32.view(batch, n, -1)))
        else:
            _matmul(x32, _k_major(wd.to(torch.float32), plan.precision), t, precision=plan.precision)
    source = x2d if has_enc else y.reshape(batch, width)   # the residual X, or the decoder-only op's Y
    bm = 16 if _interpreting() else 32
    G._sfg_epilogue_kernel[(cdiv(batch, bm), part.shape[1])](
        h if h is not None else part, t if t is not None else part, source, part, z if z is not None else part,
        batch, width, float(plan.gamma), source.stride(0), source.stride(1),
        ACT=K.ACT_CODES[plan.activation], RESIDUAL=plan.residual, HAS_ENC=has_enc, HAS_DEC=has_dec,
        STORE_Z=not has_dec, BLOCK_M=bm, BLOCK_N=block_n)


def backward(plan, x, ids, offsets, y, enc_w, wd, saved, dlogit=None, dz=None, need_x=True, need_y=False,
             need_w=True, need_b=True, need_wd=True):
    """(dx, dy, d_enc_w [W, W], d_enc_b [W], d_wd [W, W]) in fp32: dx is the dense table gradient
    [V, D] when gathered, else [B, N, D]; dy [B, N, D] for a dense Y. ``dlogit`` [B] with a decoder,
    ``dz`` [B, N, D] for the encoder alone."""
    xs, hs, ts = saved
    has_enc, has_dec = enc_w is not None, wd is not None
    offsets = offsets.contiguous() if offsets is not None else None   # indexed with unit stride
    batch, n = ids.shape if plan.gather else x.shape[:2]
    d = x.shape[-1]
    width = n * d
    f32 = dict(dtype=torch.float32, device=x.device)
    x2d = xs if plan.gather else x.reshape(batch, width)
    y2d = y.reshape(batch, width) if y is not None else None
    dz2d = dz.reshape(batch, width) if dz is not None else None
    parts = int(has_enc) + int(has_dec)
    grads = _empty(batch, parts * width, **f32)
    dy = _empty(batch, width, **f32) if (not has_enc and has_dec) else None
    need_dw = (has_enc and need_w) or (has_dec and need_wd)
    # the weight-gradient GEMM G^T @ X reads K-contiguous copies the elementwise pass writes (see
    # k_major_weight_grad); else G and X themselves, transposed views
    # (the structured plan's weight-gradient GEMM is dWe alone: nothing to copy for a decoder-only pass or a
    # frozen encoder)
    transposed = ((has_enc and need_w) if plan.structured else need_dw) and batch > 0 and width > 0 \
        and k_major_weight_grad(grads, plan.precision)
    grads_t = _empty(parts * width, batch, **f32) if transposed else None
    x_t = _empty(width, batch, **f32) if transposed else None
    if batch > 0 and width > 0:
        bm = 16 if _interpreting() else 32
        bn = _pow2(width, 16, 64) if _interpreting() else 128
        xy = x2d if has_enc else y2d
        dummy = grads
        G._sfg_gemm_grad_kernel[(cdiv(batch, bm), cdiv(width, bn))](
            hs if hs is not None else dummy, ts if ts is not None else dummy, xy if xy is not None else dummy,
            dlogit if dlogit is not None else dummy, dz2d if dz2d is not None else dummy, grads,
            dy if dy is not None else dummy, grads_t if transposed else dummy, x2d, x_t if transposed else dummy,
            batch, width, float(plan.gamma),
            xy.stride(0) if xy is not None else 0, xy.stride(1) if xy is not None else 0,
            dz2d.stride(0) if dz2d is not None else 0, dz2d.stride(1) if dz2d is not None else 0,
            x2d.stride(0), x2d.stride(1),
            ACT=K.ACT_CODES[plan.activation], RESIDUAL=plan.residual, HAS_ENC=has_enc, HAS_DEC=has_dec,
            STORE_T=transposed, BLOCK_M=bm, BLOCK_N=bn)
    dx = None
    if need_x and plan.structured:
        dense = _structured_dx(plan, grads, enc_w, wd, batch, n, d, dlogit, ts, dz2d)
        if not plan.gather:
            dx = dense.view(batch, n, d)
        elif torch.are_deterministic_algorithms_enabled():
            from .sfg_logits import _table_grad_deterministic
            dx = _table_grad_deterministic(dense.view(batch, n, d), ids, offsets, x.shape[0])
        else:
            from .embedding_lookup import embedding_lookup_bwd
            dx = embedding_lookup_bwd(dense.view(batch, n, d), ids, offsets, x.shape[0], torch.float32,
                                      deterministic=False)
    elif need_x:
        # dX = G @ [We ; Wd^T] (+ g * T or + dZ where X also feeds Y directly through the residual)
        # the B operand [We ; Wd^T] ([K = parts*W, W]) stored K-contiguous, as [We^T | Wd] transposed
        mats = ([enc_w.to(torch.float32).t()] if has_enc else []) + ([wd.to(torch.float32)] if has_dec else [])
        stacked = torch.cat(mats, dim=1).t()
        extra = {}
        if plan.residual and has_enc:
            extra = dict(scale=dlogit, addend=ts) if has_dec else dict(addend=dz2d)
        if plan.gather and not torch.are_deterministic_algorithms_enabled() and torch_gemms(grads, plan.precision):
            # torch.mm's product, then the lookup's atomic scatter into the table gradient
            from .embedding_lookup import embedding_lookup_bwd
            dense = _matmul(grads, stacked, _empty(batch, width, **f32), precision=plan.precision, **extra)
            dx = embedding_lookup_bwd(dense.view(batch, n, d), ids, offsets, x.shape[0], torch.float32,
                                      deterministic=False)
        elif plan.gather and not torch.are_deterministic_algorithms_enabled():
            dx = torch.zeros(x.shape[0], d, **f32)
            _matmul(grads, stacked, dx, ids=ids, offsets=offsets, d=d, precision=plan.precision, **extra)
        else:
            dense = _matmul(grads, stacked, _empty(batch, width, **f32), precision=plan.precision, **extra)
            if plan.gather:
                from .sfg_logits import _table_grad_deterministic
                dx = _table_grad_deterministic(dense.view(batch, n, d), ids, offsets, x.shape[0])
            else:
                dx = dense.view(batch, n, d)
    d_w = d_b = d_wd = None
    if need_dw and plan.structured:
        # dWe = dH^T @ X; the decoder's own gradient by its structure
        x32 = x2d.to(torch.float32)
        if has_enc and need_w:
            a, b = (grads_t[:width], x_t.t()) if transposed else (grads[:, :width].t(), x32)
            d_w = _matmul(a, b, _empty(width, width, **f32), precision=plan.precision)
        if has_dec and need_wd:
            d_t = grads[:, (parts - 1) * width:].reshape(batch, n, d)
            d_wd = _mix(plan.kind, 2, d_t, x32.view(batch, n, d))
    elif need_dw:
        # [dWe ; dWd^T] = G^T @ X: one GEMM over the batch (no atomics)
        a, b = (grads_t, x_t.t()) if transposed else (grads.t(), x2d)
        both = _matmul(a, b, _empty(parts * width, width, **f32), precision=plan.precision)
        if has_enc and need_w:
            d_w = both[:width]
        if has_dec and need_wd:
            d_wd = both[(parts - 1) * width:].t()
    if has_enc and need_b:
        d_b = grads[:, :width].sum(dim=0)
    return dx, (dy.view(batch, n, d) if (dy is not None and need_y) else None), d_w, d_b, d_wd


def _structured_dx(plan, grads, enc_w, dec, batch, n, d, dlogit, ts, dz2d) -> torch.Tensor:
    """dX [B, W] fp32 of the structured plan: dH @ We (torch.mm, or the Triton GEMM) plus dT mapped back through the decoder's
    blocks (the transpose of its forward mixing), plus the residual's direct term as in the dense plan."""
    width = n * d
    has_enc = enc_w is not None
    d_t = grads[:, (width if has_enc else 0):].reshape(batch, n, d)
    dense = _mix(plan.kind, 1, dec.to(torch.float32), d_t).reshape(batch, width)
    if has_enc:
        dense = _matmul(grads[:, :width], _k_major(enc_w.to(torch.float32), plan.precision),
                        _empty(batch, width, dtype=torch.float32, device=dense.device), addend=dense,
                        precision=plan.precision)
        if plan.residual:
            dense.addcmul_(dlogit.to(torch.float32)[:, None], ts)    # Y = act(H) + X feeds the logit directly
    return dense


def interaction(plan, out_dtype, x, ids, offsets, y, enc_w, enc_b, wd):
    """The op's entry point: under autograd when a gradient can flow, else the forward alone (it then
    saves nothing, so inference under no_grad / inference_mode allocates no backward buffers)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, y, enc_w, enc_b, wd)):
        return SfgGemmFunction.apply(plan, out_dtype, x, ids, offsets, y, enc_w, enc_b, wd)
    logit, _, _, z, _ = forward(plan, x, ids, offsets, y, enc_w, enc_b, wd, store=False)
    return (logit if wd is not None else z).to(out_dtype)


class SfgGemmFunction(torch.autograd.Function):
    """The GEMM-shaped interaction under autograd: logit [B] (with a decoder) or Z [B, N, D] (encoder
    only) from (x, ids, offsets, y, enc_w, enc_b, wd) as in ``forward``."""

    @staticmethod
    def forward(ctx, plan, out_dtype, x, ids, offsets, y, enc_w, enc_b, wd):
        store = any(ctx.needs_input_grad)
        logit, _, _, z, saved = forward(plan, x, ids, offsets, y, enc_w, enc_b, wd, store=store)
        ctx.plan = plan
        ctx.bias_dtype = enc_b.dtype if enc_b is not None else None
        if store:
            ctx.save_for_backward(x, ids, offsets, y, enc_w, wd, *saved)
        return (logit if wd is not None else z).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        if create_graph_requested():   # the backward is kernels: create_graph must not pretend
            refuse("the GEMM-shaped interaction", "triton")
        x, ids, offsets, y, enc_w, wd, xs, hs, ts = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous().to(torch.float32)
        dx, dy, d_w, d_b, d_wd = backward(
            ctx.plan, x, ids, offsets, y, enc_w, wd, (xs, hs, ts),
            dlogit=grad if wd is not None else None, dz=grad if wd is None else None,
            need_x=need[2], need_y=need[5], need_w=need[6], need_b=need[7] and ctx.bias_dtype is not None,
            need_wd=need[8])

        def cast(g, like_dtype, wanted):
            return g.to(like_dtype) if (wanted and g is not None) else None
        return (None, None, cast(dx, x.dtype, need[2]), None, None, cast(dy, y.dtype if y is not None else None, need[5]),
                cast(d_w, enc_w.dtype if enc_w is not None else None, need[6]), cast(d_b, ctx.bias_dtype, need[7]),
                cast(d_wd, wd.dtype if wd is not None else None, need[8]))
