"""Input validation shared by every backend: one place, one wording.

Every check raises ValueError / TypeError / IndexError naming the offending argument, its shape
or value, and what was expected. Nothing here reads tensor data except where stated (id bounds,
label values), so the checks are cheap.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("identity", "scalar", "vector", "matrix")
PAIRS = ("upper", "all", "offdiag")
SIDES = ("left", "right")
REDUCTIONS = ("mean", "sum", "none")
BOUNDS_CHECKS = ("fatal", "clamp_to_oov", "off")

ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "gelu": F.gelu,
}


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_tensor(name: str, t, ndim: Optional[int] = None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {_shape(t)}")


def check_embeddings(name: str, t) -> None:
    """``t`` must be a floating [B, N, D] tensor."""
    check_tensor(name, t, ndim=3)


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {_shape(a)}, got {_shape(b)}")
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}")


def _check_device(name: str, t: torch.Tensor, name_ref: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {name_ref} is on {ref.device}")


def is_bool(value) -> bool:
    """A boolean of Python, numpy or torch (a flag where a number belongs)."""
    return (isinstance(value, (bool, np.bool_))
            or isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def real_number(name: str, value) -> float:
    """``value`` as a float: a Python, numpy or 0-d tensor number, never a bool or a string (TypeError
    naming ``name``: ``float("0.1")`` would parse a config value that was never converted)."""
    if is_bool(value) or isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def check_gamma(gamma) -> float:
    if isinstance(gamma, torch.Tensor) and gamma.requires_grad:
        raise TypeError("gamma must be a number: it is a fixed hyper-parameter, and a tensor that requires grad "
                        "would silently get no gradient")
    value = real_number("gamma", gamma)
    # x - x == 0 holds exactly for finite x (NaN and inf give NaN). Unlike math.isfinite it also traces:
    # torch.compile(dynamic=True) sees a module's float attribute as a symbol, for which the test folds
    # to True (the layers check gamma when they are built), while a concrete NaN is still refused
    if not (value - value == 0):
        raise ValueError(f"gamma must be finite, got {gamma!r}")
    return value


def pair_mask(num_fields: int, pairs: str, device=None) -> torch.Tensor:
    """Boolean [N, N] mask of the pair set P: upper = i<j, all = every (i, j), offdiag = i != j.
    Built once per (N, P, device) and shared (``_constants``): do not write to it."""
    check_choice("pairs", pairs, PAIRS)
    if torch.compiler.is_compiling():      # (N may be symbolic there; the graph folds the mask anyway)
        return _pair_mask(num_fields, pairs, device)
    from ._constants import constant, device_key
    device = device_key(device)
    return constant(("pair_mask", int(num_fields), pairs, device), lambda: _pair_mask(num_fields, pairs, device))


def _pair_mask(num_fields: int, pairs: str, device) -> torch.Tensor:
    ones = torch.ones(num_fields, num_fields, dtype=torch.bool, device=device)
    if pairs == "upper":
        return torch.triu(ones, diagonal=1)
    if pairs == "offdiag":
        return ones & ~torch.eye(num_fields, dtype=torch.bool, device=device)
    return ones


def pair_index(num_fields: int, pairs: str, device=None):
    """(rows, cols) int64 of the pairs of P in row-major order, built on the device from shapes alone:
    no data-dependent ``nonzero`` (torch.compile traces it) and no copy from host memory (a blocking
    copy, which a CUDA graph capture refuses)."""
    check_choice("pairs", pairs, PAIRS)
    n = int(num_fields)
    if pairs == "upper":
        rows, cols = torch.triu_indices(n, n, offset=1, device=device)
        return rows, cols
    rows = torch.arange(n, dtype=torch.int64, device=device).repeat_interleave(n if pairs == "all" else max(n - 1, 0))
    if pairs == "all":
        return rows, torch.arange(n, dtype=torch.int64, device=device).repeat(n)
    # offdiag: row i pairs with 0..n-2, each shifted past the diagonal
    cols = torch.arange(max(n - 1, 0), dtype=torch.int64, device=device).repeat(n)
    return rows, cols + (cols >= rows).to(torch.int64)


def check_positive_finite(name: str, value) -> float:
    """A positive finite float hyper-parameter (lr, eps), named in the error."""
    try:
        number = real_number(name, value)
    except TypeError:
        raise TypeError(f"{name} must be a positive finite number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def check_init_std(init_std) -> float:
    """The tables' initial standard deviation: a finite real number >= 0 (Python, numpy or a 0-d tensor)."""
    value = real_number("init_std", init_std)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"init_std must be a finite number >= 0, got {value!r}")
    return value


def check_betas(value) -> Tuple[float, float]:
    """Adam's (beta1, beta2): two numbers in [0, 1)."""
    try:
        if isinstance(value, (str, bytes, bytearray)):
            raise TypeError
        pair = tuple(real_number("betas", b) for b in value)
    except (TypeError, ValueError):
        raise TypeError(f"betas must be two numbers in [0, 1), got {value!r}") from None
    if len(pair) != 2 or not all(0.0 <= b < 1.0 for b in pair):   # NaN fails the comparison too
        raise ValueError(f"betas must be two numbers in [0, 1), got {value!r}")
    return pair


def check_ids(ids) -> None:
    """``ids`` must be an int32/int64 ``[B, N]`` tensor of field-local ids (values are not read)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64 field-local ids, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"ids must have shape [B, N], got {_shape(ids)}")


def on_meta(*tensors: torch.Tensor) -> bool:
    """True when a tensor lives on the meta device: it has a shape but no values, so the checks that
    read values (ids in range, offsets, labels) have nothing to read; the shape checks still run."""
    return any(t.is_meta for t in tensors)


def capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream. No host sync is allowed then,
    so the data checks become device-side asserts (``torch._assert_async``): a bad value fails the
    graph's replay with CUDA's device-side assert error instead of a Python exception naming it."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_offsets_and_ids(ids: torch.Tensor, offsets: torch.Tensor, num_rows: int,
                          table: str = "weight") -> torch.Tensor:
    """``check_offsets`` then ``check_ids_in_range`` (same errors) with ONE host sync on the good path:
    the offsets test and the id test are reduced on the device into one flag, and only a failing
    flag runs the checks that find and name the culprit. Returns the field sizes."""
    sizes = field_sizes(offsets, num_rows)
    if offsets.numel() and not on_meta(ids, offsets):
        problem = ((ids < 0) | (ids >= sizes)).any() | _bad_offsets(offsets, num_rows)
        if capturing(ids):
            torch._assert_async(~problem, f"ids outside their field's [0, size) or bad offsets into {table} "
                                          "(bounds_check='fatal' inside a CUDA graph)")
            return sizes
        if bool(problem):
            check_offsets(offsets, num_rows, table)   # bad offsets: ValueError (sizes are meaningless then)
            check_ids_in_range(ids, sizes)      # else a bad id: IndexError naming field and id
    return sizes


def apply_bounds_check(ids, offsets, num_rows: int, bounds_check: str, table: str = "weight"):
    """Eager bounds handling shared by the fused ops: validate offsets, then raise ("fatal"),
    remap to the field's OOV id ("clamp_to_oov"), or pass through ("off"). Reads ids and offsets.
    ``table`` names the table argument in error messages."""
    if bounds_check == "off":
        return ids
    if bounds_check == "fatal":
        check_offsets_and_ids(ids, offsets, num_rows, table)
        return ids
    sizes = check_offsets(offsets, num_rows, table)
    return clamp_to_oov(ids, sizes)[0]


def check_lookup(ids, weight, offsets, bounds_check: str, table: str = "weight") -> None:
    """Shape/dtype/device checks of a lookup; ``table`` names the table argument in messages."""
    check_choice("bounds_check", bounds_check, BOUNDS_CHECKS)
    check_ids(ids)
    check_tensor(table, weight, ndim=2)
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64:
        got = offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__
        raise TypeError(f"offsets must be an int64 tensor (row offsets into {table}), got {got}")
    if offsets.dim() != 1 or offsets.numel() != ids.shape[1]:
        raise ValueError(f"offsets must have shape [N]=[{ids.shape[1]}] (one per field of ids), "
                         f"got {_shape(offsets)}")
    if ids.device != weight.device or offsets.device != weight.device:
        raise ValueError(f"ids ({ids.device}), {table} ({weight.device}) and offsets ({offsets.device}) "
                         "must be on one device")


def field_sizes(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Vocabulary size of each field from its row offset and the table's row count (int64 [N])."""
    # new_full fills on the device; new_tensor([...]) would copy from host memory (a sync on GPUs, which a
    # CUDA graph capture refuses)
    ends = torch.cat([offsets[1:], offsets.new_full((1,), num_rows)])
    return ends - offsets


def _bad_offsets(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """0-d bool: some offset lies outside [0, num_rows] or they decrease. Compared, never subtracted:
    offsets near 2^63 would wrap the sizes (next - this) into plausible non-negative values."""
    return (offsets < 0).any() | (offsets > num_rows).any() | (offsets[1:] < offsets[:-1]).any()


def check_offsets(offsets: torch.Tensor, num_rows: int, table: str = "weight") -> torch.Tensor:
    """Validate offsets (reads them) and return the field sizes."""
    sizes = field_sizes(offsets, num_rows)
    if offsets.numel() and not on_meta(offsets) and bool(_bad_offsets(offsets, num_rows)):
        raise ValueError(f"offsets must be non-decreasing, start >= 0 and stay below {table} rows "
                         f"({num_rows}), got {offsets.tolist()}")
    return sizes


def check_ids_in_range(ids: torch.Tensor, sizes: torch.Tensor) -> None:
    """Raise IndexError naming the first field with an id outside [0, field size). Reads ids."""
    if on_meta(ids, sizes):
        return
    bad = (ids < 0) | (ids >= sizes)    # compared in int64: a field past 2^31 rows must not wrap for int32 ids
    if bool(bad.any()):
        field = int(bad.any(0).nonzero()[0, 0])
        col = ids[:, field]
        bad_ids = col[bad[:, field]]
        raise IndexError(f"ids[:, {field}] (field {field}) holds id {int(bad_ids[0])} outside "
                         f"[0, {int(sizes[field])}) (the field's vocabulary size); "
                         f"{int(bad[:, field].sum())} bad ids in this field")


def clamp_to_oov(ids: torch.Tensor, sizes: torch.Tensor):
    """Remap out-of-range ids to their field's last id (the OOV row). Returns (ids, count) with ids
    in their own dtype. A field without rows (equal offsets, or the last one at the table's end) has
    no OOV row: ValueError naming it (its last id would be another field's first row, or past the
    table). One host sync. Meta tensors hold no ids to remap: returned as they are, none counted."""
    if on_meta(ids, sizes):
        return ids.clone(), 0
    bad = (ids < 0) | (ids >= sizes)    # int64 comparison (sizes may exceed int32 ids' range)
    if not ids.numel():     # no ids: the dtype a batch would get, and a new tensor (never ids itself)
        return widen_for_oov(ids, int(sizes.max()) if sizes.numel() else 0).clone(), 0
    count, empty, largest = torch.stack([bad.sum(), (sizes < 1).sum(), sizes.max()]).tolist()
    if empty:
        field = int((sizes < 1).nonzero()[0, 0])
        raise ValueError(f"bounds_check='clamp_to_oov' needs at least one row (the OOV row) in every field; "
                         f"field {field} has none (offsets give field sizes {sizes.tolist()})")
    ids = widen_for_oov(ids, largest)
    oov = (sizes - 1).to(ids.dtype).expand_as(ids)
    return torch.where(bad, oov, ids), count


def widen_for_oov(ids: torch.Tensor, largest_field: int) -> torch.Tensor:
    """``ids`` as int64 when the OOV id of a field with ``largest_field`` rows (its last id) does not fit
    their dtype (int32 ids, a field past 2^31 rows), else ``ids`` itself: a remapped id must be the
    field's own OOV id, never one capped to the dtype's maximum."""
    if ids.dtype != torch.int64 and largest_field - 1 > torch.iinfo(ids.dtype).max:
        return ids.to(torch.int64)
    return ids


def check_encode(V, weight, bias, activation, gamma, residual, prefix: str = "", source: str = "V") -> float:
    """Encoder checks. ``prefix`` and ``source`` rename the arguments in messages (sfg_logits passes
    "enc_" and "table", so its errors name enc_weight / enc_bias, not a weight it does not have)."""
    check_embeddings(source, V)
    _, n, d = V.shape
    w_name, b_name = f"{prefix}weight", f"{prefix}bias"
    check_tensor(w_name, weight, ndim=2)
    if tuple(weight.shape) != (n * d, n * d):
        raise ValueError(f"{w_name} must have shape [N*D, N*D]=[{n * d}, {n * d}] (N={n}, D={d}), "
                         f"got {_shape(weight)}")
    if bias is not None:
        check_tensor(b_name, bias, ndim=1)
        if bias.numel() != n * d:
            raise ValueError(f"{b_name} must have shape [N*D]=[{n * d}], got {_shape(bias)}")
    _check_device(w_name, weight, source, V)
    if bias is not None:
        _check_device(b_name, bias, source, V)
    return check_encoder_options(activation, gamma, residual)


def check_encoder_options(activation, gamma, residual) -> float:
    """The encoder's non-tensor options (also checked when there is no encoder, so every backend
    rejects the same calls). Returns gamma as a float."""
    check_choice("activation", activation, tuple(ACTIVATIONS))
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {residual!r}")
    return check_gamma(gamma)


def check_decode(Z, V, weight, kind, pairs, generated_side, symmetric, weight_name: str = "weight") -> None:
    check_embeddings("Z", Z)
    check_embeddings("V", V)
    check_same("Z", Z, "V", V)
    check_choice("kind", kind, KINDS)
    check_choice("pairs", pairs, PAIRS)
    check_choice("generated_side", generated_side, SIDES)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    _, n, d = Z.shape
    expected = {"identity": None, "scalar": (n, n), "vector": (n, n, d), "matrix": (n, n, d, d)}[kind]
    if expected is None:
        if weight is not None:
            raise ValueError(f"{weight_name} must be None for kind='identity'")
        return
    if weight is None:
        raise ValueError(f"{weight_name} is required for kind={kind!r}: expected shape {list(expected)}")
    check_tensor(weight_name, weight)
    if tuple(weight.shape) != expected:
        raise ValueError(f"{weight_name} for kind={kind!r} must have shape {list(expected)} "
                         f"(N={n}, D={d}), got {_shape(weight)}")
    if weight.device != Z.device:
        raise ValueError(f"{weight_name} is on {weight.device} but Z is on {Z.device}")


def check_products(Z, V, pairs, generated_side, symmetric) -> None:
    check_decode(Z, V, None, "identity", pairs, generated_side, symmetric)


def check_cross(x, x_gen, weight, bias) -> None:
    check_tensor("x", x, ndim=2)
    check_tensor("x_gen", x_gen, ndim=2)
    check_same("x", x, "x_gen", x_gen)
    k = x.shape[1]
    check_tensor("weight", weight, ndim=2)
    if tuple(weight.shape) != (k, k):
        raise ValueError(f"weight must have shape [K, K]=[{k}, {k}] for x {_shape(x)}, got {_shape(weight)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.numel() != k:
            raise ValueError(f"bias must have shape [K]=[{k}], got {_shape(bias)}")
    # the fused backends take raw pointers: a parameter left on another device must not reach them
    _check_device("weight", weight, "x", x)
    if bias is not None:
        _check_device("bias", bias, "x", x)


def check_bce(logits, labels, reduction, values: bool = True) -> None:
    """Arguments of bce_with_logits; ``values``: also the label values (``check_label_values``: a host
    sync), which a backend that checks them inside its own kernel skips (``raise_on_bad_labels``)."""
    check_choice("reduction", reduction, REDUCTIONS)
    check_tensor("logits", logits)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be a real float or integer tensor, got dtype {labels.dtype}")
    if labels.shape != logits.shape:
        raise ValueError(f"labels must have the shape of logits {_shape(logits)}, got {_shape(labels)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits are on {logits.device}")
    if values:
        check_label_values(labels)


def check_label_values(labels) -> None:
    """Labels finite and in [0, 1]: one host sync (a device-side assert while a CUDA graph captures)."""
    if labels.numel() and not on_meta(labels):
        lab = labels if labels.is_floating_point() else labels.to(torch.float32)
        # one host sync per call: NaN fails both comparisons, so one test catches NaN, inf and range
        valid = ((lab >= 0) & (lab <= 1)).all()
        if capturing(lab):
            torch._assert_async(valid, "labels must be finite and lie in [0, 1] (checked inside a CUDA graph)")
            return
        if not bool(valid):
            if not bool(torch.isfinite(lab).all()):
                raise ValueError(f"labels contain {int((~torch.isfinite(lab)).sum())} NaN/inf values")
            raise ValueError(f"labels must lie in [0, 1], got min {float(lab.min())} max {float(lab.max())}")


def raise_on_bad_labels(bad: torch.Tensor, labels: torch.Tensor) -> None:
    """The label check of a kernel that counted the bad labels itself (``bad``: int32 counts per
    program): one host read of the count on the good path; a non-zero count re-runs
    ``check_label_values`` for the error naming the problem. A device-side assert while a CUDA graph
    captures, as ``check_label_values``."""
    total = bad[0] if bad.numel() == 1 else bad.sum()
    if capturing(bad):
        torch._assert_async(total == 0, "labels must be finite and lie in [0, 1] (checked inside a CUDA graph)")
        return
    if int(total):
        check_label_values(labels)
        # the host check found nothing the kernel counted: report the kernel's count
        raise ValueError(f"labels: {int(total)} values are not finite or not in [0, 1]")


def check_sfg_logits(ids, table, offsets, enc_weight, enc_bias, dec_weight, kind, activation, gamma,
                     residual, pairs, generated_side, symmetric, bounds_check) -> float:
    """Shape/dtype checks of the fused op, without reading tensor data."""
    check_lookup(ids, table, offsets, bounds_check)
    n, d = ids.shape[1], table.shape[1]
    probe = torch.empty(0, n, d, dtype=table.dtype, device=table.device)
    if enc_weight is not None:
        gamma = check_encode(probe, enc_weight, enc_bias, activation, gamma, residual, prefix="enc_", source="table")
    elif enc_bias is not None:
        raise ValueError("enc_bias must be None when enc_weight is None (no encoder: the base model)")
    else:
        gamma = check_encoder_options(activation, gamma, residual)
    check_decode(probe, probe, dec_weight, kind, pairs, generated_side, symmetric, weight_name="dec_weight")
    return gamma


def check_interaction(V, enc_weight, enc_bias, dec_weight, kind, activation, gamma, residual, pairs,
                      generated_side, symmetric) -> float:
    """Checks of ``sfg_interaction`` (encoder + decoder on V); messages name enc_* / dec_weight."""
    if enc_weight is not None:
        gamma = check_encode(V, enc_weight, enc_bias, activation, gamma, residual, prefix="enc_")
    else:
        check_embeddings("V", V)
        if enc_bias is not None:
            raise ValueError("enc_bias must be None when enc_weight is None (no encoder: the base model)")
        gamma = check_encoder_options(activation, gamma, residual)
    check_decode(V, V, dec_weight, kind, pairs, generated_side, symmetric, weight_name="dec_weight")
    return gamma


_ENV_TRUE, _ENV_FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (any case), unset or empty = ``default``.
    Anything else raises ValueError naming it (``SFG_FAST_GEMM_PATH=off`` had left the path on)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _ENV_TRUE:
        return True
    if value in _ENV_FALSE:
        return False
    raise ValueError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {os.environ[name]!r}")
