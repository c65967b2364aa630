"""Command line: parsing, YAML Base + experiment block + flag precedence, train/resume/compare/analyze."""
import json
import os
import subprocess
import sys

import numpy as np
import torch
import pytest
import yaml

from sfg_fast import cli
from sfg_fast import models as model_zoo
from sfg_fast import train as T

TINY = ["--dataset", "synthetic-avazu", "--num-rows", "2000", "--embedding-dim", "4", "--batch-size", "256",
        "--threads", "1", "--quiet"]


def _write_config(tmp_path, content):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def _parse(argv):
    return cli.build_parser().parse_args(argv)


def test_precedence_base_block_set_flags(tmp_path):
    path = _write_config(tmp_path, {
        "Base": {"model": "fm", "epochs": 7, "lr": 0.01, "batch_size": 128, "gamma": 2.0, "seed": 5},
        "deep_exp": {"model": "deepfm", "epochs": 3, "hidden_units": [8, 8], "gamma": 0.5},
    })
    config = cli.config_from_args(_parse(["train", "--config", path, "--expid", "deep_exp"]))
    # Base < block: the block's values win, Base fills the rest, trainer defaults fill what neither sets.
    assert config["model"] == "deepfm" and config["epochs"] == 3 and config["gamma"] == 0.5
    assert config["lr"] == 0.01 and config["batch_size"] == 128 and config["seed"] == 5
    assert config["patience"] == T.TRAIN_DEFAULTS["patience"] and config["expid"] == "deep_exp"
    assert config["hidden_units"] == [8, 8]
    # block < --set < explicit flags.
    args = _parse(["train", "--config", path, "--expid", "deep_exp", "--set", "epochs=9", "--set",
                   "hidden_units=[4]", "--epochs", "2", "--lr", "0.5", "--base", "--gamma", "3"])
    config = cli.config_from_args(args)
    assert config["epochs"] == 2 and config["hidden_units"] == [4] and config["lr"] == 0.5
    assert config["generative"] is False and config["gamma"] == 3.0


def test_set_reads_exponent_notation_as_a_number():
    # PyYAML reads "1e-3" as a string; --set lr=1e-3 must still mean the number
    config = cli.config_from_args(_parse(["train", "--set", "lr=1e-3", "--set", "min_lr=5E-7",
                                          "--set", "activation=relu"]))
    assert config["lr"] == 1e-3 and isinstance(config["lr"], float)
    assert config["min_lr"] == 5e-7 and config["activation"] == "relu"


def test_set_null_clears_a_key(tmp_path):
    # --set KEY=null is the user's explicit "none" (no early stopping, no clipping), not a flag left out
    path = _write_config(tmp_path, {"Base": {"model": "fm", "patience": 3, "clip_grad_norm": 5.0}})
    config = cli.config_from_args(_parse(["train", "--config", path, "--set", "patience=null",
                                          "--set", "clip_grad_norm=~"]))
    assert config["patience"] is None and config["clip_grad_norm"] is None
    config = cli.config_from_args(_parse(["train", "--config", path]))   # flags not given change nothing
    assert config["patience"] == 3 and config["clip_grad_norm"] == 5.0
    from sfg_fast.distributed import DIST_DEFAULTS
    key = next(k for k, v in DIST_DEFAULTS.items() if v is not None and k not in T.TRAIN_DEFAULTS)
    config = cli.config_from_args(_parse(["train", "--config", path, "--distributed", "--set", f"{key}=null"]))
    assert key in config and config[key] is None
    assert T.resolve_config(path, None, {"patience": None})["patience"] is None


def test_model_flag_selects_its_block(tmp_path):
    path = _write_config(tmp_path, {"Base": {"epochs": 4}, "DCNv2": {"model": "dcnv2", "num_cross_layers": 1},
                                    "fm": {"model": "fm", "epochs": 6}})
    assert cli.config_from_args(_parse(["train", "--config", path, "--model", "dcnv2"]))["num_cross_layers"] == 1
    config = cli.config_from_args(_parse(["train", "--config", path, "--model", "fm"]))
    assert config["epochs"] == 6 and "num_cross_layers" not in config
    # A model without a block gets Base alone.
    config = cli.config_from_args(_parse(["train", "--config", path, "--model", "fwfm"]))
    assert config["model"] == "fwfm" and config["epochs"] == 4


def test_yaml_configs_read_floats_as_yaml_1_2_does(tmp_path):
    """lr: 1e-3 is the number FuxiCTR configs mean (YAML 1.1 alone would read the string "1e-3", which the
    trainer refuses); dotted, signed and capitalised forms too; strings stay strings."""
    path = tmp_path / "exp.yaml"
    path.write_text("Base:\n  lr: 1e-3\n  min_lr: 1E-6\n  gamma: 2.5e+1\n  weight_decay: -1_0e-2\n"
                    "exp:\n  model: fm\n  expid_note: 1e3x\n  seed: 12\n")
    blocks = T.load_yaml_config(str(path))
    assert blocks["Base"] == {"lr": 1e-3, "min_lr": 1e-6, "gamma": 25.0, "weight_decay": -0.1}
    assert blocks["exp"] == {"model": "fm", "expid_note": "1e3x", "seed": 12}
    assert isinstance(blocks["exp"]["seed"], int)


def test_config_errors(tmp_path, capsys):
    path = _write_config(tmp_path, {"Base": {"model": "fm"}, "exp": {"model": "fm", "gama": 1.0}})
    with pytest.raises(ValueError, match="expid 'nope' is not a block"):
        cli.config_from_args(_parse(["train", "--config", path, "--expid", "nope"]))
    with pytest.raises(ValueError, match="unknown config key 'gama'"):
        cli.config_from_args(_parse(["train", "--config", path, "--expid", "exp"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.config_from_args(_parse(["train", "--config", str(tmp_path / "missing.yaml")]))
    assert cli.main(["train", "--config", path, "--expid", "exp"]) == 2
    assert "unknown config key 'gama'" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("Base:\n  model: fm\n   epochs: [1\n")
    assert cli.main(["train", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML" in err and "broken.yaml" in err and "Traceback" not in err
    # a key written twice in one block would silently keep its last value
    twice = tmp_path / "twice.yaml"
    twice.write_text("exp:\n  epochs: 1\n  model: fm\n  epochs: 3\n")
    assert cli.main(["train", "--config", str(twice), "--expid", "exp"]) == 2
    err = capsys.readouterr().err
    assert "found the key 'epochs' twice" in err and "line 4" in err
    for bad in (["train", "--epochs", "0"], ["train", "--lr", "-1"], ["train", "--base", "--generative"],
                ["train", "--set", "novalue"], ["compare", "--seeds"], ["frobnicate"]):
        with pytest.raises(SystemExit) as info:
            cli.main(bad)
        assert info.value.code == 2, bad


def test_default_config_blocks_build_every_model():
    blocks = T.load_yaml_config(T.DEFAULT_CONFIG_PATH)
    assert set(model_zoo.MODELS) <= {b.lower() for b in blocks}
    for name in model_zoo.MODELS:
        config = T.resolve_config(None, None, {"model": name})
        train_cfg, hparams, ignored = T.split_config(config)
        assert ignored == [], (name, ignored)
        assert train_cfg["dataset"] == "movielens100k" and train_cfg["lr"] > 0 and train_cfg["patience"] == 2
        model = model_zoo.build(name, [5, 7, 3], **hparams)
        assert model.generative is True
        for units in (hparams.get("hidden_units") or []):
            assert units <= 128, (name, hparams["hidden_units"])


def test_train_resume_analyze_via_main(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train", "--model", "fwfm", "--epochs", "1", "--out", out, "--seed", "3"] + TINY) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == "fwfm" and summary["epochs_run"] == 1 and summary["out"] == out
    results = json.loads(open(os.path.join(out, "results.json")).read())
    assert results["config"]["dataset"] == "synthetic-avazu" and results["config"]["num_rows"] == 2000
    assert results["config"]["seed"] == 3 and results["generative"] is True

    # Resume to 2 epochs; changing the experiment while resuming is refused with exit status 2.
    assert cli.main(["train", "--resume", out, "--lr", "0.5", "--quiet"]) == 2
    assert "cannot change 'lr'" in capsys.readouterr().err
    assert cli.main(["train", "--resume", out, "--epochs", "2", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["epochs_run"] == 2
    assert T.load_checkpoint(out)["epoch"] == 2

    assert cli.main(["analyze", out, "--max-samples", "150", "--out", str(tmp_path / "an")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 150
    assert {"spectrum.png", "correlation.png", "diagnostics.json"} <= set(os.listdir(tmp_path / "an"))
    assert cli.main(["analyze", str(tmp_path / "nothing-here")]) == 2


def test_compare_via_main(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    argv = ["compare", "--models", "fm", "--seeds", "1", "--epochs", "1", "--out", out, "--only", "sfg"] + TINY
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fm" in printed and "SFG" in printed and "total wall time" in printed
    summary = json.loads(open(os.path.join(out, "compare.json")).read())
    assert summary["variants"] == ["sfg"] and len(summary["runs"]) == 1
    assert summary["command"].startswith("sfg-fast compare --models fm")
    assert os.path.exists(os.path.join(out, "compare.png"))
    # --seed: the first of --seeds N seeds (not an override of every run's seed)
    argv = ["compare", "--models", "fm", "--seeds", "2", "--seed", "7", "--epochs", "1", "--out", out + "2",
            "--only", "base"] + TINY
    assert cli.main(argv) == 0
    runs = json.loads(open(os.path.join(out + "2", "compare.json")).read())["runs"]
    assert sorted(run["seed"] for run in runs) == [7, 8]


@pytest.mark.slow
def test_python_dash_m_movielens_default(tmp_path):
    """``python -m sfg_fast train`` with the packaged default config on the embedded MovieLens data."""
    out = tmp_path / "ml"
    proc = subprocess.run([sys.executable, "-m", "sfg_fast", "train", "--model", "fm", "--epochs", "1",
                           "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "movielens100k" and results["rows"]["train"] == 80000
    assert results["schema"]["field_names"][:2] == ["user_id", "item_id"]
    assert results["test_auc"] > 0.6


@pytest.mark.parametrize("dataset", ["criteo", "avazu"])
def test_train_on_real_format_files_end_to_end(tmp_path, dataset):
    """The CLI on small files written in the Kaggle Criteo / Avazu formats (the real data is never shipped)."""
    from test_data import write_avazu, write_criteo   # generators of the readers' tests

    data_dir = tmp_path / "raw"
    data_dir.mkdir()
    if dataset == "criteo":
        write_criteo(str(data_dir / "train.txt"), num_rows=800)
    else:
        write_avazu(str(data_dir / "train.csv"), num_rows=800)
    out = str(tmp_path / "run")
    argv = ["train", "--model", "fwfm", "--dataset", dataset, "--data-dir", str(data_dir), "--epochs", "1",
            "--embedding-dim", "4", "--batch-size", "128", "--threads", "1", "--quiet", "--out", out]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "results.json")) as fh:
        results = json.load(fh)
    assert results["config"]["dataset"] == dataset
    assert 0.0 <= results["test_auc"] <= 1.0 and results["test_logloss"] > 0
    num_fields = 39 if dataset == "criteo" else 24
    assert len(results["schema"]["field_dims"]) == num_fields
    # the preprocessed arrays are cached beside the raw file for the next run
    assert any(name.startswith(".sfg_cache") or name == ".sfg_cache" for name in os.listdir(data_dir))


def test_predict_via_main(tmp_path, capsys):
    """sfg-fast predict: the run's feature map encodes raw files as training did. On the training file the
    test split's rows score the run's own test AUC; on a new file the unseen values go to OOV."""
    from sklearn.metrics import roc_auc_score

    from sfg_fast.data.common import split_assignment
    from test_data import write_avazu

    write_avazu(tmp_path / "train.csv", num_rows=600, seed=1)
    out = str(tmp_path / "run")
    assert cli.main(["train", "--model", "fwfm", "--epochs", "1", "--out", out, "--dataset", "avazu",
                     "--data-dir", str(tmp_path / "train.csv"), "--embedding-dim", "4", "--batch-size", "128",
                     "--threads", "1", "--quiet"]) == 0
    assert os.path.exists(os.path.join(out, "feature_map.json.gz"))
    capsys.readouterr()
    os.makedirs(os.path.join(out, "predictions"))
    leftover = os.path.join(out, "predictions", ".predictions.csv.x1y2z3.tmp")   # of a predict killed outright
    open(leftover, "wb").close()
    assert cli.main(["predict", out, "--threads", "1"]) == 0
    assert "AUC" in capsys.readouterr().out
    assert not os.path.exists(leftover)
    report = json.loads(open(os.path.join(out, "predictions", "predict.json")).read())
    rows = np.loadtxt(os.path.join(out, "predictions", "predictions.csv"), delimiter=",", skiprows=1)
    assert report["rows"] == len(rows) == 600 and np.array_equal(rows[:, 0], np.arange(600))
    assert np.array_equal(rows[:, 1], np.arange(600) + 2)          # line 1 is the header
    results = json.loads(open(os.path.join(out, "results.json")).read())
    test_rows = split_assignment(600, (8, 1, 1), 2018) == 2
    logit = np.log(rows[test_rows, 3]) - np.log1p(-rows[test_rows, 3])
    assert abs(roc_auc_score(rows[test_rows, 2], logit) - results["test_auc"]) < 1e-6
    assert report["oov_rate"]["device_ip"] == 1.0               # unique per row: never kept at min_count 2
    write_avazu(tmp_path / "new.csv", num_rows=50, seed=7)
    lines = (tmp_path / "new.csv").read_text().splitlines(keepends=True)
    lines[10] = "1,2,3\n"                                           # a malformed line (line 11) and a blank one
    lines.insert(20, "\n")
    (tmp_path / "new.csv").write_text("".join(lines))
    assert cli.main(["predict", out, "--data-dir", str(tmp_path / "new.csv"), "--out", str(tmp_path / "p2"),
                     "--skip-bad-lines"]) == 0
    report = json.loads((tmp_path / "p2" / "predict.json").read_text())
    assert report["rows"] == 49 and report["skipped_lines"] == 1 and report["blank_lines"] == 1
    new_rows = np.loadtxt(tmp_path / "p2" / "predictions.csv", delimiter=",", skiprows=1)
    assert 11 not in new_rows[:, 1] and 21 not in new_rows[:, 1] and new_rows[-1, 1] == 52
    assert [int(x) for x in new_rows[:, 1]] == [n for n in range(2, 53) if n not in (11, 21)]
    # the run's int8 serving copy scores the same rows, through the same feature map
    assert cli.main(["quantize", out, "--threads", "1", "--no-export"]) == 0
    assert cli.main(["predict", out, "--data-dir", str(tmp_path / "new.csv"), "--out", str(tmp_path / "p4"),
                     "--skip-bad-lines", "--int8"]) == 0
    assert "(int8 SFG)" in capsys.readouterr().out
    int8_rows = np.loadtxt(tmp_path / "p4" / "predictions.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(int8_rows[:, :3], new_rows[:, :3])
    assert np.abs(int8_rows[:, 3] - new_rows[:, 3]).max() < 0.02 and not np.array_equal(int8_rows[:, 3], new_rows[:, 3])
    from sfg_fast import serving
    from sfg_fast.data import load_dataset, load_feature_map
    served = serving.load_quantized(os.path.join(out, "serving", "model-int8.pt"))
    encoded = load_dataset("avazu", data_dir=tmp_path / "new.csv", split=(1, 0, 0), skip_bad_lines=True,
                           vocabularies=load_feature_map(os.path.join(out, "feature_map.json.gz")))
    with torch.no_grad():
        want = torch.sigmoid(served(torch.from_numpy(encoded.train.ids)).double()).numpy()
    np.testing.assert_allclose(int8_rows[:, 3], want, rtol=1e-8, atol=1e-9)
    # the same file without its label column (Avazu's test format: header id,hour,...) scores the same rows
    text = (tmp_path / "new.csv").read_text().splitlines(keepends=True)
    unlabeled = []
    for line in text:
        cells = line.rstrip("\n").split(",")
        unlabeled.append(",".join(cells[:1] + cells[2:]) + "\n" if len(cells) == 24 else line)
    (tmp_path / "test.csv").write_text("".join(unlabeled))
    assert cli.main(["predict", out, "--data-dir", str(tmp_path / "test.csv"), "--out", str(tmp_path / "p3"),
                     "--skip-bad-lines", "--unlabeled"]) == 0
    assert "no metrics (unlabelled)" in capsys.readouterr().out
    scored = np.loadtxt(tmp_path / "p3" / "predictions.csv", delimiter=",", skiprows=1)
    assert (tmp_path / "p3" / "predictions.csv").read_text().startswith("row,line,probability\n")
    np.testing.assert_array_equal(scored[:, [0, 1]], new_rows[:, [0, 1]])
    np.testing.assert_array_equal(scored[:, 2], new_rows[:, 3])
    assert json.loads((tmp_path / "p3" / "predict.json").read_text())["metrics"] is None
    capsys.readouterr()
    # the training file edited since (labels flipped: same vocabularies, so same field_dims): quantize and
    # analyze re-read the run's data and must refuse it, not report metrics of other data as the run's
    lines = (tmp_path / "train.csv").read_text().splitlines(keepends=True)
    flipped = [lines[0]]
    for line in lines[1:]:
        cells = line.split(",")
        cells[1] = "0" if cells[1] == "1" else "1"          # the click column
        flipped.append(",".join(cells))
    (tmp_path / "train.csv").write_text("".join(flipped))
    assert cli.main(["quantize", out, "--threads", "1", "--no-export"]) == 2
    assert cli.main(["analyze", out, "--max-samples", "50"]) == 2
    assert capsys.readouterr().err.count("differs from the one the checkpoint was trained on") == 2
    assert cli.main(["predict", out, "--data-dir", str(tmp_path / "test.csv")]) == 2   # unlabelled, read as labelled
    assert "--unlabeled" in capsys.readouterr().err
    # a feature map from another run (same fields and sizes, other tokens) is refused, not used
    write_avazu(tmp_path / "other.csv", num_rows=600, seed=1)
    text = (tmp_path / "other.csv").read_text().replace(",a99f214a,", ",b00f214a,")
    (tmp_path / "other.csv").write_text(text)
    other = str(tmp_path / "other-run")
    assert cli.main(["train", "--model", "fwfm", "--epochs", "1", "--out", other, "--dataset", "avazu",
                     "--data-dir", str(tmp_path / "other.csv"), "--embedding-dim", "4", "--batch-size", "128",
                     "--threads", "1", "--quiet"]) == 0
    # another run's int8 model is refused
    assert cli.main(["quantize", other, "--threads", "1", "--no-export"]) == 0
    capsys.readouterr()
    assert cli.main(["predict", out, "--int8", os.path.join(other, "serving", "model-int8.pt")]) == 2
    assert "not quantised from this run" in capsys.readouterr().err
    import shutil
    shutil.copy(os.path.join(other, "feature_map.json.gz"), os.path.join(out, "feature_map.json.gz"))
    capsys.readouterr()
    assert cli.main(["predict", out]) == 2
    assert "not the feature map" in capsys.readouterr().err
    synthetic = str(tmp_path / "synthetic")
    assert cli.main(["train", "--model", "fm", "--epochs", "1", "--out", synthetic] + TINY) == 0
    capsys.readouterr()
    assert cli.main(["predict", synthetic]) == 2
    assert "feature_map.json.gz" in capsys.readouterr().err


def test_quantize_via_main(tmp_path, capsys):
    """sfg-fast quantize: float vs int8 test metrics from a real run, a saved int8 model that reloads to the
    same logits, and a torch.export program with a dynamic batch that agrees with it."""
    import torch

    from sfg_fast import serving

    out = str(tmp_path / "run")
    assert cli.main(["train", "--model", "deepfm", "--epochs", "1", "--out", out] + TINY) == 0
    capsys.readouterr()
    (tmp_path / "srv").mkdir()
    leftover = tmp_path / "srv" / ".model-int8.pt2.l1y3zom5.tmp"      # of a quantize killed outright
    leftover.write_bytes(b"partial")
    assert cli.main(["quantize", out, "--out", str(tmp_path / "srv"), "--threads", "1"]) == 0
    assert not leftover.exists()
    printed = capsys.readouterr().out
    assert "| int8 |" in printed and "dAUC" in printed
    report = json.loads((tmp_path / "srv" / "quantize.json").read_text())
    results = json.loads(open(os.path.join(out, "results.json")).read())
    # the float row re-evaluates the best checkpoint on the test split: the training run's own test metrics
    assert abs(report["float"]["AUC"] - results["test_auc"]) < 1e-9
    assert abs(report["int8"]["AUC"] - report["float"]["AUC"]) < 5e-3
    assert report["dAUC"] == report["int8"]["AUC"] - report["float"]["AUC"]
    model, _ = T.model_from_checkpoint(out)
    rows, dim = sum(model.field_dims), model.embedding_dim
    first_order = rows * 4                                         # one float32 weight per id, in both models
    # the main table: D float32 a row, or D uint8 codes + a float32 (scale, bias)
    assert report["table_bytes"] == {"float": rows * dim * 4 + first_order, "int8": rows * (dim + 8) + first_order}

    served = serving.load_quantized(str(tmp_path / "srv" / "model-int8.pt"))
    again = serving.quantize_model(model)
    ids = torch.stack([torch.randint(0, n, (23,)) for n in model.field_dims], dim=1)
    program = torch.export.load(str(tmp_path / "srv" / "model-int8.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(served(ids), again(ids), rtol=0, atol=0)
        torch.testing.assert_close(program.module()(ids), served(ids), rtol=1e-5, atol=1e-6)
    assert cli.main(["quantize", str(tmp_path / "nothing-here")]) == 2
    # --out naming a file: a clear error (exit 2), not a traceback
    assert cli.main(["quantize", out, "--out", str(tmp_path / "srv" / "quantize.json")]) == 2
    assert "error" in capsys.readouterr().err
    # a rerun without the export leaves no program of the earlier run behind
    assert cli.main(["quantize", out, "--out", str(tmp_path / "srv"), "--no-export"]) == 0
    assert sorted(os.listdir(tmp_path / "srv")) == ["model-int8.pt", "quantize.json"]
    with pytest.raises(ValueError, match="serving"):
        serving.load_quantized(os.path.join(out, "best.pt"))


def test_resume_never_tests_another_runs_best_model(tmp_path, capsys):
    """A resume into a fresh directory seeds best.pt from the checkpoint when that is the best model so
    far, so it ends exactly like a straight run; one into a directory holding another run's checkpoints
    is refused; and the final reload refuses a best.pt that is not this run's."""
    import shutil

    straight = str(tmp_path / "straight")
    assert cli.main(["train", "--model", "fwfm", "--epochs", "2", "--out", straight] + TINY) == 0
    reference = json.loads(open(os.path.join(straight, "results.json")).read())
    assert reference["best_epoch"] == 1, "the tiny run must peak before its last epoch to test the reload"

    first = str(tmp_path / "first")
    assert cli.main(["train", "--model", "fwfm", "--epochs", "1", "--out", first] + TINY) == 0
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(os.path.join(first, "last.pt"), backup / "last.pt")           # no best.pt beside it
    fresh = str(tmp_path / "fresh")
    assert cli.main(["train", "--resume", str(backup / "last.pt"), "--out", fresh, "--epochs", "2", "--quiet"]) == 0
    resumed = json.loads(open(os.path.join(fresh, "results.json")).read())
    assert (resumed["test_auc"], resumed["best_epoch"]) == (reference["test_auc"], 1)

    other = str(tmp_path / "other")
    assert cli.main(["train", "--model", "fwfm", "--epochs", "2", "--seed", "7", "--out", other] + TINY) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(backup / "last.pt"), "--out", other, "--epochs", "2", "--quiet"]) == 2
    assert "already holds" in capsys.readouterr().err

    # a foreign best.pt beside a checkpoint that is itself the best model: replaced by that checkpoint
    shutil.copy(os.path.join(other, "best.pt"), os.path.join(first, "best.pt"))
    assert cli.main(["train", "--resume", first, "--epochs", "2", "--quiet"]) == 0
    healed = json.loads(open(os.path.join(first, "results.json")).read())
    assert (healed["test_auc"], healed["best_epoch"]) == (reference["test_auc"], 1)
    # beside a checkpoint whose best model is older (epoch 2 of 2, best epoch 1), the final reload names
    # the foreign file instead of testing it
    shutil.copy(os.path.join(other, "best.pt"), os.path.join(straight, "best.pt"))
    capsys.readouterr()
    assert cli.main(["train", "--resume", straight, "--epochs", "2", "--quiet"]) == 2
    assert "not this run's best checkpoint" in capsys.readouterr().err


def test_compare_checks_every_config_before_training(tmp_path, capsys):
    """A value only the last model rejects fails the comparison before the first run trains."""
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--models", "fm,deepfm", "--seeds", "1", "--out", str(out), "--set", "dropout=1.5"]
                    + TINY) == 2
    err = capsys.readouterr().err
    assert "deepfm" in err and "dropout" in err
    assert not out.exists() or not any(out.iterdir())
    # fused tables are checked too (their optimizer settings included)
    assert cli.main(["compare", "--models", "fm,deepfm", "--seeds", "1", "--out", str(out), "--set", "embedding=fused",
                     "--set", "embedding_optimizer=adagrad"] + TINY) == 2
    assert "embedding_optimizer" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("command,hint", [("train", "--resume /runs/x"), ("train-early", "run the command again"),
                                          ("compare", "rerun the same command to continue"), ("analyze", None)])
def test_an_interrupt_says_what_can_be_resumed(monkeypatch, capsys, command, hint):
    """train: --resume names the run's directory once it has a checkpoint of its own (the trainer's
    KeyboardInterrupt carries it), else says to start again."""
    def interrupted(*args, **kwargs):
        exc = KeyboardInterrupt()
        if command == "train":
            exc.resume_from = "/runs/x"
        raise exc
    command_name = command.replace("-early", "")
    for name in ("_run_train", "_run_compare", "_run_analyze"):
        monkeypatch.setattr(cli, name, interrupted)
    argv = {"train": ["train"], "compare": ["compare"], "analyze": ["analyze", "somewhere"]}[command_name]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and (hint in err if hint else "--resume" not in err)


def test_a_compare_interrupted_under_overwrite_says_to_continue_without_it(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_compare", interrupted)
    assert cli.main(["compare", "--overwrite"]) == 130
    assert "rerun the same command without --overwrite to continue" in capsys.readouterr().err


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    """SIGTERM (timeout, Slurm, Kubernetes) killed the process on the spot, leaving the temp file of a
    half-written checkpoint or data cache for good; it now stops the run as Ctrl-C does: exit 143, the
    resume hint, no temp file, and the run resumes."""
    import signal
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sfg_fast", "train", "--model", "fm", "--epochs", "500",
                             "--set", "patience=null", "--out", str(out)] + TINY,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (out / "last.pt").exists(), proc.communicate(timeout=60)
        # a second checkpoint: the run then knows the first is its own (a signal right after the first one's
        # rename, before the run records it, gets the "start again" hint)
        first = (out / "last.pt").stat().st_mtime_ns
        while (out / "last.pt").stat().st_mtime_ns == first and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and f"--resume {out}" in err
    assert not list(out.glob(".*.tmp"))
    done = int(torch.load(out / "last.pt", map_location="cpu", weights_only=False)["epoch"])
    assert cli.main(["train", "--resume", str(out), "--epochs", str(done + 1), "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["history"][-1]["epoch"] == done + 1


def test_an_ignored_sigterm_stays_ignored(monkeypatch):
    """main() turns SIGTERM into an interrupt only where it would kill the process: under ``trap '' TERM``
    (SIG_IGN inherited) or a caller's own handler, the run goes on and the caller's handler runs."""
    import signal

    def train_through_a_sigterm(args):
        os.kill(os.getpid(), signal.SIGTERM)
        return 0
    monkeypatch.setattr(cli, "_run_train", train_through_a_sigterm)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert cli.main(["train"]) == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        seen = []
        signal.signal(signal.SIGTERM, lambda *args: seen.append(args[0]))
        assert cli.main(["train"]) == 0 and seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_failing_overwrite_keeps_the_run_it_was_to_replace(tmp_path, monkeypatch, capsys):
    """Errors a run meets only in its first steps (a junk SFG_FAST_BACKEND, an empty split) are raised before
    --overwrite removes the earlier run: the run it was to replace had been deleted, and then nothing came."""
    out = str(tmp_path / "run")
    assert cli.main(["train", "--model", "fm", "--epochs", "1", "--out", out] + TINY) == 0
    before = {name: open(os.path.join(out, name), "rb").read() for name in ("last.pt", "best.pt", "results.json")}
    monkeypatch.setenv("SFG_FAST_BACKEND", "junk")
    assert cli.main(["train", "--model", "fm", "--epochs", "1", "--out", out, "--overwrite"] + TINY) == 2
    assert "SFG_FAST_BACKEND must be one of" in capsys.readouterr().err
    monkeypatch.delenv("SFG_FAST_BACKEND")
    tiny = [a if a != "2000" else "5" for a in TINY]                 # 5 rows: an empty valid split
    assert cli.main(["train", "--model", "fm", "--epochs", "1", "--out", out, "--overwrite"] + tiny) == 2
    assert "split is empty" in capsys.readouterr().err
    assert cli.main(["train", "--model", "fm", "--epochs", "1", "--out", out, "--overwrite", "--device", "meta"]
                    + TINY) == 2
    assert "device must be" in capsys.readouterr().err
    assert {name: open(os.path.join(out, name), "rb").read() for name in before} == before


def test_a_failing_compare_overwrite_keeps_the_earlier_comparison(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--models", "fm", "--seeds", "1", "--only", "base", "--epochs", "1", "--out",
                     str(out)] + TINY) == 0
    kept = sorted(p.name for p in out.iterdir())
    assert cli.main(["compare", "--models", "fm", "--seeds", "1", "--only", "base", "--epochs", "1", "--out", str(out),
                     "--overwrite", "--dataset", "avazu", "--data-dir", str(tmp_path / "missing")]
                    + TINY[4:]) == 2
    assert "missing" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == kept and (out / "compare.json").exists()


def test_config_numbers_and_booleans_follow_yaml_1_2(tmp_path, capsys):
    """YAML 1.1 read ``seed: 0100`` as octal 64, ``1:30`` as 90, ``1_0`` as 10 and ``off`` as False."""
    config = tmp_path / "numbers.yaml"
    config.write_text("Base:\n  seed: 0100\n  lr: 1e-3\n  generative: true\n")
    blocks = T.load_yaml_config(str(config))
    assert blocks["Base"] == {"seed": 100, "lr": 1e-3, "generative": True}
    assert cli.main(["train", "--model", "fm", "--set", "generative=off", "--out", str(tmp_path / "r")] + TINY) == 2
    assert "generative" in capsys.readouterr().err
    assert cli.main(["train", "--model", "fm", "--set", "epochs=1:30", "--out", str(tmp_path / "r")] + TINY) == 2
    assert "epochs" in capsys.readouterr().err


def test_a_config_whose_aliases_expand_without_bound_is_refused(tmp_path):
    """A few hundred bytes of nested aliases expand to billions of values: the config checks walked them for
    minutes (and results.json would have held them)."""
    lines = ["Base:", "  a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="expands to more than"):
        T.load_yaml_config(str(path))


def test_config_errors_name_the_file_and_the_launch(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("Base:\n  dataset: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.yaml.*UTF-8"):
        T.load_yaml_config(str(bad))
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert cli.main(["train", "--model", "fm", "--distributed", "--out", str(tmp_path / "d")] + TINY) == 2
    assert "torchrun" in capsys.readouterr().err


def test_a_model_too_large_for_memory_is_a_config_error(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(T.model_zoo, "build", out_of_memory)
    assert cli.main(["train", "--model", "fm", "--out", str(tmp_path / "r")] + TINY) == 2
    assert "does not fit in memory" in capsys.readouterr().err


def test_a_key_set_twice_is_refused(tmp_path, capsys):
    """``--set gamma=2 --set gamma=3`` silently trained gamma 3, where a key written twice in a config file is
    an error."""
    out = tmp_path / "r"
    assert cli.main(["train", "--model", "fm", "--set", "gamma=2", "--set", "gamma=3", "--out", str(out)] + TINY) == 2
    assert "--set gives 'gamma' twice" in capsys.readouterr().err and not out.exists()
