"""Base vs SFG over seeds: ``compare(models, seeds) -> summary``; writes compare.md, .json and .png.

Every (model, variant, seed) run is a full :class:`sfg_fast.train.Trainer` run with its own run
directory (checkpoints and results.json) under ``out``. The data are loaded once and shared. Seeds
vary the model initialisation and the shuffling; the train/valid/test split stays fixed
(``data_seed``), as is usual when reporting mean +- std in CTR papers. Every run's config is checked
before the first one trains; a run that diverges is recorded (``failures`` in compare.json, a list in
compare.md), left out of its variant's means, and the comparison goes on (``sfg-fast compare`` then exits 3).
An interrupted comparison continues when the same command runs again: each run with a checkpoint resumes
from it (a finished one only re-evaluates), exactly as if it had not stopped.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ._io import remove_if_present
from .train import (RUN_FILES, Trainer, TrainingDiverged, _jsonable, atomic_write_text, checkpoint_config,
                    check_resume_overrides, load_checkpoint, load_data, resolve_config, resume, versions)

__all__ = ["DEFAULT_MODELS", "compare", "parse_models", "parse_seeds", "format_table", "plot"]

log = logging.getLogger("sfg_fast.compare")

DEFAULT_MODELS = ("fm", "fwfm", "deepfm", "dcnv2")
_DATA_KEYS = ("dataset", "data_dir", "cache_dir", "data_seed", "num_rows", "max_rows", "min_count",
              "skip_bad_lines", "data_options", "text_encoding")


def parse_models(models: Union[str, Sequence[str]]) -> List[str]:
    """Model names from a list or a comma-separated string, lower-cased; unknown or repeated names raise
    ValueError."""
    names = [m.strip().lower() for m in (models.split(",") if isinstance(models, str) else models)]
    names = [m for m in names if m]
    if not names:
        raise ValueError("models must name at least one model")
    from .models import MODELS
    bad = [m for m in names if m not in MODELS]
    if bad:
        raise ValueError(f"models: unknown model {bad[0]!r}; choose from {sorted(MODELS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"models lists a model twice: {names}")
    return names


MAX_SEED_COUNT = 100


def parse_seeds(seeds: Union[int, str, Sequence[int]], first_seed: int = 2018) -> List[int]:
    """``3`` -> [first, first+1, first+2]; ``"1,5,9"`` or ``[1, 5, 9]`` -> those seeds; ``"2018,"`` -> [2018].
    A count above ``MAX_SEED_COUNT`` is refused (``--seeds 2018`` meant as a seed would start 2018 runs)."""
    if isinstance(seeds, str):
        text = seeds.strip()
        if "," in text:
            try:
                values = [int(s) for s in text.split(",") if s.strip()]
            except ValueError:
                raise ValueError(f"seeds must be a count or a comma-separated list of integers, got {seeds!r}") from None
            seeds = values
        else:
            try:
                seeds = int(text)
            except ValueError:
                raise ValueError(f"seeds must be a count or a comma-separated list of integers, got {seeds!r}") from None
    if isinstance(seeds, bool):
        raise ValueError(f"seeds must be a count or a list of integers, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        if seeds > MAX_SEED_COUNT:
            # a seed value given as a count (--seeds 2018) would start thousands of runs
            raise ValueError(f"seeds={seeds} is a count: {seeds} runs per model and variant. For the single seed "
                             f"{seeds} give a list (--seeds {seeds}, or seeds=[{seeds}]) or --seed {seeds} --seeds 1; "
                             f"counts above {MAX_SEED_COUNT} are refused (list the seeds instead)")
        return [int(first_seed) + k for k in range(seeds)]
    values = [int(s) for s in seeds]
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise ValueError(f"seeds must be a non-empty list of distinct non-negative integers, got {list(seeds)}")
    return values


def _mean_std(values: Sequence[float]):
    n = len(values)
    mean = sum(values) / n
    # Sample standard deviation (ddof=1), the usual "mean +- std over seeds"; undefined (None) for one seed.
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def _pm(stat: Dict[str, Any]) -> str:
    """``mean ± std``, or the mean alone where one seed leaves the spread undefined."""
    if stat["std"] is None:
        return f"{stat['mean']:.5f} (1 seed)"
    return f"{stat['mean']:.5f} ± {stat['std']:.5f}"


def _paired_gain(base: Dict[str, Any], sfg: Dict[str, Any]) -> str:
    """SFG's mean AUC gain over base on the seeds both completed (a seed that diverged in one variant would
    otherwise compare different seed sets); says how many seeds it pairs when that is fewer than ran."""
    b = dict(zip(base["seeds"], base["test_auc"]["values"]))
    g = dict(zip(sfg["seeds"], sfg["test_auc"]["values"]))
    common = [seed for seed in g if seed in b]
    if not common:
        return "n/a (no common seed)"
    gain = sum(g[seed] - b[seed] for seed in common) / len(common)
    text = f"{gain:+.5f}"
    if len(common) < max(len(b), len(g)):
        text += f" ({len(common)} paired)"
    return text


def _aggregate(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    out = {"n": len(runs), "seeds": [r["seed"] for r in runs]}
    keys = ["test_auc", "test_logloss", "valid_auc", "train_seconds", "samples_per_second", "best_epoch"]
    if all(r.get("test_gauc") is not None for r in runs):   # group_field set (and every run had a group to score)
        keys.append("test_gauc")
    for key in keys:
        mean, std = _mean_std([float(r[key]) for r in runs])
        out[key] = {"mean": mean, "std": std, "values": [r[key] for r in runs]}
    out["num_parameters"] = runs[0]["num_parameters"]
    return out


def format_table(summary: Dict[str, Any], markdown: bool = True) -> str:
    """The results table: one row per (model, variant) plus SFG's AUC gain over base."""
    header = ["model", "variant", "seeds", "test AUC", "test logloss", "dAUC vs base", "best epoch",
              "train s", "samples/s", "params"]
    with_gauc = any("test_gauc" in agg for variants in summary["results"].values() for agg in variants.values())
    if with_gauc:
        header.insert(5, "test gAUC")
    rows = []
    for model, variants in summary["results"].items():
        ran = len(summary.get("seeds", [])) or None
        for variant in ("base", "sfg"):
            if variant not in variants:
                continue
            agg = variants[variant]
            gain = "" if variant == "base" or "base" not in variants else _paired_gain(variants["base"], agg)
            seeds = str(agg["n"]) if ran is None or agg["n"] == ran else f"{agg['n']}/{ran}"
            rows.append([model, "SFG" if variant == "sfg" else "base", seeds,
                         _pm(agg["test_auc"]), _pm(agg["test_logloss"]),
                         gain, f"{agg['best_epoch']['mean']:.1f}", f"{agg['train_seconds']['mean']:.1f}",
                         f"{agg['samples_per_second']['mean']:,.0f}", f"{agg['num_parameters']:,}"])
            if with_gauc:
                g = agg.get("test_gauc")
                rows[-1].insert(5, _pm(g) if g else "")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def plot(summary: Dict[str, Any], path: str) -> None:
    """Grouped bars (base vs SFG per model) of test AUC and logloss, mean with std error bars."""
    # The object-oriented Agg canvas renders without touching pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(summary["results"])
    fig = Figure(figsize=(max(6.0, 1.6 * len(models) + 3), 4.0), dpi=120)
    FigureCanvasAgg(fig)
    width = 0.38
    colors = {"base": "#8c8c8c", "sfg": "#2a6fbb"}
    for axis_index, (key, label) in enumerate((("test_auc", "test AUC (higher is better)"),
                                               ("test_logloss", "test logloss (lower is better)"))):
        ax = fig.add_subplot(1, 2, axis_index + 1)
        lows, highs = [], []
        for offset, variant in ((-width / 2, "base"), (width / 2, "sfg")):
            xs, means, stds = [], [], []
            for i, model in enumerate(models):
                agg = summary["results"][model].get(variant)
                if agg is None:
                    continue
                xs.append(i + offset)
                means.append(agg[key]["mean"])
                stds.append(agg[key]["std"] or 0.0)   # one seed: no error bar
            ax.bar(xs, means, width, yerr=stds, capsize=3, color=colors[variant],
                   label="SFG" if variant == "sfg" else "base")
            lows += [m - s for m, s in zip(means, stds)]
            highs += [m + s for m, s in zip(means, stds)]
        if lows:
            # Differences between models are small next to the values: zoom the axis on them.
            span = max(max(highs) - min(lows), 1e-4)
            ax.set_ylim(min(lows) - 0.6 * span, max(highs) + 0.3 * span)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if axis_index == 0:
            ax.legend(fontsize=8)
    fig.suptitle(f"{summary['dataset']}: base vs SFG, mean ± std over {len(summary['seeds'])} seed(s)", fontsize=11)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def _preflight(names, variants, config_path, overrides, seed) -> None:
    """Check every run's config before the first one trains: its trainer keys, and its model's
    hyper-parameters by building the model on the meta device (no memory, no data needed), so a bad value
    for the last model does not abort the comparison after the others have trained."""
    from . import models as model_zoo
    from .train import TRAIN_DEFAULTS, _check_train_config, split_config

    for model in names:
        for variant in variants:
            config = dict(TRAIN_DEFAULTS, **resolve_config(config_path, None, dict(
                overrides, model=model, generative=(variant == "sfg"), seed=seed)))
            try:
                train_cfg, hparams, _ = split_config(config)
                _check_train_config(train_cfg)
                if hparams.get("embedding", "native") in ("native", "fused"):
                    with torch.device("meta"):
                        model_zoo.build(model, [2, 2, 2], **hparams)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{model} ({variant}): {exc}") from None
            except Exception as exc:  # a model the meta device cannot build: its own run checks it
                log.debug("preflight of %s (%s) skipped: %s", model, variant, exc)


_RUN_DIR = re.compile(r"^.+-(base|sfg)-seed-?\d+$")


def _remove_earlier_comparison(out: str) -> None:
    """With overwrite: the run directories an earlier comparison in ``out`` left go, so that ``out`` never
    mixes two comparisons' runs: those its compare.json recorded, and (a comparison interrupted before it
    wrote one) every ``<model>-<base|sfg>-seed<N>`` directory directly inside ``out`` that holds a run's
    files. Nothing outside ``out`` is removed."""
    import shutil
    root = os.path.realpath(out)
    candidates = []
    path = os.path.join(out, "compare.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                earlier = json.load(fh)
        except (OSError, ValueError):
            earlier = {}                 # not readable: its runs are found by their names below
        for run in list(earlier.get("runs") or []) + list(earlier.get("failures") or []):
            run_dir = run.get("out") if isinstance(run, dict) else None
            if isinstance(run_dir, str):
                candidates.append(os.path.realpath(run_dir))
    if os.path.isdir(root):
        candidates += [os.path.join(root, name) for name in sorted(os.listdir(root)) if _RUN_DIR.match(name)]
    for real in dict.fromkeys(candidates):
        if os.path.dirname(real) == root and os.path.isdir(real) and any(
                os.path.exists(os.path.join(real, name)) for name in RUN_FILES):
            shutil.rmtree(real)
    for report in ("compare.json", "compare.md", "compare.png"):     # the reports of the runs just removed
        remove_if_present(os.path.join(out, report))


def _continuable_runs(planned: Dict[str, Dict[str, Any]], out: str) -> List[str]:
    """The run directories of ``planned`` (run dir -> its config) that an interrupted earlier attempt of
    this same comparison left, to be resumed; anything else in ``out`` (a finished comparison, another
    comparison's run, a run without a checkpoint to continue) is refused before anything trains."""
    summary = os.path.join(out, "compare.json")
    if os.path.exists(summary):
        raise ValueError(f"{out} already holds the results of an earlier comparison ({summary}); choose another "
                         f"--out, or pass --overwrite (overwrite=True) to train every run again and replace them")
    if os.path.isdir(out):
        planned_names = {os.path.basename(run_dir) for run_dir in planned}
        strays = [name for name in sorted(os.listdir(out)) if _RUN_DIR.match(name) and name not in planned_names
                  and any(os.path.exists(os.path.join(out, name, f)) for f in RUN_FILES)]
        if strays:
            raise ValueError(f"{out} holds {os.path.join(out, strays[0])}, a run this comparison does not plan (an "
                             f"earlier comparison of other models or seeds); choose another --out, or pass "
                             f"--overwrite (overwrite=True) to remove it and train every run again")
    continued = []
    for run_dir, config in planned.items():
        held = [name for name in RUN_FILES if os.path.exists(os.path.join(run_dir, name))]
        if not held:
            continue
        last = os.path.join(run_dir, "last.pt")
        why = None
        if "last.pt" not in held:
            why = f"it holds {held[0]} but no last.pt to continue from"
        else:
            try:
                ckpt = load_checkpoint(last)
                check_resume_overrides(checkpoint_config(ckpt), dict(config))
                done = int(ckpt.get("epoch") or 0)
                if int(config["epochs"]) < done:
                    raise ValueError(f"it has run {done} epochs, more than epochs={config['epochs']}")
            except ValueError as exc:
                why = f"it is another comparison's run: {exc}"
        if why is not None:
            raise ValueError(f"{out} holds {run_dir}, which this comparison cannot continue ({why}); choose "
                             f"another --out, or pass --overwrite (overwrite=True) to train every run again")
        continued.append(run_dir)
    return continued


def compare(models: Union[str, Sequence[str]] = DEFAULT_MODELS, seeds: Union[int, str, Sequence[int]] = 3,
            out: str = os.path.join("runs", "compare"), config_path: Optional[str] = None,
            overrides: Optional[Dict[str, Any]] = None, variants: Sequence[str] = ("base", "sfg"),
            command: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Train every model of ``models`` as base and SFG over ``seeds``; summarise and write the reports.

    Args:
        models: names (list or comma-separated string).
        seeds: a count (seeds ``seed, seed+1, ...`` from the config's ``seed``) or explicit seeds.
        out: directory for compare.md / compare.json / compare.png and one run directory per run.
        config_path: YAML config (default: the packaged default.yaml); each model uses its block.
        overrides: config keys applied to every run (epochs, batch_size, dataset, threads, ...); model,
            generative, out, seed and expid are the comparison's own and raise ValueError.
        overwrite: replace the runs and reports an earlier comparison left in ``out``; without it such an
            ``out`` is refused before anything trains (like ``sfg-fast train`` without --overwrite).
    Returns:
        The summary written to compare.json, plus ``table`` (the plain-text table printed).
    """
    names = parse_models(models)
    overrides = dict(overrides or {})
    for key in ("model", "generative", "out", "seed", "expid"):
        if key in overrides:
            hint = " (the seeds argument, --seeds / --seed on the command line, chooses them)" if key == "seed" else ""
            raise ValueError(f"overrides may not set {key!r}: compare chooses it per run{hint}")
    bad = [v for v in variants if v not in ("base", "sfg")]
    if bad or not variants:
        raise ValueError(f"variants must be a subset of ('base', 'sfg'), got {list(variants)}")
    first_seed = resolve_config(config_path, None, dict(overrides, model=names[0]))["seed"]
    seed_list = parse_seeds(seeds, first_seed)
    for seed in seed_list:
        _preflight(names, variants, config_path, overrides, seed)
    def run_config(model, variant, seed):
        config = resolve_config(config_path, None, dict(overrides, model=model, generative=(variant == "sfg"),
                                                        seed=seed))
        config["out"] = os.path.join(out, f"{model}-{variant}-seed{seed}")
        return config

    # every run's config once, then every dataset: a bad data_dir or option fails before anything of an
    # earlier comparison is removed
    configs = {(model, variant, seed): run_config(model, variant, seed)
               for model in names for variant in variants for seed in seed_list}
    data_keys = {run: json.dumps({k: config.get(k) for k in _DATA_KEYS}, sort_keys=True, default=str)
                 for run, config in configs.items()}
    datasets: Dict[str, Any] = {}
    for run, config in configs.items():
        if data_keys[run] not in datasets:
            datasets[data_keys[run]] = load_data(dict(config))
    if overwrite:
        _remove_earlier_comparison(out)
        continued = set()
    else:
        continued = set(_continuable_runs({c["out"]: c for c in configs.values()}, out))
        if continued:
            log.info("continuing an interrupted comparison: %d of its runs resume from their checkpoints",
                     len(continued))
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    runs: List[Dict[str, Any]] = []
    failures: List[Dict[str, Any]] = []   # runs that diverged: recorded, and the comparison goes on
    results: Dict[str, Dict[str, Any]] = {}
    total = len(names) * len(variants) * len(seed_list)
    count = 0
    dataset_name = None
    for model in names:
        results[model] = {}
        for variant in variants:
            variant_runs = []
            for seed in seed_list:
                count += 1
                config = dict(configs[(model, variant, seed)])
                data_key = data_keys[(model, variant, seed)]
                dataset_name = config["dataset"]
                tick = time.perf_counter()
                try:
                    if config["out"] in continued:
                        # an earlier attempt's run: continued exactly (a finished one only re-evaluates)
                        result = resume(config["out"], data=datasets[data_key], **config)
                    else:
                        # the out directory was checked above: a run replaces its files only with overwrite
                        result = Trainer(config, data=datasets[data_key], overwrite=True).fit()
                except Exception as exc:   # diverged, out of memory, a bad file: recorded, the comparison goes on
                    what = "diverged" if isinstance(exc, TrainingDiverged) else f"failed ({type(exc).__name__})"
                    log.warning("[%d/%d] %s %s seed %d %s; it is left out of the means: %s", count, total,
                                model, variant, seed, what, exc)
                    failures.append({"model": model, "variant": variant, "seed": seed, "out": config["out"],
                                     "error": str(exc) if isinstance(exc, TrainingDiverged)
                                     else f"{type(exc).__name__}: {exc}"})
                    continue
                log.info("[%d/%d] %s %s seed %d: test AUC %.5f logloss %.5f, best epoch %d, %.1f s", count, total,
                         model, variant, seed, result["test_auc"], result["test_logloss"], result["best_epoch"],
                         time.perf_counter() - tick)
                variant_runs.append(result)
                runs.append({k: result[k] for k in ("model", "generative", "seed", "test_auc", "test_logloss",
                                                   "valid_auc", "valid_logloss", "best_epoch", "epochs_run",
                                                   "train_seconds", "samples_per_second", "num_parameters",
                                                   "device")}
                            | {k: result[k] for k in ("test_gauc", "valid_gauc") if k in result}
                            | {"out": config["out"], "config": result["config"]})
            if variant_runs:
                results[model][variant] = _aggregate(variant_runs)
    if not runs:
        raise TrainingDiverged(f"every run failed or diverged; the first: {failures[0]['error']}")
    wall = time.perf_counter() - started
    first = runs[0]["config"]
    summary = _jsonable({
        "dataset": dataset_name,
        "models": names,
        "variants": list(variants),
        "seeds": seed_list,
        "epochs": first["epochs"],
        "batch_size": first["batch_size"],
        "lr": first["lr"],
        "threads": torch.get_num_threads(),
        "device": runs[0]["device"],
        "wall_seconds": wall,
        "command": command,
        "results": results,
        "runs": runs,
        "failures": failures,
        "versions": versions(),
    })
    table = format_table(summary, markdown=True)
    md = [f"# Base vs SFG on {dataset_name}", "",
          f"Mean ± sample std over seeds {seed_list}; {first['epochs']} epochs max (early stopping, patience "
          f"{first['patience']}), batch {first['batch_size']}, Adam lr {first['lr']:g}; "
          f"{summary['threads']} CPU thread(s); total wall time {wall:.1f} s.", ""]
    if command:
        md += ["```", command, "```", ""]
    md += [table, ""]
    if failures:
        md += [f"Runs that diverged or failed, left out of the means ({len(failures)} of {total}; dAUC pairs the "
               "seeds both variants completed):", ""]
        md += [f"- {f['model']} {'SFG' if f['variant'] == 'sfg' else 'base'} seed {f['seed']}: {f['error']}"
               for f in failures]
        md += [""]
    md += [f"Versions: {', '.join(f'{k} {v}' for k, v in summary['versions'].items() if v)}.", "",
           "Per-run results are in each run directory's results.json; the plot is compare.png.", ""]
    atomic_write_text("\n".join(md), os.path.join(out, "compare.md"))
    atomic_write_text(json.dumps(summary, indent=2) + "\n", os.path.join(out, "compare.json"))
    plot(summary, os.path.join(out, "compare.png"))
    summary["table"] = format_table(summary, markdown=False)
    return summary
