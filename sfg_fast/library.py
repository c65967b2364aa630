"""sfg_fast ops as ``torch.library`` custom ops, so models compose with ``torch.compile(fullgraph=True)``.

Why this exists: the ``"torch"`` backend (``sfg_fast.factored``) is plain PyTorch and traces as it is,
but the Triton launchers and the compiled extension are opaque to Dynamo (host-side block sizing,
autograd.Functions holding Python state, raw kernel launches). Each functional op therefore has a
custom op ``sfg_fast::<op>(..., str backend)`` with a fake (meta) implementation that states the
output's shape and dtype, and a registered autograd formula whose backward is itself a custom op
``sfg_fast::<op>_backward``. ``sfg_fast.functional`` routes through them only while compiling;
eager calls keep the direct path (no dispatcher overhead).

Data-reading validation (id bounds, label values) cannot be traced: a ``bool(tensor.any())`` is a
graph break. While compiling it runs inside the graph as the opaque ops ``sfg_fast::checked_ids``
and ``sfg_fast::checked_labels``, which read the data at run time and raise the same errors as
eager mode.

Output dtype contract (the fake and the real kernel must agree, so the eager body casts to it):
the promoted dtype of the op's floating operands (bias excluded for the encoder ops), the table's
dtype for ``embedding_lookup``, and fp32 (fp64 for fp64 logits) for ``bce_with_logits``. Under
autocast the custom ops receive their inputs uncast, so a bf16 activation meeting an fp32 table
promotes to fp32 instead of silently losing precision; the caller's autocast state travels in the op's
backend string, so the op's body (which a compiled graph runs with autocast off) computes as the eager op
does under autocast (the SFG GEMMs on half operands).

Backward: ``embedding_lookup`` and ``bce_with_logits`` call their Triton backward launchers
directly; the other ops recompute their forward under autograd inside the backward op and pull
the gradients through the backend's own autograd.Function (one extra forward kernel per backward;
the eager path has no such cost).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _checks as C
from ._backend import _assume_constant_result, autocast_on
from . import factored
from . import functional as _functional

__all__ = ["NAMESPACE", "OPS", "compiled_impl", "checked_ids", "checked_labels", "validate_bce",
           "op", "backward_op"]

NAMESPACE = "sfg_fast"


# ---------------------------------------------------------------------------------------------
# run-time validation inside compiled graphs


@torch.library.custom_op(f"{NAMESPACE}::checked_ids", mutates_args=())
def checked_ids(ids: torch.Tensor, offsets: torch.Tensor, num_rows: int, bounds_check: str) -> torch.Tensor:
    """Validated ids for a lookup (``"fatal"``: IndexError naming field and id; ``"clamp_to_oov"``:
    remapped to the field's last id). Returns a new tensor: custom op outputs may not alias inputs."""
    C.check_choice("bounds_check", bounds_check, ("fatal", "clamp_to_oov"))
    if bounds_check == "fatal":
        C.check_offsets_and_ids(ids, offsets, num_rows)
        return ids.clone()
    # widened by num_rows, which bounds every field's size: the fake below needs a dtype known from shapes
    remapped, _ = C.clamp_to_oov(C.widen_for_oov(ids, num_rows), C.check_offsets(offsets, num_rows))
    return remapped


@checked_ids.register_fake
def _checked_ids_fake(ids, offsets, num_rows, bounds_check):
    if bounds_check == "clamp_to_oov":
        return torch.empty_like(ids, dtype=C.widen_for_oov(ids.new_empty(0), num_rows).dtype)
    return torch.empty_like(ids)


@torch.library.custom_op(f"{NAMESPACE}::checked_labels", mutates_args=())
def checked_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` (copied) after the value checks of ``bce_with_logits``: finite and in [0, 1]."""
    probe = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    C.check_bce(probe, labels, "mean")
    return labels.clone()


@checked_labels.register_fake
def _checked_labels_fake(labels):
    return torch.empty_like(labels)


def _labels_setup(ctx, inputs, output):
    pass


def _labels_backward(ctx, grad):
    return grad


checked_labels.register_autograd(_labels_backward, setup_context=_labels_setup)


def validate_bce(logits, labels, reduction: str) -> torch.Tensor:
    """Every check of ``bce_with_logits`` that needs no tensor data, then :func:`checked_labels`."""
    C.check_tensor("logits", logits)
    if isinstance(labels, torch.Tensor):
        # zero-size stand-ins keep the dtype and choice checks and skip the value checks
        C.check_bce(logits.new_empty(0), labels.new_empty(0), reduction)
        C.check_same("logits", logits, "labels", labels)
    else:
        C.check_bce(logits, labels, reduction)
    return checked_labels(labels)


# ---------------------------------------------------------------------------------------------
# one custom op (and one backward op) per functional op


def _promote(*tensors) -> torch.dtype:
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def _num_pairs(n: int, pairs: str) -> int:
    return {"upper": n * (n - 1) // 2, "all": n * n, "offdiag": n * (n - 1)}[pairs]


def _bce_meta(logits, labels, reduction):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (tuple(logits.shape) if reduction == "none" else ()), dtype


@dataclass(frozen=True)
class OpSpec:
    """Schema of one functional op as a custom op, and how its output is shaped."""
    name: str
    args: str                                  # schema of the arguments, without ``str backend``
    differentiable: Tuple[int, ...]            # positions of the tensor arguments that get gradients
    meta: Callable                             # (*args) -> (output shape, output dtype)
    check: Callable                            # (*args) -> None: the functional op's shape / dtype checks

    @property
    def arg_names(self) -> List[str]:
        return [a.strip().split(" ")[-1] for a in self.args.split(",")]


OPS: Dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("embedding_lookup", "Tensor ids, Tensor weight, Tensor offsets", (1,),
           lambda ids, w, off: ((ids.shape[0], ids.shape[1], w.shape[1]), w.dtype),
           lambda ids, w, off: C.check_lookup(ids, w, off, "off")),
    OpSpec("sfg_encode", "Tensor V, Tensor weight, Tensor? bias, str activation, float gamma, bool residual",
           (0, 1, 2), lambda V, w, b, *_: (tuple(V.shape), _promote(V, w)), C.check_encode),
    OpSpec("pairwise_decode", "Tensor Z, Tensor V, Tensor? weight, str kind, str pairs, str generated_side, "
           "bool symmetric", (0, 1, 2), lambda Z, V, w, *_: ((Z.shape[0],), _promote(Z, V, w)), C.check_decode),
    OpSpec("pairwise_products", "Tensor Z, Tensor V, str pairs, str generated_side, bool symmetric", (0, 1),
           lambda Z, V, pairs, *_: ((Z.shape[0], _num_pairs(Z.shape[1], pairs)), _promote(Z, V)), C.check_products),
    OpSpec("generative_cross", "Tensor x, Tensor x_gen, Tensor weight, Tensor? bias", (0, 1, 2, 3),
           lambda x, g, w, b: (tuple(x.shape), _promote(x, g, w, b)), C.check_cross),
    OpSpec("bce_with_logits", "Tensor logits, Tensor labels, str reduction", (0, 1), _bce_meta,
           lambda logits, labels, reduction: C.check_bce(logits, labels, reduction, values=False)),
    OpSpec("sfg_logits", "Tensor ids, Tensor table, Tensor offsets, Tensor? enc_weight, Tensor? enc_bias, "
           "Tensor? dec_weight, str kind, str activation, float gamma, bool residual, str pairs, "
           "str generated_side, bool symmetric", (1, 3, 4, 5),
           lambda ids, t, off, ew, eb, dw, *_: ((ids.shape[0],), _promote(t, ew, dw)),
           lambda *args: C.check_sfg_logits(*args, "off")),
    OpSpec("sfg_interaction", "Tensor V, Tensor? enc_weight, Tensor? enc_bias, Tensor? dec_weight, str kind, "
           "str activation, float gamma, bool residual, str pairs, str generated_side, bool symmetric", (0, 1, 2, 3),
           lambda V, ew, eb, dw, *_: ((V.shape[0],), _promote(V, ew, dw)), C.check_interaction),
)}


# The caller's torch.autocast state rides in the custom ops' backend string ("triton@autocast:cuda:bfloat16"):
# inside a compiled graph an op's body no longer sees it (AOTAutograd runs the graph with autocast off), so
# functional reads it while tracing and the op's forward, and its backward's recomputation, run the eager
# implementation under the same autocast, computing what the eager op computes there.
_AUTOCAST = "@autocast:"


@_assume_constant_result
def _autocast_suffix(device: str) -> str:
    """``_AUTOCAST`` + "<device type>:<dtype>" when autocast is on for ``device`` at trace time, else "".
    (Dynamo's global-state guard recompiles when the autocast state changes.)"""
    kind = torch.device(device).type
    if not autocast_on(kind):
        return ""
    return f"{_AUTOCAST}{kind}:{str(torch.get_autocast_dtype(kind)).replace('torch.', '')}"


def _split_backend(backend: str):
    """(backend name, the context its eager implementation runs in: the caller's autocast, or none)."""
    name, sep, rest = backend.partition(_AUTOCAST)
    if not sep:
        return name, contextlib.nullcontext()
    kind, dtype = rest.split(":")
    return name, torch.autocast(kind, dtype=getattr(torch, dtype))


def _concrete(backend: str, name: str, op_args) -> str:
    """The backend an op runs on: "auto" (kept in exported programs) is resolved now, on this machine,
    for the device of the op's first tensor argument."""
    if backend != "auto":
        return backend
    from ._backend import resolve
    from .ops import load_backends
    load_backends()
    device = next(a.device for a in op_args if isinstance(a, torch.Tensor))
    return resolve("auto", name, device)


def _backend_impl(backend: str, name: str) -> Callable:
    """The eager implementation of op ``name`` on ``backend`` (the torch one is sfg_fast.factored)."""
    if backend == "torch":
        return getattr(factored, name)
    from .ops import load_backends
    load_backends()
    impl = _functional._OPTIONAL_IMPLS.get((backend, name))
    if impl is None:
        from ._backend import unavailable_reason
        raise RuntimeError(f"backend {backend!r} has no implementation of {name!r}: "
                           f"{unavailable_reason(backend, name) or 'it did not register one'}")
    return impl


def _fresh(out: torch.Tensor, inputs: Sequence) -> torch.Tensor:
    """``out`` itself unless it shares memory with an input (custom op outputs must not alias)."""
    ptr = out.untyped_storage().data_ptr()
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() == ptr:
            return out.clone()
    return out


def _laid_out_like(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``g`` with the strides of ``torch.empty_like(like)`` (what the fake kernels return): Inductor
    asserts real strides against fake ones, and autograd through views (the decoder's masked,
    permuted weight) hands back permuted gradients. The layout is read off a meta tensor: the table's
    gradient can be gigabytes, and the common case (strides already match) needs no second copy."""
    if g.stride() == torch.empty_like(like, device="meta").stride():
        return g
    return torch.empty_like(like).copy_(g)


def _make_forward(spec: OpSpec):
    def forward(*args):
        *op_args, backend = args
        # the op is public (torch.ops.sfg_fast.*): a call that bypasses sfg_fast.functional gets the same
        # shape checks before any kernel sees a raw pointer (no tensor data is read)
        spec.check(*op_args)
        shape, dtype = spec.meta(*op_args)
        backend, autocast = _split_backend(backend)
        backend = _concrete(backend, spec.name, op_args)
        with torch.no_grad(), autocast:
            out = _backend_impl(backend, spec.name)(*op_args)
        if tuple(out.shape) != tuple(shape):
            raise RuntimeError(f"{spec.name} on backend {backend!r} returned shape {list(out.shape)}, "
                               f"expected {list(shape)}")
        return _fresh(out.to(dtype).contiguous(), op_args)

    def fake(*args):
        *op_args, _ = args
        spec.check(*op_args)
        shape, dtype = spec.meta(*op_args)
        ref = next(a for a in op_args if isinstance(a, torch.Tensor))
        return ref.new_empty(shape, dtype=dtype)
    return forward, fake


def _lookup_backward_triton(grad, ids, weight, offsets, needs):
    from .ops.embedding_lookup import embedding_lookup_bwd
    return [embedding_lookup_bwd(grad, ids, offsets, weight.shape[0], weight.dtype) if needs[0] else None]


def _bce_backward_triton(grad, logits, labels, reduction, needs):
    from .ops.bce_with_logits import bce_with_logits_bwd
    need_labels = bool(needs[1]) and labels.is_floating_point()
    dx, dy = bce_with_logits_bwd(grad, logits, labels, reduction, bool(needs[0]), need_labels)
    return [dx, dy]


# Backward launchers that need no recomputation of the forward; every other (backend, op) recomputes.
_DIRECT_BACKWARD = {("triton", "embedding_lookup"): _lookup_backward_triton,
                    ("triton", "bce_with_logits"): _bce_backward_triton}


def _autograd_inside_kernel():
    """Re-enable autograd recording inside a custom op's kernel.

    The dispatcher runs custom op kernels with the autograd keys excluded (the op's own formula is
    the autograd), so ATen ops in a recomputed forward would record nothing and every gradient
    would silently be zero. This lifts exactly those keys for the recomputation (autocast is as the
    forward ran: ``_split_backend``).
    """
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality) | \
        torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                           torch._C._dispatch_tls_local_exclude_set() - keys)


def _recompute_backward(spec: OpSpec, backend: str, grad, op_args, needs) -> List[Optional[torch.Tensor]]:
    """Gradients of ``sum(grad * op(*op_args))`` through the backend's own autograd formula."""
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in op_args]
    impl = _backend_impl(backend, spec.name)
    wanted = []
    for pos, need in zip(spec.differentiable, needs):
        if need and args[pos] is not None and args[pos].is_floating_point():
            args[pos] = args[pos].requires_grad_(True)
            wanted.append(pos)
    grads: Dict[int, torch.Tensor] = {}
    if wanted:
        with torch.enable_grad(), _autograd_inside_kernel():
            out = impl(*args)
            if out.requires_grad:
                got = torch.autograd.grad(out, [args[p] for p in wanted], grad.to(out.dtype), allow_unused=True)
                grads = {p: g for p, g in zip(wanted, got) if g is not None}
    return [None if pos not in wanted else grads.get(pos, torch.zeros_like(args[pos]))
            for pos in spec.differentiable]


def _make_backward(spec: OpSpec):
    def backward(*args):
        grad, *op_args, backend, needs = args
        backend, autocast = _split_backend(backend)
        backend = _concrete(backend, spec.name, op_args)
        direct = _DIRECT_BACKWARD.get((backend, spec.name))
        if direct:
            grads = direct(grad, *op_args, needs)
        else:
            with autocast:           # the forward recomputed as the forward ran
                grads = _recompute_backward(spec, backend, grad, op_args, needs)
        out = []
        for pos, g, need in zip(spec.differentiable, grads, needs):
            t = op_args[pos]
            if g is None or not need or t is None:
                out.append(grad.new_empty(0))       # the autograd formula maps empties to None
            else:
                out.append(_fresh(_laid_out_like(g.to(t.dtype).reshape(t.shape), t), [grad, *op_args]))
        return out

    def fake(*args):
        grad, *op_args, _, needs = args
        out = []
        for pos, need in zip(spec.differentiable, needs):
            t = op_args[pos]
            out.append(torch.empty_like(t) if (need and t is not None) else grad.new_empty(0))
        return out
    return backward, fake


def _register(spec: OpSpec):
    forward, forward_fake = _make_forward(spec)
    backward, backward_fake = _make_backward(spec)
    fwd = torch.library.custom_op(f"{NAMESPACE}::{spec.name}", forward, mutates_args=(),
                                  schema=f"({spec.args}, str backend) -> Tensor")
    fwd.register_fake(forward_fake)
    bwd = torch.library.custom_op(f"{NAMESPACE}::{spec.name}_backward", backward, mutates_args=(),
                                  schema=f"(Tensor grad, {spec.args}, str backend, bool[] needs) -> Tensor[]")
    bwd.register_fake(backward_fake)
    num_args = len(spec.arg_names)

    def setup_context(ctx, inputs, output):
        *op_args, backend = inputs
        tensors = [i for i, a in enumerate(op_args) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*[op_args[i] for i in tensors])
        ctx.layout = (tensors, [None if isinstance(a, torch.Tensor) else a for a in op_args], backend)

    def autograd_backward(ctx, grad):
        tensors, op_args, backend = ctx.layout
        op_args = list(op_args)
        for i, t in zip(tensors, ctx.saved_tensors):
            op_args[i] = t
        needs = [bool(ctx.needs_input_grad[pos]) for pos in spec.differentiable]
        result = [None] * (num_args + 1)
        if any(needs):
            grads = bwd(grad.contiguous(), *op_args, backend, needs)
            for pos, need, g in zip(spec.differentiable, needs, grads):
                keep = need and op_args[pos] is not None and g.numel() == op_args[pos].numel()
                result[pos] = g if keep else None
        return tuple(result)

    fwd.register_autograd(autograd_backward, setup_context=setup_context)
    return fwd, bwd


_REGISTERED = {name: _register(spec) for name, spec in OPS.items()}


def op(name: str):
    """The custom op of functional op ``name`` (call as ``op(name)(*args, backend)``)."""
    return _REGISTERED[name][0]


def backward_op(name: str):
    """The backward custom op of functional op ``name``."""
    return _REGISTERED[name][1]


# ---------------------------------------------------------------------------------------------
# what sfg_fast.functional calls while torch.compile traces it


@_assume_constant_result
def _backend_forced() -> bool:
    """SFG_FAST_BACKEND names a backend (read eagerly at trace time)."""
    from ._backend import ENV_VAR
    return os.environ.get(ENV_VAR, "").strip() not in ("", "auto")


@_assume_constant_result
def _resolve_while_tracing(backend: str, name: str, device: str, exporting: bool = False) -> str:
    """Backend choice, run eagerly at trace time: loading the backends imports modules, which Dynamo
    cannot trace. The result is baked into the graph (set SFG_FAST_BACKEND before compiling)."""
    from ._backend import ENV_VAR, resolve
    from .ops import load_backends
    if (backend == "auto" and not exporting and torch.device(device).type == "cpu"
            and os.environ.get(ENV_VAR, "").strip() in ("", "auto")):
        # Inductor compiles the factored torch ops into C++ it can fuse; the extension's kernels stay opaque
        # ops whose compiled backward recomputes their forward. Measured (bench_train, SFG-FwFM training
        # step, compiled torch vs compiled extension): 5.0 vs 9.5 ms at MovieLens's shape, 49.9 vs 58.8 ms
        # at the Criteo shape (quick). An exported program is not compiled further: it keeps the kernels.
        return "torch"
    if backend not in ("torch", "reference"):
        load_backends()
    return resolve(backend, name, torch.device(device))


def compiled_impl(backend: str, name: str, device: torch.device) -> Optional[Callable]:
    """What ``functional._impl`` returns while compiling: the traceable torch implementation, or a
    caller of the custom op for an opaque backend (None selects the reference)."""
    chosen = _resolve_while_tracing(backend, name, str(device), torch.compiler.is_exporting())
    if chosen == "reference":
        return None
    if chosen == "torch":
        return getattr(factored, name)
    custom = op(name)
    if backend == "auto" and torch.compiler.is_exporting() and not _backend_forced():
        # an exported program keeps "auto" and resolves it where it runs: loaded where the extension (or
        # Triton) is missing, the op runs on the torch twin instead of failing
        chosen = "auto"
    chosen += _autocast_suffix(str(device))
    return lambda *args: custom(*args, chosen)
