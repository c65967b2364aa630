"""Feature maps: the vocabularies a run trained with, saved beside it, so new raw data can be encoded
exactly as the training data was (FuxiCTR keeps the same as ``feature_map.json``).

A feature map is gzipped JSON: the dataset name, its preprocessing options, the field names and
``field_dims``, and per field the raw tokens of ids ``0 .. k-1`` in id order (``k = field_dims[f] - 1``
is the OOV id, which takes every token the run did not keep: unseen values, rare values, and
anything new at serving time). ``load_dataset(name, data_dir, vocabularies=fm["vocabularies"], ...)``
encodes a file with it.
"""
from __future__ import annotations

import gzip
import json
from typing import Any, Dict, Optional

from .._io import atomic_write_bytes
from .schema import CTRData

__all__ = ["FEATURE_MAP_FORMAT", "FEATURE_MAP_FILE", "feature_map_of", "save_feature_map", "write_feature_map",
           "load_feature_map", "feature_map_digest"]

FEATURE_MAP_FORMAT = "sfg_fast-feature-map-1"
FEATURE_MAP_FILE = "feature_map.json.gz"
# options of load_dataset that change what a raw line becomes (genre, threshold: MovieLens; encoding: how the
# Criteo / Avazu readers decoded the tokens), and where the vocabularies came from
_PREPROCESSING_KEYS = ("min_count", "genre", "threshold", "encoding")
_SOURCE_KEYS = ("source", "rows", "seed", "split", "max_rows")


def feature_map_of(data: CTRData) -> Dict[str, Any]:
    """The feature map of a dataset read from files; ValueError for data without vocabularies."""
    if data.vocabularies is None:
        raise ValueError(f"dataset {data.schema.name!r} has no vocabularies (generated data, or built by hand): "
                         "there is no feature map to save")
    fm = {"format": FEATURE_MAP_FORMAT, "dataset": data.schema.name, "field_names": list(data.schema.field_names),
          "field_dims": [int(d) for d in data.schema.field_dims],
          "preprocessing": _preprocessing(data.info),
          "built_from": {k: data.info[k] for k in _SOURCE_KEYS if k in data.info},
          "vocabularies": [list(v) for v in data.vocabularies]}
    check_feature_map(fm, "the feature map")
    return fm


def _preprocessing(info: Dict[str, Any]) -> Dict[str, Any]:
    """The options that change what a raw line becomes. A latin-1 text encoding is left out: a map without
    the record means latin-1 (maps were written before it), so a run resumed on latin-1 data keeps the
    very map, and digest, its checkpoints name."""
    out = {k: info[k] for k in _PREPROCESSING_KEYS if k in info}
    if out.get("encoding") == "latin-1":
        del out["encoding"]
    return out


def feature_map_digest(fm: Dict[str, Any]) -> str:
    """sha256 of what decides a raw line's ids (dataset, fields, field_dims, preprocessing, vocabularies),
    not of where the vocabularies came from. Checkpoints keep it: ``predict`` refuses a feature map of
    another run (same field_dims, other tokens would score every row with the wrong embeddings)."""
    import hashlib
    keys = ("dataset", "field_names", "field_dims", "preprocessing", "vocabularies")
    payload = json.dumps({k: fm.get(k) for k in keys}, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def save_feature_map(data: CTRData, path: str) -> Dict[str, Any]:
    """Write the feature map of ``data`` to ``path`` (gzipped JSON, atomically); returns it."""
    return write_feature_map(feature_map_of(data), path)


def write_feature_map(fm: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Write a feature map (from :func:`feature_map_of`) to ``path``, gzipped JSON, atomically; returns it."""
    # mtime=0: the same vocabularies give the same bytes
    atomic_write_bytes(gzip.compress(json.dumps(fm).encode("utf-8"), mtime=0), path)
    return fm


def check_feature_map(fm, where: str) -> None:
    """ValueError naming ``where`` unless ``fm`` is a complete, self-consistent feature map."""
    if not isinstance(fm, dict) or fm.get("format") != FEATURE_MAP_FORMAT:
        raise ValueError(f"{where} is not an sfg_fast feature map (expected format {FEATURE_MAP_FORMAT!r})")
    names, dims, vocabs = fm.get("field_names"), fm.get("field_dims"), fm.get("vocabularies")
    if not (isinstance(fm.get("dataset"), str) and isinstance(names, list) and isinstance(dims, list)
            and isinstance(vocabs, list) and len(names) == len(dims) == len(vocabs)):
        raise ValueError(f"{where}: dataset, field_names, field_dims and vocabularies (one per field) are required")
    for f, (name, dim, tokens) in enumerate(zip(names, dims, vocabs)):
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{where}: the vocabulary of field {f} ({name!r}) must be a list of strings")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim != len(tokens) + 1:
            raise ValueError(f"{where}: field {f} ({name!r}) has field_dims {dim!r} but {len(tokens)} tokens "
                             f"(expected tokens + 1 OOV id)")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"{where}: the vocabulary of field {f} ({name!r}) repeats a token")


def load_feature_map(path: str, dataset: Optional[str] = None) -> Dict[str, Any]:
    """Read and check a feature map (``dataset``: the name it must be for). FileNotFoundError when missing,
    ValueError naming the file for anything malformed."""
    try:
        with gzip.open(path, "rb") as fh:
            fm = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"feature map {path!r} could not be read ({type(exc).__name__}: {exc})") from None
    check_feature_map(fm, f"feature map {path!r}")
    if dataset is not None and fm["dataset"] != dataset:
        raise ValueError(f"feature map {path!r} is for dataset {fm['dataset']!r}, not {dataset!r}")
    return fm
