"""Avazu click logs (Kaggle ``train``): csv with a header, ``id, click, hour (YYMMDDHH), C1, ...``.

Standard preprocessing: ``id`` is dropped; ``hour`` becomes three fields, the hour of day, the
weekday (0 = Monday) and is_weekend; every other column is a categorical token (empty = its own
token); values seen fewer than ``min_count`` (default 2) times in the training split map to OOV.
Random 8:1:1 split.
"""
from __future__ import annotations

import datetime

from .tabular import TableFormat

COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
           "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
           "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
FIELDS = ["hour", "weekday", "is_weekend"] + COLUMNS[3:]
FILE_NAMES = ("train", "train.csv", "train.gz", "train.csv.gz")
DEFAULT_MIN_COUNT = 2
DEFAULT_SPLIT = (8, 1, 1)


def parse_hour(raw: str):
    """``YYMMDDHH`` -> (hour of day, weekday 0-6 with 0 = Monday, is_weekend) as token strings."""
    if len(raw) != 8 or not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"hour {raw!r} is not YYMMDDHH")
    try:
        day = datetime.date(2000 + int(raw[0:2]), int(raw[2:4]), int(raw[4:6]))
    except ValueError as exc:
        raise ValueError(f"hour {raw!r} is not a valid date: {exc}") from None
    if int(raw[6:8]) > 23:
        raise ValueError(f"hour {raw!r} has hour of day {raw[6:8]} > 23")
    weekday = day.weekday()
    return raw[6:8], str(weekday), "1" if weekday >= 5 else "0"


FORMAT = TableFormat(
    name="avazu", sep=",", column_names=COLUMNS, has_header=True, label_column=1,
    feature_columns=list(range(2, 24)),
    parsers={2: parse_hour},
    fields=[("hour", 2, lambda p: p[0]), ("weekday", 2, lambda p: p[1]), ("is_weekend", 2, lambda p: p[2])]
    + [(name, c, None) for c, name in enumerate(COLUMNS) if c >= 3],
)
