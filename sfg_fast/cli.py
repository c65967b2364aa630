"""Command line: ``sfg-fast train | compare | analyze | quantize | predict`` (also ``python -m sfg_fast``).

Config precedence, lowest to highest: trainer defaults < YAML ``Base:`` < experiment block
(``--expid``, else the block named after ``--model``) < ``--set KEY=VALUE`` < explicit flags.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser", "config_from_args"]

# flag destination -> config key, for the flags every training command shares
_FLAG_KEYS = {
    "model": "model", "generative": "generative", "dataset": "dataset", "data_dir": "data_dir",
    "cache_dir": "cache_dir", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "seed": "seed",
    "device": "device", "out": "out", "embedding_dim": "embedding_dim", "gamma": "gamma",
    "activation": "activation", "patience": "patience", "num_rows": "num_rows", "max_rows": "max_rows",
    "min_count": "min_count", "verbose": "verbose", "threads": "threads",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _key_value(text: str):
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a non-empty KEY, got {text!r}")
    from .train import _config_loader

    try:
        # read as config files are: 1e-3 is a number (YAML 1.2), not the string YAML 1.1 makes of it
        parsed = yaml.load(value, Loader=_config_loader()) if value.strip() else None
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"value of {key!r} is not valid YAML: {exc}") from None
    return key, parsed


def _add_common(p: argparse.ArgumentParser, compare: bool = False) -> None:
    g = p.add_argument_group("config")
    g.add_argument("--config", help="YAML file or directory of YAML files with a Base: block and experiment "
                                    "blocks (default: the packaged configs/default.yaml)")
    g.add_argument("--set", dest="sets", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="set any config key (value parsed as YAML, e.g. hidden_units=[64,64]); repeatable")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", help="movielens100k (default), criteo, avazu, synthetic-criteo, synthetic-avazu")
    d.add_argument("--data-dir", help="directory holding the raw dataset files")
    d.add_argument("--cache-dir", help="where preprocessed arrays are cached")
    d.add_argument("--num-rows", type=_positive_int, help="rows to generate (synthetic datasets)")
    d.add_argument("--max-rows", type=_positive_int, help="read at most this many rows of a real dataset")
    d.add_argument("--min-count", type=_positive_int, help="ids seen fewer times map to the field's OOV id")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=_positive_int)
    t.add_argument("--batch-size", type=_positive_int)
    t.add_argument("--lr", type=_positive_float, help="Adam learning rate (default: the config's lr)")
    t.add_argument("--patience", type=_positive_int, help="early-stopping patience in epochs (default: the config's patience; --set patience=null turns it off)")
    t.add_argument("--embedding-dim", type=_positive_int)
    t.add_argument("--gamma", type=float, help="SFG encoder output scale")
    t.add_argument("--activation", help="SFG encoder activation (relu, identity, tanh, sigmoid, silu, gelu)")
    if not compare:
        t.add_argument("--seed", type=int)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    r.add_argument("--threads", type=_positive_int, help="torch.set_num_threads for CPU work")
    r.add_argument("--out", help="output directory")
    v = r.add_mutually_exclusive_group()
    v.add_argument("--verbose", dest="verbose", action="store_const", const=1, help="progress bars and epoch logs")
    v.add_argument("--quiet", dest="verbose", action="store_const", const=0, help="only the final summary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfg-fast", description="Train, compare and analyse CTR models with Supervised Feature Generation.")
    sub = parser.add_subparsers(dest="command")
    sub.required = True

    p = sub.add_parser("train", help="train one model (base or SFG)",
                       description="Train one model; writes last.pt, best.pt and results.json under --out.")
    p.add_argument("--expid", help="experiment block of the config to use")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run files another run left in --out (refused without it)")
    p.add_argument("--model", help="fm, fwfm, fmfm, deepfm, ipnn, xdeepfm, dcnv2, crossnet")
    variant = p.add_mutually_exclusive_group()
    variant.add_argument("--generative", dest="generative", action="store_const", const=True,
                         help="the SFG form of the model (default)")
    variant.add_argument("--base", dest="generative", action="store_const", const=False,
                         help="the discriminative base model")
    p.add_argument("--resume", metavar="PATH",
                   help="checkpoint file or run directory (its last.pt) to continue exactly")
    p.add_argument("--distributed", action="store_true",
                   help="train on TorchRec sharded tables over the torchrun process group "
                        "(torchrun --nproc_per_node=K -m sfg_fast train --distributed ...; see docs/distributed.md)")
    p.add_argument("--sharding", choices=("auto", "table_wise", "column_wise", "row_wise", "data_parallel"),
                   help="with --distributed: how tables are sharded (default auto: planner on GPU, table_wise on CPU)")
    _add_common(p)

    c = sub.add_parser("compare", help="base vs SFG for several models over seeds",
                       description="Train each model as base and SFG over seeds; write compare.md/.json/.png.")
    c.add_argument("--models", default="fm,fwfm,deepfm,dcnv2", help="comma-separated (default fm,fwfm,deepfm,dcnv2)")
    c.add_argument("--seeds", default="3", help="a count (default 3, at most 100, from the config's seed on) or a "
                                               "list: 1,2,3 (one seed: 2018,)")
    c.add_argument("--seed", type=int, help="first seed when --seeds is a count")
    c.add_argument("--only", choices=("base", "sfg"), help="train only one variant")
    c.add_argument("--overwrite", action="store_true",
                   help="replace the runs and reports an earlier comparison left in --out (refused without it)")
    _add_common(c, compare=True)

    a = sub.add_parser("analyze", help="embedding diagnostics of a trained model",
                       description="Spectrum, information abundance and redundancy of a checkpoint's embeddings.")
    a.add_argument("checkpoint", help="checkpoint file or run directory (its best.pt)")
    a.add_argument("--out", help="output directory (default <run dir>/analysis)")
    a.add_argument("--max-samples", type=_positive_int, default=50000, help="validation rows to embed (default 50000; a seeded uniform sample of a larger split)")
    a.add_argument("--batch-size", type=_positive_int, default=8192)
    a.add_argument("--device", default="cpu")
    a.add_argument("--threads", type=_positive_int)

    q = sub.add_parser("quantize", help="int8 serving copy of a trained model and its test AUC cost",
                       description="Quantise a checkpoint's embedding tables row-wise to int8, evaluate float vs "
                                   "int8 on the test split, write model-int8.pt, model-int8.pt2 (torch.export) "
                                   "and quantize.json.")
    q.add_argument("checkpoint", help="checkpoint file or run directory (its best.pt)")
    q.add_argument("--out", help="output directory (default <run dir>/serving)")
    q.add_argument("--batch-size", type=_positive_int, default=16384)
    q.add_argument("--threads", type=_positive_int)
    q.add_argument("--no-export", action="store_true", help="skip the torch.export program (model-int8.pt2)")

    r = sub.add_parser("predict", help="click probabilities of a trained model on a raw data file",
                       description="Encode the dataset's file in --data-dir with the run's own vocabularies "
                                   "(feature_map.json.gz; values it did not keep map to OOV), score every line, "
                                   "write predictions.csv and predict.json (metrics when labelled, OOV share "
                                   "per field).")
    r.add_argument("checkpoint", help="checkpoint file or run directory (its best.pt)")
    r.add_argument("--data-dir", help="folder or file of the dataset's raw data (default: the run's)")
    r.add_argument("--out", help="output directory (default <run dir>/predictions)")
    r.add_argument("--max-rows", type=_positive_int,
                   help="read at most this many data lines (criteo/avazu: every line after the header, blank and "
                        "bad ones included; movielens: non-blank lines)")
    r.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines instead of stopping")
    r.add_argument("--int8", nargs="?", const="", metavar="FILE",
                   help="score with the run's int8 serving model (default <run dir>/serving/model-int8.pt, "
                        "from sfg-fast quantize) instead of the float checkpoint")
    r.add_argument("--unlabeled", action="store_true",
                   help="the file has no label column (criteo/avazu test files, new traffic): no metrics")
    r.add_argument("--batch-size", type=_positive_int, default=16384)
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=_positive_int)
    return parser


def config_overrides(args: argparse.Namespace, skip: Sequence[str] = ()) -> Dict[str, Any]:
    """Config keys from ``--set`` then from explicit flags (flags win); unset flags are left out."""
    overrides: Dict[str, Any] = {}
    for key, value in getattr(args, "sets", []) or []:
        if key in overrides:   # as a key written twice in a config file: which one was meant is unknown
            raise ValueError(f"--set gives {key!r} twice ({overrides[key]!r}, then {value!r}); give it once")
        overrides[key] = value
    for dest, key in _FLAG_KEYS.items():
        if dest in skip:
            continue
        value = getattr(args, dest, None)
        if value is not None:
            overrides[key] = value
    return overrides


def config_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The merged config of ``sfg-fast train`` (see the module docstring for the precedence).

    With ``--distributed`` the distributed keys (``embedding_lr``, ``embedding_optimizer``,
    ``max_steps`` ... of ``sfg_fast.distributed.DIST_DEFAULTS``) given by ``--set`` are held apart
    while the trainer/model keys are resolved and checked, then added back.
    """
    from .train import resolve_config

    overrides = config_overrides(args)
    dist_overrides: Dict[str, Any] = {}
    if getattr(args, "distributed", False):
        from .distributed import DIST_DEFAULTS

        dist_overrides = {k: overrides.pop(k) for k in list(overrides) if k in DIST_DEFAULTS}
    config = resolve_config(args.config, args.expid, overrides)
    config.update(dist_overrides)
    return config


def _setup_logging(verbose: Optional[int]) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr, force=True)


def _summary_line(results: Dict[str, Any]) -> str:
    keys = ("model", "generative", "test_auc", "test_logloss", "test_gauc", "best_epoch", "epochs_run",
            "samples_per_second", "train_seconds")
    return json.dumps({k: results[k] for k in keys if k in results} | {"out": results["config"]["out"]})


def _run_distributed(args) -> int:
    from .distributed import run_distributed_training

    config = config_from_args(args)
    _setup_logging(config.get("verbose"))
    if args.sharding:
        config["sharding"] = args.sharding
    if args.resume:
        config["resume"] = args.resume
    results = run_distributed_training(config, overwrite=args.overwrite)
    if results["rank"] == 0:
        keys = ("model", "generative", "world_size", "sharding", "test_auc", "test_logloss", "steps",
                "samples_per_second")
        print(json.dumps({k: results[k] for k in keys} | {"out": results["config"]["out"]}))
    return 0


def _run_train(args) -> int:
    from .train import Trainer, resume

    if getattr(args, "distributed", False):
        return _run_distributed(args)
    if getattr(args, "sharding", None):
        raise ValueError("--sharding needs --distributed")
    if args.resume:
        overrides = config_overrides(args)
        if args.expid is not None or args.config is not None:
            raise ValueError("--resume takes the config from the checkpoint; drop --config/--expid")
        _setup_logging(overrides.get("verbose", 1))
        results = resume(args.resume, **overrides)
    else:
        config = config_from_args(args)
        _setup_logging(config.get("verbose"))
        results = Trainer(config, overwrite=args.overwrite).fit()
    print(_summary_line(results))
    return 0


def _run_compare(args, argv: Sequence[str]) -> int:
    from .compare import compare, parse_seeds

    # --seed is the first seed of the list (parse_seeds below), not an override of every run's seed
    overrides = config_overrides(args, skip=("out", "verbose", "seed"))
    _setup_logging(1 if args.verbose is None else args.verbose)
    # Progress bars and epoch logs of each run only with --verbose; one line per run unless --quiet.
    overrides["verbose"] = 1 if args.verbose else 0
    seeds = parse_seeds(args.seeds, args.seed) if args.seed is not None else args.seeds
    command = "sfg-fast " + " ".join(shlex.quote(a) for a in argv)
    summary = compare(args.models, seeds, out=args.out or "runs/compare", config_path=args.config,
                      overrides=overrides, variants=(args.only,) if args.only else ("base", "sfg"),
                      command=command, overwrite=args.overwrite)
    print(summary["table"])
    print(f"\ntotal wall time {summary['wall_seconds']:.1f} s; reports in {args.out or 'runs/compare'}/compare.md, "
          f"compare.json, compare.png")
    for failure in summary.get("failures", []):
        print(f"sfg-fast compare: {failure['model']} {failure['variant']} seed {failure['seed']} diverged and is "
              f"left out of the means: {failure['error']}", file=sys.stderr)
    return 3 if summary.get("failures") else 0


def _run_analyze(args) -> int:
    import torch

    from .train import analyze_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    result = analyze_checkpoint(args.checkpoint, out=args.out, max_samples=args.max_samples,
                                batch_size=args.batch_size, device=args.device)

    def compact(value):
        # The full spectra stay in diagnostics.json; the terminal gets the scalars.
        if isinstance(value, dict):
            return {k: compact(v) for k, v in value.items() if k != "singular_values"}
        return value

    print(json.dumps(compact(result), indent=2, default=str))
    return 0


def _run_quantize(args) -> int:
    import torch

    from .train import quantize_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    r = quantize_checkpoint(args.checkpoint, out=args.out, batch_size=args.batch_size, export=not args.no_export)
    mb = {k: v / 2 ** 20 for k, v in r["table_bytes"].items()}
    print(f"{r['model']} ({'SFG' if r['generative'] else 'base'}) on {r['dataset']}, {r['test_rows']} test rows")
    print("| model | test AUC | test logloss | table MB | samples/s |")
    print("|---|---|---|---|---|")
    for name in ("float", "int8"):
        m = r[name]
        print(f"| {name} | {m['AUC']:.5f} | {m['logloss']:.5f} | {mb[name]:.2f} | {m['samples_per_second']:.0f} |")
    print(f"dAUC {r['dAUC']:+.2e}, dlogloss {r['dlogloss']:+.2e}; wrote {', '.join(r['files'])} and quantize.json "
          f"to {r['out']}")
    return 0


def _int8_path(args) -> Optional[str]:
    if args.int8 is None:
        return None
    if args.int8:
        return args.int8
    from .train import resolve_checkpoint
    return os.path.join(os.path.dirname(os.path.abspath(resolve_checkpoint(args.checkpoint, "best.pt"))),
                        "serving", "model-int8.pt")


def _run_predict(args) -> int:
    import torch

    from .train import predict_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    r = predict_checkpoint(args.checkpoint, data_dir=args.data_dir, out=args.out, batch_size=args.batch_size,
                           max_rows=args.max_rows, skip_bad_lines=args.skip_bad_lines, device=args.device,
                           labeled=not args.unlabeled, int8=_int8_path(args))
    worst = max(r["oov_rate"].items(), key=lambda kv: kv[1])
    metrics = r["metrics"]
    scores = (f"AUC {metrics['AUC']:.5f}, logloss {metrics['logloss']:.5f}" if metrics
              else "no metrics (unlabelled)" if args.unlabeled else "no metrics (the labels hold one class)")
    kind = "int8 " if r.get("int8_model") else ""
    print(f"{r['model']} ({kind}{'SFG' if r['generative'] else 'base'}) on {r['rows']} rows of {r['source']}: {scores}; "
          f"mean probability {r['mean_probability']:.4f}"
          + (f" (click rate {r['positive_rate']:.4f}); " if r["positive_rate"] is not None else "; ") +
          f"highest OOV share {worst[1]:.3f} ({worst[0]}); skipped lines {r['skipped_lines']}; "
          f"wrote {r['files']['predictions']} and predict.json")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, Slurm and Kubernetes send) raised as an interrupt, so that a run stops as
    after Ctrl-C: temp files of half-written checkpoints and caches removed, the resume hint printed.
    Before, the process died on the spot and left them (a data cache's temp file can be gigabytes). Only
    while :func:`main` runs, and only when SIGTERM has its default action (not ignored, no handler of the
    caller's)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``sfg-fast`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    # only where SIGTERM would kill the process: an inherited SIG_IGN (``trap '' TERM``) or a caller's own
    # handler stays in charge; signal handlers live in the main thread
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(args, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args, argv: List[str]) -> int:
    from ._backend import BackendUnavailableError
    from .train import TrainingDiverged

    try:
        if args.command == "train":
            return _run_train(args)
        if args.command == "compare":
            return _run_compare(args, argv)
        if args.command == "quantize":
            return _run_quantize(args)
        if args.command == "predict":
            return _run_predict(args)
        return _run_analyze(args)
    except TrainingDiverged as exc:
        print(f"sfg-fast {args.command}: {exc}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, OSError, ImportError, BackendUnavailableError) as exc:
        print(f"sfg-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        resume_from = getattr(exc, "resume_from", None)
        train_hint = (f"; resume with --resume {resume_from}" if resume_from else
                      "; no checkpoint of this run had been written yet: run the command again to start it")
        hint = {"train": train_hint,
                "compare": ("; rerun the same command without --overwrite to continue (each run resumes from its "
                            "last checkpoint); with --overwrite it trains every run again"
                            if getattr(args, "overwrite", False) else
                            "; rerun the same command to continue (each run resumes from its last checkpoint), or "
                            "with --overwrite to train every run again")
                }.get(args.command, "")
        terminated = isinstance(exc, Terminated)
        print(f"sfg-fast {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}{hint}",
              file=sys.stderr)
        return 143 if terminated else 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
