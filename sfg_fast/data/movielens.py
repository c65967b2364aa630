"""MovieLens-100K as a CTR task: a rating >= 4 is a click.

Fields: user_id, item_id, age (MovieLens-1M buckets: 1 = under 18, 18, 25, 35, 45, 50, 56+),
gender, occupation, zip3 (first three characters of the zip code), release_year (missing or
malformed years share the token ''), genre. A movie may have several genres; ``genre="first"``
(default) keeps the first in the dataset's fixed genre order (unknown, Action, Adventure, ...),
``genre="combination"`` makes the whole sorted genre set one token (e.g. 'Action|Thriller').
Random 8:1:1 split with the seed; vocabularies from the train split (min_count default 1).

Sources, in order: ``data_dir`` holding the RecBole atomic files (ml-100k.inter / .user / .item,
tab-separated with typed headers) or the GroupLens originals (u.data tab-separated, u.user and
u.item '|'-separated), directly or in an ``ml-100k`` subfolder; without ``data_dir``, the copy that
ships inside the ``recbole`` package, located without importing it (its import needs many extras).
The data is GroupLens's, licensed for research use without redistribution: nothing of it is kept here.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .common import ColumnEncoder, SkipLog, finalize, no_rows, split_assignment
from .schema import CTRData

FIELDS = ["user_id", "item_id", "age", "gender", "occupation", "zip3", "release_year", "genre"]
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western"]
GENRE_MODES = ("first", "combination")
RECBOLE_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
GROUPLENS_FILES = ("u.data", "u.user", "u.item")
DEFAULT_SPLIT = (8, 1, 1)
INSTALL_HINT = "pip install --no-deps recbole==1.2.1"


def age_bucket(age: int) -> str:
    for low in (56, 50, 45, 35, 25, 18):
        if age >= low:
            return str(low)
    return "1"


def genre_token(genres: Sequence[str], mode: str) -> str:
    order = sorted(set(genres), key=lambda g: (GENRES.index(g) if g in GENRES else len(GENRES), g))
    if not order:
        return ""
    return order[0] if mode == "first" else "|".join(order)


def _year(text: str) -> str:
    text = text.strip()
    return text if len(text) == 4 and text.isascii() and text.isdigit() else ""


def find_source(data_dir) -> Tuple[str, str]:
    """``(layout, folder)`` with layout 'recbole' or 'grouplens'."""
    if data_dir is not None:
        root = os.path.expanduser(os.fspath(data_dir))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data_dir {root!r} for dataset 'movielens100k' is not a folder")
        for folder in (root, os.path.join(root, "ml-100k")):
            if all(os.path.isfile(os.path.join(folder, f)) for f in RECBOLE_FILES):
                return "recbole", folder
            if all(os.path.isfile(os.path.join(folder, f)) for f in GROUPLENS_FILES):
                return "grouplens", folder
        raise FileNotFoundError(f"data_dir {root!r} holds neither {'/'.join(RECBOLE_FILES)} nor "
                                f"{'/'.join(GROUPLENS_FILES)} (directly or in ml-100k/)")
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("movielens100k is read from the copy inside the recbole package, which is not "
                                f"installed: run `{INSTALL_HINT}`, or pass data_dir= a folder with the "
                                "MovieLens-100K files (u.data/u.user/u.item or ml-100k.inter/.user/.item)")
    for location in spec.submodule_search_locations:
        folder = os.path.join(location, "dataset_example", "ml-100k")
        if all(os.path.isfile(os.path.join(folder, f)) for f in RECBOLE_FILES):
            return "recbole", folder
    raise FileNotFoundError(f"the installed recbole package has no dataset_example/ml-100k files; reinstall it "
                            f"with `{INSTALL_HINT}` or pass data_dir")


def _lines(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "r", encoding="latin-1", newline="\n") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def _read_table(path: str, sep: str, columns: Sequence[str], typed_header: bool, log: SkipLog,
                max_rows: Optional[int] = None, width: Optional[int] = None):
    """Yield ``(line number, {column: value})`` for the wanted columns.

    With a typed header, columns are found by name; without one they are the first ``len(columns)``
    of exactly ``width`` (default ``len(columns)``).
    """
    lines = _lines(path)
    if typed_header:
        try:
            number, header = next(lines)
        except StopIteration:
            raise ValueError(f"{path}: the file is empty (expected a header)") from None
        names = [h.split(":", 1)[0] for h in header.split(sep)]
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{path}: line {number}: header {header!r} lacks columns {missing}")
        positions = [names.index(c) for c in columns]
        width = len(names)
    else:
        positions = list(range(len(columns)))
        width = width or len(columns)
    count = 0
    for number, line in lines:
        if max_rows is not None and count >= max_rows:
            break
        count += 1
        parts = line.split(sep)
        if len(parts) != width:
            log.bad(number, f"expected {width} columns separated by {sep!r}, found {len(parts)}")
            continue
        yield number, {c: parts[p] for c, p in zip(columns, positions)}


def _users(path: str, layout: str, log: SkipLog) -> Dict[str, Tuple[str, str, str, str]]:
    sep, typed = ("\t", True) if layout == "recbole" else ("|", False)
    users = {}
    for number, row in _read_table(path, sep, ["user_id", "age", "gender", "occupation", "zip_code"], typed, log):
        try:
            age = int(row["age"])
        except ValueError:
            log.bad(number, f"age {row['age']!r} is not an integer")
            continue
        if row["user_id"] in users:
            log.bad(number, f"user_id {row['user_id']!r} appears twice")
            continue
        users[row["user_id"]] = (age_bucket(age), row["gender"], row["occupation"], row["zip_code"][:3])
    return users


def _items(path: str, layout: str, log: SkipLog) -> Dict[str, Tuple[str, List[str]]]:
    items = {}
    if layout == "recbole":
        rows = _read_table(path, "\t", ["item_id", "release_year", "class"], True, log)
        parsed = ((n, r["item_id"], _year(r["release_year"]), r["class"].split()) for n, r in rows)
    else:
        flags = [f"g{i}" for i in range(len(GENRES))]
        rows = _read_table(path, "|", ["item_id", "title", "release_date", "video_date", "url"] + flags, False, log)

        def grouplens():
            for n, r in rows:
                marks = [r[f] for f in flags]
                if any(m not in ("0", "1") for m in marks):
                    log.bad(n, f"genre flags must be 0/1, found {marks}")
                    continue
                yield n, r["item_id"], _year(r["release_date"][-4:]), [g for g, m in zip(GENRES, marks) if m == "1"]
        parsed = grouplens()
    for number, item, year, genres in parsed:
        if item in items:
            log.bad(number, f"item_id {item!r} appears twice")
            continue
        items[item] = (year, genres)
    return items


def load_movielens(data_dir=None, seed: int = 2018, max_rows: Optional[int] = None, min_count: int = 1,
                   skip_bad_lines: bool = False, split=DEFAULT_SPLIT, genre: str = "first",
                   threshold: float = 4.0, vocabularies=None) -> CTRData:
    if genre not in GENRE_MODES:
        raise ValueError(f"genre must be one of {GENRE_MODES}, got {genre!r}")
    start = time.perf_counter()
    layout, folder = find_source(data_dir)
    names = RECBOLE_FILES if layout == "recbole" else GROUPLENS_FILES
    inter_path, user_path, item_path = (os.path.join(folder, n) for n in names)
    logs = [SkipLog(p, skip_bad_lines) for p in (inter_path, user_path, item_path)]
    users = _users(user_path, layout, logs[1])
    items = _items(item_path, layout, logs[2])

    sep, typed = "\t", layout == "recbole"
    columns: List[List[str]] = [[] for _ in FIELDS]
    labels: List[float] = []
    numbers: List[int] = []                 # source line of each row
    genre_cache: Dict[str, str] = {}
    for number, row in _read_table(inter_path, sep, ["user_id", "item_id", "rating"], typed, logs[0], max_rows,
                                   width=None if typed else 4):
        try:
            rating = float(row["rating"])
        except ValueError:
            rating = math.nan
        if not math.isfinite(rating):
            logs[0].bad(number, f"rating {row['rating']!r} is not a finite number")
            continue
        user = users.get(row["user_id"])
        item = items.get(row["item_id"])
        if user is None or item is None:
            which = "user_id" if user is None else "item_id"
            logs[0].bad(number, f"{which} {row[which]!r} is missing from the "
                                f"{os.path.basename(user_path if user is None else item_path)} file")
            continue
        if row["item_id"] not in genre_cache:
            genre_cache[row["item_id"]] = genre_token(item[1], genre)
        for column, value in zip(columns, (row["user_id"], row["item_id"], *user, item[0],
                                           genre_cache[row["item_id"]])):
            column.append(value)
        labels.append(1.0 if rating >= threshold else 0.0)
        numbers.append(number)

    if not labels:
        raise no_rows(inter_path, logs[0].count, logs[0].count, max_rows)
    encoders = [ColumnEncoder() for _ in FIELDS]
    ids = np.stack([enc.encode(col) for enc, col in zip(encoders, columns)], axis=1) if labels \
        else np.zeros((0, len(FIELDS)), np.int64)
    label_array = np.asarray(labels, dtype=np.float32)
    where = split_assignment(len(label_array), split, seed)
    chunks = [[(ids[where == s], label_array[where == s])] for s in range(3)]
    schema, splits, vocabs = finalize("movielens100k", FIELDS, [(f, None) for f in range(len(FIELDS))],
                                      [e.values() for e in encoders], chunks, min_count, vocabularies)
    info = {"dataset": "movielens100k", "source": folder, "layout": layout, "rows": int(label_array.size),
            "seed": seed, "split": list(split), "min_count": min_count, "max_rows": max_rows, "genre": genre,
            "threshold": threshold, "skipped_lines": sum(log.count for log in logs),
            "skipped_examples": [e for log in logs for e in log.examples], "from_cache": False,
            "build_seconds": round(time.perf_counter() - start, 3)}
    lines = None
    if vocabularies is not None:
        number_array = np.asarray(numbers, dtype=np.int64)
        lines = [number_array[where == s] for s in range(3)]
    return CTRData(schema, *splits, info=info, vocabularies=vocabs, source_lines=lines)
