"""Pieces shared by the dataset loaders: bad-line errors, seeded splits, train-only vocabularies, caching.

Vocabulary convention (every dataset): a field's raw values are first given provisional ids in
order of appearance; after reading, the values seen at least ``min_count`` times in the TRAIN split
get ids ``0 .. k-1`` ordered by decreasing train frequency (ties by value), and every other value,
including those absent from training, maps to the OOV id ``k``; the field's dimension is ``k + 1``.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import os
import zlib
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._io import atomic_write, atomic_write_bytes, remove_stale_temp_files
from .schema import CTRData, Schema, Split

CACHE_FORMAT = 4   # 3: the vocabularies (kept tokens per field) are cached too; 4: tokens decoded as UTF-8


class BadLineError(ValueError):
    """A malformed input line; ``path`` and the 1-based ``line`` number say where."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}: line {line}: {reason} (skip_bad_lines=True skips such lines: on the command "
                         f"line --set skip_bad_lines=true, or predict's --skip-bad-lines)")
        self.path = path
        self.line = line
        self.reason = reason


class SkipLog:
    """Counts skipped lines and keeps the first few for the report in ``CTRData.info``."""

    def __init__(self, path: str, skip: bool, keep: int = 5):
        self.path = path
        self.skip = skip
        self.count = 0
        self.examples: List[str] = []
        self.keep = keep

    def bad(self, line: int, reason: str) -> None:
        if not self.skip:
            raise BadLineError(self.path, line, reason)
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{os.path.basename(self.path)}:{line}: {reason}")


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------

def check_ratios(split) -> Tuple[int, ...]:
    try:
        ratios = tuple(split)
    except TypeError:
        raise ValueError(f"split must be three non-negative ratios like (8, 1, 1), got {split!r}") from None
    if len(ratios) != 3 or any((not isinstance(r, (int, float, np.integer, np.floating))) or r < 0 for r in ratios) \
            or sum(ratios) <= 0:
        raise ValueError(f"split must be three non-negative ratios like (8, 1, 1), got {split!r}")
    return ratios


def split_assignment(num_rows: int, ratios: Sequence[float], seed: int) -> np.ndarray:
    """uint8 ``[num_rows]``: 0 train, 1 valid, 2 test; a seeded random permutation, exact sizes.

    Split sizes are ``floor(n * r0 / sum)``, ``floor(n * r1 / sum)`` and the remainder.
    """
    total = float(sum(ratios))
    n_train = int(num_rows * ratios[0] / total)
    n_valid = int(num_rows * ratios[1] / total)
    perm = np.random.default_rng(seed).permutation(num_rows)
    out = np.full(num_rows, 2, dtype=np.uint8)
    out[perm[:n_train]] = 0
    out[perm[n_train:n_train + n_valid]] = 1
    return out


# ----------------------------------------------------------------------------------------------
# Vocabularies
# ----------------------------------------------------------------------------------------------

def build_vocab(counts: np.ndarray, min_count: int, token_names: Optional[Sequence] = None) -> Tuple[np.ndarray, int]:
    """Map tokens to final ids from their TRAIN counts.

    Args:
        counts: int ``[num_tokens]`` occurrences of each token in the training split.
        min_count: tokens seen fewer times in training map to OOV (``min_count <= 1``: every seen token kept).
        token_names: optional names used to break frequency ties (default: token index).
    Returns:
        ``(table, dim)``: int64 ``[num_tokens]`` final id of each token, and the field dimension
        ``k + 1`` where ``k`` tokens were kept and ``k`` is the OOV id.
    """
    counts = np.asarray(counts, dtype=np.int64)
    kept = np.flatnonzero(counts >= max(int(min_count), 1))
    if token_names is not None and kept.size:
        names = [token_names[i] for i in kept.tolist()]
        tie = np.empty(kept.size, dtype=np.int64)
        tie[np.array(sorted(range(kept.size), key=names.__getitem__), dtype=np.int64)] = np.arange(kept.size)
    else:
        tie = kept
    order = kept[np.lexsort((tie, -counts[kept]))]
    k = int(order.size)
    table = np.full(counts.size, k, dtype=np.int64)
    table[order] = np.arange(k, dtype=np.int64)
    return table, k + 1


class ColumnEncoder:
    """Provisional ids for one raw column, in order of first appearance, at C speed.

    ``defaultdict(count().__next__)`` assigns the next id on a miss without a Python-level call,
    so ``map(d.__getitem__, column)`` encodes a column with no interpreter loop.
    """

    def __init__(self):
        self.ids: Dict[str, int] = defaultdict(itertools.count().__next__)

    def encode(self, column: Sequence[str]) -> np.ndarray:
        return np.fromiter(map(self.ids.__getitem__, column), dtype=np.int64, count=len(column))

    def values(self) -> List[str]:
        return list(self.ids)  # insertion order == provisional id order

    def __len__(self) -> int:
        return len(self.ids)


def tokens_of(values: Sequence, transform: Optional[Callable]) -> Tuple[np.ndarray, List]:
    """``(value_to_token int64 [len(values)], token_names)`` after applying ``transform`` per value."""
    if transform is None:
        return np.arange(len(values), dtype=np.int64), list(values)
    index: Dict = {}
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        out[i] = index.setdefault(transform(v), len(index))
    return out, list(index)


# ----------------------------------------------------------------------------------------------
# Assembling a dataset from provisional ids
# ----------------------------------------------------------------------------------------------

def finalize(name: str, field_names: Sequence[str], field_sources: Sequence[Tuple[int, Optional[Callable]]],
             column_values: Sequence[Sequence], split_chunks: Sequence[List[Tuple[np.ndarray, np.ndarray]]],
             min_count: int, vocabularies: Optional[Sequence[Sequence[str]]] = None
             ) -> Tuple[Schema, List[Split], List[List[str]]]:
    """Turn provisional ids into final ids with train-only vocabularies (or given ones).

    Args:
        field_sources: per output field ``(source column, transform)``: the field's token is
            ``transform(raw value)`` (identity when None). Several fields may share one column.
        column_values: per source column, its raw values in provisional id order.
        split_chunks: for train, valid, test: a list of ``(provisional ids [k, C], labels [k])``;
            the lists are emptied as the chunks are copied out.
        vocabularies: per field, the tokens of ids ``0 .. k-1`` of an earlier run (a feature map):
            used as they are (``min_count`` and the counts play no part), every other token -> ``k``.
    Returns:
        ``(schema, [train, valid, test], vocabularies)``, the last the tokens of each field's ids
        ``0 .. k-1`` as strings.
    """
    if vocabularies is not None and len(vocabularies) != len(field_sources):
        raise ValueError(f"vocabularies holds {len(vocabularies)} fields, the dataset has {len(field_sources)}")
    # train counts per provisional value, chunk by chunk: never a second copy of the train split
    value_counts = {c: np.zeros(len(column_values[c]), dtype=np.int64) for c in {src for src, _ in field_sources}}
    for chunk_ids, _ in split_chunks[0]:
        for c, counts in value_counts.items():
            counts += np.bincount(chunk_ids[:, c], minlength=counts.size)
    tables, dims, vocabs = [], [], []
    for f, (src, transform) in enumerate(field_sources):
        value_to_token, token_names = tokens_of(column_values[src], transform)
        if vocabularies is None:
            counts = np.bincount(value_to_token, weights=value_counts[src], minlength=len(token_names))
            table, dim = build_vocab(np.rint(counts).astype(np.int64), min_count, token_names)
            # the kept tokens in id order; the loop runs over kept tokens only, not every distinct value
            order = np.empty(dim - 1, dtype=np.int64)
            kept_at = np.flatnonzero(table < dim - 1)
            order[table[kept_at]] = kept_at
            kept = [str(token_names[i]) for i in order.tolist()]
        else:
            kept = [str(t) for t in vocabularies[f]]
            index = {t: i for i, t in enumerate(kept)}
            table = np.fromiter((index.get(str(t), len(kept)) for t in token_names), dtype=np.int64,
                                count=len(token_names))
            dim = len(kept) + 1
        tables.append(table[value_to_token])
        dims.append(dim)
        vocabs.append(kept)
    schema = Schema(name=name, field_names=list(field_names), field_dims=dims)
    splits = []
    for chunks in split_chunks:
        n = sum(len(labels) for _, labels in chunks)
        ids = np.empty((n, len(field_sources)), dtype=np.int64)
        labels = np.empty(n, dtype=np.float32)
        row = 0
        # pop chunks as they are copied so peak memory stays near one copy of the data
        while chunks:
            chunk_ids, chunk_labels = chunks.pop(0)
            k = len(chunk_labels)
            for f, (src, _) in enumerate(field_sources):
                ids[row:row + k, f] = tables[f][chunk_ids[:, src]]
            labels[row:row + k] = chunk_labels
            row += k
        splits.append(Split(ids=ids, labels=labels))
    return schema, splits, vocabs


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

# How the delimited readers decode bytes: UTF-8, with any byte that is not UTF-8 kept as a lone surrogate
# ("surrogateescape"), so decoding never fails and every distinct byte string stays a distinct token. Feature
# maps record it; a map without the record was built when the readers decoded latin-1, and files encoded
# with it are read that way (the same tokens as then).
TEXT_ENCODING = "utf-8"
LEGACY_TEXT_ENCODING = "latin-1"
BYTE_ORDER_MARK = {"utf-8": "\ufeff", "latin-1": "\xef\xbb\xbf"}   # a UTF-8 BOM as each decodes it


def open_text(path: str, encoding: str = TEXT_ENCODING):
    """Open a text file, gzip-aware, decoding as ``encoding`` (see TEXT_ENCODING; never fails).

    Lines end at "\n" only, exactly where :func:`count_lines` counts them (a stray "\r" must not start
    a line: the reader sizes its split from that count, so an extra line would push a real row off the
    end); a "\r" before the "\n" (CRLF) is stripped by the readers."""
    errors = "surrogateescape" if encoding == "utf-8" else "strict"
    if is_gzip(path):
        return gzip.open(path, "rt", encoding=encoding, errors=errors, newline="\n")
    return open(path, "r", encoding=encoding, errors=errors, newline="\n")


# what reading a damaged gzip file raises: gzip.BadGzipFile (an OSError), EOFError (truncated), zlib.error
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def unreadable_gzip(path: str, exc: BaseException) -> ValueError:
    """The error for a gzip file that cannot be decompressed, naming it."""
    return ValueError(f"{path}: the gzip data is damaged or truncated ({type(exc).__name__}: {exc}); "
                      f"re-download or re-compress the file")


def no_rows(path: str, lines_read: int, skipped: int, max_rows: Optional[int]) -> ValueError:
    """The error for a data file that yielded no rows, saying why."""
    if max_rows == 0:
        why = "max_rows=0 reads no lines"
    elif lines_read == 0:
        why = "the file holds no data lines"
    elif skipped:
        why = f"all {skipped} malformed lines were skipped (skip_bad_lines)"
    else:
        why = f"its {lines_read} lines are blank"
    return ValueError(f"{path}: no data rows: {why}")


def is_gzip(path: str) -> bool:
    """Whether ``path`` holds gzip data, by its magic bytes (Avazu's ``train`` comes gzipped without a
    ``.gz`` name): read as text, it would fail on its header or column count with a misleading message."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def count_lines(path: str, limit: Optional[int] = None) -> int:
    """Number of lines (a last line without newline counts), stopping once ``limit`` is reached."""
    opener = gzip.open if is_gzip(path) else open
    n = 0
    last = b"\n"
    try:
        with opener(path, "rb") as f:
            while True:
                block = f.read(1 << 22)
                if not block:
                    break
                n += block.count(b"\n")
                last = block[-1:]
                if limit is not None and n >= limit:
                    return limit
    except GZIP_ERRORS as exc:
        raise unreadable_gzip(path, exc) from None
    if last != b"\n":
        n += 1
    return n if limit is None else min(n, limit)


def resolve_file(name: str, data_dir, candidates: Sequence[str]) -> str:
    """The data file: ``data_dir`` itself when it is a file, else the first candidate inside it."""
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir: a folder holding one of {list(candidates)} or the "
                         f"file itself (its licence forbids redistribution, so it is never downloaded)")
    data_dir = os.path.expanduser(os.fspath(data_dir))
    if os.path.isfile(data_dir):
        return data_dir
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} for dataset {name!r} does not exist")
    for c in candidates:
        p = os.path.join(data_dir, c)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"no {' / '.join(candidates)} in data_dir {data_dir!r} for dataset {name!r}")


# ----------------------------------------------------------------------------------------------
# Cache: <cache_dir>/<name>-<key>.npz (ids, labels, info) + <name>-<key>.schema.json
# ----------------------------------------------------------------------------------------------

def _edge_digest(path: str, size: int, span: int = 1 << 16) -> str:
    """sha256 of the first and last ``span`` bytes: a content check that costs two small reads."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(span))
        if size > span:
            f.seek(max(span, size - span))
            h.update(f.read(span))
    return h.hexdigest()


def cache_key(path: str, options: Dict) -> str:
    """Key of a file's cache entry: its absolute path, size, mtime and ctime (a rewrite that restores the
    mtime, as ``cp -p`` / ``rsync -t`` / ``tar x`` do, still moves the ctime), the digest of its first and
    last 64 KB, and every option."""
    st = os.stat(path)
    payload = {"format": CACHE_FORMAT, "file": os.path.realpath(path), "size": st.st_size,
               "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "edges": _edge_digest(path, st.st_size),
               "options": options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_paths(cache_dir: str, name: str, key: str) -> Tuple[str, str]:
    stem = os.path.join(cache_dir, f"{name}-{key}")
    return stem + ".npz", stem + ".schema.json"


def load_cache(cache_dir: str, name: str, key: str) -> Optional[CTRData]:
    npz_path, schema_path = cache_paths(cache_dir, name, key)
    if not (os.path.isfile(npz_path) and os.path.isfile(schema_path)):
        return None
    try:
        schema = Schema.load_json(schema_path)
        with np.load(npz_path, allow_pickle=False) as z:
            splits = [Split(ids=z[f"{s}_ids"].astype(np.int64), labels=z[f"{s}_labels"])
                      for s in ("train", "valid", "test")]
            info = json.loads(str(z["info"]))
            vocabularies = json.loads(z["vocabularies"].tobytes().decode("utf-8")) \
                if "vocabularies" in z.files else None
    except Exception as exc:   # a truncated or corrupt entry is a miss: the data are read again and re-cached
        logging.getLogger("sfg_fast.data").warning("ignoring the unreadable cache entry %s (%s: %s); reading the "
                                                   "raw data again", npz_path, type(exc).__name__, exc)
        return None
    info.update(from_cache=True, cache_path=npz_path)
    return CTRData(schema, *splits, info=info, vocabularies=vocabularies)


def _source_path(cache_dir: str, name: str, key: str) -> str:
    return os.path.join(cache_dir, f"{name}-{key}.source.json")


def _prune_superseded(cache_dir: str, name: str, key: str, source: Dict) -> List[str]:
    """Delete the entries of ``name`` that ``source`` (the same file, or the same path, read with the same
    options) has superseded: the file changed since, the path now leads to another file, or they are of an
    older cache format. An entry of the file read with other options (another min_count, seed, ...) stays.
    Returns the removed .npz paths."""
    removed = []
    for entry in sorted(os.listdir(cache_dir)):
        if not (entry.startswith(f"{name}-") and entry.endswith(".source.json")) \
                or entry == os.path.basename(_source_path(cache_dir, name, key)):
            continue
        path = os.path.join(cache_dir, entry)
        try:
            with open(path, encoding="utf-8") as f:
                other = json.load(f)
        except (OSError, ValueError):
            continue
        mine, theirs = source["options"], other.get("options")
        if other.get("cache_format") != CACHE_FORMAT and isinstance(theirs, dict):
            # an older format's entry is never hit again; options added since (the text encoding) are not in it
            mine = {k: v for k, v in mine.items() if k in theirs}
        if theirs != mine:
            continue
        # the same file (a new version of it), or the same path (a link re-pointed at another day's log). An
        # entry of a file out of reach stays: it may be on a drive unmounted for now, or seen by another
        # machine or container sharing this cache under another path.
        same_path = other.get("path") is not None and other.get("path") == source.get("path")
        if other.get("file") != source["file"] and not same_path:
            continue
        stem = path[:-len(".source.json")]
        for old in (stem + ".npz", stem + ".schema.json", path):   # the record last: a partial prune is redone
            try:
                os.remove(old)
            except FileNotFoundError:
                pass
        removed.append(stem + ".npz")
    return removed


def save_cache(cache_dir: str, name: str, key: str, data: CTRData, source: Optional[Dict] = None) -> Optional[str]:
    """Write the cache atomically; returns the .npz path, or None (with info['cache_error']) on failure.

    ``source`` (``{"file": real path, "path": the path as given, "options": {...}}``) is recorded beside the
    entry, and the entries it supersedes (same file or path and options: an older version of the file, the
    file a re-pointed link led to, or an older cache format) are deleted: one entry of a 10 GB log per option
    set, not one per edit of the file."""
    npz_path, schema_path = cache_paths(cache_dir, name, key)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        # int32 halves the file whenever every id fits, which is always the case for real vocabularies
        id_dtype = np.int32 if max(data.schema.field_dims, default=0) < 2 ** 31 else np.int64
        arrays = {"info": np.array(json.dumps(data.info, default=str))}
        for s, split in data.splits().items():
            arrays[f"{s}_ids"] = split.ids.astype(id_dtype)
            arrays[f"{s}_labels"] = split.labels
        if data.vocabularies is not None:
            # JSON as UTF-8 bytes: a numpy string array would drop a token's trailing NUL characters and
            # take 4 bytes a character
            arrays["vocabularies"] = np.frombuffer(json.dumps(data.vocabularies).encode("utf-8"), dtype=np.uint8)
        # temp files of writes killed outright (SIGKILL), each up to an entry's size; an hour untouched: another
        # process may be writing its own entry here
        remove_stale_temp_files(cache_dir, (f".{name}-",), min_age_s=3600)
        # The source record first: every entry that exists, even one whose writer was killed before its schema,
        # is found by _prune_superseded; and again at the end: another process's prune may have removed it
        # meanwhile (its own newer entry of the path), which would leave this entry unprunable. A file object
        # stops numpy from appending another .npz; atomic_write fsyncs, and removes its temp file when the
        # write fails (a full disk, Ctrl-C). The schema follows the arrays: an entry is only read when both
        # are there.
        text = None
        if source is not None:
            text = json.dumps(dict(source, cache_format=CACHE_FORMAT), sort_keys=True, default=str)
            atomic_write_bytes(text.encode("utf-8"), _source_path(cache_dir, name, key))
        atomic_write(npz_path, lambda fh: np.savez(fh, **arrays))
        data.schema.save_json(schema_path)
        if text is not None:
            atomic_write_bytes(text.encode("utf-8"), _source_path(cache_dir, name, key))
            # compared as read back from JSON, as the other entries' records are
            removed = _prune_superseded(cache_dir, name, key, json.loads(text))
            if removed:
                data.info["cache_removed"] = removed
                logging.getLogger("sfg_fast.data").info("removed superseded cache entries %s", removed)
        return npz_path
    except OSError as exc:
        data.info["cache_error"] = f"could not write the cache in {cache_dir!r}: {exc}"
        if not os.path.exists(npz_path):      # no entry came of it: its record goes too
            try:
                os.remove(_source_path(cache_dir, name, key))
            except OSError:
                pass
        return None
