"""Training: configs, the Trainer (early stopping, exact resume, atomic checkpoints) and evaluation.

Data flows ids -> model -> logits -> ``bce_with_logits``; the metrics are AUC
(``sklearn.metrics.roc_auc_score``) and logloss (mean BCE on the logits, in fp64).

A config is one flat dict in FuxiCTR's spirit: trainer keys (``TRAIN_DEFAULTS``) plus the model's
hyper-parameters (``embedding_dim``, ``generative``, ``gamma``, ``activation``, ``hidden_units``, ...).
YAML files hold a ``Base:`` block and experiment blocks; see :func:`resolve_config`.

Checkpoints (``last.pt`` at every epoch end, ``best.pt`` when the monitored validation metric improves:
``monitor``, AUC by default) carry the
model, the optimizer, the epoch and step counters, every RNG state (torch, CUDA, numpy, python and
the shuffling generator), the early-stopping state, the history, the config and the schema, so that
:func:`resume` reproduces an uninterrupted run bit for bit. They are written atomically.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch

from . import functional as SF
from ._backend import module_backend
from ._io import atomic_write as _atomic_write
from ._io import remove_if_present, remove_stale_temp_files
from . import models as model_zoo

__all__ = ["TRAIN_DEFAULTS", "DEFAULT_CONFIG_PATH", "TrainingDiverged", "Trainer", "train", "resume",
           "resolve_config", "load_yaml_config", "split_config", "load_checkpoint", "resolve_checkpoint",
           "model_from_checkpoint", "atomic_save", "atomic_write_text", "versions", "evaluate_model",
           "analyze_checkpoint", "quantize_checkpoint", "predict_checkpoint"]

log = logging.getLogger("sfg_fast.train")

DEFAULT_CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.yaml")
CHECKPOINT_FORMAT = "sfg_fast.checkpoint/1"

# Every key the trainer itself reads; everything else in a config is a model hyper-parameter.
TRAIN_DEFAULTS: Dict[str, Any] = {
    "model": "fm",
    "expid": None,
    # data
    "dataset": "movielens100k",
    "data_dir": None,
    "cache_dir": None,
    "data_seed": 2018,          # fixes the train/valid/test split; ``seed`` varies only training
    "num_rows": None,           # rows the synthetic datasets generate
    "max_rows": None,           # cap on rows read from a real dataset
    "min_count": None,
    "skip_bad_lines": False,
    "data_options": {},         # extra keyword arguments of sfg_fast.data.load_dataset
    "text_encoding": "utf-8",   # how the criteo / avazu readers decode tokens ("utf-8": bytes that are not
                                # UTF-8 stay distinct; "latin-1": one character per byte, as runs before
                                # this key read them, which their checkpoints imply)
    "group_field": None,        # a field name: also report gAUC grouped by its ids (None: the dataset's
                                # own group field, if it has one, see GROUP_FIELDS; false: no gAUC)
    # optimisation
    "seed": 2018,
    "epochs": 10,
    "batch_size": 4096,
    "eval_batch_size": 16384,
    "lr": 1.0e-3,
    "weight_decay": 0.0,
    "clip_grad_norm": 10.0,
    "patience": 2,
    "monitor": "AUC",           # what early stopping, the plateau lr decay and best.pt follow on the valid
                                # split: "AUC", "logloss" (lower is better), "gAUC", or FuxiCTR's weighted
                                # form {AUC: 1, logloss: -1} (the sum of weight x metric, higher is better)
    "reduce_lr_on_plateau": True,
    "lr_decay_factor": 0.1,
    "min_lr": 1.0e-6,
    # runtime
    "device": "auto",
    "threads": None,
    "amp": False,               # "bf16": the training forward under torch.autocast(bfloat16): its GEMMs (the
                                # SFG kernels', cuBLAS's, the CPU extension's) on bf16 operands with fp32
                                # accumulation; the loss, the optimizers and evaluation stay fp32
    "deterministic": True,      # fit under torch.use_deterministic_algorithms(True, warn_only=True): the
                                # GPU backward passes reduce without atomics, so a run (and a resume) repeats
                                # bit for bit; false trades that for speed
    "compile": False,           # torch.compile the training forward and backward: true (Inductor), an
                                # Inductor mode ("reduce-overhead": CUDA graphs on a GPU; "max-autotune",
                                # ...) or a torch.compile backend name ("aot_eager" copies fused tables every
                                # step: a debugging backend); evaluation runs the model eagerly. On CPU,
                                # backend auto then takes the torch ops (Inductor fuses them; the
                                # extension's would stay opaque)
    "verbose": 1,
    "out": None,
}

# The field whose ids group samples for gAUC when the config names none (FuxiCTR's dataset "group_id").
GROUP_FIELDS = {"movielens100k": "user_id"}

# Keys a resumed run may change; anything else would make it a different experiment.
RESUME_OVERRIDABLE = ("epochs", "verbose", "threads", "device", "out", "eval_batch_size", "group_field",
                      "deterministic", "compile")

# Config keys added after checkpoints were first written, with the value a checkpoint without the key
# implies (what its run did): filled in wherever a checkpoint's config is read (checkpoint_config).
LEGACY_CONFIG = {"monitor": "AUC", "text_encoding": "latin-1"}


def absolute_data_paths(config: Dict[str, Any]) -> Dict[str, Any]:
    """``config``'s data_dir and cache_dir made absolute (and ~ expanded), in place; returns it."""
    for key in ("data_dir", "cache_dir"):
        if isinstance(config.get(key), str) and config[key]:
            config[key] = os.path.abspath(os.path.expanduser(config[key]))
    return config


def checkpoint_config(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a checkpoint's (or manifest's) config with the keys it predates set to what its run did,
    and its data paths absolute (older runs kept them as typed)."""
    config = absolute_data_paths(dict(ckpt.get("config") or {}))
    if "monitor" in config and "text_encoding" not in config:
        # written by the few commits that read UTF-8 and knew monitor before the key was recorded
        config["text_encoding"] = "utf-8"
    for key, value in LEGACY_CONFIG.items():
        config.setdefault(key, value)
    return config


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the checkpoints on disk are the last good state."""


# ----------------------------------------------------------------------------------------------
# Config handling
# ----------------------------------------------------------------------------------------------

def _model_keys(name: str) -> List[str]:
    """Keyword hyper-parameters the model class ``name`` accepts (walking its __init__ chain)."""
    cls = model_zoo.MODELS[str(name).lower()]
    keys: List[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) \
                    and param.name not in ("self", "field_dims") and param.name not in keys:
                keys.append(param.name)
        if klass is model_zoo.CTRModel:
            break
    return keys


def _all_model_keys() -> set:
    keys = set()
    for name in model_zoo.MODELS:
        keys.update(_model_keys(name))
    return keys


def split_config(config: Dict[str, Any]):
    """Split a flat config into ``(train_keys, model_hparams, ignored)``.

    ``ignored`` are keys some other model of the zoo accepts but this one does not (a shared
    ``Base:`` block may hold ``hidden_units`` that FM has no use for). A key that no model and not
    the trainer knows is a typo and raises ValueError naming it.
    """
    name = str(config.get("model", TRAIN_DEFAULTS["model"])).lower()
    if name not in model_zoo.MODELS:
        raise ValueError(f"model must be one of {sorted(model_zoo.MODELS)}, got {config.get('model')!r}")
    accepted = set(_model_keys(name))
    known = _all_model_keys()
    train_cfg, hparams, ignored = {}, {}, []
    for key, value in config.items():
        if key in TRAIN_DEFAULTS:
            train_cfg[key] = value
        elif key in accepted:
            hparams[key] = value
        elif key in known:
            ignored.append(key)
        else:
            raise ValueError(f"unknown config key {key!r}: not a trainer key ({sorted(TRAIN_DEFAULTS)}) "
                             f"and not a hyper-parameter of any model ({sorted(known)})")
    return train_cfg, hparams, sorted(ignored)


def _config_loader():
    """PyYAML's safe loader with two changes for configs: YAML 1.2 numbers and booleans (``lr: 1e-3``, which
    YAML 1.1 reads as the string "1e-3"; ``0100`` is decimal 100 and ``off`` / ``yes`` / ``1:30`` / ``1_0`` are
    strings), and a key written twice in one mapping is an error (YAML would silently keep the last value:
    ``epochs: 1`` then ``epochs: 3`` trains 3 epochs)."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)
                seen = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    if isinstance(key, str) and key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark, f"found the key {key!r} twice",
                            key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    # YAML 1.2's integers and booleans too: YAML 1.1 read ``seed: 0100`` as octal 64, ``epochs: 1:30`` as 90,
    # ``1_0`` as 10 and ``generative: off`` as False; now those are strings, refused by the key's own check
    int_tag, bool_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:bool"
    ConfigLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (int_tag, bool_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    ConfigLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+.0123456789"))
    ConfigLoader.add_implicit_resolver(int_tag, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
    ConfigLoader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                       list("tTfF"))
    ConfigLoader.add_constructor(int_tag, lambda loader, node: int(loader.construct_scalar(node), 10))
    return ConfigLoader


_MAX_CONFIG_VALUES = 100_000


def _check_config_size(content, file: str) -> None:
    """Refuse a config whose aliases expand past ``_MAX_CONFIG_VALUES`` values (a few hundred bytes of nested
    ``*alias`` lists expand to billions: the checks and results.json would walk every one)."""
    count = 0
    stack = [content]
    while stack:
        value = stack.pop()
        count += 1
        if count > _MAX_CONFIG_VALUES:
            raise ValueError(f"config file {file!r} expands to more than {_MAX_CONFIG_VALUES} values (nested "
                             "YAML aliases?); write the values out")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def load_yaml_config(path: str) -> Dict[str, Dict[str, Any]]:
    """Read a FuxiCTR-style YAML file (or every ``*.yaml`` of a directory) into ``{block: dict}``."""
    import yaml

    if path is None:
        raise ValueError("config path is None")
    paths = [path]
    if os.path.isdir(path):
        paths = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".yaml", ".yml")))
        if not paths:
            raise FileNotFoundError(f"config directory {path!r} holds no .yaml files")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    blocks: Dict[str, Dict[str, Any]] = {}
    for file in paths:
        with open(file, encoding="utf-8") as fh:
            try:
                content = yaml.load(fh, Loader=_config_loader()) or {}
            except yaml.YAMLError as exc:   # not a ValueError: say which file, where, without a traceback
                raise ValueError(f"config file {file!r} is not valid YAML: {exc}") from None
            except UnicodeDecodeError as exc:
                raise ValueError(f"config file {file!r} is not UTF-8 text: {exc}") from None
        _check_config_size(content, file)
        if not isinstance(content, dict):
            raise ValueError(f"config file {file!r} must hold a mapping of blocks, got {type(content).__name__}")
        for block, values in content.items():
            if values is None:
                values = {}
            if not isinstance(values, dict):
                raise ValueError(f"block {block!r} of {file!r} must be a mapping, got {type(values).__name__}")
            if block == "Base" and "Base" in blocks:
                blocks["Base"].update(values)
            else:
                blocks[block] = dict(values)
    return blocks


def _find_block(blocks: Dict[str, Dict[str, Any]], name: str) -> Optional[str]:
    for block in blocks:
        if block.lower() == str(name).lower():
            return block
    return None


def resolve_config(config_path: Optional[str] = None, expid: Optional[str] = None,
                   overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Merge, lowest to highest precedence: trainer defaults < ``Base`` < experiment block < overrides.

    The experiment block is ``expid`` (an error if the file lacks it) or, without ``expid``, the block
    named after the model (``overrides["model"]``, else Base's model, matched case-insensitively) if
    the file has one. ``config_path=None`` reads the packaged ``configs/default.yaml``. Every override
    is applied, None included (``patience: null`` turns early stopping off); the CLI leaves out the
    flags a user did not give before it calls this.
    """
    overrides = dict(overrides or {})
    blocks = load_yaml_config(config_path or DEFAULT_CONFIG_PATH)
    config: Dict[str, Any] = dict(TRAIN_DEFAULTS)
    config.update(blocks.get("Base", {}))
    if expid is not None:
        block = _find_block(blocks, expid)
        if block is None or block == "Base":
            choices = [b for b in blocks if b != "Base"]
            raise ValueError(f"expid {expid!r} is not a block of {config_path or DEFAULT_CONFIG_PATH}; "
                             f"choose one of {choices}")
        config.update(blocks[block])
        config["expid"] = block
    else:
        model = overrides.get("model", config.get("model"))
        block = _find_block(blocks, model) if model is not None else None
        if block is not None and block != "Base":
            config.update(blocks[block])
    config.update(overrides)
    config["model"] = str(config["model"]).lower()
    split_config(config)  # raises on unknown keys now, before any data is loaded
    return config


def _check_plain_config(config: Dict[str, Any]) -> None:
    """Every value must be plain data (None, bool, numbers, strings, lists, dicts of them): checkpoints
    store the config and are read back with ``weights_only=True``, which refuses anything else, so a
    module or tensor passed in here would make every checkpoint of the run unreadable."""
    def bad(value) -> bool:
        if value is None or isinstance(value, (bool, int, float, str, np.integer, np.floating, np.bool_)):
            return False
        if isinstance(value, (list, tuple)):
            return any(bad(v) for v in value)
        if isinstance(value, np.ndarray):       # stored as a list
            return value.dtype.kind not in "biuf"
        if isinstance(value, dict):
            return any(not isinstance(k, str) or bad(v) for k, v in value.items())
        return True

    for key, value in config.items():
        if bad(value):
            hint = (" (a ready embedding module: use embedding='native', 'fused' or 'torchrec' in the config, "
                    "or build and train the model yourself)" if key == "embedding" else "")
            raise ValueError(f"config key {key!r} is a {type(value).__name__}: a training config holds plain data "
                             f"only, since checkpoints store it{hint}")


MONITOR_METRICS = {"AUC": 1.0, "logloss": -1.0, "gAUC": 1.0}   # a name alone: its sign (higher is better)


def check_resume_overrides(config: Dict[str, Any], overrides: Dict[str, Any]) -> None:
    """Refuse ``overrides`` (made absolute in place: the same folder given relative is no change) that a
    resume of a checkpoint whose config is ``config`` may not apply (a key outside RESUME_OVERRIDABLE
    that differs; a regrouped gAUC that early stopping scores)."""
    absolute_data_paths(overrides)
    for key, value in overrides.items():
        # compared as the checkpoint stores them (JSON-like: a tuple comes back a list)
        if key not in RESUME_OVERRIDABLE and _jsonable(config.get(key)) != _jsonable(value):
            raise ValueError(f"cannot change {key!r} when resuming ({config.get(key)!r} -> {value!r}); "
                             f"only {list(RESUME_OVERRIDABLE)} may change")
    check_group_field_change(config, overrides)


def check_group_field_change(config: Dict[str, Any], overrides: Dict[str, Any]) -> None:
    """A resume may regroup gAUC (``group_field``) only while early stopping does not score it: the best
    score so far was measured on the old groups, and the new scores would be compared with it."""
    if "group_field" in overrides and overrides["group_field"] != config.get("group_field") \
            and "gAUC" in monitor_weights(config.get("monitor", LEGACY_CONFIG["monitor"])):
        raise ValueError(f"cannot change 'group_field' when resuming ({config.get('group_field')!r} -> "
                         f"{overrides['group_field']!r}): monitor {config.get('monitor')!r} scores gAUC, and the "
                         "best score so far was measured on the old groups")


def monitor_weights(monitor) -> Dict[str, float]:
    """The validation metrics ``monitor`` scores and their weights (score = sum of weight x metric, higher
    is better): a name of MONITOR_METRICS, or FuxiCTR's mapping such as {AUC: 1, logloss: -1}."""
    if isinstance(monitor, str) and monitor in MONITOR_METRICS:
        return {monitor: MONITOR_METRICS[monitor]}
    if isinstance(monitor, dict) and monitor and all(
            k in MONITOR_METRICS and not isinstance(w, bool) and isinstance(w, (int, float)) and math.isfinite(w)
            and w != 0 for k, w in monitor.items()):
        return {k: float(w) for k, w in monitor.items()}
    raise ValueError(f"monitor must be one of {list(MONITOR_METRICS)} or a mapping of them to non-zero weights "
                     f"(FuxiCTR's {{AUC: 1, logloss: -1}}), got {monitor!r}")


def monitor_score(metrics: Dict[str, float], monitor) -> float:
    """The monitored score of validation ``metrics`` (see monitor_weights)."""
    weights = monitor_weights(monitor)
    missing = [k for k in weights if k not in metrics]
    if missing:
        raise ValueError(f"monitor {monitor!r} needs {missing} on the validation split, which has only "
                         f"{sorted(metrics)} (gAUC needs a group field: see group_field)")
    undefined = [k for k in weights if metrics[k] is None]
    if undefined:
        raise ValueError(f"monitor {monitor!r}: the validation {undefined[0]} is undefined (no group of the "
                         f"validation split holds both clicks and non-clicks); monitor AUC or logloss")
    return float(sum(w * metrics[k] for k, w in weights.items()))


def check_monitor_has_groups(monitor, group_field) -> None:
    """ValueError before training when ``monitor`` scores gAUC and the run has no group field."""
    if "gAUC" in monitor_weights(monitor) and group_field is None:
        raise ValueError(f"monitor {monitor!r} scores gAUC, but this run has no group field: set group_field to a "
                         f"field name (or monitor AUC / logloss)")


def monitor_name(monitor) -> str:
    weights = monitor_weights(monitor)
    if len(weights) == 1 and isinstance(monitor, str):
        return monitor
    return " + ".join(f"{w:g} x {k}" for k, w in weights.items())


def _check_train_config(cfg: Dict[str, Any]) -> None:
    def positive_int(key):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")

    for key in ("epochs", "batch_size", "eval_batch_size"):
        positive_int(key)
    for key in ("seed", "data_seed"):
        # torch.manual_seed and numpy's generators take at most 64 bits
        seed = cfg[key]
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"{key} must be an integer in [0, 2**63), got {seed!r}")
    verbose = cfg["verbose"]
    if verbose is not None and (not isinstance(verbose, (bool, int, np.integer)) or verbose < 0):
        raise ValueError(f"verbose must be true, false or an integer >= 0, got {verbose!r}")
    for key, what in (("out", "a directory path or None"), ("expid", "a name or None"),
                      ("cache_dir", "a directory path, None (beside the data) or false (no cache)")):
        value = cfg[key]
        if value is None or (key == "cache_dir" and value is False):
            continue
        if not (isinstance(value, str) and value.strip()):
            raise ValueError(f"{key} must be {what}, got {value!r}")
    wd = cfg["weight_decay"]
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {wd!r}")
    if not isinstance(cfg["deterministic"], (bool, np.bool_)):
        raise ValueError(f"deterministic must be true or false, got {cfg['deterministic']!r}")
    if not isinstance(cfg["reduce_lr_on_plateau"], (bool, np.bool_)):
        raise ValueError(f"reduce_lr_on_plateau must be true or false, got {cfg['reduce_lr_on_plateau']!r}")
    monitor_weights(cfg["monitor"])
    if cfg["text_encoding"] not in ("utf-8", "latin-1"):
        raise ValueError(f"text_encoding must be 'utf-8' or 'latin-1', got {cfg['text_encoding']!r}")
    if cfg["patience"] is not None and (isinstance(cfg["patience"], bool)
                                        or not isinstance(cfg["patience"], (int, np.integer)) or cfg["patience"] < 1):
        raise ValueError(f"patience must be a positive integer or None, got {cfg['patience']!r}")
    for key in ("lr", "min_lr"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key} must be a positive finite number, got {value!r}")
    if cfg["min_lr"] > cfg["lr"]:
        # the plateau decay clamps at min_lr: above lr it would raise the learning rate instead
        raise ValueError(f"min_lr ({cfg['min_lr']!r}) must not exceed lr ({cfg['lr']!r})")
    clip = cfg["clip_grad_norm"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0
                             or not math.isfinite(clip)):
        raise ValueError(f"clip_grad_norm must be a positive finite number or None, got {clip!r}")
    decay = cfg["lr_decay_factor"]
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ValueError(f"lr_decay_factor must be a number in (0, 1], got {decay!r}")
    compile_ = cfg["compile"]
    if not isinstance(compile_, (bool, np.bool_)) and not (isinstance(compile_, str) and compile_.strip()):
        raise ValueError(f"compile must be true, false, an Inductor mode {INDUCTOR_MODES} or a torch.compile "
                         f"backend name, got {compile_!r}")
    if isinstance(compile_, str) and compile_.strip() not in INDUCTOR_MODES:
        _compile_backend(compile_)      # an unknown name fails here, before the data is read
    if cfg["amp"] not in (False, None, "bf16"):
        raise ValueError(f"amp must be false or 'bf16' (the training forward under torch.autocast(bfloat16)), "
                         f"got {cfg['amp']!r}")
    if cfg["threads"] is not None and (isinstance(cfg["threads"], bool) or not isinstance(cfg["threads"], (int, np.integer))
                                       or cfg["threads"] < 1):
        raise ValueError(f"threads must be a positive integer or None, got {cfg['threads']!r}")
    if not isinstance(cfg["data_options"] or {}, dict):
        raise ValueError(f"data_options must be a mapping, got {cfg['data_options']!r}")
    if cfg["group_field"] not in (None, False) and not isinstance(cfg["group_field"], str):
        raise ValueError(f"group_field must be a field name, false (no gAUC) or None (the dataset's default), "
                         f"got {cfg['group_field']!r}")


def _compile_backend(name: str) -> str:
    """A torch.compile backend name, checked."""
    import torch._dynamo
    name = name.strip()
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"compile: unknown torch.compile backend {name!r}; use true (Inductor), false, or one of "
                         f"{torch._dynamo.list_backends()}")
    return name


# Values of config key ``compile`` that name an Inductor mode rather than a backend.
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The modes that run the compiled step as CUDA graphs on a GPU (their outputs live in the graphs' memory
# until the next step: each training step is marked as a new one)
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def _compiled(model: torch.nn.Module, choice):
    """``model`` itself, or its torch.compile wrapper for config key ``compile`` (checked by
    _check_train_config; true: Inductor; an Inductor mode; else a backend name)."""
    if not choice:
        return model
    if isinstance(choice, (bool, np.bool_)):
        return torch.compile(model, backend="inductor")
    if choice.strip() in INDUCTOR_MODES:
        return torch.compile(model, backend="inductor", mode=choice.strip())
    return torch.compile(model, backend=choice.strip())


_DETERMINISTIC_LOCK = threading.Lock()
_DETERMINISTIC = {"runs": 0, "before": (False, False)}   # runs inside deterministic_algorithms, and the setting before


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch's deterministic mode on for the block (``warn_only``: an op without a deterministic kernel warns
    instead of stopping the run) when ``enabled``; the setting before comes back after. Our kernels and torch's
    read it: sorted, atomic-free reductions on the GPU. A caller who already turned the mode on, strict or not,
    keeps theirs. The mode is process-wide, so runs training at once in threads share one switch: the first
    to enter saves the setting and the last to leave restores it (each restoring its own snapshot turned the
    mode off under the other's feet and left it on for good)."""
    if not enabled:
        yield
        return
    with _DETERMINISTIC_LOCK:
        if _DETERMINISTIC["runs"] == 0:
            _DETERMINISTIC["before"] = (torch.are_deterministic_algorithms_enabled(),
                                        torch.is_deterministic_algorithms_warn_only_enabled())
        if not torch.are_deterministic_algorithms_enabled():   # (also if turned off since the first run began)
            torch.use_deterministic_algorithms(True, warn_only=True)
        _DETERMINISTIC["runs"] += 1
    try:
        yield
    finally:
        with _DETERMINISTIC_LOCK:
            _DETERMINISTIC["runs"] -= 1
            if _DETERMINISTIC["runs"] == 0:
                before = _DETERMINISTIC["before"]
                torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@contextlib.contextmanager
def _compile_limits(active: bool):
    """While a compiled run trains: every model of the zoo shares one forward (CTRModel.forward), so the
    runs of one process (compare) share Dynamo's recompile limit of that code (8 graphs); past it Dynamo
    silently ran later models eagerly. Raised here, and reaching it is an error, never a silent fallback."""
    if not active:
        yield
        return
    import torch._dynamo
    limit = max(int(torch._dynamo.config.recompile_limit), 256)
    with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
        yield


def _check_backends(backend: str, device: torch.device) -> None:
    """The model's backend and ``SFG_FAST_BACKEND`` can run here (else the first forward would say so)."""
    from ._backend import ENV_VAR, BackendUnavailableError, env_backend, unavailable_reason

    env = env_backend()
    for name, where in ((backend, "backend"), (env, ENV_VAR)):
        why = unavailable_reason(name, "", device) if name in ("cpu", "cuda", "triton") else None
        if why is not None:
            raise BackendUnavailableError(f"{where} {name!r} is unavailable: {why}")


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):      # meta, mps, xla, ...: the trainer runs on CPUs and CUDA GPUs
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA device is available")
    return dev


def default_out_dir(config: Dict[str, Any]) -> str:
    variant = "sfg" if config.get("generative", True) else "base"
    name = config.get("expid") or config["model"]
    return os.path.join("runs", str(config["dataset"]), f"{name}-{variant}-seed{config['seed']}")


# ----------------------------------------------------------------------------------------------
# Atomic files, versions
# ----------------------------------------------------------------------------------------------

def atomic_save(obj, path: str) -> None:
    """``torch.save(obj, path)``, atomically (temp file in the same directory, fsync, os.replace)."""
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the whole new one."""
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _jsonable(obj):
    """Plain-Python copy of ``obj`` (numpy scalars/arrays, tuples, tensors made JSON-friendly)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def _git_sha() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def versions() -> Dict[str, Any]:
    """Library versions, the git SHA of the sfg_fast checkout (None when not a git checkout), the compiled
    extension's instruction set (None when it is not built) and every ``SFG_FAST_*`` environment variable:
    the knobs that pick kernels and GEMM providers, so a result says which code computed it."""
    from importlib import metadata

    from . import __version__

    info: Dict[str, Any] = {"sfg_fast": str(__version__), "torch": str(torch.__version__),
                            "numpy": str(np.__version__), "python": sys.version.split()[0], "git_sha": _git_sha()}
    for name, dist in (("scikit_learn", "scikit-learn"), ("triton", "triton")):
        try:
            info[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[name] = None
    try:
        from . import _C
        info["cpu_extension_isa"] = str(_C.hot_loop_isa())
    except Exception:       # not built, or a stale build: the extension is optional
        info["cpu_extension_isa"] = None
    info["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("SFG_FAST_")}
    return info


# ----------------------------------------------------------------------------------------------
# RNG state (stored as tensors and plain Python so checkpoints load with weights_only=True)
# ----------------------------------------------------------------------------------------------

def _capture_rng(generator: torch.Generator) -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
        "data": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: Dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["data"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

# what a run writes into its output directory (a fresh run refuses a directory holding any of them)
RUN_FILES = ("last.pt", "best.pt", "results.json")


def resolve_checkpoint(path: str, name: str = "last.pt") -> str:
    """A checkpoint file, or a run directory (then ``<dir>/<name>``)."""
    if path is None:
        raise ValueError("checkpoint path is None")
    if os.path.isdir(path):
        candidate = os.path.join(path, name)
        if not os.path.exists(candidate):
            raise FileNotFoundError(f"run directory {path!r} holds no {name}")
        return candidate
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return path


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load an sfg_fast checkpoint (file or run directory) with ``weights_only=True``."""
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path!r} could not be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not an sfg_fast checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


def model_from_checkpoint(path: str, map_location="cpu"):
    """Rebuild the model of a checkpoint: returns ``(model, checkpoint)``; the model is in eval mode."""
    ckpt = load_checkpoint(path, map_location)
    model = model_zoo.build(ckpt["model_name"], ckpt["schema"]["field_dims"], **ckpt["model_config"])
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    return model, ckpt


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def load_data(config: Dict[str, Any]):
    """``sfg_fast.data.load_dataset`` with the data keys of ``config``."""
    from .data import load_dataset

    options = dict(config.get("data_options") or {})
    skip = config.get("skip_bad_lines", False)
    if not isinstance(skip, (bool, np.bool_)):
        raise ValueError(f"skip_bad_lines must be true or false, got {skip!r}")
    if "encoding" in options:
        raise ValueError("data_options may not set 'encoding': set the config key text_encoding (it is recorded "
                         "with the run, and its resumes, analyses and predictions read the files the same way)")
    if config["dataset"] in ("criteo", "avazu"):
        options["encoding"] = config.get("text_encoding", TRAIN_DEFAULTS["text_encoding"])
    return load_dataset(name=config["dataset"], data_dir=config.get("data_dir"),
                        cache_dir=config.get("cache_dir"), seed=config.get("data_seed", 2018),
                        max_rows=config.get("max_rows"), min_count=config.get("min_count"),
                        skip_bad_lines=bool(config.get("skip_bad_lines", False)),
                        num_rows=config.get("num_rows"), **options)


def data_fingerprint(data) -> str:
    """A digest of a dataset as training sees it: every split's shape and labels, a strided sample of its
    ids (at most about 64k rows a split) and the field_dims. Checkpoints keep it, so that a resume on
    other data (same field_dims, other rows) is refused. Independent of the ids' integer width (a cached
    load and a fresh read agree)."""
    h = hashlib.sha256(json.dumps([int(d) for d in data.schema.field_dims]).encode())
    for name, split in data.splits().items():
        ids, labels = np.asarray(split.ids), np.asarray(split.labels, dtype=np.float32)
        h.update(f"{name}:{list(ids.shape)}:{list(labels.shape)}".encode())
        h.update(np.ascontiguousarray(labels).tobytes())
        step = max(1, ids.shape[0] // 65536)
        h.update(np.ascontiguousarray(ids[::step], dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


def _split_tensors(split, name: str):
    ids = torch.as_tensor(np.ascontiguousarray(split.ids), dtype=torch.int64)
    labels = torch.as_tensor(np.ascontiguousarray(split.labels), dtype=torch.float32)
    if ids.dim() != 2 or labels.dim() != 1 or ids.shape[0] != labels.shape[0]:
        raise ValueError(f"{name} split must have ids [n, N] and labels [n], got {list(ids.shape)} "
                         f"and {list(labels.shape)}")
    return ids, labels


def evaluate_model(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, device: torch.device,
                   batch_size: int = 16384, name: str = "valid", group_column: Optional[int] = None,
                   group_exclude: Optional[int] = None) -> Dict[str, float]:
    """AUC and logloss of ``model`` on ``(ids, labels)``; logloss is mean BCE on the logits in fp64.
    With ``group_column`` also gAUC (:func:`sfg_fast.metrics.group_auc`) grouped by ``ids[:, group_column]``
    and the number of groups it averaged (``gAUC_groups``); rows whose group id is ``group_exclude`` (the
    field's OOV id: every unseen user at once) are left out of gAUC and counted in ``gAUC_excluded_rows``.

    Raises TrainingDiverged when a logit is NaN/inf, ValueError when the split is empty or one-class.
    """
    if ids.shape[0] == 0:
        raise ValueError(f"the {name} split is empty")
    return logit_metrics(model_logits(model, ids, device, batch_size, name), labels, ids, name, group_column,
                         group_exclude)


def model_logits(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, batch_size: int = 16384,
                 name: str = "valid") -> torch.Tensor:
    """fp64 ``[n]`` logits of ``model`` (eval mode, no grad) in batches; TrainingDiverged on a NaN/inf."""
    was_training = model.training
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            chunks.append(model(ids[start:start + batch_size].to(device, non_blocking=True)).double().cpu())
    model.train(was_training)
    logits = torch.cat(chunks)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise TrainingDiverged(f"{bad} of {logits.numel()} {name} logits are NaN/inf")
    return logits


def resolve_group_field(schema, group_field):
    """The gAUC grouping of a run: ``(field name or None, {"group_column", "group_exclude"} or {})``.
    ``group_field`` None takes the dataset's own group field (``GROUP_FIELDS``), False / "" / "none" turns
    gAUC off; the field's OOV id (every unseen user at once) is excluded from the groups."""
    if group_field is None:
        group_field = GROUP_FIELDS.get(schema.name)
    if group_field is None or group_field in (False, "", "none"):
        return None, {}
    names = list(schema.field_names)
    if group_field not in names:
        raise ValueError(f"group_field {group_field!r} is not a field of {schema.name}; its fields are {names}")
    column = names.index(group_field)
    return group_field, {"group_column": column, "group_exclude": int(schema.oov_ids[column])}


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, name: str = "valid",
                  group_column: Optional[int] = None, group_exclude: Optional[int] = None) -> Dict[str, float]:
    """The metrics of :func:`evaluate_model` from logits already computed."""
    from sklearn.metrics import roc_auc_score

    y = labels.double()
    positives = int(y.sum().round())
    if positives in (0, y.numel()):
        raise ValueError(f"the {name} split holds only one class ({positives} clicks of {y.numel()}); "
                         f"AUC is undefined: use more rows")
    # AUC is rank-based: score the logits themselves, which fp64 sigmoid would saturate into ties.
    auc = float(roc_auc_score(y.numpy(), logits.numpy()))
    logloss = float(SF.bce_with_logits(logits, y, reduction="mean", backend="torch"))
    out = {"AUC": auc, "logloss": logloss}
    if group_column is not None:
        from .metrics import group_auc
        groups = ids[:, group_column].numpy()
        out["gAUC"], out["gAUC_groups"] = group_auc(y.numpy(), logits.numpy(), groups, exclude=group_exclude)
        out["gAUC_excluded_rows"] = 0 if group_exclude is None else int((groups == group_exclude).sum())
    return out


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------

class Trainer:
    """Train one model on one dataset: ``Trainer(config).fit() -> results``.

    Args:
        config: a flat config (see :func:`resolve_config`; missing trainer keys take ``TRAIN_DEFAULTS``).
        data: an already loaded ``CTRData`` (else loaded from the config's data keys). Several
            trainers may share one (``compare`` does).
        checkpoint: a loaded checkpoint to resume from (see :func:`resume`).
    """

    def __init__(self, config: Dict[str, Any], data=None, checkpoint: Optional[Dict[str, Any]] = None,
                 overwrite: bool = False):
        """``overwrite``: a fresh run may replace the run files (checkpoints, results) another run left in
        its output directory; without it such a directory is refused, so a finished run is never lost to
        a command repeated by mistake."""
        config = dict(TRAIN_DEFAULTS, **config)
        config["model"] = str(config["model"]).lower()
        self.train_cfg, self.hparams, self.ignored_keys = split_config(config)
        _check_train_config(self.train_cfg)
        _check_plain_config(config)
        # stored absolute: predict, analyze and quantize read the data (and its cache) again from other directories
        absolute_data_paths(config)
        self.config = config
        if config["out"] is None:
            config["out"] = default_out_dir(config)
        self.out = config["out"]
        if checkpoint is None and not overwrite:
            held = [name for name in RUN_FILES if os.path.exists(os.path.join(self.out, name))]
            if held:
                raise FileExistsError(f"--out {self.out} already holds a run ({', '.join(held)}); continue it with "
                                      f"--resume {self.out}, replace it with --overwrite, or choose another --out")
        self.verbose = int(config["verbose"] or 0)
        if config["threads"] is not None:
            torch.set_num_threads(int(config["threads"]))
        self.device = _resolve_device(config["device"])
        if self.device.type == "cuda" and config["deterministic"]:
            # cuBLAS repeats its GEMMs bit for bit only with a fixed workspace, read when cuBLAS starts: set
            # before CUDA does, it also lets the fused path's exact-fp32 GEMMs run in cuBLAS (sfg_fast._cublas)
            from . import _cublas
            _cublas.fix_workspace()
        if self.ignored_keys:
            log.info("model %s ignores config keys %s", config["model"], self.ignored_keys)

        self.data = data if data is not None else load_data(config)
        check = getattr(self.data, "check", None)
        if callable(check):
            # ids inside field_dims and 0/1 labels in every split, with the split named, before any work
            # (one pass over the ids: about a second for all of Criteo)
            check()
        self.schema = self.data.schema
        self.group_field, self._group_kw = resolve_group_field(self.schema, config["group_field"])
        # (_group_kw is passed only when set: evaluate_model's 6-argument form is the one a caller may replace)
        self.group_column = self._group_kw.get("group_column")
        check_monitor_has_groups(config["monitor"], self.group_field)
        if checkpoint is not None and list(checkpoint["schema"]["field_dims"]) != list(self.schema.field_dims):
            raise ValueError(f"the checkpoint's schema (field_dims {checkpoint['schema']['field_dims']}) does not "
                             f"match the dataset's ({list(self.schema.field_dims)}); is it the same data?")
        self.data_fingerprint = data_fingerprint(self.data)
        self.feature_map_digest = None
        self._feature_map = None          # built once: written by fit, its digest kept in every checkpoint
        if getattr(self.data, "vocabularies", None) is not None:
            from .data.feature_map import feature_map_digest, feature_map_of
            self._feature_map = feature_map_of(self.data)
            self.feature_map_digest = feature_map_digest(self._feature_map)
        elif checkpoint is not None:
            self.feature_map_digest = checkpoint.get("feature_map_digest")
        saved = (checkpoint or {}).get("data_fingerprint")
        if saved is not None and saved != self.data_fingerprint:
            raise ValueError("the dataset differs from the one the checkpoint was trained on (same field_dims, other "
                             "rows or labels): a resume on it would not continue the same run; use the same data "
                             "(raw file and data options)")
        self.train_ids, self.train_labels = _split_tensors(self.data.train, "train")
        self.valid_ids, self.valid_labels = _split_tensors(self.data.valid, "valid")
        self.test_ids, self.test_labels = _split_tensors(self.data.test, "test")
        # Errors a run would only meet in its first steps, raised here: before fit() replaces a run that
        # --overwrite names (a failed run must not cost the one it was to replace)
        for split, ids in (("train", self.train_ids), ("valid", self.valid_ids), ("test", self.test_ids)):
            if ids.shape[0] == 0:
                raise ValueError(f"the {split} split is empty ({self.data.info.get('rows', 0)} rows read, split "
                                 f"{config.get('split')}): give more rows (num_rows / max_rows) or other ratios")
        _check_backends(self.hparams.get("backend", "auto"), self.device)

        seed = int(config["seed"])
        _seed_everything(seed)  # model initialisation depends on the global torch RNG
        try:
            self.model = model_zoo.build(config["model"], list(self.schema.field_dims), **self.hparams).to(self.device)
        except (MemoryError, RuntimeError) as exc:     # torch.OutOfMemoryError is a RuntimeError
            if isinstance(exc, RuntimeError) and not isinstance(exc, torch.OutOfMemoryError) \
                    and "allocate" not in str(exc):
                raise
            raise ValueError(f"the {config['model']} model does not fit in memory on {self.device} ({exc}); "
                             f"check embedding_dim, hidden_units and the vocabulary sizes") from None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=float(config["lr"]),
                                          weight_decay=float(config["weight_decay"]))
        self._train_forward = _compiled(self.model, config["compile"])
        self._cudagraph_steps = (isinstance(config["compile"], str)
                                 and config["compile"].strip() in _CUDAGRAPH_MODES)
        self.generator = torch.Generator().manual_seed(seed)

        self.epoch = 0            # completed epochs
        self.step = 0             # completed optimizer steps
        self.best_auc = -math.inf     # valid AUC of the best epoch
        self.best_score = -math.inf   # its monitored score (config "monitor")
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped_early = False
        self.history: List[Dict[str, Any]] = []
        self.step_seconds = 0.0   # time inside training steps only (samples/s is measured on it)
        self.fit_seconds = 0.0    # wall time of fit(), validation included, summed over resumes
        self.samples_seen = 0
        self._wrote_checkpoint = False
        self._fit_failed: Optional[str] = None
        self._resumed = checkpoint is not None
        if checkpoint is not None:
            self._load_state(checkpoint)

    # -- state -------------------------------------------------------------------------------
    @property
    def schema_dict(self) -> Dict[str, Any]:
        return _jsonable(self.schema.to_dict())

    def state_dict(self) -> Dict[str, Any]:
        """Everything a checkpoint holds: model, optimizer, RNG, early-stopping and lr-schedule state, the
        config and the feature map's digest (what :func:`resume` needs to continue exactly)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "feature_map_digest": self.feature_map_digest,
            "model_name": self.config["model"],
            "model_config": _jsonable(self.model.config),
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng": _capture_rng(self.generator),
            "early_stopping": {"best_auc": self.best_auc, "best_score": self.best_score, "best_epoch": self.best_epoch,
                               "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early},
            "history": copy.deepcopy(self.history),
            "timing": {"step_seconds": self.step_seconds, "fit_seconds": self.fit_seconds,
                       "samples_seen": self.samples_seen},
            "config": _jsonable(self.config),
            "schema": self.schema_dict,
            "data_fingerprint": self.data_fingerprint,
            "versions": versions(),
        }

    def _load_state(self, ckpt: Dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.epoch = int(ckpt["epoch"])
        self.step = int(ckpt["step"])
        stop = ckpt["early_stopping"]
        self.best_auc = float(stop["best_auc"])
        # checkpoints from before "monitor" followed the valid AUC
        self.best_score = float(stop.get("best_score", stop["best_auc"]))
        self.best_epoch = int(stop["best_epoch"])
        self.bad_epochs = int(stop["bad_epochs"])
        self.stopped_early = bool(stop["stopped_early"])
        self.history = list(ckpt["history"])
        timing = ckpt.get("timing", {})
        self.step_seconds = float(timing.get("step_seconds", 0.0))
        self.fit_seconds = float(timing.get("fit_seconds", 0.0))
        self.samples_seen = int(timing.get("samples_seen", 0))
        _restore_rng(ckpt["rng"], self.generator)

    def save(self, name: str, state: Optional[Dict[str, Any]] = None) -> str:
        """Write ``state`` (default :meth:`state_dict`) atomically as ``<out>/<name>``; returns the path."""
        path = os.path.join(self.out, name)
        atomic_save(state if state is not None else self.state_dict(), path)
        return path

    # -- loop --------------------------------------------------------------------------------
    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _train_epoch(self) -> Dict[str, float]:
        cfg = self.config
        self.model.train()
        num = self.train_ids.shape[0]
        batch_size = int(cfg["batch_size"])
        order = torch.randperm(num, generator=self.generator)
        clip = cfg["clip_grad_norm"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        loss_sum, seen, seconds = 0.0, 0, 0.0
        progress = None
        if self.verbose:
            from tqdm.auto import tqdm
            progress = tqdm(total=num, unit="sample", unit_scale=True, leave=False, dynamic_ncols=True,
                            desc=f"epoch {self.epoch + 1}/{cfg['epochs']}", file=sys.stderr)
        try:
            for batch_index, start in enumerate(range(0, num, batch_size)):
                tick = time.perf_counter()
                index = order[start:start + batch_size]
                # index_select: the same rows as train_ids[index], without advanced indexing's overhead
                ids = self.train_ids.index_select(0, index).to(self.device, non_blocking=True)
                labels = self.train_labels.index_select(0, index).to(self.device, non_blocking=True)
                if self._cudagraph_steps:
                    torch.compiler.cudagraph_mark_step_begin()   # the last step's graph outputs are done
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config["amp"] == "bf16"):
                    logits = self._train_forward(ids)
                loss = SF.bce_with_logits(logits, labels, reduction="mean",
                                          backend=module_backend("auto", "bce_with_logits"))
                loss_value = float(loss.detach())
                where = (f"epoch {self.epoch + 1}, batch {batch_index + 1} (global step {self.step + 1})")
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(self._diverged_message(f"training loss is {loss_value}", where))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, float(clip))
                    if not math.isfinite(float(norm)):
                        raise TrainingDiverged(self._diverged_message(f"gradient norm is {float(norm)}", where))
                self.optimizer.step()
                self.step += 1
                rows = int(index.shape[0])
                loss_sum += loss_value * rows
                seen += rows
                seconds += time.perf_counter() - tick
                if progress is not None:
                    progress.update(rows)
                    progress.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
        finally:
            if progress is not None:
                progress.close()
        return {"train_loss": loss_sum / max(seen, 1), "samples": seen, "step_seconds": seconds}

    def _diverged_message(self, what: str, where: str) -> str:
        last = os.path.join(self.out, "last.pt")
        kept = (f"the last good checkpoint {last} (end of epoch {self.epoch}) is intact"
                if self.resumable_checkpoint() else "no checkpoint of this run had been written yet")
        return (f"training diverged: {what} at {where}; stopping. {kept}. "
                f"Try a lower lr (now {self._lr():g}) or a smaller gamma.")

    def _end_epoch(self, stats: Dict[str, float], lr: float) -> None:
        cfg = self.config
        try:
            metrics = evaluate_model(self.model, self.valid_ids, self.valid_labels, self.device,
                                     int(cfg["eval_batch_size"]), "valid", **self._group_kw)
        except TrainingDiverged as exc:
            raise TrainingDiverged(self._diverged_message(str(exc), f"the validation after epoch {self.epoch + 1}")) \
                from None
        self.epoch += 1
        score = monitor_score(metrics, cfg["monitor"])
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_auc, self.best_epoch, self.bad_epochs = score, metrics["AUC"], self.epoch, 0
        else:
            self.bad_epochs += 1
            if cfg["reduce_lr_on_plateau"]:
                for group in self.optimizer.param_groups:
                    group["lr"] = max(group["lr"] * float(cfg["lr_decay_factor"]), float(cfg["min_lr"]))
            if cfg["patience"] is not None and self.bad_epochs >= int(cfg["patience"]):
                self.stopped_early = True
        self.step_seconds += stats["step_seconds"]
        self.samples_seen += stats["samples"]
        record = {"epoch": self.epoch, "train_loss": stats["train_loss"], "valid_auc": metrics["AUC"],
                  "valid_logloss": metrics["logloss"], "lr": lr, "improved": improved,
                  **({"valid_gauc": metrics["gAUC"]} if "gAUC" in metrics else {}),
                  "seconds": None,
                  "samples_per_second": stats["samples"] / max(stats["step_seconds"], 1e-12)}
        self.history.append(record)
        if self.verbose:
            log.info("epoch %d: train loss %.5f | valid AUC %.5f logloss %.5f | lr %.1e | %.0f samples/s%s",
                     self.epoch, stats["train_loss"], metrics["AUC"], metrics["logloss"], lr,
                     record["samples_per_second"], " | best" if improved else "")

    def _checkpoint(self, improved: bool) -> None:
        state = self.state_dict()
        # last.pt first: if we die between the two writes, last.pt (epoch e, best epoch e) is itself the best
        # model, and a resume rewrites best.pt from it. The other order would leave a best.pt one epoch
        # ahead of last.pt, which only an identical redo of that epoch (same epochs, device, kernels)
        # could reconcile: the best model so far would be in no file.
        self.save("last.pt", state)
        if improved:
            self.save("best.pt", state)
        self._wrote_checkpoint = True

    def fit(self) -> Dict[str, Any]:
        """Train until ``epochs`` or early stopping, reload the best checkpoint, test, write results.

        A fit that was interrupted (Ctrl-C, an error) leaves this Trainer part-way through an epoch; calling
        fit again is refused: continue with :func:`resume` on the output directory, which is exact."""
        if self._fit_failed:
            raise RuntimeError(f"this Trainer's fit() stopped part-way ({self._fit_failed}); its state is in the "
                               f"middle of an epoch. Continue exactly with sfg_fast.train.resume({self.out!r})")
        try:
            with deterministic_algorithms(bool(self.config["deterministic"])), \
                    _compile_limits(bool(self.config["compile"])):
                return self._fit()
        except BaseException as exc:
            self._fit_failed = type(exc).__name__
            if isinstance(exc, KeyboardInterrupt):
                exc.resume_from = self.resumable_checkpoint()    # the CLI's hint: resume, or start again
            raise

    def _fit(self) -> Dict[str, Any]:
        cfg = self.config
        os.makedirs(self.out, exist_ok=True)
        self._remove_stale_temp_files()
        if not self._resumed:
            self._remove_replaced_run()
        self._write_feature_map()
        if self.verbose:
            log.info("training %s (%s) on %s: %d train / %d valid / %d test rows, %d fields, %d parameters, "
                     "device %s, out %s", cfg["model"], "SFG" if self.model.generative else "base", cfg["dataset"],
                     self.train_ids.shape[0], self.valid_ids.shape[0], self.test_ids.shape[0],
                     self.train_ids.shape[1], self.num_parameters, self.device, self.out)
        while self.epoch < int(cfg["epochs"]) and not self.stopped_early:
            tick = time.perf_counter()
            lr = self._lr()
            stats = self._train_epoch()
            self._end_epoch(stats, lr)
            # Timing is settled before the checkpoint so that it is part of the saved state.
            self.history[-1]["seconds"] = time.perf_counter() - tick
            self.fit_seconds += self.history[-1]["seconds"]
            self._checkpoint(self.history[-1]["improved"])
        if self.stopped_early and self.verbose:
            log.info("early stop after epoch %d: no gain in the validation %s for %d epochs", self.epoch,
                     monitor_name(self.config["monitor"]), self.bad_epochs)
        return self.finish()

    def _remove_replaced_run(self) -> None:
        """A fresh run into a directory that holds another run's files (allowed by ``overwrite``) removes them
        before its first epoch: otherwise, stopped before its first checkpoint, the directory would pair the
        other run's last.pt / best.pt with this run's command, and its results.json would describe a run
        that is not there (a resume would silently continue the other run)."""
        for name in RUN_FILES:
            remove_if_present(os.path.join(self.out, name))

    def resumable_checkpoint(self) -> Optional[str]:
        """The directory to ``--resume`` this run from, or None while no checkpoint of this run exists
        (a last.pt there belongs to it only once it wrote one, or resumed from it)."""
        last = os.path.join(self.out, "last.pt")
        ours = self.epoch > 0 and os.path.exists(last) and (self._wrote_checkpoint or self._resumed)
        return self.out if ours else None

    def _remove_stale_temp_files(self) -> None:
        """Temp files of an atomic write that a killed process never renamed (each up to a checkpoint's size)."""
        from .data import FEATURE_MAP_FILE

        remove_stale_temp_files(self.out, tuple(f".{name}." for name in RUN_FILES + (FEATURE_MAP_FILE,)))

    def _write_feature_map(self) -> None:
        """``feature_map.json.gz``: the vocabularies of the data (files only), so ``predict`` encodes new
        raw data exactly as this run's. A stale one (an overwritten run on other data) is removed."""
        from .data import FEATURE_MAP_FILE
        from .data.feature_map import write_feature_map

        path = os.path.join(self.out, FEATURE_MAP_FILE)
        if self._feature_map is not None:
            write_feature_map(self._feature_map, path)
        elif os.path.exists(path) and not self._resumed:
            # a resume given the same rows without their vocabularies keeps the run's own file
            os.unlink(path)

    def _best_checkpoint(self, path: str) -> Dict[str, Any]:
        """This run's best checkpoint, checked to be it: the best epoch and its validation AUC, and the
        experiment (every config key a resume may not change). A best.pt of another run (a reused output
        directory, a resume whose source folder lacked one) would otherwise be tested as this model."""
        if not os.path.exists(path):
            raise ValueError(f"{path} is missing: the best model of this run (epoch {self.best_epoch}) predates "
                             f"its last epoch ({self.epoch}) and cannot be reloaded; resume from the run directory "
                             "that holds its best.pt (or pass --out that directory)")
        best = load_checkpoint(path, map_location=self.device)
        stop = best.get("early_stopping", {})
        theirs = {k: v for k, v in checkpoint_config(best).items() if k not in RESUME_OVERRIDABLE}
        ours = {k: v for k, v in _jsonable(self.config).items() if k not in RESUME_OVERRIDABLE}
        if best.get("epoch") != self.best_epoch or stop.get("best_auc") != self.best_auc or theirs != ours:
            differs = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise ValueError(f"{path} is not this run's best checkpoint (it holds epoch {best.get('epoch')} with "
                             f"valid AUC {stop.get('best_auc')}; this run's best is epoch {self.best_epoch} with "
                             f"{self.best_auc}" + (f"; its config differs in {differs}" if differs else "") +
                             "): the output directory holds another run's files")
        return best

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def finish(self) -> Dict[str, Any]:
        """Reload best.pt, evaluate valid and test, and write ``results.json``."""
        cfg = self.config
        best_path = os.path.join(self.out, "best.pt")
        if self.best_epoch != self.epoch:
            # the best model predates the last epoch: it must come from this run's best.pt
            self.model.load_state_dict(self._best_checkpoint(best_path)["model_state"])
        self.model.eval()
        batch = int(cfg["eval_batch_size"])
        valid = evaluate_model(self.model, self.valid_ids, self.valid_labels, self.device, batch, "valid",
                               **self._group_kw)
        test = evaluate_model(self.model, self.test_ids, self.test_labels, self.device, batch, "test",
                              **self._group_kw)
        results = {
            "model": cfg["model"],
            "generative": bool(self.model.generative),
            "dataset": cfg["dataset"],
            "seed": cfg["seed"],
            "test_auc": test["AUC"],
            "test_logloss": test["logloss"],
            "valid_auc": valid["AUC"],
            "valid_logloss": valid["logloss"],
            **({"test_gauc": test["gAUC"], "valid_gauc": valid["gAUC"], "test_gauc_groups": test["gAUC_groups"],
                "test_gauc_excluded_rows": test["gAUC_excluded_rows"],
                "group_field": self.group_field} if self.group_column is not None else {}),
            "best_epoch": self.best_epoch,
            "epochs_run": self.epoch,
            "steps": self.step,
            "stopped_early": self.stopped_early,
            "samples_per_second": self.samples_seen / max(self.step_seconds, 1e-12),
            "train_seconds": self.fit_seconds,
            "step_seconds": self.step_seconds,
            "num_parameters": self.num_parameters,
            "rows": {"train": int(self.train_ids.shape[0]), "valid": int(self.valid_ids.shape[0]),
                     "test": int(self.test_ids.shape[0])},
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "history": self.history,
            "config": self.config,
            "model_config": self.model.config,
            "ignored_config_keys": self.ignored_keys,
            "schema": self.schema_dict,
            "data_info": getattr(self.data, "info", None),
            "versions": versions(),
            "best_checkpoint": best_path if os.path.exists(best_path) and self.best_epoch else None,
        }
        results = _jsonable(results)
        atomic_write_text(json.dumps(results, indent=2, default=str) + "\n", os.path.join(self.out, "results.json"))
        if self.verbose:
            log.info("test AUC %.5f logloss %.5f (best epoch %d); results in %s", test["AUC"], test["logloss"],
                     self.best_epoch, os.path.join(self.out, "results.json"))
        return results


def train(config: Optional[Dict[str, Any]] = None, data=None, overwrite: bool = False,
          **overrides) -> Dict[str, Any]:
    """Train with ``config`` (default: the packaged default.yaml for ``overrides['model']``) + overrides.
    ``overwrite`` as in :class:`Trainer`."""
    if config is None:
        config = resolve_config(None, overrides.pop("expid", None), overrides)
    else:
        config = dict(config, **overrides)
    return Trainer(config, data=data, overwrite=overwrite).fit()


def resume(path: str, data=None, **overrides) -> Dict[str, Any]:
    """Continue the run whose checkpoint (or run directory, then its ``last.pt``) is ``path``.

    Only ``RESUME_OVERRIDABLE`` keys may be changed (e.g. ``epochs`` to train longer); an override of
    None is a value like any other (``group_field=None``: the dataset's default). The output directory
    (``out`` not given, or None) is the checkpoint's directory. Final metrics equal an uninterrupted run's.
    """
    file = resolve_checkpoint(path)
    ckpt = load_checkpoint(file)
    config = checkpoint_config(ckpt)
    if overrides.get("out", "") is None:
        del overrides["out"]                      # out=None: the checkpoint's directory, as when not given
    check_resume_overrides(config, overrides)
    epochs, done = overrides.get("epochs"), int(ckpt.get("epoch") or 0)
    if isinstance(epochs, (int, np.integer)) and not isinstance(epochs, bool) and 0 < epochs < done:
        raise ValueError(f"epochs={epochs} is fewer than the {done} epochs the checkpoint has already run; "
                         f"a resume can only train longer (its results would report {done} epochs run of {epochs})")
    config.update(overrides)
    source_dir = os.path.dirname(os.path.abspath(file))
    if "out" not in overrides:
        config["out"] = source_dir
    best = os.path.join(source_dir, "best.pt")
    out_dir = os.path.abspath(config["out"])
    stop = ckpt.get("early_stopping", {})
    best_is_this = stop.get("best_epoch") == ckpt.get("epoch")     # the checkpoint is the best model so far
    from .data import FEATURE_MAP_FILE
    source_map = os.path.join(source_dir, FEATURE_MAP_FILE)
    if out_dir != source_dir:
        # the copies an earlier attempt of this same resume made (stopped before its first checkpoint) are
        # this run's own: a retry may go on; anything else there is another run's
        own_copies = {"best.pt": file if best_is_this else best}
        for name in RUN_FILES:
            there = os.path.join(out_dir, name)
            if os.path.exists(there) and not (name in own_copies and _same_file_bytes(there, own_copies[name])):
                raise ValueError(f"--out {out_dir} already holds a {name} (another run's files); resume into an "
                                 f"empty directory or into the checkpoint's own ({source_dir})")
    last = os.path.join(source_dir, "last.pt")
    if out_dir == source_dir and os.path.abspath(file) != os.path.abspath(last) and os.path.exists(last):
        # e.g. --resume RUN/best.pt: continuing an earlier epoch in place would overwrite the later last.pt
        try:
            newer = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("epoch")
        except Exception:       # an unreadable last.pt is what a resume from best.pt may be meant to get past
            newer = None
        if isinstance(newer, int) and newer > int(ckpt.get("epoch") or 0):
            raise ValueError(f"resuming {file} (epoch {ckpt.get('epoch')}) in its own directory would overwrite "
                             f"{last} (epoch {newer}) and lose the epochs after it; resume into another --out, "
                             f"or resume {last}")
    if stop.get("best_epoch") and not best_is_this and not os.path.exists(best):
        raise ValueError(f"cannot resume {file}: the run's best model (epoch {stop.get('best_epoch')}) was in a "
                         f"best.pt that is not beside it in {source_dir}; results would test the wrong model")
    # Every check of the config, device and data first: a resume refused there writes nothing (files copied
    # into a new --out would make a retry into it look like another run's directory).
    trainer = Trainer(config, data=data, checkpoint=ckpt)
    if out_dir == source_dir:
        # the results of the run so far describe a best.pt that the epochs to come may replace: stopped
        # before they end, the directory must not pair the old results with a newer best model (fit
        # writes them again at its end, also when there is nothing left to train)
        remove_if_present(os.path.join(out_dir, "results.json"))
        if best_is_this and stop.get("best_epoch") and os.path.abspath(file) != os.path.abspath(best):
            # the checkpoint is the best model: best.pt may be missing or older (a run stopped between
            # writing last.pt and best.pt)
            _atomic_write(best, lambda fh: _copy_into(file, fh))
    else:
        # The final reload needs the best model so far, which may predate the resumed epochs.
        if best_is_this or os.path.exists(best):
            _atomic_write(os.path.join(out_dir, "best.pt"), lambda fh: _copy_into(file if best_is_this else best, fh))
        # and predict needs the vocabularies the checkpoints' digest names (the resumed data may lack them)
        if os.path.exists(source_map):
            _atomic_write(os.path.join(out_dir, FEATURE_MAP_FILE), lambda fh: _copy_into(source_map, fh))
    return trainer.fit()


def _same_file_bytes(a: str, b: str) -> bool:
    """Whether two files hold the same bytes (a missing one holds none)."""
    import filecmp
    try:
        return filecmp.cmp(a, b, shallow=False)
    except FileNotFoundError:
        return False


def _copy_into(path: str, fh) -> None:
    with open(path, "rb") as src:
        shutil.copyfileobj(src, fh)


def iter_batches(ids: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, ids.shape[0], batch_size):
        yield ids[start:start + batch_size]


def _checkpoint_data(ckpt: Dict[str, Any], data=None):
    """The dataset of a checkpoint's run (loaded from its config unless given), checked by field_dims and
    by the run's data fingerprint (a raw file edited since training keeps its field_dims when every field
    keeps its number of values, but its rows, labels and vocabularies are others: metrics on it would
    silently describe other data)."""
    if data is None:
        data = load_data(checkpoint_config(ckpt))
    if list(data.schema.field_dims) != list(ckpt["schema"]["field_dims"]):
        raise ValueError(f"the dataset's field_dims {list(data.schema.field_dims)} differ from the checkpoint's "
                         f"{ckpt['schema']['field_dims']}; was the data or its preprocessing changed?")
    saved = ckpt.get("data_fingerprint")
    if saved is not None and saved != data_fingerprint(data):
        raise ValueError("the dataset differs from the one the checkpoint was trained on (same field_dims, other "
                         "rows or labels): was the raw file or its preprocessing changed since training? "
                         "Score new data with `sfg-fast predict RUN_DIR --data-dir ...`")
    return data


def analyze_checkpoint(checkpoint: str, out: Optional[str] = None, max_samples: int = 50000,
                       batch_size: int = 8192, data=None, device: str = "cpu") -> Dict[str, Any]:
    """Embedding diagnostics (spectrum, information abundance, redundancy) of a trained model.

    Rebuilds the model and its dataset from ``checkpoint`` (file or run directory, then its
    ``best.pt``), collects ``model.analysis_embeddings`` on ``max_samples`` validation rows (all of them when
    the split is no larger; else a seeded uniform sample, kept in file order: the first rows of time-ordered
    logs would cover only their start)
    and hands them to ``sfg_fast.diagnostics.analyze_embeddings``, which writes spectrum.png,
    correlation.png (SFG models) and diagnostics.json into ``out`` (default ``<run dir>/analysis``).
    """
    from .diagnostics import analyze_embeddings

    if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < 2:
        raise ValueError(f"max_samples must be an integer >= 2, got {max_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    file = resolve_checkpoint(checkpoint, "best.pt")
    dev = _resolve_device(device)
    model, ckpt = model_from_checkpoint(file, map_location=dev)
    model.to(dev)
    config = checkpoint_config(ckpt)
    data = _checkpoint_data(ckpt, data)
    ids, _ = _split_tensors(data.valid, "valid")
    if ids.shape[0] > int(max_samples):
        pick = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(0))[:int(max_samples)]
        ids = ids[pick.sort().values]
    raws, generated = [], []
    for batch in iter_batches(ids, int(batch_size)):
        emb = model.analysis_embeddings(batch.to(dev))
        raws.append(emb["raw"].float().cpu())
        if emb.get("generated") is not None:
            generated.append(emb["generated"].float().cpu())
    raw = torch.cat(raws)
    gen = torch.cat(generated) if generated else None
    out = out or os.path.join(os.path.dirname(os.path.abspath(file)), "analysis")
    variant = "SFG" if model.generative else "base"
    title = f"{ckpt['model_name']} ({variant}) on {config.get('dataset')}, epoch {ckpt['epoch']}, n={raw.shape[0]}"
    result = analyze_embeddings(raw, gen, out, title=title)
    return result


def predict_checkpoint(checkpoint: str, data_dir: Optional[str] = None, out: Optional[str] = None,
                       batch_size: int = 16384, max_rows: Optional[int] = None, skip_bad_lines: bool = False,
                       device: str = "cpu", labeled: bool = True, int8: Optional[str] = None) -> Dict[str, Any]:
    """Click probabilities of a trained model on a raw data file, encoded with the run's own vocabularies.

    Rebuilds the model of ``checkpoint`` (file or run directory, then its ``best.pt``), reads the run's
    ``feature_map.json.gz`` and encodes every line of the dataset's file in ``data_dir`` (default: the
    run's) with it: values the run did not keep (unseen, rare, new) map to their field's OOV id, as in
    serving. Lines keep their file order. Writes into ``out`` (default ``<run dir>/predictions``):
    ``predictions.csv`` (``row,line,label,probability``: the row's position among the rows read and its
    1-based line in the file; blank and skipped lines have no row) and ``predict.json`` (rows, skipped
    lines, AUC / logloss / gAUC when the labels hold both classes, and the share of OOV ids per field: a
    drift check against the training data). The feature map must be the one the checkpoint trained
    with (its digest is in the checkpoint). ``labeled=False`` scores criteo/avazu files without their
    label column (Kaggle's test files, new traffic): no label column and no metrics then. ``int8``: the
    path of the run's int8 serving model (``sfg-fast quantize`` writes ``serving/model-int8.pt``) to
    score with instead of the float checkpoint; it must have been quantised from this run (the feature
    map digest it carries).
    """
    import io

    from .data import FEATURE_MAP_FILE, load_dataset, load_feature_map
    from .data.feature_map import feature_map_digest

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dev = _resolve_device(device)
    file = resolve_checkpoint(checkpoint, "best.pt")
    run_dir = os.path.dirname(os.path.abspath(file))
    if int8 is None:
        model, ckpt = model_from_checkpoint(file, map_location="cpu")
        model.to(dev)
    else:
        ckpt = load_checkpoint(file)      # its config and digest; the int8 model scores
    config = checkpoint_config(ckpt)
    fm_path = os.path.join(run_dir, FEATURE_MAP_FILE)
    try:
        fm = load_feature_map(fm_path, dataset=config["dataset"])
    except FileNotFoundError:
        raise ValueError(f"{run_dir} has no {FEATURE_MAP_FILE}: predict needs the vocabularies of a run on data "
                         "read from files (generated datasets have none; runs before feature maps were saved "
                         "need retraining)") from None
    if ckpt.get("feature_map_digest") is None:
        raise ValueError(f"{file} records no feature-map digest (written before checkpoints kept one), so "
                         f"{fm_path} cannot be verified as its vocabularies: resume the run for one more epoch "
                         "(its new checkpoints record the digest) or retrain")
    if feature_map_digest(fm) != ckpt["feature_map_digest"]:
        raise ValueError(f"{fm_path} is not the feature map {file} was trained with (another run's vocabularies: "
                         "its ids would select other rows' embeddings); use the run directory that trained it")
    if int8 is not None:
        from . import serving
        if not os.path.exists(int8):
            raise FileNotFoundError(f"{int8} does not exist: quantize the run first (sfg-fast quantize {run_dir})")
        model = serving.load_quantized(int8).to(dev)
        if model.feature_map_digest != ckpt["feature_map_digest"]:
            raise ValueError(f"{int8} was not quantised from this run (its feature map digest "
                             f"{model.feature_map_digest} is not {ckpt['feature_map_digest']}): quantize the run "
                             "again (sfg-fast quantize RUN_DIR)")
    options = {k: v for k, v in (config.get("data_options") or {}).items() if k != "split"}
    try:
        data = load_dataset(name=config["dataset"],
                            data_dir=data_dir if data_dir is not None else config.get("data_dir"),
                            cache_dir=False, seed=0, max_rows=max_rows, skip_bad_lines=bool(skip_bad_lines),
                            split=(1, 0, 0), vocabularies=fm, labeled=labeled, **options)
    except ValueError as exc:
        if "column" in str(exc) or "header" in str(exc):
            hint = ("a file without a label column needs --unlabeled (labeled=False)" if labeled else
                    "--unlabeled (labeled=False) expects files without the label column")
            # a plain ValueError: BadLineError's constructor takes (path, line, reason), not a message
            raise ValueError(f"{exc}; {hint}") from exc
        raise
    ids, labels = _split_tensors(data.train, "input")
    if ids.shape[0] == 0:
        raise ValueError(f"no rows were read from the {config['dataset']} data in {data_dir or config.get('data_dir')}")
    logits = model_logits(model, ids, dev, int(batch_size), "input")
    probabilities = torch.sigmoid(logits).numpy()
    out = out or os.path.join(run_dir, "predictions")
    os.makedirs(out, exist_ok=True)
    remove_stale_temp_files(out, (".predictions.csv.", ".predict.json."))   # of a killed run
    buffer = io.StringIO()
    columns = [np.arange(ids.shape[0]), data.source_lines[0]] + ([labels.numpy()] if labeled else []) + [probabilities]
    buffer.write("row,line," + ("label," if labeled else "") + "probability\n")
    np.savetxt(buffer, np.column_stack(columns), fmt=["%d", "%d"] + (["%d"] if labeled else []) + ["%.9g"],
               delimiter=",")
    csv_path = os.path.join(out, "predictions.csv")
    _atomic_write(csv_path, lambda fh: fh.write(buffer.getvalue().encode()))
    oov = (ids == torch.as_tensor(fm["field_dims"]) - 1).double().mean(0).tolist()
    summary: Dict[str, Any] = {
        "checkpoint": os.path.abspath(file), "model": ckpt["model_name"], "generative": bool(model.generative),
        "int8_model": os.path.abspath(int8) if int8 is not None else None,
        "dataset": config["dataset"], "source": data.info.get("source"), "rows": int(ids.shape[0]),
        "skipped_lines": data.info.get("skipped_lines", 0), "skipped_examples": data.info.get("skipped_examples", []),
        "blank_lines": data.info.get("blank_lines", 0), "mean_probability": float(probabilities.mean()),
        "positive_rate": float(labels.double().mean()) if labeled else None,
        "oov_rate": {name: round(rate, 6) for name, rate in zip(fm["field_names"], oov)},
        "metrics": None, "files": {"predictions": csv_path}}
    if labeled and 0 < int(labels.sum()) < labels.numel():
        group_field = config.get("group_field")
        if group_field is None:
            group_field = GROUP_FIELDS.get(fm["dataset"])
        group = {}
        if group_field not in (None, False, "", "none") and group_field in fm["field_names"]:
            column = fm["field_names"].index(group_field)
            # new traffic's unseen users all share the field's OOV id: left out of gAUC, not one big "user"
            group = {"group_column": column, "group_exclude": int(fm["field_dims"][column]) - 1}
        summary["metrics"] = logit_metrics(logits, labels, ids, "input", **group)
    summary = _jsonable(summary)
    atomic_write_text(json.dumps(summary, indent=2) + "\n", os.path.join(out, "predict.json"))
    return summary


def export_dynamic_batch(model: torch.nn.Module, ids: torch.Tensor):
    """``torch.export`` of ``model(ids)`` with a dynamic batch, traced on up to 64 rows of ``ids``. A split of
    0 or 1 rows traces on two rows of id 0 (present in every field) instead: export specialises a batch of
    one to that size, and the program would refuse every other batch."""
    example = ids[:64]
    if example.shape[0] < 2:
        example = torch.zeros(2, ids.shape[1], dtype=ids.dtype, device=ids.device)
    return torch.export.export(model, (example,), dynamic_shapes={"ids": {0: torch.export.Dim("batch")}})


def quantize_checkpoint(checkpoint: str, out: Optional[str] = None, batch_size: int = 16384, data=None,
                        export: bool = True) -> Dict[str, Any]:
    """int8 serving copy of a trained model, and what it costs in test AUC.

    Rebuilds the model of ``checkpoint`` (file or run directory, then its ``best.pt``) and its dataset,
    quantises its embedding tables row-wise to int8 (``sfg_fast.serving.quantize_model``), evaluates
    the float and the int8 model on the test split (CPU), and writes into ``out`` (default
    ``<run dir>/serving``): ``model-int8.pt`` (``serving.load_quantized`` reads it),
    ``model-int8.pt2`` (a ``torch.export`` program with a dynamic batch dimension; ``torch.export.load``
    after ``import sfg_fast.serving``) unless ``export=False``, and ``quantize.json`` with both
    models' test metrics, the AUC / logloss change, table bytes and evaluation times.
    """
    from . import serving

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    file = resolve_checkpoint(checkpoint, "best.pt")
    model, ckpt = model_from_checkpoint(file, map_location="cpu")
    config = checkpoint_config(ckpt)
    data = _checkpoint_data(ckpt, data)
    ids, labels = _split_tensors(data.test, "test")
    out = out or os.path.join(os.path.dirname(os.path.abspath(file)), "serving")
    os.makedirs(out, exist_ok=True)      # fails here (not after the evaluation) when out is not a directory
    # files of an earlier run go first: the directory never mixes this model's files with another's
    # (quantize.json, written last, lists what this run wrote)
    written = ("quantize.json", "model-int8.pt", "model-int8.pt2")
    for stale in written:
        remove_if_present(os.path.join(out, stale))
    remove_stale_temp_files(out, tuple(f".{name}." for name in written))   # of a quantize killed outright
    served = serving.quantize_model(model)
    cpu = torch.device("cpu")
    results: Dict[str, Any] = {"checkpoint": os.path.abspath(file), "model": ckpt["model_name"],
                               "generative": bool(model.generative), "dataset": config.get("dataset"),
                               "test_rows": int(ids.shape[0]), "threads": torch.get_num_threads()}
    for name, m in (("float", model), ("int8", served)):
        results[name] = evaluate_model(m, ids, labels, cpu, int(batch_size), "test")
    # inference speed: forward passes only (no metric code), after a warm-up, the best of three
    for name, m in (("float", model), ("int8", served)):
        best = math.inf
        with torch.no_grad():
            m(ids[:int(batch_size)])
            for _ in range(3):
                start = time.perf_counter()
                for batch in iter_batches(ids, int(batch_size)):
                    m(batch)
                best = min(best, time.perf_counter() - start)
        results[name].update(forward_seconds=round(best, 4), samples_per_second=round(ids.shape[0] / best, 1))
    results["dAUC"] = results["int8"]["AUC"] - results["float"]["AUC"]
    results["dlogloss"] = results["int8"]["logloss"] - results["float"]["logloss"]
    # every id-indexed table of each model (the int8 model keeps its first-order tables in float)
    results["table_bytes"] = {"float": sum(serving.table_bytes(model).values()),
                              "int8": sum(serving.table_bytes(served).values())}
    serving.save_quantized(served, os.path.join(out, "model-int8.pt"), ckpt.get("feature_map_digest"))
    results["files"] = ["model-int8.pt"]
    if export:
        program = export_dynamic_batch(served, ids)
        _atomic_write(os.path.join(out, "model-int8.pt2"), lambda fh: torch.export.save(program, fh))
        results["files"].append("model-int8.pt2")
    results["versions"] = versions()
    atomic_write_text(json.dumps(_jsonable(results), indent=2) + "\n", os.path.join(out, "quantize.json"))
    results["out"] = out
    return results
