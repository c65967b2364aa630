"""TorchRec embeddings in front of sfg_fast's SFG layers.

Data flows ids ``[B, N]`` -> :func:`ids_to_kjt` -> ``EmbeddingBagCollection`` (one table and one
feature per field, sum pooling of a single id, so the pooled row IS the field's embedding) ->
``KeyedTensor`` -> :func:`keyed_tensor_to_fields` -> V ``[B, N, D]`` in sfg_fast's field order ->
encoder / decoder / heads. :class:`TorchRecFieldEmbedding` packs that path behind the forward
contract of :class:`sfg_fast.nn.FieldEmbedding`, so every model of the zoo runs on it
(``sfg_fast.models.build(..., embedding="torchrec")``) and DistributedModelParallel can shard it.

TorchRec, FBGEMM and torch move in lock-step (torch 2.13 <-> torchrec 1.8.0 <-> fbgemm-gpu(-cpu)
1.8.0). Importing this module checks the installed versions and raises ImportError explaining a
mismatch instead of failing later with an undefined C++ symbol.
"""
from __future__ import annotations

import functools
import importlib.metadata
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import _checks as C
from .._backend import BACKENDS
from ..nn import FieldDimsState

__all__ = ["INSTALL_LINES", "check_versions", "ids_to_kjt", "keyed_tensor_to_fields", "default_feature_names",
           "TorchRecFieldEmbedding", "torchrec_embeddings", "convert_native_state_dict"]

INSTALL_LINES = ("pip install fbgemm-gpu-cpu==1.8.0   # or fbgemm-gpu==1.8.0 with a CUDA torch\n"
                 "pip install --no-deps torchrec==1.8.0\n"
                 "pip install tensordict torchmetrics tqdm pyre-extensions")

# torch minor version each FBGEMM/TorchRec minor version is built against (tested pairs only).
_TORCH_FOR_FBGEMM = {"1.8": "2.13"}


def _minor(version: Optional[str]) -> Optional[str]:
    if version is None:
        return None
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def _installed(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions() -> Dict[str, Optional[str]]:
    """Installed torch / torchrec / fbgemm versions; raises ImportError when they cannot work together."""
    found = {"torch": torch.__version__.split("+")[0], "torchrec": _installed("torchrec"),
             "fbgemm_gpu": _installed("fbgemm-gpu-cpu") or _installed("fbgemm-gpu") or _installed("fbgemm-gpu-genai")}
    if found["torchrec"] is None:
        raise ImportError("torchrec is not installed; install the lock-step set:\n" + INSTALL_LINES)
    if found["fbgemm_gpu"] is None:
        raise ImportError(f"torchrec {found['torchrec']} is installed but FBGEMM is not; torchrec needs "
                          f"fbgemm-gpu-cpu (CPU torch) or fbgemm-gpu (CUDA torch) of the same version:\n"
                          + INSTALL_LINES)
    if _minor(found["torchrec"]) != _minor(found["fbgemm_gpu"]):
        raise ImportError(f"torchrec {found['torchrec']} and fbgemm_gpu {found['fbgemm_gpu']} differ: they are "
                          f"released in lock-step and must share major.minor; reinstall them together:\n"
                          + INSTALL_LINES)
    want_torch = _TORCH_FOR_FBGEMM.get(_minor(found["fbgemm_gpu"]))
    if want_torch is not None and _minor(found["torch"]) != want_torch:
        raise ImportError(f"fbgemm_gpu {found['fbgemm_gpu']} is built for torch {want_torch}.x but torch "
                          f"{torch.__version__} is installed; FBGEMM's C++ ops would not load. Install the "
                          f"fbgemm/torchrec release built for your torch (or torch=={want_torch}.0).")
    if want_torch is None:
        warnings.warn(f"sfg_fast has not been tested with fbgemm_gpu {found['fbgemm_gpu']} / torchrec "
                      f"{found['torchrec']} on torch {torch.__version__}; tested: torchrec 1.8.0 with torch 2.13",
                      RuntimeWarning, stacklevel=2)
    return found


VERSIONS = check_versions()
try:
    # the first import may happen inside ``with torch.device("meta")`` (a model built on meta): their
    # import-time code builds and reads tensors, which must be real ones
    with torch.device("cpu"):
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm; fails first on an ABI mismatch)
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
except Exception as exc:  # an ABI mismatch surfaces as OSError/RuntimeError from the C++ loader
    raise ImportError(f"torchrec {VERSIONS['torchrec']} / fbgemm_gpu {VERSIONS['fbgemm_gpu']} failed to import "
                      f"on torch {torch.__version__} ({type(exc).__name__}: {exc}). The three move in "
                      f"lock-step; reinstall a matching set:\n{INSTALL_LINES}") from exc


def default_feature_names(num_fields: int) -> List[str]:
    """``["f0", "f1", ...]``: the feature (KJT key) of each field when none are given."""
    return [f"f{i}" for i in range(int(num_fields))]


def _check_feature_names(feature_names: Sequence[str], num_fields: int) -> List[str]:
    names = [str(x) for x in feature_names]
    if len(names) != num_fields:
        raise ValueError(f"feature_names must name each of the {num_fields} fields, got {len(names)} names")
    if len(set(names)) != len(names):
        dupes = sorted({x for x in names if names.count(x) > 1})
        raise ValueError(f"feature_names must be unique, got duplicates {dupes}")
    return names


def ids_to_kjt(ids: torch.Tensor, feature_names: Sequence[str]) -> "KeyedJaggedTensor":
    """The KeyedJaggedTensor holding one id per feature per sample.

    Key f of the result holds ``ids[:, f]`` (lengths all 1, values int64, key-major as TorchRec
    lays them out). Args: ids ``[B, N]`` int32/int64 field-local ids; feature_names N unique keys.
    """
    C.check_ids(ids)
    names = _check_feature_names(feature_names, ids.shape[1])
    batch, num_fields = ids.shape
    # KJT values are key-major: all samples of key 0, then key 1, ...; transpose then flatten.
    values = ids.to(torch.int64).t().contiguous().view(-1)
    lengths = torch.ones(batch * num_fields, dtype=torch.int32, device=ids.device)
    return KeyedJaggedTensor.from_lengths_sync(keys=names, values=values, lengths=lengths)


def keyed_tensor_to_fields(kt, feature_names: Sequence[str]) -> torch.Tensor:
    """Stack a KeyedTensor's pooled embeddings to V ``[B, N, D]`` in the order of ``feature_names``.

    Indexed by key, never by position: an EmbeddingBagCollection orders its output keys by table,
    and a sharded one by shard, which need not be the input order. Every key must have width D.
    """
    by_key = kt.to_dict()
    missing = [f for f in feature_names if f not in by_key]
    if missing:
        raise KeyError(f"the KeyedTensor lacks features {missing}; it holds {sorted(by_key)}")
    columns = [by_key[f] for f in feature_names]
    widths = {c.shape[1] for c in columns}
    if len(widths) != 1:
        raise ValueError(f"every feature must have one embedding width D to stack to [B, N, D], got widths "
                         f"{ {f: c.shape[1] for f, c in zip(feature_names, columns)} }")
    return torch.stack(columns, dim=1)


class TorchRecFieldEmbedding(FieldDimsState, nn.Module):
    """N per-field tables in a TorchRec EmbeddingBagCollection: ``forward(ids [B, N]) -> V [B, N, D]``.

    Same contract as :class:`sfg_fast.nn.FieldEmbedding` (field-local ids, N(0, init_std^2) rows,
    ``bounds_check`` "fatal" raising IndexError naming the field and the id, "clamp_to_oov" remapping
    bad ids to the field's last id and counting them in ``num_clamped``, "off" trusting the caller).
    FBGEMM itself would silently remap a bad id to row 0, so the check runs here, before the lookup.
    Table of field f: ``ebc.embedding_bags[table_prefix + feature_names[f]]``; feature (KJT key) f:
    ``feature_names[f]`` (default ``f0, f1, ...``). ``device="meta"`` builds the tables without
    memory for DistributedModelParallel to materialise shard by shard. Like FieldEmbedding, its state dict
    records field_dims (a file of other field sizes is refused), and the offsets and field sizes are rebuilt
    wherever the module lands (``to_empty`` included).
    """

    def __init__(self, field_dims: Sequence[int], embedding_dim: int, feature_names: Optional[Sequence[str]] = None,
                 bounds_check: str = "fatal", init_std: float = 1e-4, backend: str = "auto",
                 device: Optional[torch.device] = None, table_prefix: str = "t_"):
        super().__init__()
        from ..nn import init_table_fields

        dims = init_table_fields(self, field_dims, embedding_dim, bounds_check)
        # FBGEMM's fused (shardable) kernels need row widths divisible by 4: narrower tables (the D=1
        # first-order weights, odd D) are stored padded and forward returns the first D columns.
        self.storage_dim = -(-self.embedding_dim // 4) * 4
        C.check_choice("backend", backend, BACKENDS)
        self.backend = backend  # kept for the FieldEmbedding contract; FBGEMM does the lookup
        self.init_std = C.check_init_std(init_std)
        self.num_clamped = 0
        names = default_feature_names(self.num_fields) if feature_names is None else feature_names
        self.feature_names = _check_feature_names(names, self.num_fields)
        # Table names key TorchRec's sharding constraints and must be unique model-wide: one prefix per module.
        self.table_names = [f"{table_prefix}{f}" for f in self.feature_names]
        init = functools.partial(nn.init.normal_, std=self.init_std)
        tables = [EmbeddingBagConfig(name=t, embedding_dim=self.storage_dim, num_embeddings=n, feature_names=[f],
                                     pooling=PoolingType.SUM, init_fn=init)
                  for t, f, n in zip(self.table_names, self.feature_names, dims)]
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu") if device is None else device)
        # field_sizes (set by init_table_fields) is a real CPU tensor even for meta tables: the bounds
        # check needs real sizes.

    def _checked_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be int32 or int64 field-local ids, got dtype {ids.dtype}")
        if ids.dim() != 2 or ids.shape[1] != self.num_fields:
            raise ValueError(f"ids must have shape [B, N]=[B, {self.num_fields}] for field_dims of "
                             f"{self.num_fields} fields, got {list(ids.shape)}")
        sizes = self.field_sizes.to(ids.device)
        if self.bounds_check == "fatal":
            C.check_ids_in_range(ids, sizes)
        elif self.bounds_check == "clamp_to_oov":
            ids, count = C.clamp_to_oov(ids, sizes)
            self.num_clamped += count
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._checked_ids(ids)
        # V in the tables' dtype, as FieldEmbedding's (TorchRec hands its pooled output back as float32
        # whatever the tables hold); read from the parameters, which a sharded module keeps too
        dtype = next((p.dtype for p in self.ebc.parameters()), torch.float32)
        if ids.shape[0] == 0:
            # torchrec's KeyedJaggedTensor cannot describe an empty batch; the native module returns [0, N, D]
            return torch.zeros(0, len(self.field_dims), self.embedding_dim, dtype=dtype, device=ids.device)
        pooled = self.ebc(ids_to_kjt(ids, self.feature_names))
        V = keyed_tensor_to_fields(pooled, self.feature_names)
        V = V if self.storage_dim == self.embedding_dim else V[..., :self.embedding_dim].contiguous()
        return V if V.dtype == dtype or not dtype.is_floating_point else V.to(dtype)

    def tables(self) -> List[torch.Tensor]:
        """The N unsharded tables ``[field_dims[f], storage_dim]`` in field order (not valid once sharded)."""
        return [self.ebc.embedding_bags[t].weight for t in self.table_names]

    @torch.no_grad()
    def load_concatenated(self, weight: torch.Tensor) -> None:
        """Copy a FieldEmbedding-layout table ``[sum(field_dims), D]`` into the per-field tables."""
        C.check_tensor("weight", weight, ndim=2)
        if tuple(weight.shape) != (sum(self.field_dims), self.embedding_dim):
            raise ValueError(f"weight must have shape [sum(field_dims), D]=[{sum(self.field_dims)}, "
                             f"{self.embedding_dim}], got {list(weight.shape)}")
        for table, part in zip(self.tables(), torch.split(weight, self.field_dims, dim=0)):
            table[:, :self.embedding_dim].copy_(part)

    def concatenated(self) -> torch.Tensor:
        """The tables as one FieldEmbedding-layout ``[sum(field_dims), D]`` tensor (a copy)."""
        return torch.cat([t.detach()[:, :self.embedding_dim] for t in self.tables()], dim=0)

    def extra_repr(self) -> str:
        return (f"field_dims={self.field_dims}, embedding_dim={self.embedding_dim}, "
                f"bounds_check={self.bounds_check!r}, features={self.feature_names}")


def torchrec_embeddings(model: nn.Module) -> Dict[str, TorchRecFieldEmbedding]:
    """Every :class:`TorchRecFieldEmbedding` of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TorchRecFieldEmbedding)}


def convert_native_state_dict(native_state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A state dict of the native (FieldEmbedding) twin of ``model``, re-keyed for ``model``.

    Each ``<name>.weight`` ``[sum(field_dims), D]`` of a module that is a TorchRecFieldEmbedding in
    ``model`` is split into ``<name>.ebc.embedding_bags.<table>.weight`` (zero-padded to the module's
    ``storage_dim``); other entries pass through.
    """
    out = dict(native_state)
    metadata = getattr(native_state, "_metadata", None) or {}
    for name, module in torchrec_embeddings(model).items():
        prefix = f"{name}." if name else ""      # name "" when model is the embedding module itself
        key = f"{prefix}weight"
        if key not in out:
            raise KeyError(f"native state dict lacks {key!r} (the table of TorchRec module {name!r})")
        saved = (metadata.get(name) or {}).get("field_dims")
        if saved is not None and list(saved) != list(module.field_dims):
            # the concatenated table cannot tell [3, 5] from [5, 3]: split by the wrong sizes, every field
            # would read another field's rows
            raise ValueError(f"{key}: the state dict was saved with field_dims={list(saved)}, the TorchRec module "
                             f"{name or type(module).__name__!r} has field_dims={list(module.field_dims)}")
        weight = out.pop(key)
        if tuple(weight.shape) != (sum(module.field_dims), module.embedding_dim):
            raise ValueError(f"{key} has shape {list(weight.shape)}, expected "
                             f"[{sum(module.field_dims)}, {module.embedding_dim}]")
        for table, part in zip(module.table_names, torch.split(weight, module.field_dims, dim=0)):
            padded = part.new_zeros(part.shape[0], module.storage_dim)
            padded[:, :module.embedding_dim] = part
            out[f"{prefix}ebc.embedding_bags.{table}.weight"] = padded
    return out
