"""CTR datasets as int64 field-local ids and 0/1 labels, split into train/valid/test.

``load_dataset(name, ...)`` reads MovieLens-100K (default, no download), Criteo and Avazu (streamed
from the user's files, preprocessed once and cached) or generates Criteo-/Avazu-shaped synthetic
data with a planted pairwise click model. Every field's vocabulary comes from the training split;
values unseen there (or rarer than ``min_count``) map to the field's OOV id, its last id.
"""
from . import synthetic  # noqa: F401
from .common import BadLineError  # noqa: F401
from .feature_map import FEATURE_MAP_FILE, load_feature_map, save_feature_map  # noqa: F401
from .load import DATASETS, load_dataset  # noqa: F401
from .schema import CTRData, Schema, Split  # noqa: F401

__all__ = ["Schema", "Split", "CTRData", "load_dataset", "DATASETS", "BadLineError", "synthetic"]
