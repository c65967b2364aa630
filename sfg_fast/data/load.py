"""``load_dataset``: one entry point for every dataset, with argument checks."""
from __future__ import annotations

from typing import Optional

from . import avazu, criteo, movielens, synthetic
from .common import LEGACY_TEXT_ENCODING, TEXT_ENCODING, check_ratios, resolve_file
from .schema import CTRData
from .tabular import DEFAULT_CHUNK_ROWS, load_table, without_label

DATASETS = ("movielens100k", "criteo", "avazu", "synthetic-criteo", "synthetic-avazu")

_OPTIONS = {
    "movielens100k": {"split", "genre", "threshold"},
    "criteo": {"split", "chunk_rows", "encoding"},
    "avazu": {"split", "chunk_rows", "encoding"},
    "synthetic-criteo": {"split", "vocab_scale", "zipf_a", "embed_dim", "target_ctr", "linear_std", "pairwise_std"},
    "synthetic-avazu": {"split", "vocab_scale", "zipf_a", "embed_dim", "target_ctr", "linear_std", "pairwise_std"},
}


def _count(name: str, value, minimum: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")
    return int(value)


def load_dataset(name: str = "movielens100k", data_dir=None, cache_dir=None, seed: int = 2018,
                 max_rows: Optional[int] = None, min_count: Optional[int] = None, skip_bad_lines: bool = False,
                 num_rows: Optional[int] = None, vocabularies=None, labeled: bool = True, **options) -> CTRData:
    """Load a CTR dataset as train/valid/test splits of field-local int64 ids and 0/1 labels.

    Args:
        name: one of ``DATASETS``.
        data_dir: folder holding the raw files, or the raw file itself (criteo: ``train.txt``; avazu:
            ``train`` / ``train.csv``, optionally ``.gz``; movielens100k: optional, see
            :mod:`sfg_fast.data.movielens`). Not used by the synthetic datasets.
        cache_dir: where criteo/avazu keep their preprocessed form (default ``<data folder>/.sfg_cache``;
            ``False`` disables it). A hit is reported as ``info["from_cache"] = True``.
        seed: fixes the random split (and, for synthetic data, the generator).
        max_rows: read at most this many data lines (synthetic: cap on ``num_rows``).
        min_count: values seen fewer times in the train split map to their field's OOV id
            (defaults: criteo 10, avazu 2, others 1).
        skip_bad_lines: skip malformed lines, counting them in ``info["skipped_lines"]``, instead of
            raising ValueError with the file name and line number.
        num_rows: rows the synthetic datasets generate (default 100000).
        vocabularies: encode with these per-field token lists, or a whole feature map (a trained run's,
            see :func:`sfg_fast.data.load_feature_map`; its genre/threshold and text encoding then apply, and a
            conflicting option is an error) instead of building vocabularies from the train split: tokens outside
            them map to the OOV id, and ``field_dims`` are the run's. Never cached. Files only (not the
            synthetic datasets). The result's ``source_lines`` give each row's line in the file.
        labeled: False reads criteo/avazu files without their label column (to be scored with
            ``vocabularies``; the rows' labels are NaN).
        **options: per dataset: ``split`` (three ratios; defaults movielens100k/avazu/synthetic 8:1:1,
            criteo 7:2:1); movielens100k ``genre`` ('first' | 'combination'), ``threshold`` (4.0);
            criteo/avazu ``chunk_rows``, ``encoding`` (how tokens are decoded: "utf-8", bytes that are not
            UTF-8 kept distinct, or "latin-1", one character per byte; a feature map brings its own);
            synthetic ``vocab_scale``, ``zipf_a``, ``embed_dim``,
            ``target_ctr``, ``linear_std``, ``pairwise_std`` (see :func:`sfg_fast.data.synthetic.generate`).
    Returns:
        CTRData with ``schema``, ``train``/``valid``/``test`` and ``info`` (source, rows, seed,
        skipped_lines, from_cache, ...). Rows keep their file order within each split; the split
        itself is a seeded random permutation with exact sizes ``floor(n * r_i / sum(r))`` for
        train and valid, the rest for test, of the n lines read (criteo/avazu: a skipped bad line keeps its
        slot, so a split can hold fewer rows).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; expected one of {DATASETS}")
    unknown = sorted(set(options) - _OPTIONS[name])
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; it accepts {sorted(_OPTIONS[name])}")
    if isinstance(seed, bool) or not hasattr(seed, "__index__") or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    max_rows = _count("max_rows", max_rows, 0)
    min_count = _count("min_count", min_count, 1)
    num_rows = _count("num_rows", num_rows, 0)
    if not isinstance(skip_bad_lines, bool):
        raise ValueError(f"skip_bad_lines must be True or False, got {skip_bad_lines!r}")
    synthetic_name = name.startswith("synthetic-")
    if num_rows is not None and not synthetic_name:
        raise ValueError(f"num_rows sets the size of the synthetic datasets; dataset {name!r} is read from files: "
                         f"use max_rows to cap the rows read")
    if isinstance(vocabularies, dict):
        # a whole feature map: its own preprocessing options apply, and a conflicting one is an error
        from .feature_map import check_feature_map
        check_feature_map(vocabularies, "vocabularies")
        if vocabularies["dataset"] != name:
            raise ValueError(f"vocabularies is the feature map of dataset {vocabularies['dataset']!r}, not {name!r}")
        for key, value in vocabularies.get("preprocessing", {}).items():
            if key in ("genre", "threshold"):
                if key in options and options[key] != value:
                    raise ValueError(f"{key}={options[key]!r} conflicts with the feature map's {key}={value!r}")
                options[key] = value
        if name in ("criteo", "avazu"):
            # the files are decoded as the map's tokens were (maps from before the record: latin-1)
            mapped = vocabularies.get("preprocessing", {}).get("encoding", LEGACY_TEXT_ENCODING)
            if "encoding" in options and options["encoding"] != mapped:
                raise ValueError(f"encoding={options['encoding']!r} conflicts with the feature map's "
                                 f"encoding={mapped!r}")
            options["encoding"] = mapped
        vocabularies = vocabularies["vocabularies"]
    if vocabularies is not None:
        if synthetic_name:
            raise ValueError(f"vocabularies apply to datasets read from files; {name!r} is generated")
        if not isinstance(vocabularies, (list, tuple)) or not all(
                isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v) for v in vocabularies):
            raise ValueError("vocabularies must be a list (one per field) of lists of token strings")
    if not isinstance(labeled, bool):
        raise ValueError(f"labeled must be True or False, got {labeled!r}")
    if not labeled and name not in ("criteo", "avazu"):
        raise ValueError(f"labeled=False applies to criteo/avazu files (their logs without the label column); "
                         f"dataset {name!r} has no unlabelled format")
    if not labeled and vocabularies is None:
        raise ValueError("labeled=False reads files to be scored with a trained run's vocabularies: pass "
                         "vocabularies= (its feature map)")
    module = {"movielens100k": movielens, "criteo": criteo, "avazu": avazu}.get(name, synthetic)
    ratios = check_ratios(options.pop("split", module.DEFAULT_SPLIT))

    if name == "movielens100k":
        return movielens.load_movielens(data_dir, seed=seed, max_rows=max_rows, min_count=min_count or 1,
                                        skip_bad_lines=skip_bad_lines, split=ratios, vocabularies=vocabularies,
                                        **options)
    if synthetic_name:
        return synthetic.load_synthetic(name, num_rows, seed=seed, max_rows=max_rows, min_count=min_count or 1,
                                        split=ratios, **options)
    chunk_rows = _count("chunk_rows", options.pop("chunk_rows", DEFAULT_CHUNK_ROWS), 1)
    encoding = options.pop("encoding", TEXT_ENCODING)
    if encoding not in (TEXT_ENCODING, LEGACY_TEXT_ENCODING):
        raise ValueError(f"encoding must be {TEXT_ENCODING!r} or {LEGACY_TEXT_ENCODING!r}, got {encoding!r}")
    path = resolve_file(name, data_dir, module.FILE_NAMES)
    if cache_dir is not None and cache_dir is not False and not isinstance(cache_dir, (str, bytes)) \
            and not hasattr(cache_dir, "__fspath__"):
        raise ValueError(f"cache_dir must be a path, None (default location) or False (no cache), got {cache_dir!r}")
    return load_table(module.FORMAT if labeled else without_label(module.FORMAT), path, cache_dir, seed, ratios, max_rows,
                      module.DEFAULT_MIN_COUNT if min_count is None else min_count, skip_bad_lines, chunk_rows,
                      vocabularies, encoding)
