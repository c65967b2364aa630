"""Criteo display-advertising logs (Kaggle ``train.txt``): ``label, I1..I13, C1..C26``, tab-separated.

Standard preprocessing: an empty value is missing and becomes its own token; the counts ``I1..I13``
are bucketed as ``int(floor(ln(x) ** 2))`` for ``x > 2`` and ``int(x)`` otherwise (so e.g. 3 and 1
share bucket 1, as in the widely used reference code); every field then maps values seen fewer
than ``min_count`` (default 10) times in the training split to its OOV id. Random 7:2:1 split.
"""
from __future__ import annotations

import math

from .tabular import TableFormat

NUMERIC = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label"] + NUMERIC + CATEGORICAL
FILE_NAMES = ("train.txt", "train.txt.gz")
DEFAULT_MIN_COUNT = 10
DEFAULT_SPLIT = (7, 2, 1)


def bucket_count(raw: str) -> str:
    """Token of one numeric value: '' when missing, else the bucket number as a string."""
    if raw == "":
        return ""
    if "_" in raw or not raw.isascii():   # int() and float() take digit grouping ("1_000") and other
        raise ValueError(f"{raw!r} is not a number")      # scripts' digits ("５")
    try:
        x = int(raw)
    except ValueError:
        try:
            x = float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
        if not math.isfinite(x):
            raise ValueError(f"{raw!r} is not a finite number") from None
    return str(int(math.floor(math.log(x) ** 2))) if x > 2 else str(int(x))


FORMAT = TableFormat(
    name="criteo", sep="\t", column_names=COLUMNS, has_header=False, label_column=0,
    feature_columns=list(range(1, 40)),
    parsers={c: bucket_count for c in range(1, 14)},
    fields=[(name, c, None) for c, name in enumerate(COLUMNS) if c > 0],
)
