"""Row-sparse optimizers for embedding tables, applied inside the lookup's backward.

A CTR step touches a few thousand of the table's millions of rows. Instead of building a dense
``[V, D]`` gradient and letting a dense optimizer sweep the whole table, ``fused_embedding_lookup``
reduces the gradient of each touched row (duplicates summed in a fixed, sorted order) and updates
those rows of the table IN PLACE during backward; the table never receives a ``.grad``.

Optimizers (``g`` = summed gradient of touched row ``r``; arithmetic in fp32, fp64 for fp64 tables;
results stored in the table's dtype; untouched rows and their state are left alone):

    sgd:      w[r] -= lr * g
    adagrad:  acc[r] += mean_d(g[d]^2)                          (rowwise: one fp32 scalar per row,
              w[r] -= lr * g / (sqrt(acc[r]) + eps)              FBGEMM's EXACT_ROWWISE_ADAGRAD)
    adam:     t += 1 (one global step count per optimizer step)
              m[r] = b1 * m[r] + (1 - b1) * g;   v[r] = b2 * v[r] + (1 - b2) * g^2
              w[r] -= lr * (m[r] / (1 - b1^t)) / (sqrt(v[r] / (1 - b2^t)) + eps)
              (lazy rows, like torch.optim.SparseAdam, with torch.optim.Adam's eps placement)

Backends: ``"torch"`` (index ops on the unique rows), ``"triton"`` (one fused segment-reduce +
update kernel, ``kernels/sparse_update.py``) and ``"cpu"`` (the C++ gather and the C++ sort + fused
update of ``sfg_fast._C``, fp32/bf16 tables); ``"auto"`` takes triton for CUDA tensors and cpu for
fp32/bf16 CPU tables when available, else torch.
"""
from __future__ import annotations

import math
import os
from typing import Sequence, Tuple

import torch
from torch import nn

from . import _checks as C
from ._backend import ENV_VAR, BackendUnavailableError, unavailable_reason
from .nn import check_ids_width, init_table_fields

__all__ = ["SparseRowOptimizer", "unique_row_grads", "fused_embedding_lookup", "FusedFieldEmbedding"]

KINDS = ("sgd", "adagrad", "adam")
FUSED_BACKENDS = ("auto", "torch", "triton", "cpu")
_CPU_FUSED_DTYPES = (torch.float32, torch.bfloat16)


class SparseRowOptimizer:
    """A row-sparse optimizer for one ``[V, D]`` table: ``sgd`` | ``adagrad`` (rowwise) | ``adam`` (lazy).

    Formulas in the module docstring. State is fp32 (fp64 for fp64 tables, torch path only) and
    created on the first step for the table it sees (Adagrad ``sum [V]``; Adam ``exp_avg [V, D]``
    and ``exp_avg_sq [V, D]``); later steps must use a table of the same shape (the state follows
    the table to a new device).

    Args:
        kind: "sgd" | "adagrad" | "adam".
        lr: learning rate (> 0).
        eps: denominator guard of adagrad/adam (default 1e-8, FBGEMM's and torch.optim.Adam's).
        betas: Adam's (b1, b2), each in [0, 1).
        initial_accumulator_value: Adagrad's starting ``acc`` (>= 0).
    """

    def __init__(self, kind: str = "adagrad", lr: float = 0.01, eps: float = 1e-8,
                 betas: Tuple[float, float] = (0.9, 0.999), initial_accumulator_value: float = 0.0):
        C.check_choice("kind", kind, KINDS)
        self.kind = kind
        self._set_hyper_parameters(lr, eps, betas, initial_accumulator_value)
        self.step_count = 0
        self.state = {}

    def _set_hyper_parameters(self, lr, eps, betas, initial_accumulator_value) -> None:
        """Validate and set the hyper-parameters (the constructor and load_state_dict alike)."""
        lr, eps = float(lr), float(eps)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr}")
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        betas = tuple(betas)
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        initial_accumulator_value = float(initial_accumulator_value)
        if not (initial_accumulator_value >= 0 and math.isfinite(initial_accumulator_value)):
            raise ValueError(f"initial_accumulator_value must be a finite number >= 0, got {initial_accumulator_value}")
        self.lr, self.eps = lr, eps
        self.betas = (float(betas[0]), float(betas[1]))
        self.initial_accumulator_value = initial_accumulator_value

    def _ensure_state(self, weight: torch.Tensor) -> None:
        num_rows, dim = weight.shape
        shapes = {"adagrad": {"sum": (num_rows,)},
                  "adam": {"exp_avg": (num_rows, dim), "exp_avg_sq": (num_rows, dim)}}.get(self.kind, {})
        for name, shape in shapes.items():
            have = self.state.get(name)
            if have is None:
                fill = self.initial_accumulator_value if name == "sum" else 0.0
                self.state[name] = torch.full(shape, fill, dtype=self._compute_dtype(weight), device=weight.device)
            elif have.device != weight.device and tuple(have.shape) == shape:
                self.state[name] = have.to(weight.device)     # the table moved (module.to(device))
            elif tuple(have.shape) != shape:
                raise ValueError(f"optimizer state {name!r} has shape {list(have.shape)} on {have.device}, "
                                 f"but weight {list(weight.shape)} on {weight.device} needs {list(shape)}")

    @staticmethod
    def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
        return torch.float64 if weight.dtype == torch.float64 else torch.float32

    def _begin_step(self, weight: torch.Tensor) -> dict:
        """Create state, advance the step count, and return the scalars of this step."""
        self._ensure_state(weight)
        self.step_count += 1
        b1, b2 = self.betas
        return {"lr": self.lr, "eps": self.eps, "beta1": b1, "beta2": b2,
                "bias1": 1.0 - b1 ** self.step_count, "bias2": 1.0 - b2 ** self.step_count}

    @torch.no_grad()
    def step_rows(self, weight: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Update ``weight[rows]`` in place from their summed gradients (the ``"torch"`` path).

        Args:
            weight: ``[V, D]`` table (fp32/fp16/bf16/fp64), modified in place.
            rows: int64 ``[U]`` UNIQUE row indices.  grads: ``[U, D]`` summed gradient of each row.
        """
        if rows.dim() != 1 or grads.shape != (rows.numel(), weight.shape[1]):
            raise ValueError(f"grads must have shape [U, D]=[{rows.numel()}, {weight.shape[1]}], "
                             f"got {list(grads.shape)}")
        s = self._begin_step(weight)
        if rows.numel() == 0:
            return
        g = grads.to(self._compute_dtype(weight))
        w = weight.index_select(0, rows).to(g.dtype)
        if self.kind == "sgd":
            w -= s["lr"] * g
        elif self.kind == "adagrad":
            acc = self.state["sum"].index_select(0, rows) + (g * g).mean(dim=1)
            self.state["sum"].index_copy_(0, rows, acc)
            w -= (s["lr"] / (acc.sqrt() + s["eps"]))[:, None] * g
        else:
            m = self.state["exp_avg"].index_select(0, rows) * s["beta1"] + (1.0 - s["beta1"]) * g
            v = self.state["exp_avg_sq"].index_select(0, rows) * s["beta2"] + (1.0 - s["beta2"]) * (g * g)
            self.state["exp_avg"].index_copy_(0, rows, m)
            self.state["exp_avg_sq"].index_copy_(0, rows, v)
            w -= s["lr"] * (m / s["bias1"]) / ((v / s["bias2"]).sqrt() + s["eps"])
        weight.index_copy_(0, rows, w.to(weight.dtype))

    @torch.no_grad()
    def step_lookup_triton(self, weight: torch.Tensor, grad_V: torch.Tensor, ids: torch.Tensor,
                           offsets: torch.Tensor) -> None:
        """Fused path: segment-reduce ``grad_V [B, N, D]`` per row and update in one Triton kernel."""
        from .ops.embedding_lookup import sparse_update
        if weight.dtype == torch.float64:
            raise TypeError("the triton fused update computes in fp32; use backend='torch' for float64 tables")
        s = self._begin_step(weight)
        state1 = self.state.get("sum", self.state.get("exp_avg"))
        sparse_update(weight, grad_V, ids, offsets, self.kind, state1=state1, state2=self.state.get("exp_avg_sq"),
                      **s)

    @torch.no_grad()
    def step_lookup_cpu(self, weight: torch.Tensor, grad_V: torch.Tensor, ids: torch.Tensor,
                        offsets: torch.Tensor) -> None:
        """Fused path on CPU: stable radix sort by row, fp32 duplicate sums, update in place (C++).

        Bitwise identical for any thread count (each row's gradients are summed in entry order).
        Args: weight fp32/bf16 contiguous ``[V, D]`` CPU table; grad_V ``[B, N, D]``; ids int32/int64
        ``[B, N]`` (already bounds-checked); offsets int64 ``[N]``.
        """
        from .ops import cpu_ext
        if weight.dtype not in _CPU_FUSED_DTYPES:
            raise TypeError(f"the cpu fused update handles float32/bfloat16 tables, got {weight.dtype}; "
                            "use backend='torch'")
        s = self._begin_step(weight)
        cpu_ext.sparse_row_update(self.kind, weight, self.state, ids, offsets, grad_V, s["lr"], s["eps"],
                                  (s["beta1"], s["beta2"]), self.step_count, "off")

    def state_dict(self) -> dict:
        return {"kind": self.kind, "lr": self.lr, "eps": self.eps, "betas": self.betas,
                "initial_accumulator_value": self.initial_accumulator_value, "step": self.step_count,
                "state": {k: v.clone() for k, v in self.state.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("kind") != self.kind:
            raise ValueError(f"state_dict is for kind {state_dict.get('kind')!r}, this optimizer is {self.kind!r}")
        # validated like the constructor's (and before anything changes): a corrupt or hand-edited state
        # must not turn rows into NaN later
        step = int(state_dict["step"])
        if step < 0:
            raise ValueError(f"state_dict['step'] must be >= 0, got {step}")
        self._set_hyper_parameters(state_dict["lr"], state_dict["eps"], state_dict["betas"],
                                   state_dict.get("initial_accumulator_value", 0.0))
        self.step_count = step
        self.state = {k: v.detach().clone() for k, v in state_dict["state"].items()}

    def __repr__(self) -> str:
        return f"SparseRowOptimizer(kind={self.kind!r}, lr={self.lr}, eps={self.eps}, betas={self.betas})"


def unique_row_grads(ids: torch.Tensor, offsets: torch.Tensor, grad_V: torch.Tensor):
    """The table gradient as (unique rows, summed grads): ``grads[u] = sum of grad_V[b, f]`` over every
    (b, f) with ``offsets[f] + ids[b, f] == rows[u]``.

    Duplicates are summed in ascending (b * N + f) order after a stable sort, so the result is
    deterministic. Args: ids int32/int64 ``[B, N]``, offsets int64 ``[N]``, grad_V ``[B, N, D]``.
    Returns ``(rows int64 [U] ascending, grads [U, D])`` in grad_V's dtype (fp32 sums for fp16/bf16).
    """
    if grad_V.dim() != 3 or grad_V.shape[:2] != ids.shape:
        raise ValueError(f"grad_V must have shape [B, N, D] with [B, N]={list(ids.shape)}, got {list(grad_V.shape)}")
    flat = (ids.to(torch.int64) + offsets).reshape(-1)
    sorted_rows, perm = torch.sort(flat, stable=True)
    rows, inverse = torch.unique_consecutive(sorted_rows, return_inverse=True)
    acc_dtype = torch.float64 if grad_V.dtype == torch.float64 else torch.float32
    g = grad_V.reshape(-1, grad_V.shape[2]).to(acc_dtype)[perm]
    # index_put_ with accumulate is deterministic on CPU and under torch's deterministic mode on CUDA.
    grads = torch.zeros(rows.numel(), grad_V.shape[2], dtype=acc_dtype, device=grad_V.device)
    grads.index_put_((inverse,), g, accumulate=True)
    out_dtype = grad_V.dtype if grad_V.dtype in (torch.float32, torch.float64) else torch.float32
    return rows, grads.to(out_dtype)


def _cpu_fused_reason(device: torch.device, dtype) -> "str | None":
    """None when the C++ fused lookup + update can run on this table, else why not."""
    why = unavailable_reason("cpu", "", device)
    if why is None and dtype is not None and dtype not in _CPU_FUSED_DTYPES:
        why = f"the C++ fused update handles float32/bfloat16 tables, got {dtype}"
    return why


def _resolve_fused_backend(backend: str, device: torch.device, dtype=None) -> str:
    C.check_choice("backend", backend, FUSED_BACKENDS)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env in ("torch", "triton", "cpu"):
            backend = env
        elif device.type == "cuda" and unavailable_reason("triton", "embedding_lookup", device) is None:
            return "triton"
        elif device.type == "cpu" and _cpu_fused_reason(device, dtype) is None:
            return "cpu"
        else:
            return "torch"
    if backend == "cpu":
        why = _cpu_fused_reason(device, dtype)
        if why is not None:
            raise BackendUnavailableError(f"backend 'cpu' is unavailable for fused_embedding_lookup: {why}")
    if backend == "triton":
        from .ops import load_backends
        load_backends()
        why = unavailable_reason("triton", "embedding_lookup", device)
        if why is not None:
            raise BackendUnavailableError(f"backend 'triton' is unavailable for fused_embedding_lookup: {why}")
    return backend


class _FusedLookupFunction(torch.autograd.Function):
    """Forward: gather. Backward: update the table in place; no gradient is returned for it."""

    @staticmethod
    def forward(ctx, ids, weight, offsets, optimizer, backend):
        ctx.save_for_backward(ids, offsets)
        ctx.weight = weight      # updated in place in backward, so not saved (no version check)
        ctx.shape = tuple(weight.shape)
        ctx.optimizer, ctx.backend = optimizer, backend
        if backend == "triton":
            from .ops.embedding_lookup import embedding_lookup_fwd
            if weight.dtype == torch.float64:
                raise TypeError("the triton fused update computes in fp32; use backend='torch' for float64 tables")
            return embedding_lookup_fwd(ids, weight, offsets)
        if backend == "cpu":
            from .ops import cpu_ext
            return cpu_ext.embedding_lookup(ids, weight, offsets, "off")
        return torch.nn.functional.embedding(ids.to(torch.int64) + offsets, weight)

    @staticmethod
    def backward(ctx, grad_V):
        ids, offsets = ctx.saved_tensors
        weight = ctx.weight
        if tuple(weight.shape) != ctx.shape:
            # the update addresses rows with the ids the forward validated against the old shape
            raise RuntimeError(f"fused_embedding_lookup: weight changed shape from {list(ctx.shape)} to "
                               f"{list(weight.shape)} between forward and backward; its sparse update would "
                               "address rows that no longer exist")
        if ctx.backend == "triton":
            ctx.optimizer.step_lookup_triton(weight, grad_V, ids, offsets)
        elif ctx.backend == "cpu":
            ctx.optimizer.step_lookup_cpu(weight, grad_V, ids, offsets)
        else:
            rows, grads = unique_row_grads(ids, offsets, grad_V)
            ctx.optimizer.step_rows(weight, rows, grads)
        return None, None, None, None, None


def _validated_ids(ids, weight, offsets, bounds_check):
    """Apply the bounds mode; returns (ids, number of remapped ids)."""
    C.check_lookup(ids, weight, offsets, bounds_check)
    if bounds_check == "off":
        return ids, 0
    if bounds_check == "fatal":
        C.check_offsets_and_ids(ids, offsets, weight.shape[0])
        return ids, 0
    return C.clamp_to_oov(ids, C.check_offsets(offsets, weight.shape[0]))


def fused_embedding_lookup(ids: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                           optimizer: SparseRowOptimizer, bounds_check: str = "fatal",
                           backend: str = "auto") -> torch.Tensor:
    """``V[b, f] = weight[offsets[f] + ids[b, f]]`` whose backward updates ``weight`` in place.

    Backward sums the gradient of each touched row and applies ``optimizer`` to those rows (one
    optimizer step per backward); no dense ``[V, D]`` gradient is built and ``weight.grad`` stays
    None. ``weight`` must require grad for the backward to run.

    Args:
        ids: int32/int64 ``[B, N]`` field-local ids.  weight: ``[V, D]`` table (updated in place).
        offsets: int64 ``[N]`` first row of each field.  optimizer: a :class:`SparseRowOptimizer`.
        bounds_check: "fatal" (IndexError naming field and id) | "clamp_to_oov" | "off".
        backend: "auto" | "torch" | "triton" | "cpu" (C++ gather + fused update, fp32/bf16 CPU tables).
    Returns:
        ``[B, N, D]`` embeddings in weight's dtype.
    """
    if not isinstance(optimizer, SparseRowOptimizer):
        raise TypeError(f"optimizer must be a SparseRowOptimizer, got {type(optimizer).__name__}")
    ids, _ = _validated_ids(ids, weight, offsets, bounds_check)
    chosen = _resolve_fused_backend(backend, weight.device, weight.dtype)
    return _FusedLookupFunction.apply(ids, weight, offsets, optimizer, chosen)


class FusedFieldEmbedding(nn.Module):
    """:class:`sfg_fast.nn.FieldEmbedding` whose table trains itself: the row-sparse optimizer runs
    inside backward (see :func:`fused_embedding_lookup`), so leave ``weight`` out of the dense optimizer
    (it never gets a ``.grad``, so including it is harmless).

    ``forward(ids [B, N]) -> V [B, N, D]``. The optimizer state travels in ``state_dict()`` (extra state).
    Args: as FieldEmbedding, plus ``optimizer`` ("sgd" | "adagrad" | "adam"), ``lr``, ``eps``, ``betas``,
    ``dtype`` of the table.
    """

    def __init__(self, field_dims: Sequence[int], embedding_dim: int, optimizer: str = "adagrad",
                 lr: float = 0.01, eps: float = 1e-8, betas: Tuple[float, float] = (0.9, 0.999),
                 bounds_check: str = "fatal", init_std: float = 1e-4, backend: str = "auto",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        dims = init_table_fields(self, field_dims, embedding_dim, bounds_check)
        C.check_choice("backend", backend, FUSED_BACKENDS)
        self.backend = backend
        self.num_clamped = 0
        self.optimizer = SparseRowOptimizer(optimizer, lr=lr, eps=eps, betas=betas)
        self.weight = nn.Parameter(torch.empty(sum(dims), self.embedding_dim, dtype=dtype))
        self.init_std = float(init_std)
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids_width(self, ids)
        ids, count = _validated_ids(ids, self.weight, self.offsets, self.bounds_check)
        self.num_clamped += count
        chosen = _resolve_fused_backend(self.backend, self.weight.device, self.weight.dtype)
        return _FusedLookupFunction.apply(ids, self.weight, self.offsets, self.optimizer, chosen)

    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "num_clamped": self.num_clamped}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_clamped = int(state.get("num_clamped", 0))

    def extra_repr(self) -> str:
        return (f"field_dims={self.field_dims}, embedding_dim={self.embedding_dim}, "
                f"bounds_check={self.bounds_check!r}, optimizer={self.optimizer!r}")
