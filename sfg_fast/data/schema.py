"""Containers of a preprocessed CTR dataset: its field schema, the three splits, and the bundle."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from .._io import atomic_write_bytes


@dataclass
class Schema:
    """The fields of a dataset: ids of field ``f`` lie in ``[0, field_dims[f])``.

    Each field's vocabulary was built on the training split: ids ``0 .. field_dims[f]-2`` are the
    values kept there (most frequent first), and ``oov_ids[f] = field_dims[f] - 1`` stands for every
    value unseen in training or seen fewer than ``min_count`` times. ``oov_ids`` may be omitted; it
    is then derived from ``field_dims``.
    """

    name: str
    field_names: List[str]
    field_dims: List[int]
    oov_ids: Optional[List[int]] = None

    def __post_init__(self):
        self.field_names = [str(n) for n in self.field_names]
        self.field_dims = [int(d) for d in self.field_dims]
        if len(self.field_names) != len(self.field_dims):
            raise ValueError(f"field_names has {len(self.field_names)} entries but field_dims has "
                             f"{len(self.field_dims)}; they must describe the same fields")
        if len(set(self.field_names)) != len(self.field_names):
            raise ValueError(f"field_names must be unique, got {self.field_names}")
        bad = [(n, d) for n, d in zip(self.field_names, self.field_dims) if d < 1]
        if bad:
            raise ValueError(f"field_dims must be >= 1 (each field has at least its OOV id), got {bad}")
        expected = [d - 1 for d in self.field_dims]
        if self.oov_ids is None:
            self.oov_ids = expected
        else:
            self.oov_ids = [int(i) for i in self.oov_ids]
            if self.oov_ids != expected:
                raise ValueError(f"oov_ids must be field_dims[f] - 1 (the last id of each field) = {expected}, "
                                 f"got {self.oov_ids}")

    @property
    def num_fields(self) -> int:
        return len(self.field_dims)

    @property
    def offsets(self) -> np.ndarray:
        """Exclusive cumulative sum of ``field_dims`` (int64 ``[N]``): field ``f``'s rows in one table."""
        return np.concatenate([[0], np.cumsum(self.field_dims[:-1], dtype=np.int64)]).astype(np.int64)

    @property
    def total_dim(self) -> int:
        """Rows of a single table holding every field (``sum(field_dims)``)."""
        return int(sum(self.field_dims))

    def to_dict(self) -> Dict[str, Any]:
        """The schema as JSON-ready values (:meth:`from_dict` reads them back)."""
        return {"name": self.name, "field_names": list(self.field_names),
                "field_dims": list(self.field_dims), "oov_ids": list(self.oov_ids)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Schema":
        missing = [k for k in ("name", "field_names", "field_dims") if k not in d]
        if missing:
            raise ValueError(f"schema dict lacks keys {missing}; got keys {sorted(d)}")
        return cls(name=d["name"], field_names=d["field_names"], field_dims=d["field_dims"],
                   oov_ids=d.get("oov_ids"))

    def save_json(self, path) -> None:
        """Write :meth:`to_dict` as JSON to ``path`` atomically."""
        # readers never see a half-written schema, and a failed write leaves no temp file behind
        atomic_write_bytes(json.dumps(self.to_dict(), indent=1).encode("utf-8"), os.fspath(path))

    @classmethod
    def load_json(cls, path) -> "Schema":
        with open(os.fspath(path)) as f:
            return cls.from_dict(json.load(f))


@dataclass
class Split:
    """One split: ``ids`` int64 ``[n, N]`` of field-local ids, ``labels`` float32 ``[n]`` of 0/1."""

    ids: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        self.ids = np.asarray(self.ids)
        self.labels = np.asarray(self.labels)
        if self.ids.ndim != 2:
            raise ValueError(f"ids must be 2-D [n, N], got shape {self.ids.shape}")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.ids.shape[0]:
            raise ValueError(f"labels must be 1-D [n] with n = ids.shape[0] = {self.ids.shape[0]}, "
                             f"got shape {self.labels.shape}")
        if not np.issubdtype(self.ids.dtype, np.integer):
            raise ValueError(f"ids must hold integers, got dtype {self.ids.dtype}")
        # astype(copy=False) is free when the dtype already matches, as it does for every loader here
        self.ids = self.ids.astype(np.int64, copy=False)
        self.labels = self.labels.astype(np.float32, copy=False)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_fields(self) -> int:
        return int(self.ids.shape[1])

    def positive_rate(self) -> float:
        """Mean label (the click rate); NaN for an empty split."""
        return float(self.labels.mean()) if len(self) else float("nan")


@dataclass
class CTRData:
    """A dataset ready for training: schema, train/valid/test splits and provenance ``info``.

    ``vocabularies`` (datasets read from raw files): per field, the raw tokens of ids ``0 .. k-1``
    (the OOV id ``k`` has none); :func:`sfg_fast.data.save_feature_map` writes them next to a run, and
    ``load_dataset(..., vocabularies=...)`` encodes new files with them. None for synthetic data.
    ``source_lines``: see the field's comment."""

    schema: Schema
    train: Split
    valid: Split
    test: Split
    info: Dict[str, Any] = field(default_factory=dict)
    vocabularies: Optional[List[List[str]]] = None
    # per split, the 1-based line of the raw file each row came from; kept only when a file is encoded
    # with given vocabularies (scoring new data), where outputs must be traceable to their input lines
    source_lines: Optional[List[np.ndarray]] = None

    def splits(self) -> Dict[str, Split]:
        """``{"train": ..., "valid": ..., "test": ...}`` in that order."""
        return {"train": self.train, "valid": self.valid, "test": self.test}

    def check(self) -> None:
        """Raise ValueError unless every split has ``num_fields`` columns and ids inside ``field_dims``."""
        dims = np.asarray(self.schema.field_dims, dtype=np.int64)
        for name, split in self.splits().items():
            if split.ids.shape[1] != self.schema.num_fields:
                raise ValueError(f"{name}.ids has {split.ids.shape[1]} fields, schema has {self.schema.num_fields}")
            if len(split) == 0:
                continue
            low = split.ids.min(axis=0)
            high = split.ids.max(axis=0)
            bad = np.flatnonzero((low < 0) | (high >= dims))
            if bad.size:
                f = int(bad[0])
                raise ValueError(f"{name}.ids of field {self.schema.field_names[f]!r} span [{low[f]}, {high[f]}], "
                                 f"outside [0, {dims[f]})")
            labels = np.unique(split.labels)
            if not np.isin(labels, (0.0, 1.0)).all():
                raise ValueError(f"{name}.labels must be 0/1, found values {labels[:10].tolist()}")

    def __repr__(self) -> str:
        return (f"CTRData({self.schema.name!r}: {self.schema.num_fields} fields, "
                f"train {len(self.train)} / valid {len(self.valid)} / test {len(self.test)} rows)")
