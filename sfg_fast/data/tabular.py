"""Streaming reader for delimited CTR logs (Criteo, Avazu): chunked, validated, split, cached.

One pass over the file: each chunk of lines is split into columns, validated (column count,
label, typed columns), given provisional ids per column and routed to its split; only per-column
dictionaries of distinct raw values and compact int32 id chunks stay in memory, never the raw rows.
Rows are assigned to splits by a seeded permutation of line slots (counted first, a cheap byte
scan), so split sizes are exact and independent of the chunk size.
"""
from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .common import (BYTE_ORDER_MARK, GZIP_ERRORS, TEXT_ENCODING, ColumnEncoder, SkipLog, cache_key, count_lines,
                     finalize, load_cache, no_rows, open_text, save_cache, split_assignment, unreadable_gzip)
from .schema import CTRData

_CR_BEFORE_NEWLINE = re.compile("\r+\n")  # CRLF (or a doubled CR) ending a line

DEFAULT_CHUNK_ROWS = 100_000


@dataclass
class TableFormat:
    """How to read one delimited format.

    Args:
        name: dataset name (schema name, cache file prefix).
        sep: column separator.
        column_names: names of the raw columns, in file order (also the expected header, if any).
        has_header: the first line must equal ``sep.join(column_names)``.
        label_column: raw column holding the 0/1 label (None: unlabelled logs, see :func:`without_label`).
        feature_columns: raw columns read as features (source columns, in this order).
        parsers: raw column -> ``parse(raw) -> value``, raising ValueError(reason) on a bad value;
            called once per distinct raw value.
        fields: output fields as ``(name, raw column, token)``, where ``token(parsed value) -> str``
            (None: the raw string itself is the token).
    """

    name: str
    sep: str
    column_names: List[str]
    has_header: bool
    label_column: Optional[int]
    feature_columns: List[int]
    parsers: Dict[int, Callable[[str], object]] = field(default_factory=dict)
    fields: List[Tuple[str, int, Optional[Callable]]] = field(default_factory=list)


def without_label(fmt: TableFormat) -> TableFormat:
    """``fmt`` with its label column removed: the same logs without clicks (Kaggle's Criteo ``test.txt``,
    Avazu's ``test`` with the header ``id,hour,C1,...``, or new traffic to score). Rows get NaN labels."""
    if fmt.label_column is None:
        return fmt
    label = fmt.label_column

    def shift(c: int) -> int:
        return c - 1 if c > label else c
    return TableFormat(name=fmt.name, sep=fmt.sep,
                       column_names=[n for c, n in enumerate(fmt.column_names) if c != label],
                       has_header=fmt.has_header, label_column=None,
                       feature_columns=[shift(c) for c in fmt.feature_columns],
                       parsers={shift(c): p for c, p in fmt.parsers.items()},
                       fields=[(name, shift(c), token) for name, c, token in fmt.fields])


def _label_value(raw: str) -> float:
    if not raw.isascii() or "_" in raw:     # float() takes "0_1" and other scripts' digits ("１")
        raise ValueError(f"label {raw!r} is not numeric")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"label {raw!r} is not numeric") from None
    if value not in (0.0, 1.0):
        raise ValueError(f"label {raw!r} is not 0 or 1")
    return value


def read_table(fmt: TableFormat, path: str, seed: int, ratios: Sequence[float], max_rows: Optional[int],
               min_count: int, skip_bad_lines: bool, chunk_rows: int = DEFAULT_CHUNK_ROWS,
               vocabularies=None, encoding: str = TEXT_ENCODING) -> CTRData:
    """Read ``path`` in ``fmt`` into a CTRData (no cache; see :func:`load_table`); ``vocabularies`` as in
    :func:`sfg_fast.data.common.finalize`; ``encoding`` as in :func:`sfg_fast.data.common.open_text`.
    ValueError naming the file when it yields no rows or its gzip data is damaged."""
    try:
        return _read_table(fmt, path, seed, ratios, max_rows, min_count, skip_bad_lines, chunk_rows, vocabularies,
                           encoding)
    except GZIP_ERRORS as exc:
        raise unreadable_gzip(path, exc) from None


def _read_table(fmt, path, seed, ratios, max_rows, min_count, skip_bad_lines, chunk_rows, vocabularies,
                encoding) -> CTRData:
    start = time.perf_counter()
    bom = BYTE_ORDER_MARK[encoding]
    header_lines = 1 if fmt.has_header else 0
    limit = None if max_rows is None else max_rows + header_lines
    num_slots = max(count_lines(path, limit) - header_lines, 0)
    assign = split_assignment(num_slots, ratios, seed)
    log = SkipLog(path, skip_bad_lines)
    num_columns = len(fmt.column_names)
    source_of = {raw: j for j, raw in enumerate(fmt.feature_columns)}
    encoders = [ColumnEncoder() for _ in fmt.feature_columns]
    parsed: Dict[int, Dict[str, object]] = {c: {} for c in fmt.parsers}
    label_values: Dict[str, float] = {"0": 0.0, "1": 1.0}
    chunks: Tuple[List, List, List] = ([], [], [])
    line_chunks: Optional[Tuple[List, List, List]] = ([], [], []) if vocabularies is not None else None
    blank_lines = 0

    with open_text(path, encoding) as f:
        if fmt.has_header:
            # a UTF-8 byte-order mark and trailing blanks are not part of it
            header = f.readline().rstrip("\r\n").removeprefix(bom).rstrip(" \t")
            expected = fmt.sep.join(fmt.column_names)
            if header != expected:
                # the header fixes the column meaning: a mismatch is never skippable
                raise ValueError(f"{path}: line 1: expected the header {expected!r}, found {header[:200]!r}")
        slot = 0
        while slot < num_slots:
            lines = list(itertools.islice(f, min(chunk_rows, num_slots - slot)))
            if not lines:
                break
            if slot == 0 and not fmt.has_header:
                # a UTF-8 byte-order mark is not part of the first line's label
                lines[0] = lines[0].removeprefix(bom)
            num_lines = len(lines)
            first_line = header_lines + slot + 1
            columns, good, bad, drop = _split_lines(lines, fmt.sep, num_columns)
            row_of = (lambda i: i) if good is None else good.__getitem__

            # typed columns and labels: each distinct value is checked once, offending rows located after
            new_bad = False
            checks = [(fmt.label_column, label_values, _label_value)] if fmt.label_column is not None else []
            checks += [(c, parsed[c], p) for c, p in fmt.parsers.items()]
            for c, cache, parse in checks if columns else ():
                column = columns[c]
                errors = {}
                for value in set(column).difference(cache):
                    try:
                        cache[value] = parse(value)
                    except ValueError as exc:
                        errors[value] = str(exc)
                if errors:
                    new_bad = True
                    for i, value in enumerate(column):
                        if value in errors:
                            bad.setdefault(row_of(i), f"column {fmt.column_names[c]!r}: {errors[value]}")
            if bad:
                for i in sorted(bad):
                    log.bad(first_line + i, bad[i])  # raises on the first one unless skipping
            if new_bad:
                positions = good if good is not None else range(num_lines)
                keep = [i for i, row in enumerate(positions) if row not in bad]
                columns = [[column[i] for i in keep] for column in columns]
                good = [positions[i] for i in keep]
            blank_lines += len(drop)
            del lines
            slots = slot + (np.arange(num_lines) if good is None else np.asarray(good, dtype=np.int64))
            slot += num_lines
            if not columns or not columns[0]:
                continue
            labels = (_labels(columns[fmt.label_column], label_values) if fmt.label_column is not None
                      else np.full(len(columns[fmt.feature_columns[0]]), np.nan, dtype=np.float32))
            ids = np.empty((labels.size, len(fmt.feature_columns)), dtype=np.int32)
            for j, c in enumerate(fmt.feature_columns):
                ids[:, j] = encoders[j].encode(columns[c])
            del columns
            where = assign[slots]
            for s in range(3):
                mask = where == s
                if mask.any():
                    chunks[s].append((ids[mask], labels[mask]))
                    if line_chunks is not None:
                        line_chunks[s].append(header_lines + 1 + slots[mask])

    field_sources = []
    for _, raw, token in fmt.fields:
        transform = None
        if raw in parsed:
            cache = parsed[raw]
            transform = cache.__getitem__ if token is None else (lambda v, cache=cache, token=token: token(cache[v]))
        elif token is not None:
            transform = token
        field_sources.append((source_of[raw], transform))
    schema, splits, vocabs = finalize(fmt.name, [name for name, _, _ in fmt.fields], field_sources,
                                      [e.values() for e in encoders], chunks, min_count, vocabularies)
    rows = sum(len(s) for s in splits)
    if rows == 0:
        raise no_rows(path, num_slots, log.count, max_rows)
    info = {"dataset": fmt.name, "source": os.path.abspath(path), "rows": rows, "seed": seed, "encoding": encoding,
            "split": list(ratios), "min_count": min_count, "max_rows": max_rows, "lines_read": num_slots,
            "skipped_lines": log.count, "skipped_examples": log.examples, "blank_lines": blank_lines,
            "from_cache": False, "build_seconds": round(time.perf_counter() - start, 3)}
    lines = None if line_chunks is None else [np.concatenate(c) if c else np.zeros(0, np.int64) for c in line_chunks]
    return CTRData(schema, *splits, info=info, vocabularies=vocabs, source_lines=lines)


def _split_lines(lines: List[str], sep: str, num_columns: int):
    """Columns of a chunk of lines: ``(columns, good, bad, drop)``.

    ``columns[c]`` lists column ``c`` of the well-formed lines, whose chunk positions are ``good``
    (None: all lines); ``bad`` maps a malformed line's position to the reason; ``drop`` holds
    blank lines.
    """
    if set(map(str.count, lines, itertools.repeat(sep, len(lines)))) == {num_columns - 1}:
        # every line has the right width: split the whole chunk at once and slice out the columns,
        # several times faster than splitting line by line and transposing
        text = "".join(lines)
        if not text.endswith("\n"):
            text += "\n"
        if "\r" in text:
            text = _CR_BEFORE_NEWLINE.sub("\n", text)   # as the per-line path's rstrip("\r\n")
        flat = text.replace("\n", sep).split(sep)
        flat.pop()  # the empty string after the last newline
        return [flat[c::num_columns] for c in range(num_columns)], None, {}, set()
    rows = [line.rstrip("\r\n").split(sep) for line in lines]
    bad: Dict[int, str] = {}
    drop = set()
    for i, r in enumerate(rows):
        if len(r) == num_columns:
            continue
        if len(r) == 1 and not r[0].strip():
            drop.add(i)  # a blank line holds no row; nothing is misread by passing it
        else:
            # a CR inside the line (not the CR of a CRLF ending): lines that end with a bare CR run together
            bare_cr = "\r" in lines[i].rstrip("\r\n")
            hint = " (the file may end its lines with a bare CR: convert it to LF or CRLF)" if bare_cr else ""
            bad[i] = f"expected {num_columns} columns separated by {sep!r}, found {len(r)}{hint}"
    good = [i for i in range(len(rows)) if i not in bad and i not in drop]
    return [list(c) for c in zip(*[rows[i] for i in good])], good, bad, drop


def _labels(column: Sequence[str], values: Dict[str, float]) -> np.ndarray:
    joined = "".join(column)
    if len(joined) == len(column) and not joined.strip("01"):
        # every label is one character '0' or '1': decode them all at once
        return (np.frombuffer(joined.encode("latin-1"), dtype=np.uint8) - ord("0")).astype(np.float32)
    return np.fromiter(map(values.__getitem__, column), dtype=np.float32, count=len(column))


def load_table(fmt: TableFormat, path: str, cache_dir, seed: int, ratios, max_rows, min_count: int,
               skip_bad_lines: bool, chunk_rows: int = DEFAULT_CHUNK_ROWS, vocabularies=None,
               encoding: str = TEXT_ENCODING) -> CTRData:
    """:func:`read_table` behind a cache keyed by the file's size and mtime and every option.

    ``cache_dir=None`` means ``<folder of the file>/.sfg_cache``; ``cache_dir=False`` disables caching.
    A read with given ``vocabularies`` (encoding new data for a trained model) is never cached.
    """
    options = {"seed": int(seed), "split": [float(r) for r in ratios], "max_rows": max_rows,
               "min_count": int(min_count), "skip_bad_lines": bool(skip_bad_lines),
               "labeled": fmt.label_column is not None}
    if cache_dir is False or vocabularies is not None:
        return read_table(fmt, path, seed, ratios, max_rows, min_count, skip_bad_lines, chunk_rows, vocabularies,
                          encoding)
    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(path)), ".sfg_cache")
    cache_dir = os.path.expanduser(os.fspath(cache_dir))
    options["encoding"] = encoding
    key = cache_key(path, {"format": fmt.name, **options})
    cached = load_cache(cache_dir, fmt.name, key)
    if cached is not None:
        return cached
    data = read_table(fmt, path, seed, ratios, max_rows, min_count, skip_bad_lines, chunk_rows, encoding=encoding)
    data.info["cache_path"] = save_cache(cache_dir, fmt.name, key, data,
                                         source={"file": os.path.realpath(path), "path": os.path.abspath(path),
                                                 "options": {"format": fmt.name, **options}})
    return data
