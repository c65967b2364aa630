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

Under ``torch.compile`` (fullgraph included) the lookup and its update are the graph ops
``sfg_fast::fused_gather`` and ``sfg_fast::fused_row_update`` (see "the same lookup inside torch.compile
graphs" below); a compiled step updates the tables exactly as an eager one on the same backend. That
needs torch >= 2.13: older AOTAutograd refuses a backward that writes a parameter, so there the fused
lookup runs eagerly between graphs while training (a graph break; ``fullgraph=True`` raises Dynamo's error
naming ``_fused_lookup_between_graphs_before_torch_2_13``); inference compiles whole.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import _checks as C
from ._backend import BackendUnavailableError, _assume_constant_result, env_backend, in_torch_func, unavailable_reason
from .nn import FieldDimsState, check_ids_width, clamp_ids_to_oov, draw_initial_rows, init_table_fields

__all__ = ["SparseRowOptimizer", "unique_row_grads", "fused_embedding_lookup", "FusedFieldEmbedding"]

KINDS = ("sgd", "adagrad", "adam")
FUSED_BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
_CPU_FUSED_DTYPES = (torch.float32, torch.bfloat16)


class SparseRowOptimizer:
    """A row-sparse optimizer for one ``[V, D]`` table: ``sgd`` | ``adagrad`` (rowwise) | ``adam`` (lazy).

    Formulas in the module docstring. State is fp32 (fp64 for fp64 tables, torch path only) and
    created on the first step for the table it sees (Adagrad ``sum [V]``; Adam ``exp_avg [V, D]``
    and ``exp_avg_sq [V, D]``); later steps must use a table of the same shape (the state follows
    the table to a new device or dtype).

    One optimizer serves ONE table, and every backward through a fused lookup is one optimizer step:
    a table looked up twice in an iteration (or a backward run twice with ``retain_graph``) is stepped
    twice (Adam's step count advances by 2, Adagrad accumulates twice), unlike a dense optimizer
    stepping once on the summed gradient. Look each table up once per step.

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
        # The step count is a 0-d int64 CPU tensor and lr, eps, beta1, beta2 are mirrored in a float64 CPU
        # tensor (written by their setters), not only Python numbers: a compiled graph passes them to its
        # update op, which reads them at run time and steps the count in place. Python numbers would be
        # baked into the graph, and every step (or lr change) would compile it again. Reading a CPU tensor
        # costs no device sync.
        self._step = torch.zeros((), dtype=torch.int64, device="cpu")
        self._hyper = torch.zeros(4, dtype=torch.float64, device="cpu")
        self.state = {}
        self._row_map: Optional[torch.Tensor] = None     # the Triton update's scratch (SFG_FAST_SPARSE_DEDUP=map)
        self._set_hyper_parameters(lr, eps, betas, initial_accumulator_value)

    @property
    def lr(self) -> float:
        """Learning rate of the row updates (positive, finite)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = self._hyper[0] = C.check_positive_finite("lr", value)

    @property
    def eps(self) -> float:
        """The denominator's epsilon of Adagrad and Adam (positive, finite)."""
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        # eps = 0 turns a touched row whose gradient is zero into 0/0 = NaN
        self._eps = self._hyper[1] = C.check_positive_finite("eps", value)

    @property
    def betas(self) -> Tuple[float, float]:
        """Adam's (beta1, beta2), each in [0, 1)."""
        return self._betas

    @betas.setter
    def betas(self, value) -> None:
        self._betas = C.check_betas(value)
        self._hyper[2], self._hyper[3] = self._betas

    @property
    def initial_accumulator_value(self) -> float:
        """Adagrad's starting ``acc``; set before the first step, it also refills the state already built."""
        return self._initial_acc

    @initial_accumulator_value.setter
    def initial_accumulator_value(self, value: float) -> None:
        value = C.real_number("initial_accumulator_value", value)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"initial_accumulator_value must be a finite number >= 0, got {value}")
        self._initial_acc = value
        if self.kind == "adagrad" and "sum" in self.state and self.step_count == 0:
            self.state["sum"].fill_(value)

    def __copy__(self) -> "SparseRowOptimizer":
        # the step counter and the hyper-parameter tensor are this optimizer's own (a shared one would step
        # or retune the original); the state dict is new, its row tensors shared, as a shallow copy's are
        other = SparseRowOptimizer.__new__(SparseRowOptimizer)
        other.__dict__.update(self.__dict__)
        other._step, other._hyper, other.state = self._step.clone(), self._hyper.clone(), dict(self.state)
        return other

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (Adam's ``t``)."""
        return int(self._step)

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._step.fill_(int(value))

    def prepare(self, weight: torch.Tensor) -> None:
        """Create (or move to ``weight``'s device) the state this optimizer keeps for ``weight``. Steps do
        this themselves; a compiled graph cannot (its update op mutates the state tensors it was given),
        so :class:`FusedFieldEmbedding` calls it when built, moved or loaded."""
        self._ensure_state(weight)

    def _set_hyper_parameters(self, lr, eps, betas, initial_accumulator_value) -> None:
        """Validate and set the hyper-parameters (the constructor and load_state_dict alike)."""
        self.lr, self.eps, self.betas = lr, eps, betas
        self.initial_accumulator_value = initial_accumulator_value

    def _state_shapes(self, weight: torch.Tensor) -> dict:
        """The shape of each row-state tensor this optimizer keeps for ``weight``."""
        num_rows, dim = weight.shape
        return {"adagrad": {"sum": (num_rows,)},
                "adam": {"exp_avg": (num_rows, dim), "exp_avg_sq": (num_rows, dim)}}.get(self.kind, {})

    def _ensure_state(self, weight: torch.Tensor) -> None:
        for name, shape in self._state_shapes(weight).items():
            have = self.state.get(name)
            want = self._compute_dtype(weight)
            if have is None or have.device.type == "meta" and weight.device.type != "meta":
                # (state built on the meta device holds no values: a module materialised with to_empty starts
                # its optimizer afresh)
                fill = self.initial_accumulator_value if name == "sum" else 0.0
                self.state[name] = torch.full(shape, fill, dtype=want, device=weight.device)
            elif tuple(have.shape) != shape:
                raise ValueError(f"optimizer state {name!r} has shape {list(have.shape)} on {have.device}, "
                                 f"but weight {list(weight.shape)} on {weight.device} needs {list(shape)}")
            elif have.device != weight.device or have.dtype != want or not have.is_contiguous():
                # the table moved or changed dtype (module.to(...), a checkpoint of another dtype)
                self.state[name] = have.to(device=weight.device, dtype=want).contiguous()

    @staticmethod
    def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
        return torch.float64 if weight.dtype == torch.float64 else torch.float32

    def _begin_step(self, weight: torch.Tensor) -> dict:
        """Create state and return the scalars of the next step (its number ``t``, bias corrections). The
        step count advances only when the update has been applied (:meth:`_end_step`): a step that
        fails leaves Adam's bias correction where it was."""
        if weight.dim() == 2 and weight.shape[1] == 0:
            # row-wise Adagrad's mean over D would be 0 / 0 = NaN in every touched row's state
            raise ValueError(f"weight must have at least one column (D >= 1) for a sparse update, got shape "
                             f"{list(weight.shape)}")
        self._ensure_state(weight)
        t = self.step_count + 1
        b1, b2 = self.betas
        return {"lr": self.lr, "eps": self.eps, "beta1": b1, "beta2": b2,
                "bias1": 1.0 - b1 ** t, "bias2": 1.0 - b2 ** t, "t": t}

    def _end_step(self, s: dict) -> None:
        self.step_count = s["t"]

    @torch.no_grad()
    def step_rows(self, weight: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Update ``weight[rows]`` in place from their summed gradients (the ``"torch"`` path).

        Args:
            weight: ``[V, D]`` table (fp32/fp16/bf16/fp64), modified in place.
            rows: int64 ``[U]`` UNIQUE row indices in ``[0, V)``.  grads: ``[U, D]`` summed gradient of each row.
        """
        C.check_tensor("weight", weight, ndim=2)
        if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.dim() != 1:
            raise TypeError(f"rows must be a 1-D int64 tensor of row indices, got "
                            f"{getattr(rows, 'dtype', type(rows).__name__)} of shape {list(getattr(rows, 'shape', []))}")
        if not isinstance(grads, torch.Tensor) or grads.shape != (rows.numel(), weight.shape[1]):
            raise ValueError(f"grads must have shape [U, D]=[{rows.numel()}, {weight.shape[1]}], "
                             f"got {list(getattr(grads, 'shape', [])) or type(grads).__name__}")
        if rows.device != weight.device or grads.device != weight.device:
            raise ValueError(f"rows ({rows.device}) and grads ({grads.device}) must be on weight's device "
                             f"({weight.device})")
        if rows.numel() and not C.on_meta(rows):
            lo, hi = torch.stack([rows.min(), rows.max()]).tolist()
            distinct = torch.unique(rows).numel()
            if lo < 0 or hi >= weight.shape[0]:
                raise IndexError(f"rows must lie in [0, {weight.shape[0]}) (weight's rows), got min {lo} max {hi}")
            if distinct != rows.numel():
                raise ValueError(f"rows must be unique (sum the gradients of a repeated row first, as "
                                 f"unique_row_grads does): {rows.numel() - distinct} repeats")
        self._step_unique_rows(weight, rows, grads)

    def _step_unique_rows(self, weight: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """step_rows on rows known unique and in range (unique_row_grads's): the torch backend's update."""
        s = self._begin_step(weight)
        if rows.numel() == 0:
            self._end_step(s)
            return
        g = grads.to(self._compute_dtype(weight))
        w = weight.index_select(0, rows).to(g.dtype)
        new_state = {}
        if self.kind == "sgd":
            w -= s["lr"] * g
        elif self.kind == "adagrad":
            acc = new_state["sum"] = self.state["sum"].index_select(0, rows) + (g * g).mean(dim=1)
            w -= (s["lr"] / (acc.sqrt() + s["eps"]))[:, None] * g
        else:
            m = new_state["exp_avg"] = self.state["exp_avg"].index_select(0, rows) * s["beta1"] + (1.0 - s["beta1"]) * g
            v = new_state["exp_avg_sq"] = (self.state["exp_avg_sq"].index_select(0, rows) * s["beta2"]
                                           + (1.0 - s["beta2"]) * (g * g))
            w -= s["lr"] * (m / s["bias1"]) / ((v / s["bias2"]).sqrt() + s["eps"])
        # the table first: if writing it fails, the row state and the step count have not moved either
        weight.index_copy_(0, rows, w.to(weight.dtype))
        for name, rows_state in new_state.items():
            self.state[name].index_copy_(0, rows, rows_state)
        self._end_step(s)

    @torch.no_grad()
    def step_lookup_triton(self, weight: torch.Tensor, grad_V: torch.Tensor, ids: torch.Tensor,
                           offsets: torch.Tensor) -> None:
        """Fused path: sum ``grad_V [B, N, D]`` per touched row and update in Triton kernels (the sorted
        segment reduction, or the row map of ``ops.embedding_lookup.SPARSE_DEDUP`` "map")."""
        from .ops.embedding_lookup import new_row_map, row_map_wanted, sparse_update
        if weight.dtype == torch.float64:
            raise TypeError("the triton fused update computes in fp32; use backend='torch' for float64 tables")
        s = self._begin_step(weight)
        state1 = self.state.get("sum", self.state.get("exp_avg"))
        row_map = None
        if row_map_wanted(ids.numel()):
            row_map = self._row_map
            if row_map is None or row_map.shape[0] != weight.shape[0] or row_map.device != weight.device:
                # scratch, not state: every entry is UNCLAIMED between steps (never saved)
                row_map = self._row_map = new_row_map(weight.shape[0], weight.device)
        sparse_update(weight, grad_V, ids, offsets, self.kind, state1=state1, state2=self.state.get("exp_avg_sq"),
                      row_map=row_map, **{k: v for k, v in s.items() if k != "t"})
        self._end_step(s)

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
                                  (s["beta1"], s["beta2"]), s["t"], "off")
        self._end_step(s)

    @torch.no_grad()
    def step_lookup_cuda(self, weight: torch.Tensor, grad_V: torch.Tensor, ids: torch.Tensor,
                         offsets: torch.Tensor) -> None:
        """Fused path of the CUDA extension (row-wise Adagrad only): stable radix sort by row, segment
        sums in entry order (no atomics, bitwise repeatable), update in place.
        Args: weight fp32 contiguous ``[V, D]`` CUDA table (D <= 256); grad_V ``[B, N, D]``; ids int32/int64
        ``[B, N]`` (already bounds-checked); offsets int64 ``[N]``.
        """
        from .ops import cpu_ext
        why = _cuda_fused_reason(weight.device, weight.dtype, self.kind, weight.shape[1])
        if why is not None:
            raise TypeError(f"the cuda fused update cannot run: {why}; use backend='triton' or 'torch'")
        s = self._begin_step(weight)
        cpu_ext._C.rowwise_adagrad_update_cuda(weight, self.state["sum"], ids, offsets,
                                               grad_V.to(torch.float32).contiguous(), s["lr"], s["eps"])
        self._end_step(s)

    def state_dict(self) -> dict:
        """Kind, hyper-parameters, step count and a copy of the row state (:meth:`load_state_dict` reads it)."""
        return {"kind": self.kind, "lr": self.lr, "eps": self.eps, "betas": self.betas,
                "initial_accumulator_value": self.initial_accumulator_value, "step": self.step_count,
                "state": {k: v.clone() for k, v in self.state.items()}}

    def load_state_dict(self, state_dict: dict, weight: Optional[torch.Tensor] = None) -> None:
        """Restore a :meth:`state_dict`. Everything is validated before anything changes (a corrupt or
        hand-edited state must not turn rows into NaN later, nor leave this optimizer half-loaded);
        given the table ``weight`` it serves, the state's shapes are checked against it too."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict from SparseRowOptimizer.state_dict(), got "
                            f"{type(state_dict).__name__}")
        if state_dict.get("kind") != self.kind:
            raise ValueError(f"state_dict is for kind {state_dict.get('kind')!r}, this optimizer is {self.kind!r}")
        missing = [k for k in ("lr", "eps", "betas", "step", "state") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}")
        step = int(state_dict["step"])
        if step < 0:
            raise ValueError(f"state_dict['step'] must be >= 0, got {step}")
        state = _checked_state(self.kind, state_dict["state"], step)
        if weight is not None:
            for name, shape in self._state_shapes(weight).items():
                if name in state and tuple(state[name].shape) != shape:
                    raise ValueError(f"state_dict['state'][{name!r}] has shape {list(state[name].shape)}, but "
                                     f"weight {list(weight.shape)} needs {list(shape)}")
        probe = SparseRowOptimizer(self.kind)
        probe._set_hyper_parameters(state_dict["lr"], state_dict["eps"], state_dict["betas"],
                                    state_dict.get("initial_accumulator_value", 0.0))
        self.lr, self.eps, self.betas = probe.lr, probe.eps, probe.betas
        self.initial_accumulator_value = probe.initial_accumulator_value
        self.step_count = step
        self.state = state

    def __repr__(self) -> str:
        return f"SparseRowOptimizer(kind={self.kind!r}, lr={self.lr}, eps={self.eps}, betas={self.betas})"


_STATE_NAMES = {"sgd": (), "adagrad": ("sum",), "adam": ("exp_avg", "exp_avg_sq")}


def _checked_state(kind: str, state, step: int) -> dict:
    """A copy of a loaded optimizer state after checking its names, dtypes, shapes and values."""
    if not isinstance(state, dict):
        raise TypeError(f"state_dict['state'] must be a dict of tensors, got {type(state).__name__}")
    names = _STATE_NAMES[kind]
    if state and set(state) != set(names) or not state and step > 0 and names:
        raise ValueError(f"state_dict['state'] of a {kind} optimizer after {step} steps must hold exactly "
                         f"{list(names)}, got {sorted(state)}")
    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"state_dict['state'][{name!r}] must be a floating tensor, got "
                            f"{getattr(value, 'dtype', type(value).__name__)}")
        value = value.detach()
        if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
            raise ValueError(f"state_dict['state'][{name!r}] holds NaN or infinite values")
        if name in ("sum", "exp_avg_sq") and value.device.type != "meta" and bool((value < 0).any()):
            raise ValueError(f"state_dict['state'][{name!r}] holds negative values (a sum of squares)")
        out[name] = value.clone()
    if kind == "adagrad" and out and out["sum"].dim() != 1:
        raise ValueError(f"state_dict['state']['sum'] must be [V], got {list(out['sum'].shape)}")
    if kind == "adam" and out and (out["exp_avg"].dim() != 2 or out["exp_avg"].shape != out["exp_avg_sq"].shape):
        raise ValueError(f"state_dict['state'] exp_avg {list(out['exp_avg'].shape)} and exp_avg_sq "
                         f"{list(out['exp_avg_sq'].shape)} must both be [V, D]")
    return out


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


def _cuda_fused_reason(device: torch.device, dtype, kind: str, dim: int) -> "str | None":
    """None when the CUDA extension's fused lookup + row-wise Adagrad can run on this table, else why not."""
    why = unavailable_reason("cuda", "embedding_lookup", device)
    if why is None and kind != "adagrad":
        why = f"the CUDA extension's fused update is row-wise Adagrad only, the optimizer is {kind!r}"
    if why is None and dtype is not None and dtype != torch.float32:
        why = f"the CUDA extension's fused update handles float32 tables, got {dtype}"
    if why is None and dim is not None and dim > 256:
        why = f"the CUDA extension's fused update handles D <= 256, got D={dim}"
    return why


def _resolve_fused_backend(backend: str, device: torch.device, dtype=None, contiguous: bool = True,
                           kind: "str | None" = None, dim: "int | None" = None) -> str:
    """The backend of a fused lookup on a table of this device, dtype and layout (``kind``: the
    optimizer's, ``dim``: D, for the CUDA extension's limits). The fused kernels update the table in
    place through its raw memory, so they take contiguous tables only: "auto" then falls back to torch,
    and an explicit "cpu" / "triton" / "cuda" is refused here, in forward, not in backward. "auto" never
    picks "cuda": Triton's fused update measured faster on the H200 (0.42 vs 0.78 ms at the Criteo shape)."""
    C.check_choice("backend", backend, FUSED_BACKENDS)
    if backend == "auto":
        if torch.jit.is_tracing():
            return "torch"          # the kernels' calls are invisible to a trace (_backend.kernels_invisible)
        # refused as by every other op (_backend.resolve); "reference" has no fused update and means the
        # factored torch path here
        env = env_backend()
        if env in ("torch", "triton", "cpu", "cuda"):
            backend = env
        elif not contiguous:
            return "torch"
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
    if backend == "cuda":
        from .ops import load_backends
        load_backends()          # registers the extension's kernels (nothing may have imported it yet)
        why = _cuda_fused_reason(device, dtype, kind or "adagrad", dim)
        if why is not None:
            raise BackendUnavailableError(f"backend 'cuda' is unavailable for fused_embedding_lookup: {why}")
    if backend in ("cpu", "triton", "cuda") and not contiguous:
        raise ValueError(f"weight must be contiguous for backend {backend!r} (its fused update writes the table "
                         "in place); pass weight.contiguous() as the parameter, or backend='torch'")
    return backend


def _fused_gather(ids, weight, offsets, backend: str) -> torch.Tensor:
    """The forward of a fused lookup on the chosen backend (ids already validated)."""
    if backend == "triton":
        from .ops.embedding_lookup import embedding_lookup_fwd
        if weight.dtype == torch.float64:
            raise TypeError("the triton fused update computes in fp32; use backend='torch' for float64 tables")
        return embedding_lookup_fwd(ids, weight, offsets)
    if backend == "cpu":
        from .ops import cpu_ext
        return cpu_ext.embedding_lookup(ids, weight, offsets, "off")
    if backend == "cuda":
        from .ops import cpu_ext
        return cpu_ext._C.embedding_lookup_cuda(ids, weight, offsets)
    return torch.nn.functional.embedding(ids.to(torch.int64) + offsets, weight)


def _fused_step(optimizer: SparseRowOptimizer, weight, grad_V, ids, offsets, backend: str) -> None:
    """One optimizer step on the rows ``ids`` touched, on the chosen backend (eager and compiled alike)."""
    if backend == "triton":
        optimizer.step_lookup_triton(weight, grad_V, ids, offsets)
    elif backend == "cpu":
        optimizer.step_lookup_cpu(weight, grad_V, ids, offsets)
    elif backend == "cuda":
        optimizer.step_lookup_cuda(weight, grad_V, ids, offsets)
    else:
        rows, grads = unique_row_grads(ids, offsets, grad_V)
        optimizer._step_unique_rows(weight, rows, grads)


class _FusedLookupFunction(torch.autograd.Function):
    """Forward: gather. Backward: update the table in place; no gradient is returned for it."""

    @staticmethod
    def forward(ctx, ids, weight, offsets, optimizer, backend):
        ctx.save_for_backward(ids, offsets)
        ctx.weight = weight      # updated in place in backward, so not saved (no version check)
        ctx.shape = tuple(weight.shape)
        ctx.optimizer, ctx.backend = optimizer, backend
        return _fused_gather(ids, weight, offsets, backend)

    @staticmethod
    def backward(ctx, grad_V):
        ids, offsets = ctx.saved_tensors
        weight = ctx.weight
        if tuple(weight.shape) != ctx.shape:
            # the update addresses rows with the ids the forward validated against the old shape
            raise RuntimeError(f"fused_embedding_lookup: weight changed shape from {list(ctx.shape)} to "
                               f"{list(weight.shape)} between forward and backward; its sparse update would "
                               "address rows that no longer exist")
        _fused_step(ctx.optimizer, weight, grad_V, ids, offsets, ctx.backend)
        if ctx.backend in ("triton", "cpu", "cuda"):
            # the kernels write through raw pointers: tell autograd the table changed, so a graph that saved
            # it for another use (a regulariser on W) raises, as the torch path's index_copy_ makes it
            torch.autograd.graph.increment_version(weight)
        return None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# the same lookup inside torch.compile graphs
#
# A graph cannot hold a Python optimizer object, so while compiling the lookup is _GraphFusedLookup, an
# autograd.Function that Dynamo traces: its forward is the custom op ``sfg_fast::fused_gather`` and its
# backward the mutating custom op ``sfg_fast::fused_row_update``, declared to write the table, the row
# state and the step counter; the hyper-parameters come as a CPU tensor read at run time. AOTAutograd
# keeps that mutation of forward inputs in the backward graph, and Inductor runs the op on the tensors
# themselves (no copy of the table). As in eager mode, the tensors the backward writes are kept on ctx,
# not saved for backward: saved tensors are version-checked, and a second backward on the same forward
# state (gradient accumulation, one table looked up twice, retain_graph) would then refuse the table its
# first backward updated. Both ops run the eager path's code (_fused_gather, _fused_step), so a compiled
# model steps its tables exactly as an eager one.


def _bound_optimizer(kind: str, hyper: torch.Tensor, state1, state2, step: torch.Tensor) -> SparseRowOptimizer:
    """A SparseRowOptimizer working on the given state tensors (stepped in place)."""
    lr, eps, beta1, beta2 = hyper.tolist()
    # built without __init__ (no tensors allocated, no checks): the values come from a validated optimizer
    opt = SparseRowOptimizer.__new__(SparseRowOptimizer)
    opt.kind, opt._hyper, opt._step = kind, hyper, step
    opt._lr, opt._eps, opt._betas, opt._initial_acc = lr, eps, (beta1, beta2), 0.0
    opt.state = {name: t for name, t in zip(_STATE_NAMES[kind], (state1, state2))}
    return opt


def _state_args(optimizer: SparseRowOptimizer, weight: torch.Tensor):
    """The optimizer's row state as the update op's two optional tensors, checked against the table (a
    graph writes the state in place and cannot create or move it)."""
    names = _STATE_NAMES[optimizer.kind]
    if any(name not in optimizer.state for name in names):
        raise RuntimeError("fused_embedding_lookup under torch.compile needs the optimizer's state before the "
                           "first step: call optimizer.prepare(weight) before compiling (FusedFieldEmbedding "
                           "does this itself)")
    want = optimizer._compute_dtype(weight)
    for name in names:
        have = optimizer.state[name]
        if have.device != weight.device or have.dtype != want or not have.is_contiguous():
            raise RuntimeError(f"fused_embedding_lookup under torch.compile: the optimizer state {name!r} is "
                               f"{have.dtype} on {have.device}, the table needs {want} on {weight.device}; a graph "
                               "updates the state in place and cannot move it: call optimizer.prepare(weight) "
                               "(a FusedFieldEmbedding does this when moved with .to(...))")
    state = [optimizer.state[n] for n in names] + [None] * (2 - len(names))
    return state[0], state[1]


@torch.library.custom_op("sfg_fast::fused_gather", mutates_args=())
def _fused_gather_op(ids: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    """``V = weight[offsets + ids]`` on the chosen backend (the forward of a fused lookup in a graph)."""
    return _fused_gather(ids, weight, offsets, backend)


@_fused_gather_op.register_fake
def _fused_gather_fake(ids, weight, offsets, backend):
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.custom_op("sfg_fast::fused_row_update", mutates_args=("weight", "state1", "state2", "step"))
def _fused_row_update_op(weight: torch.Tensor, state1: Optional[torch.Tensor], state2: Optional[torch.Tensor],
                         step: torch.Tensor, hyper: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                         grad_V: torch.Tensor, kind: str, backend: str) -> None:
    """Apply one step of the row-sparse optimizer ``kind`` (``hyper`` = float64 [lr, eps, beta1, beta2]) to
    ``weight``'s touched rows, ``state1``/``state2`` (its row state: Adagrad ``sum``; Adam ``exp_avg``,
    ``exp_avg_sq``) and ``step``, in place."""
    opt = _bound_optimizer(kind, hyper, state1, state2, step)
    given = dict(opt.state)
    opt.prepare(weight)
    moved = [name for name, t in given.items() if opt.state[name] is not t]
    if moved:
        raise RuntimeError(f"fused_embedding_lookup: the optimizer state {moved} is not on the table's device "
                           f"({weight.device}) in its compute dtype; a compiled graph updates the state in place, "
                           "so move the module with .to(...) (which moves the state too) rather than the table "
                           "alone")
    _fused_step(opt, weight, grad_V, ids, offsets, backend)


class _GraphFusedLookup(torch.autograd.Function):
    """The fused lookup as Dynamo traces it: gather op forward, update op backward (see above)."""

    @staticmethod
    def forward(ctx, ids, weight, offsets, state1, state2, step, hyper, kind, backend):
        ctx.save_for_backward(ids, offsets)
        ctx.weight, ctx.state1, ctx.state2, ctx.step, ctx.hyper = weight, state1, state2, step, hyper
        ctx.kind, ctx.backend = kind, backend
        return _fused_gather_op(ids, weight, offsets, backend)

    @staticmethod
    def backward(ctx, grad_V):
        ids, offsets = ctx.saved_tensors
        _fused_row_update_op(ctx.weight, ctx.state1, ctx.state2, ctx.step, ctx.hyper, ids, offsets, grad_V,
                             ctx.kind, ctx.backend)
        return (None,) * 9


@_assume_constant_result
def _resolve_fused_while_tracing(backend: str, device: str, dtype: str, contiguous: bool, kind: str,
                                 dim: int) -> str:
    """_resolve_fused_backend run eagerly at trace time (it reads the environment and imports backends);
    its result is baked into the graph."""
    return _resolve_fused_backend(backend, torch.device(device), getattr(torch, dtype.split(".")[-1]),
                                  contiguous, kind, dim)


# torch < 2.13's AOTAutograd, tracing the joint graph, replays a backward's write of a forward input with
# grad mode on, and a parameter is a leaf that requires grad: compiling fails with "a leaf Variable that
# requires grad is being used in an in-place operation" (seen with torch 2.11 on an H200; torch 2.13 replays
# it under no_grad). There the fused lookup stays out of the graph.
GRAPH_ROW_UPDATE = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def _eager_fused_lookup(ids, weight, offsets, optimizer: SparseRowOptimizer, backend: str) -> torch.Tensor:
    if in_torch_func():
        raise RuntimeError("a fused lookup (FusedFieldEmbedding, embedding='fused') cannot run inside a torch.func "
                           "transform (grad, vmap, jacrev, ...): its backward updates the table in place instead of "
                           "returning a gradient; use a native or TorchRec table there")
    if torch._debug_has_internal_overlap(weight) == 1:
        # refused here, in forward: the update would find out in backward, after the row state moved
        raise ValueError(f"weight's elements overlap in memory (strides {list(weight.stride())}: an expanded view); "
                         "a sparse update would write one location for several rows: pass a table of its own, "
                         "e.g. weight.clone()")
    dim = weight.shape[1] if weight.dim() == 2 else None
    chosen = _resolve_fused_backend(backend, weight.device, weight.dtype, weight.is_contiguous(), optimizer.kind,
                                    dim)
    return _FusedLookupFunction.apply(ids, weight, offsets, optimizer, chosen)


@torch.compiler.disable
def _fused_lookup_between_graphs_before_torch_2_13(ids, weight, offsets, optimizer: SparseRowOptimizer,
                                                   backend: str) -> torch.Tensor:
    """The eager fused lookup, called between two compiled graphs (torch < 2.13; see GRAPH_ROW_UPDATE).
    Its name is what Dynamo's fullgraph error shows."""
    return _eager_fused_lookup(ids, weight, offsets, optimizer, backend)


def _fused_lookup(ids, weight, offsets, optimizer: SparseRowOptimizer, backend: str) -> torch.Tensor:
    """The fused lookup of validated ids: the autograd Function eagerly, the custom op while compiling."""
    if not torch.compiler.is_compiling():
        return _eager_fused_lookup(ids, weight, offsets, optimizer, backend)
    if not GRAPH_ROW_UPDATE and torch.is_grad_enabled() and weight.requires_grad:
        # (inference traces no backward, so no update: it stays in the graph on any torch)
        return _fused_lookup_between_graphs_before_torch_2_13(ids, weight, offsets, optimizer, backend)
    dim = weight.shape[1] if weight.dim() == 2 else None
    chosen = _resolve_fused_while_tracing(
        backend, str(weight.device), str(weight.dtype), weight.is_contiguous(), optimizer.kind, dim)
    state1, state2 = _state_args(optimizer, weight)
    return _GraphFusedLookup.apply(ids, weight, offsets, state1, state2, optimizer._step, optimizer._hyper,
                                   optimizer.kind, chosen)


def _validated_ids(ids, weight, offsets, bounds_check):
    """Apply the bounds mode; returns (ids, number of remapped ids; 0 while compiling, where the modules
    count in a buffer instead)."""
    C.check_lookup(ids, weight, offsets, bounds_check)
    if weight.shape[1] == 0:
        # row-wise Adagrad's mean over D would be 0 / 0; refused in forward on every backend alike
        raise ValueError(f"weight must have at least one column (D >= 1) for a fused lookup, got shape "
                         f"{list(weight.shape)}")
    if bounds_check == "off":
        return ids, 0
    if torch.compiler.is_compiling():
        # reading ids is a graph break: the checks run at run time inside the graph
        from .library import checked_ids
        return checked_ids(ids, offsets, weight.shape[0], bounds_check), 0
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
        backend: "auto" | "torch" | "triton" | "cpu" (C++ gather + fused update, fp32/bf16 CPU tables) |
            "cuda" (the CUDA extension's gather + sorted row-wise Adagrad: fp32 tables, D <= 256).
    Returns:
        ``[B, N, D]`` embeddings in weight's dtype.
    """
    if not isinstance(optimizer, SparseRowOptimizer):
        raise TypeError(f"optimizer must be a SparseRowOptimizer, got {type(optimizer).__name__}")
    ids, _ = _validated_ids(ids, weight, offsets, bounds_check)
    return _fused_lookup(ids, weight, offsets, optimizer, backend)


def _data_parallel_world() -> int:
    """The size of the default process group (1 when torch.distributed is not in use)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class FusedFieldEmbedding(FieldDimsState, nn.Module):
    """:class:`sfg_fast.nn.FieldEmbedding` whose table trains itself: the row-sparse optimizer runs
    inside backward (see :func:`fused_embedding_lookup`), so leave ``weight`` out of the dense optimizer
    (it never gets a ``.grad``, so including it is harmless; but DistributedDataParallel hands parameters
    without one zero gradients, which a dense optimizer's weight decay would act on: the zoo's models list
    their fused tables in ``_ddp_params_and_buffers_to_ignore``, and a model of your own should too, with
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``). Under data parallelism every
    rank updates its own copy of the table from its own rows (a warning says so), and DDP does not copy an
    ignored table from rank 0 either, so the ranks start alike only when seeded alike: shard tables with
    :mod:`sfg_fast.distributed` instead.

    ``forward(ids [B, N]) -> V [B, N, D]``. The optimizer state travels in ``state_dict()`` (extra state)
    and follows the module on ``.to(...)``. Under ``torch.compile(fullgraph=True)`` the lookup and its
    update are graph ops (torch >= 2.13; see the module docstring), and compiled training equals eager training.
    Args: as FieldEmbedding, plus ``optimizer`` ("sgd" | "adagrad" | "adam"), ``lr``, ``eps``, ``betas``,
    ``initial_accumulator_value`` (Adagrad), ``dtype`` of the table. Assigning ``optimizer`` (a
    :class:`SparseRowOptimizer`) prepares its state for this table.
    """

    def __init__(self, field_dims: Sequence[int], embedding_dim: int, optimizer: str = "adagrad",
                 lr: float = 0.01, eps: float = 1e-8, betas: Tuple[float, float] = (0.9, 0.999),
                 bounds_check: str = "fatal", init_std: float = 1e-4, backend: str = "auto",
                 dtype: torch.dtype = torch.float32, initial_accumulator_value: float = 0.0):
        super().__init__()
        dims = init_table_fields(self, field_dims, embedding_dim, bounds_check)
        C.check_choice("backend", backend, FUSED_BACKENDS)
        self.backend = backend
        self.register_buffer("clamped_count", torch.zeros((), dtype=torch.int64), persistent=False)
        C.check_choice("optimizer", optimizer, KINDS)
        self.optimizer = SparseRowOptimizer(optimizer, lr=lr, eps=eps, betas=betas,
                                            initial_accumulator_value=initial_accumulator_value)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype for the table, got {dtype!r}")
        self.weight = nn.Parameter(torch.empty(sum(dims), self.embedding_dim, dtype=dtype))
        self.init_std = C.check_init_std(init_std)
        self._warned_data_parallel = False     # the warning of forward, once per table
        self.optimizer.prepare(self.weight)     # a compiled graph needs the state before the first step
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Rows drawn from N(0, init_std^2) again, and the optimizer's row state back to its start (the
        step count and accumulators of rows trained for other values would misstep the new ones)."""
        draw_initial_rows(self.weight, self.init_std)
        # in place: a compiled graph keeps the state tensors it was given
        for name, state in self.optimizer.state.items():
            state.fill_(self.optimizer.initial_accumulator_value if name == "sum" else 0.0)
        self.optimizer.step_count = 0

    @property
    def optimizer(self) -> SparseRowOptimizer:
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: SparseRowOptimizer) -> None:
        if not isinstance(optimizer, SparseRowOptimizer):
            raise TypeError(f"optimizer must be a SparseRowOptimizer, got {type(optimizer).__name__}")
        if "weight" in self._parameters and self.weight.device.type != "meta":
            # before it is taken: an optimizer whose state fits another table is refused, the old one kept
            optimizer.prepare(self.weight)    # a compiled graph finds the state where the table is
        self._optimizer = optimizer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids_width(self, ids)
        if self.training and not torch.compiler.is_compiling() and _data_parallel_world() > 1 \
                and not getattr(self, "_warned_data_parallel", False):
            import warnings
            self._warned_data_parallel = True
            warnings.warn(f"FusedFieldEmbedding trains under a process group of {_data_parallel_world()} ranks: "
                          "its table updates in backward from this rank's rows only, so the ranks' copies drift "
                          "apart (DDP averages only the dense gradients). Shard the tables with sfg_fast.distributed "
                          "(TorchRec), or use native tables under DDP", RuntimeWarning, stacklevel=2)
        if self.bounds_check == "clamp_to_oov":
            C.check_lookup(ids, self.weight, self.offsets, "clamp_to_oov")
            ids, clamped = clamp_ids_to_oov(self, ids)
            V = _fused_lookup(ids, self.weight, self.offsets, self.optimizer, self.backend)
            self.clamped_count += clamped       # a buffer: no host sync; only after the lookup succeeded
            return V
        ids, _ = _validated_ids(ids, self.weight, self.offsets, self.bounds_check)
        return _fused_lookup(ids, self.weight, self.offsets, self.optimizer, self.backend)

    @property
    def num_clamped(self) -> int:
        """How many out-of-range ids ``clamp_to_oov`` has remapped so far (reads the device counter)."""
        return int(self.clamped_count)

    def _apply(self, fn, recurse=True):
        # the optimizer's state is no buffer: it follows the table here (to its device; it stays fp32),
        # so that a compiled graph, which cannot move it, finds it where the table is
        super()._apply(fn, recurse)
        if self.weight.device.type != "meta":
            self.optimizer.prepare(self.weight)
        return self

    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "num_clamped": self.num_clamped}

    def set_extra_state(self, state: dict) -> None:
        # everything checked before anything changes: a state that does not fit leaves this table as it was
        if not isinstance(state, dict) or "optimizer" not in state:
            raise ValueError("the extra state of a FusedFieldEmbedding must be a dict holding 'optimizer', got "
                             f"{type(state).__name__}")
        clamped = state.get("num_clamped", 0)
        if (isinstance(clamped, bool) or not isinstance(clamped, (int, torch.Tensor))
                or isinstance(clamped, torch.Tensor) and (clamped.numel() != 1 or clamped.is_floating_point())
                or int(clamped) < 0):
            raise ValueError(f"num_clamped in the extra state must be an integer >= 0, got {clamped!r}")
        self.optimizer.load_state_dict(state["optimizer"], weight=self.weight)
        self.optimizer.prepare(self.weight)
        self.clamped_count.fill_(int(clamped))

    def extra_repr(self) -> str:
        return (f"field_dims={self.field_dims}, embedding_dim={self.embedding_dim}, "
                f"bounds_check={self.bounds_check!r}, optimizer={self.optimizer!r}")
