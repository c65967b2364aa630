"""Trainer: end-to-end results, exact resume, atomic checkpoints, divergence stop, compare, analyze."""
import gzip
import json
import math
import os

import numpy as np
import pytest
import torch

from sfg_fast import train as T
from sfg_fast.data import load_dataset


@pytest.fixture(scope="module")
def tiny():
    """A small Criteo-shaped synthetic dataset (3000 rows, 39 fields), generated once per module."""
    return load_dataset("synthetic-criteo", num_rows=3000, seed=7)


def _config(tmp_path, name="run", **kw):
    config = dict(model="fm", dataset="synthetic-criteo", num_rows=3000, data_seed=7, generative=True,
                  embedding_dim=4, epochs=2, batch_size=256, lr=3e-3, seed=11, verbose=0, threads=1,
                  out=str(tmp_path / name))
    config.update(kw)
    return config


def _leftover_temp_files(directory):
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


def test_train_end_to_end_results(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("SFG_FAST_STRUCTURED_DECODER", "graphs")     # a knob the run records (its default value)
    results = T.Trainer(_config(tmp_path, epochs=2, patience=5), data=tiny).fit()
    out = tmp_path / "run"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["test_auc"] == results["test_auc"]
    for key in ("test_auc", "test_logloss", "best_epoch", "samples_per_second", "train_seconds", "history",
                "config", "schema", "versions", "valid_auc", "num_parameters"):
        assert key in on_disk, key
    assert 0.0 <= on_disk["test_auc"] <= 1.0 and on_disk["test_logloss"] > 0
    assert len(on_disk["history"]) == 2 and on_disk["epochs_run"] == 2
    assert on_disk["best_epoch"] in (1, 2)
    assert on_disk["history"][on_disk["best_epoch"] - 1]["valid_auc"] == max(h["valid_auc"] for h in on_disk["history"])
    assert on_disk["samples_per_second"] > 0 and on_disk["train_seconds"] > 0
    assert on_disk["schema"]["field_dims"] == list(tiny.schema.field_dims)
    assert on_disk["config"]["model"] == "fm" and on_disk["config"]["lr"] == 3e-3
    assert on_disk["versions"]["torch"] == torch.__version__
    # the knobs that pick kernels and GEMM providers travel with the result
    assert on_disk["versions"]["env"] == {k: v for k, v in os.environ.items() if k.startswith("SFG_FAST_")}
    assert on_disk["versions"]["env"]["SFG_FAST_STRUCTURED_DECODER"] == "graphs"
    try:
        from sfg_fast import _C
        isa = _C.hot_loop_isa()
    except ImportError:
        isa = None
    assert on_disk["versions"]["cpu_extension_isa"] == isa
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
    assert _leftover_temp_files(out) == []
    # The model learns the planted signal: better than chance on held-out data.
    assert on_disk["test_auc"] > 0.55
    # The reported test metrics are those of the best checkpoint, recomputed independently here.
    model, ckpt = T.model_from_checkpoint(str(out / "best.pt"))
    assert ckpt["epoch"] == on_disk["best_epoch"]
    with torch.no_grad():
        logits = model(torch.from_numpy(tiny.test.ids)).double()
    labels = torch.from_numpy(tiny.test.labels).double()
    from sklearn.metrics import log_loss, roc_auc_score
    assert roc_auc_score(labels.numpy(), logits.numpy()) == pytest.approx(on_disk["test_auc"], abs=1e-12)
    probs = torch.sigmoid(logits).numpy()
    assert log_loss(labels.numpy(), probs) == pytest.approx(on_disk["test_logloss"], rel=1e-6)


def test_early_stopping_and_lr_decay(tmp_path, tiny, monkeypatch):
    # Scripted validation AUCs make the plateau logic observable without depending on training noise.
    scores = iter([0.70, 0.72, 0.71, 0.705, 0.9, 0.9])
    real = T.evaluate_model

    def fake(model, ids, labels, device, batch_size=16384, name="valid", group_column=None):
        metrics = real(model, ids, labels, device, batch_size, name, group_column)
        if name == "valid" and fake.in_fit:
            metrics["AUC"] = next(scores)
        return metrics

    fake.in_fit = True
    monkeypatch.setattr(T, "evaluate_model", fake)
    trainer = T.Trainer(_config(tmp_path, epochs=6, patience=2, lr=1e-3), data=tiny)
    real_finish = trainer.finish

    def finish():
        fake.in_fit = False
        return real_finish()

    trainer.finish = finish
    results = trainer.fit()
    assert results["epochs_run"] == 4 and results["stopped_early"]
    assert results["best_epoch"] == 2
    assert [h["lr"] for h in results["history"]] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])
    assert [h["improved"] for h in results["history"]] == [True, True, False, False]
    best = T.load_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert best["epoch"] == 2


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model,moved", [("fm", True), ("deepfm", False), ("fwfm-fused", False),
                                         ("fwfm-fused-compiled", False)])
def test_resume_is_exact(tmp_path, tiny, model, moved):
    extra = {"hidden_units": [16], "dropout": 0.2} if model == "deepfm" else {}
    if model.startswith("fwfm-fused"):
        # tables that train themselves in backward: their optimizer state travels in the model state
        extra = {"embedding": "fused", "embedding_optimizer": "adam", "embedding_lr": 0.02}
        if model.endswith("compiled"):   # the training step as one graph, the tables' updates in it
            extra["compile"] = "aot_eager"
        model = "fwfm"
    # lr decay on plateau and dropout make every piece of state (optimizer lr, RNGs) matter.
    full = T.Trainer(_config(tmp_path, "full", model=model, epochs=3, patience=3, **extra), data=tiny)
    full_results = full.fit()

    part = _config(tmp_path, "part", model=model, epochs=1, patience=3, **extra)
    T.Trainer(part, data=tiny).fit()
    # ``moved``: continue into another directory (best.pt must follow the run there).
    target = tmp_path / ("moved" if moved else "part")
    resumed = T.resume(str(tmp_path / "part"), data=tiny, epochs=3, out=str(target) if moved else None)

    assert resumed["test_auc"] == full_results["test_auc"]
    assert resumed["test_logloss"] == full_results["test_logloss"]
    assert resumed["best_epoch"] == full_results["best_epoch"]
    assert [h["valid_auc"] for h in resumed["history"]] == [h["valid_auc"] for h in full_results["history"]]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full_results["history"]]
    last_full = T.load_checkpoint(str(tmp_path / "full" / "last.pt"))
    last_resumed = T.load_checkpoint(str(target / "last.pt"))
    assert last_full["step"] == last_resumed["step"] > 0
    for key, value in last_full["model_state"].items():
        if key.endswith("_extra_state"):      # a fused table's own optimizer: step count and row state
            other = last_resumed["model_state"][key]["optimizer"]
            assert value["optimizer"]["step"] == other["step"] > 0, key
            assert value["optimizer"]["state"].keys() == other["state"].keys()
            assert all(torch.equal(t, other["state"][k]) for k, t in value["optimizer"]["state"].items()), key
            continue
        assert torch.equal(value, last_resumed["model_state"][key]), key
    for a, b in zip(last_full["optimizer_state"]["state"].values(), last_resumed["optimizer_state"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_amp_bf16_trains_under_autocast_and_resumes_exactly(tmp_path, tiny, monkeypatch):
    """amp: bf16 runs the training forward under torch.autocast(bfloat16) (and only it: evaluation is fp32),
    learns, changes the numbers against the fp32 run, resumes bit for bit, and cannot be changed on resume."""
    from sfg_fast import models as model_zoo
    states = []
    real_forward = model_zoo.CTRModel.__call__

    def spy(self, *args, **kwargs):
        states.append((self.training, torch.is_autocast_enabled("cpu")
                       and torch.get_autocast_dtype("cpu") == torch.bfloat16))
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(model_zoo.CTRModel, "__call__", spy)
    extra = dict(model="fwfm", patience=3, amp="bf16")
    full = T.Trainer(_config(tmp_path, "full", epochs=2, **extra), data=tiny).fit()
    assert {s for s in states if s[0]} == {(True, True)} and {s for s in states if not s[0]} == {(False, False)}
    assert full["config"]["amp"] == "bf16" and full["test_auc"] > 0.55
    fp32 = T.Trainer(_config(tmp_path, "fp32", epochs=2, **dict(extra, amp=False)), data=tiny).fit()
    assert fp32["history"][0]["train_loss"] != full["history"][0]["train_loss"]
    T.Trainer(_config(tmp_path, "part", epochs=1, **extra), data=tiny).fit()
    resumed = T.resume(str(tmp_path / "part"), data=tiny, epochs=2)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    assert resumed["test_auc"] == full["test_auc"]
    with pytest.raises(ValueError, match="cannot change 'amp'"):
        T.resume(str(tmp_path / "part"), data=tiny, amp=False)
    with pytest.raises(ValueError, match="amp must be false or 'bf16'"):
        T.Trainer(_config(tmp_path, "bad", amp="fp16"), data=tiny)


def test_resume_rejects_changed_experiment(tmp_path, tiny):
    T.Trainer(_config(tmp_path, epochs=1), data=tiny).fit()
    with pytest.raises(ValueError, match="cannot change 'lr'"):
        T.resume(str(tmp_path / "run"), data=tiny, lr=0.5)
    with pytest.raises(FileNotFoundError, match="holds no last.pt"):
        T.resume(str(tmp_path), data=tiny)


def test_resume_takes_the_same_data_dir_given_relative(tmp_path, tiny, monkeypatch):
    """The config keeps data_dir absolute; a resume naming the same folder relative (or with ~) is no change,
    another folder still is."""
    (tmp_path / "data").mkdir()
    T.Trainer(_config(tmp_path, epochs=1, data_dir=str(tmp_path / "data")), data=tiny).fit()
    monkeypatch.chdir(tmp_path)
    T.resume(str(tmp_path / "run"), data=tiny, epochs=1, data_dir="data")
    T.resume(str(tmp_path / "run"), data=tiny, epochs=1, data_dir="./data/")
    with pytest.raises(ValueError, match="cannot change 'data_dir'"):
        T.resume(str(tmp_path / "run"), data=tiny, epochs=1, data_dir="elsewhere")


def test_compare_refuses_an_out_holding_an_earlier_comparison(tmp_path, tiny):
    """Like train: a second comparison into the same out is refused before anything trains, unless
    overwrite=True (--overwrite), which trains every run again."""
    from sfg_fast.compare import compare
    overrides = dict(dataset="synthetic-criteo", num_rows=3000, data_seed=7, epochs=1, batch_size=512,
                     embedding_dim=4, verbose=0, threads=1)
    out = tmp_path / "cmp"
    compare(["fm"], seeds=1, out=str(out), overrides=overrides, variants=("sfg",))
    before = (out / "fm-sfg-seed2018" / "results.json").read_bytes()
    with pytest.raises(ValueError, match="already holds the results of an earlier comparison.*--overwrite"):
        compare(["fm"], seeds=1, out=str(out), overrides=dict(overrides, epochs=2), variants=("sfg",))
    assert (out / "fm-sfg-seed2018" / "results.json").read_bytes() == before
    again = compare(["fm"], seeds=1, out=str(out), overrides=dict(overrides, epochs=2), variants=("sfg",),
                    overwrite=True)
    assert again["runs"][0]["epochs_run"] == 2
    # overwrite replaces the earlier comparison whole: its runs the new one does not redo go too
    compare(["fm"], seeds=2, out=str(out), overrides=overrides, variants=("sfg",), overwrite=True)
    assert (out / "fm-sfg-seed2019" / "results.json").exists()
    (out / "notes.txt").write_text("the user's own file")
    compare(["fm"], seeds=1, out=str(out), overrides=overrides, variants=("sfg",), overwrite=True)
    assert not (out / "fm-sfg-seed2019").exists() and (out / "fm-sfg-seed2018" / "results.json").exists()
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_resume_of_finished_run_does_not_train(tmp_path, tiny):
    first = T.Trainer(_config(tmp_path, epochs=2), data=tiny).fit()
    again = T.resume(str(tmp_path / "run" / "last.pt"), data=tiny)
    assert again["steps"] == first["steps"] and again["test_auc"] == first["test_auc"]


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    T.atomic_save({"format": "old", "x": torch.arange(3)}, str(path))
    before = path.read_bytes()

    def torn_save(obj, fh, *args, **kwargs):
        fh.write(b"partial bytes of a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        T.atomic_save({"format": "new"}, str(path))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    monkeypatch.undo()
    T.atomic_save({"format": "new", "x": torch.ones(2)}, str(path))
    assert torch.load(str(path), weights_only=True)["format"] == "new"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_nan_loss_stops_and_keeps_checkpoints(tmp_path, tiny):
    trainer = T.Trainer(_config(tmp_path, epochs=3, patience=5), data=tiny)
    steps_per_epoch = math.ceil(len(tiny.train) / 256)
    poison_at = steps_per_epoch + 3          # third batch of epoch 2
    calls = {"n": 0}

    def hook(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == poison_at:
                return output * float("nan")
        return output

    trainer.model.register_forward_hook(hook)
    with pytest.raises(T.TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "training loss is nan" in message
    assert "epoch 2, batch 3" in message and f"global step {poison_at}" in message
    assert "last.pt" in message and "intact" in message
    out = tmp_path / "run"
    for name in ("last.pt", "best.pt"):
        ckpt = T.load_checkpoint(str(out / name))
        assert ckpt["epoch"] == 1 and ckpt["step"] == steps_per_epoch
        assert all(torch.isfinite(v).all() for v in ckpt["model_state"].values() if v.is_floating_point())
    assert not (out / "results.json").exists()
    assert _leftover_temp_files(out) == []
    # The intact checkpoint resumes (the hook is gone with the old trainer) and finishes.
    results = T.resume(str(out), data=tiny)
    assert results["epochs_run"] == 3 and math.isfinite(results["test_logloss"])


def test_huge_lr_diverges_with_clear_message(tmp_path, tiny):
    config = _config(tmp_path, epochs=3, lr=1e30, clip_grad_norm=None, embedding_dim=4, init_std=1.0)
    with pytest.raises(T.TrainingDiverged, match=r"(training loss|gradient norm|valid logits).*(nan|inf|NaN)"):
        T.Trainer(config, data=tiny).fit()


def test_config_errors_name_the_key(tmp_path, tiny):
    with pytest.raises(ValueError, match="unknown config key 'hiden_units'"):
        T.Trainer(_config(tmp_path, hiden_units=[4]), data=tiny)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        T.Trainer(_config(tmp_path, batch_size=0), data=tiny)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        T.Trainer(_config(tmp_path, lr=float("nan")), data=tiny)
    with pytest.raises(ValueError, match="model must be one of"):
        T.Trainer(_config(tmp_path, model="nope"), data=tiny)
    # min_lr above lr would make the plateau "decay" raise the learning rate
    with pytest.raises(ValueError, match=r"min_lr \(0.01\) must not exceed lr"):
        T.Trainer(_config(tmp_path, lr=1e-3, min_lr=1e-2), data=tiny)
    with pytest.raises(ValueError, match="clip_grad_norm must be a positive finite number"):
        T.Trainer(_config(tmp_path, clip_grad_norm="ten"), data=tiny)
    with pytest.raises(ValueError, match="lr_decay_factor must be a number"):
        T.Trainer(_config(tmp_path, lr_decay_factor="0.5"), data=tiny)
    for key, value in (("seed", 1.5), ("seed", "abc"), ("weight_decay", "abc"), ("weight_decay", -1.0),
                       ("patience", True), ("reduce_lr_on_plateau", "no"), ("compile", 1), ("compile", " "),
                       ("compile", "no-such-backend"), ("data_seed", "abc"), ("data_seed", -1), ("seed", 10 ** 23),
                       ("verbose", "abc"), ("verbose", -3), ("threads", True), ("out", 5), ("expid", 3),
                       ("cache_dir", 5)):
        with pytest.raises(ValueError, match=key):
            T.Trainer(_config(tmp_path, **{key: value}), data=tiny)
    with pytest.raises(TypeError, match="hidden_units"):
        T.Trainer(_config(tmp_path, model="deepfm", hidden_units=64), data=tiny)
    with pytest.raises(ValueError, match="hidden_units"):
        T.Trainer(_config(tmp_path, model="deepfm", hidden_units=[8, 0]), data=tiny)
    # A key another model accepts is reported as ignored, not silently used.
    trainer = T.Trainer(_config(tmp_path, hidden_units=[8]), data=tiny)
    assert trainer.ignored_keys == ["hidden_units"]


def test_seeds_change_results_and_same_seed_repeats(tmp_path, tiny):
    a = T.Trainer(_config(tmp_path, "a", epochs=1, seed=1), data=tiny).fit()
    b = T.Trainer(_config(tmp_path, "b", epochs=1, seed=1), data=tiny).fit()
    c = T.Trainer(_config(tmp_path, "c", epochs=1, seed=2), data=tiny).fit()
    assert a["test_logloss"] == b["test_logloss"]
    assert a["test_logloss"] != c["test_logloss"]


def test_compare_writes_reports(tmp_path, tiny):
    from sfg_fast.compare import compare, parse_seeds

    overrides = dict(dataset="synthetic-criteo", num_rows=3000, data_seed=7, epochs=1, batch_size=512,
                     embedding_dim=4, verbose=0, threads=1)
    summary = compare(["fm", "dcnv2"], seeds=2, out=str(tmp_path / "cmp"), overrides=overrides)
    out = tmp_path / "cmp"
    for name in ("compare.md", "compare.json", "compare.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "compare.json").read_text())
    assert on_disk["models"] == ["fm", "dcnv2"] and on_disk["seeds"] == parse_seeds(2, 2018)
    assert len(on_disk["runs"]) == 8
    for model in ("fm", "dcnv2"):
        for variant in ("base", "sfg"):
            agg = on_disk["results"][model][variant]
            values = agg["test_auc"]["values"]
            assert len(values) == 2
            assert agg["test_auc"]["mean"] == pytest.approx(np.mean(values))
            assert agg["test_auc"]["std"] == pytest.approx(np.std(values, ddof=1))
            runs = [r for r in on_disk["runs"] if r["model"] == model and r["generative"] == (variant == "sfg")]
            assert sorted(r["test_auc"] for r in runs) == sorted(values)
            for run in runs:
                assert (tmp_path / "cmp" / os.path.basename(run["out"]) / "results.json").exists()
    md = (out / "compare.md").read_text()
    assert "| fm | SFG |" in md and "| dcnv2 | base |" in md and "±" in md
    assert "dcnv2" in summary["table"]


def test_parse_seeds_and_models():
    from sfg_fast.compare import parse_models, parse_seeds

    assert parse_seeds(3, 10) == [10, 11, 12]
    assert parse_seeds("4,2") == [4, 2]
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        parse_seeds(0)
    with pytest.raises(ValueError, match="seeds must be a count"):
        parse_seeds("a,b")
    # a seed value given as a count would start thousands of runs
    assert parse_seeds("2018,") == [2018] and parse_seeds(100, 0) == list(range(100))
    with pytest.raises(ValueError, match=r"seeds=2018 is a count.*--seeds 2018,"):
        parse_seeds("2018")
    assert parse_models("FM, dcnv2") == ["fm", "dcnv2"]
    with pytest.raises(ValueError, match="unknown model 'foo'"):
        parse_models("fm,foo")


def test_analyze_checkpoint(tmp_path, tiny, monkeypatch):
    from sfg_fast import diagnostics as dg
    T.Trainer(_config(tmp_path, epochs=1), data=tiny).fit()
    result = T.analyze_checkpoint(str(tmp_path / "run"), max_samples=200, data=tiny)
    out = tmp_path / "run" / "analysis"
    for name in ("spectrum.png", "correlation.png", "diagnostics.json"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "diagnostics.json").read_text())
    assert on_disk["num_samples"] == 200 == result["num_samples"]
    assert on_disk["dim"] == 39 * 4
    # more validation rows than max_samples: a seeded uniform sample in file order, not the first rows
    seen = {}
    real = dg.analyze_embeddings
    monkeypatch.setattr(dg, "analyze_embeddings", lambda raw, gen, out, **kw: seen.setdefault("raw", raw) is None
                        or real(raw, gen, out, **kw))
    T.analyze_checkpoint(str(tmp_path / "run"), max_samples=200, data=tiny, out=str(tmp_path / "a2"))
    valid = torch.as_tensor(tiny.valid.ids)
    assert valid.shape[0] > 200
    model, _ = T.model_from_checkpoint(str(tmp_path / "run" / "best.pt"))
    with torch.no_grad():
        raw = model.analysis_embeddings(valid)["raw"].float()
    pick = torch.randperm(valid.shape[0], generator=torch.Generator().manual_seed(0))[:200].sort().values
    assert torch.equal(seen["raw"], raw[pick]) and not torch.equal(seen["raw"], raw[:200])
    with pytest.raises(ValueError, match="max_samples"):
        T.analyze_checkpoint(str(tmp_path / "run"), max_samples=1, data=tiny)


def test_resume_into_new_directory_keeps_best(tmp_path, tiny, monkeypatch):
    first = T.Trainer(_config(tmp_path, "a", epochs=1, patience=5), data=tiny).fit()
    real = T.evaluate_model

    def worse(model, ids, labels, device, batch_size=16384, name="valid"):
        metrics = real(model, ids, labels, device, batch_size, name)
        if name == "valid" and model.training:   # only the per-epoch validation inside fit()
            metrics["AUC"] = 0.0
        return metrics

    monkeypatch.setattr(T, "evaluate_model", worse)
    again = T.resume(str(tmp_path / "a"), data=tiny, epochs=2, out=str(tmp_path / "b"))
    assert again["epochs_run"] == 2 and again["best_epoch"] == 1
    assert T.load_checkpoint(str(tmp_path / "b" / "best.pt"))["epoch"] == 1
    assert again["test_auc"] == first["test_auc"] and again["test_logloss"] == first["test_logloss"]


def test_bad_data_is_refused_before_training(tmp_path, tiny):
    """NaN or non-0/1 labels and ids outside field_dims, in any split, fail when the Trainer is built (the
    message names the split), not after epochs of training; a string skip_bad_lines is refused."""
    import copy as _copy
    for split, mutate, match in (("valid", lambda s: s.labels.__setitem__(3, np.nan), "valid.labels"),
                                 ("test", lambda s: s.labels.__setitem__(0, 0.5), "test.labels"),
                                 ("test", lambda s: s.ids.__setitem__((2, 1), 10 ** 6), "test.ids"),
                                 ("train", lambda s: s.labels.__setitem__(5, 2.0), "train.labels")):
        data = _copy.deepcopy(tiny)
        mutate(getattr(data, split))
        with pytest.raises(ValueError, match=match):
            T.Trainer(_config(tmp_path, name=f"bad-{split}"), data=data)
        assert not os.path.exists(tmp_path / f"bad-{split}")
    with pytest.raises(ValueError, match="skip_bad_lines must be true or false"):
        T.load_data(dict(dataset="synthetic-criteo", num_rows=100, skip_bad_lines="false"))


def test_divergence_in_a_reused_directory_does_not_vouch_for_another_runs_checkpoint(tmp_path, tiny):
    T.train(_config(tmp_path, name="reused", epochs=1), data=tiny)
    with pytest.raises(T.TrainingDiverged) as info:
        T.train(_config(tmp_path, name="reused", model="fwfm", lr=1e30, seed=3), data=tiny, overwrite=True)
    message = str(info.value)
    assert "no checkpoint of this run had been written yet" in message and "is intact" not in message


def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path, tiny):
    """A command repeated by mistake must not replace a finished run: the directory is refused (before
    any work) unless overwrite is asked for; a resume into it still works."""
    first = T.train(_config(tmp_path, name="kept", epochs=1), data=tiny)
    before = {name: (tmp_path / "kept" / name).read_bytes() for name in T.RUN_FILES}
    with pytest.raises(FileExistsError, match=r"already holds a run \(last.pt, best.pt, results.json\).*--overwrite"):
        T.train(_config(tmp_path, name="kept", epochs=1, seed=5), data=tiny)
    assert {name: (tmp_path / "kept" / name).read_bytes() for name in T.RUN_FILES} == before
    resumed = T.resume(str(tmp_path / "kept"), data=tiny, epochs=2)
    assert resumed["epochs_run"] == 2 and first["epochs_run"] == 1
    replaced = T.train(_config(tmp_path, name="kept", epochs=1, seed=5), data=tiny, overwrite=True)
    assert replaced["config"]["seed"] == 5


def test_compare_records_a_diverged_run_and_goes_on(tmp_path, tiny, monkeypatch):
    """One run diverging is recorded (compare.json "failures", compare.md) and left out of its variant's
    means; the other runs still train and are reported; every run diverging is an error."""
    from sfg_fast.compare import compare

    real_fit = T.Trainer.fit

    def fit(self):
        if self.config["generative"] and self.config["seed"] == 2019:
            raise T.TrainingDiverged("training diverged: simulated for the test")
        return real_fit(self)

    monkeypatch.setattr(T.Trainer, "fit", fit)
    overrides = dict(dataset="synthetic-criteo", num_rows=3000, data_seed=7, epochs=1, batch_size=512,
                     embedding_dim=4, verbose=0, threads=1)
    summary = compare(["fm"], seeds=2, out=str(tmp_path / "cmp"), overrides=overrides)
    assert [(f["variant"], f["seed"]) for f in summary["failures"]] == [("sfg", 2019)]
    assert summary["results"]["fm"]["sfg"]["n"] == 1 and summary["results"]["fm"]["base"]["n"] == 2
    assert len(summary["runs"]) == 3
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "diverged or failed" in md and "simulated for the test" in md
    # the SFG row holds one seed: no spread is claimed, the seed count shows, and dAUC pairs seed 2018 only
    base, sfg = summary["results"]["fm"]["base"], summary["results"]["fm"]["sfg"]
    assert sfg["test_auc"]["std"] is None and base["test_auc"]["std"] is not None
    row = next(line for line in md.splitlines() if line.startswith("| fm | SFG"))
    paired = sfg["test_auc"]["values"][0] - base["test_auc"]["values"][base["seeds"].index(2018)]
    assert "| 1/2 |" in row and "(1 seed)" in row and f"{paired:+.5f} (1 paired)" in row
    monkeypatch.setattr(T.Trainer, "fit", lambda self: (_ for _ in ()).throw(T.TrainingDiverged("always")))
    with pytest.raises(T.TrainingDiverged, match="every run failed or diverged"):
        compare(["fm"], seeds=1, out=str(tmp_path / "cmp2"), overrides=overrides)


def test_compare_records_any_failed_run_and_still_writes_its_report(tmp_path, tiny, monkeypatch):
    """A run failing for another reason than divergence (out of memory, a broken file) is recorded like a
    divergence: the earlier runs are not thrown away and compare.md / compare.json are written."""
    from sfg_fast.compare import compare

    real_fit = T.Trainer.fit

    def fit(self):
        if not self.config["generative"]:
            raise RuntimeError("simulated out of memory")
        return real_fit(self)

    monkeypatch.setattr(T.Trainer, "fit", fit)
    overrides = dict(dataset="synthetic-criteo", num_rows=3000, data_seed=7, epochs=1, batch_size=512,
                     embedding_dim=4, verbose=0, threads=1)
    summary = compare(["fm"], seeds=1, out=str(tmp_path / "cmp"), overrides=overrides)
    assert [f["error"] for f in summary["failures"]] == ["RuntimeError: simulated out of memory"]
    assert list(summary["results"]["fm"]) == ["sfg"]
    assert "simulated out of memory" in (tmp_path / "cmp" / "compare.md").read_text()
    with pytest.raises(ValueError, match="non-negative"):
        compare(["fm"], seeds="5,-1", out=str(tmp_path / "cmp3"), overrides=overrides)


def test_resume_on_other_data_with_the_same_field_dims_is_refused(tmp_path, tiny):
    import copy as _copy
    T.train(_config(tmp_path, name="fp", epochs=1), data=tiny)
    other = _copy.deepcopy(tiny)
    other.train.labels[:] = 1 - other.train.labels                 # same shapes and field_dims, other data
    with pytest.raises(ValueError, match="dataset differs"):
        T.resume(str(tmp_path / "fp"), data=other, epochs=2)
    assert T.resume(str(tmp_path / "fp"), data=_copy.deepcopy(tiny), epochs=2)["epochs_run"] == 2
    # a fresh read and a cached load of the same file agree (the cache stores ids as int32)
    from test_data import write_criteo
    write_criteo(tmp_path / "train.txt", num_rows=300)
    fresh = load_dataset("criteo", data_dir=tmp_path, cache_dir=tmp_path / "cache", min_count=1)
    cached = load_dataset("criteo", data_dir=tmp_path, cache_dir=tmp_path / "cache", min_count=1)
    assert not fresh.info["from_cache"] and cached.info["from_cache"]
    assert T.data_fingerprint(fresh) == T.data_fingerprint(cached)


def test_a_stop_between_last_and_best_loses_no_best_model(tmp_path, tiny, monkeypatch):
    """last.pt is written before best.pt: a run killed between the two at an improving epoch resumes with
    best.pt rewritten from last.pt (that epoch's model), even when the resume trains no further."""
    config = _config(tmp_path, "run", epochs=2, patience=5)
    full = T.Trainer(_config(tmp_path, "full", epochs=2, patience=5), data=tiny).fit()
    assert full["best_epoch"] == 2          # the second epoch improves: the stop below hits an improving epoch
    real_save = T.Trainer.save

    def dies_at_second_best(self, name, state=None):
        if name == "best.pt" and self.epoch == 2:
            raise KeyboardInterrupt          # killed after last.pt, before best.pt
        return real_save(self, name, state)

    monkeypatch.setattr(T.Trainer, "save", dies_at_second_best)
    with pytest.raises(KeyboardInterrupt):
        T.Trainer(config, data=tiny).fit()
    monkeypatch.setattr(T.Trainer, "save", real_save)
    out = tmp_path / "run"
    assert T.load_checkpoint(str(out / "last.pt"))["epoch"] == 2
    assert T.load_checkpoint(str(out / "best.pt"))["epoch"] == 1
    resumed = T.resume(str(out), data=tiny)              # nothing left to train: straight to the final test
    assert resumed["test_auc"] == full["test_auc"] and resumed["best_epoch"] == 2
    assert T.load_checkpoint(str(out / "best.pt"))["epoch"] == 2


def test_fit_after_an_interrupt_is_refused_and_stale_temp_files_go(tmp_path, tiny, monkeypatch):
    trainer = T.Trainer(_config(tmp_path, epochs=2), data=tiny)
    real = trainer._train_epoch

    def interrupted():
        raise KeyboardInterrupt

    trainer._train_epoch = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer._train_epoch = real
    with pytest.raises(RuntimeError, match="resume"):
        trainer.fit()
    out = tmp_path / "run"
    (out / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")    # what a kill mid-save leaves
    (out / ".unrelated.tmp").write_bytes(b"not ours")
    T.Trainer(_config(tmp_path, epochs=1), data=tiny, overwrite=True).fit()
    assert _leftover_temp_files(out) == [".unrelated.tmp"]


def test_a_fresh_run_over_another_replaces_it_whole(tmp_path, tiny):
    """overwrite: a fresh run into another run's directory removes that run's checkpoints and results before
    its first epoch. Stopped before its own first checkpoint it leaves nothing a resume could take for it
    (the interrupt carries resume_from None, the CLI's hint); stopped later it names its own checkpoint."""
    T.Trainer(_config(tmp_path, epochs=1), data=tiny).fit()      # the other run: last.pt, best.pt, results.json
    out = tmp_path / "run"
    assert all((out / name).exists() for name in T.RUN_FILES)

    def interrupt_in_epoch(trainer, epoch):
        real, calls = trainer._train_epoch, []

        def train_epoch():
            calls.append(epoch)
            if len(calls) == epoch:
                raise KeyboardInterrupt
            return real()
        trainer._train_epoch = train_epoch
        with pytest.raises(KeyboardInterrupt) as info:
            trainer.fit()
        return info.value

    stopped = interrupt_in_epoch(T.Trainer(_config(tmp_path, model="fwfm"), data=tiny, overwrite=True), 1)
    assert stopped.resume_from is None
    assert not any((out / name).exists() for name in T.RUN_FILES)
    stopped = interrupt_in_epoch(T.Trainer(_config(tmp_path, model="fwfm"), data=tiny, overwrite=True), 2)
    assert stopped.resume_from == str(out)
    assert T.load_checkpoint(str(out / "last.pt"))["config"]["model"] == "fwfm"
    assert not (out / "results.json").exists()
    assert T.resume(str(out), data=tiny)["model"] == "fwfm"


def test_resuming_an_earlier_checkpoint_in_place_never_overwrites_later_epochs(tmp_path, tiny, monkeypatch):
    """--resume RUN/best.pt, when best.pt is older than last.pt, would overwrite the later epochs in place:
    refused, naming both; into another --out it continues from the best epoch."""
    real = T.evaluate_model

    def worse_after_first(model, ids, labels, device, batch_size=16384, name="valid"):
        metrics = real(model, ids, labels, device, batch_size, name)
        if name == "valid" and model.training and len(calls) > 0:
            metrics["AUC"] = 0.0
        calls.append(name)
        return metrics
    calls = []
    monkeypatch.setattr(T, "evaluate_model", worse_after_first)
    T.Trainer(_config(tmp_path, "a", epochs=2, patience=5), data=tiny).fit()
    monkeypatch.undo()
    best, last = tmp_path / "a" / "best.pt", tmp_path / "a" / "last.pt"
    assert T.load_checkpoint(str(best))["epoch"] == 1 and T.load_checkpoint(str(last))["epoch"] == 2
    before = last.read_bytes()
    with pytest.raises(ValueError, match=r"epoch 1\) in its own directory would overwrite .*last.pt \(epoch 2\)"):
        T.resume(str(best), data=tiny, epochs=3)
    assert last.read_bytes() == before
    with pytest.raises(ValueError, match="epochs=1 is fewer than the 2 epochs"):
        T.resume(str(last), data=tiny, epochs=1)
    assert T.resume(str(best), data=tiny, epochs=3, out=str(tmp_path / "b"))["epochs_run"] == 3


def test_a_refused_resume_into_a_new_directory_writes_nothing(tmp_path, tiny):
    """A resume refused by the trainer's checks (here threads=0) copies nothing into its new --out, so that
    the corrected command is not refused as "another run's files"."""
    T.Trainer(_config(tmp_path, "a", epochs=1), data=tiny).fit()
    with pytest.raises(ValueError, match="threads"):
        T.resume(str(tmp_path / "a"), data=tiny, epochs=2, threads=0, out=str(tmp_path / "b"))
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    assert T.resume(str(tmp_path / "a"), data=tiny, epochs=2, out=str(tmp_path / "b"))["epochs_run"] == 2


def test_resume_refuses_an_out_holding_another_runs_results(tmp_path, tiny):
    T.Trainer(_config(tmp_path, "part", epochs=1), data=tiny).fit()
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="results.json"):
        T.resume(str(tmp_path / "part"), data=tiny, epochs=2, out=str(other))
    assert (other / "results.json").read_text() == "{}"


def test_a_config_with_a_module_or_tensor_is_refused_before_training(tmp_path, tiny):
    from sfg_fast.nn import FieldEmbedding
    table = FieldEmbedding(tiny.schema.field_dims, 4)
    with pytest.raises(ValueError, match="'embedding' is a FieldEmbedding"):
        T.Trainer(_config(tmp_path, embedding=table), data=tiny)
    with pytest.raises(ValueError, match="'hidden_units' is a Tensor"):
        T.Trainer(_config(tmp_path, model="deepfm", hidden_units=torch.tensor([4])), data=tiny)
    assert not (tmp_path / "run").exists()


def test_fit_runs_under_deterministic_algorithms_and_restores_the_flag(tmp_path, tiny, monkeypatch):
    seen = []
    real = T.Trainer._train_epoch

    def spy(self):
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled()))
        return real(self)

    monkeypatch.setattr(T.Trainer, "_train_epoch", spy)
    assert not torch.are_deterministic_algorithms_enabled()
    T.Trainer(_config(tmp_path, "a", epochs=1), data=tiny).fit()
    T.Trainer(_config(tmp_path, "b", epochs=1, deterministic=False), data=tiny).fit()
    assert seen == [(True, True), (False, False)]
    assert not torch.are_deterministic_algorithms_enabled()       # the caller's setting comes back
    with pytest.raises(ValueError, match="deterministic"):
        T.Trainer(_config(tmp_path, "c", deterministic="yes"), data=tiny)


def test_fit_keeps_a_callers_strict_deterministic_mode_and_numpy_config_values(tmp_path, tiny):
    seen = []
    trainer = T.Trainer(_config(tmp_path, model="deepfm", hidden_units=np.array([8]), epochs=1), data=tiny)
    real = trainer._train_epoch

    def spy():
        seen.append(torch.is_deterministic_algorithms_warn_only_enabled())
        return real()

    trainer._train_epoch = spy
    torch.use_deterministic_algorithms(True)
    try:
        trainer.fit()
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == [False]
    assert T.load_checkpoint(str(tmp_path / "run"))["config"]["hidden_units"] == [8]


def test_the_feature_map_follows_the_run(tmp_path):
    """A run on files writes its feature map and its digest into every checkpoint; a resume given the same rows
    without vocabularies keeps the file; a fresh run on generated data in the same directory removes it."""
    import dataclasses

    from sfg_fast.data import FEATURE_MAP_FILE, load_feature_map
    from sfg_fast.data.feature_map import feature_map_digest
    from test_data import write_criteo

    write_criteo(tmp_path / "train.txt", num_rows=400)
    data = load_dataset("criteo", data_dir=tmp_path, cache_dir=False, min_count=2)
    config = _config(tmp_path, dataset="criteo", data_dir=str(tmp_path), num_rows=None, epochs=1)
    T.Trainer(config, data=data).fit()
    out = tmp_path / "run"
    fm = load_feature_map(str(out / FEATURE_MAP_FILE), dataset="criteo")
    assert T.load_checkpoint(str(out / "last.pt"))["feature_map_digest"] == feature_map_digest(fm)
    T.resume(str(out), data=dataclasses.replace(data, vocabularies=None), epochs=2)
    assert (out / FEATURE_MAP_FILE).exists()
    assert T.load_checkpoint(str(out / "last.pt"))["feature_map_digest"] == feature_map_digest(fm)
    # resumed into another directory, the run's feature map goes along with best.pt
    moved = tmp_path / "moved"
    T.resume(str(out), data=dataclasses.replace(data, vocabularies=None), epochs=3, out=str(moved))
    assert load_feature_map(str(moved / FEATURE_MAP_FILE)) == fm
    T.Trainer(_config(tmp_path, epochs=1), data=load_dataset("synthetic-criteo", num_rows=3000, seed=7),
              overwrite=True).fit()
    assert not (out / FEATURE_MAP_FILE).exists()


@pytest.mark.parametrize("embedding", ["native", "fused"])
def test_compiled_training_equals_eager_training(tmp_path, tiny, embedding):
    """compile: a backend name compiles the training forward and backward (Dynamo + AOTAutograd with
    "aot_eager": the eager kernels, so the numbers must agree exactly; backend torch, which "auto" takes
    on CPU while compiling); fused tables update inside the graph. Evaluation runs the model itself."""
    extra = {"embedding": embedding, "backend": "torch"} if embedding == "fused" else {"backend": "torch"}
    eager = T.Trainer(_config(tmp_path, "eager", model="fwfm", **extra), data=tiny).fit()
    torch._dynamo.reset()
    compiled = T.Trainer(_config(tmp_path, "compiled", model="fwfm", compile="aot_eager", **extra), data=tiny)
    assert compiled._train_forward is not compiled.model
    results = compiled.fit()
    assert results["config"]["compile"] == "aot_eager"
    assert [h["train_loss"] for h in results["history"]] == [h["train_loss"] for h in eager["history"]]
    assert results["test_auc"] == eager["test_auc"] and results["test_logloss"] == eager["test_logloss"]


@pytest.mark.slow
def test_inductor_training_resumes_exactly(tmp_path, tiny):
    """compile: true (Inductor, C++ kernels on CPU): a resumed run repeats the uninterrupted one bit for bit,
    and its result stays next to eager training (Inductor may reorder float sums)."""
    extra = {"model": "fwfm", "embedding": "fused", "compile": True, "patience": 3}
    full = T.Trainer(_config(tmp_path, "full", epochs=2, **extra), data=tiny).fit()
    T.Trainer(_config(tmp_path, "part", epochs=1, **extra), data=tiny).fit()
    resumed = T.resume(str(tmp_path / "part"), data=tiny, epochs=2)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    assert resumed["test_auc"] == full["test_auc"]
    eager = T.Trainer(_config(tmp_path, "eager", epochs=2, **dict(extra, compile=False)), data=tiny).fit()
    assert full["test_auc"] == pytest.approx(eager["test_auc"], abs=2e-3)


def test_compile_takes_inductor_modes(tmp_path, tiny, monkeypatch):
    """compile: an Inductor mode ("reduce-overhead": CUDA graphs on a GPU) reaches torch.compile as the mode
    of the Inductor backend, and the CUDA-graph modes mark every training step as a new one (the step's
    graph outputs are not read past it). torch.compile is recorded and left out here: Inductor's own
    CUDA graphs need a GPU."""
    calls, marks = [], []
    monkeypatch.setattr(T.torch, "compile", lambda model, **kw: calls.append(kw) or model)
    monkeypatch.setattr(T.torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    trainer = T.Trainer(_config(tmp_path, "ro", model="fwfm", compile="reduce-overhead", batch_size=64),
                        data=tiny)
    assert calls == [{"backend": "inductor", "mode": "reduce-overhead"}]
    results = trainer.fit()
    assert results["config"]["compile"] == "reduce-overhead"
    steps = trainer.step
    assert steps > 1 and len(marks) == steps
    calls.clear()
    T.Trainer(_config(tmp_path, "mx", model="fwfm", compile="max-autotune-no-cudagraphs"), data=tiny)
    assert calls == [{"backend": "inductor", "mode": "max-autotune-no-cudagraphs"}]
    with pytest.raises(ValueError, match="compile: unknown torch.compile backend 'reduce_overhead'"):
        T.Trainer(_config(tmp_path, "bad", compile="reduce_overhead"), data=tiny)


def test_compiled_runs_in_one_process_all_train_compiled(tmp_path, tiny):
    """Every model shares one forward (CTRModel.forward), so the compiled runs of one process (compare)
    share Dynamo's recompile limit of that code (8 graphs), past which Dynamo silently ran the later models
    eagerly. fit() raises the limit while it trains (and restores it): ten model structures, ten compiled."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    for model in ("fm", "fwfm", "fmfm", "deepfm", "ipnn"):
        for generative in (False, True):
            before = counters["stats"]["unique_graphs"]
            config = _config(tmp_path, f"{model}-{generative}", model=model, generative=generative, epochs=1,
                             compile="aot_eager", backend="torch")
            T.Trainer(config, data=tiny).fit()
            assert counters["stats"]["unique_graphs"] > before, (model, generative)
    assert torch._dynamo.config.recompile_limit == limit
    # compile is an execution setting: a compiled run may be resumed eagerly (and the other way round)
    resumed = T.resume(str(tmp_path / "fm-False"), data=tiny, epochs=2, compile=False)
    assert resumed["epochs_run"] == 2 and resumed["config"]["compile"] is False


@pytest.mark.parametrize("monitor", ["logloss", {"AUC": 1, "logloss": -1}])
def test_monitor_picks_the_best_epoch_by_its_score(tmp_path, tiny, monitor):
    """best.pt, the plateau decay and early stopping follow the monitored score: the best epoch is the
    one whose (weighted) validation metrics score highest, recomputed here from the history."""
    # lr 0.05 overfits this data fast: validation AUC peaks at epoch 2, logloss (and AUC - logloss) at epoch 1
    result = T.Trainer(_config(tmp_path, epochs=3, patience=None, lr=0.05, reduce_lr_on_plateau=False,
                               monitor=monitor), data=tiny).fit()
    history = result["history"]
    by_auc = max(range(len(history)), key=lambda i: (history[i]["valid_auc"], -i)) + 1
    weights = {"AUC": 0.0, "logloss": -1.0} if monitor == "logloss" else {"AUC": 1.0, "logloss": -1.0}
    scores = [weights["AUC"] * h["valid_auc"] + weights["logloss"] * h["valid_logloss"] for h in history]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i)) + 1     # the first epoch reaching the max
    assert result["best_epoch"] == best != by_auc          # the data separates the two rules
    running = -float("inf")
    for h, score in zip(history, scores):
        assert h["improved"] == (score > running)
        running = max(running, score)
    assert result["valid_logloss"] == pytest.approx(history[best - 1]["valid_logloss"], abs=1e-12)


def test_monitor_checks(tmp_path, tiny):
    for bad in ("auc", {"AUC": 1, "loss": -1}, {"AUC": 0}, {}, {"AUC": True}):
        with pytest.raises(ValueError, match="monitor must be one of"):
            T.Trainer(_config(tmp_path, "bad", monitor=bad), data=tiny)
    with pytest.raises(ValueError, match="no group field"):
        T.Trainer(_config(tmp_path, "bad2", monitor="gAUC", group_field=False), data=tiny)
    T.Trainer(_config(tmp_path, epochs=1), data=tiny).fit()
    with pytest.raises(ValueError, match="cannot change 'monitor'"):
        T.resume(str(tmp_path / "run"), data=tiny, epochs=2, monitor="logloss")


def _as_written_before(path, keys=("monitor", "text_encoding")):
    """Make a checkpoint look as it was written before ``keys`` (and best_score) existed."""
    ckpt = torch.load(path, weights_only=False)
    ckpt["early_stopping"].pop("best_score", None)
    for key in keys:
        del ckpt["config"][key]
    torch.save(ckpt, path)


def test_a_checkpoint_from_before_monitor_resumes_on_valid_auc(tmp_path, tiny):
    """Checkpoints written before ``monitor`` existed carry best_auc only (and no monitor in their config):
    they resume following the valid AUC, exactly like an uninterrupted run, with the best model (an epoch
    before the last) still recognised as this run's."""
    config = dict(epochs=4, patience=None, lr=0.05, reduce_lr_on_plateau=False)      # overfits: best epoch 2
    whole = T.Trainer(_config(tmp_path, "whole", **config), data=tiny).fit()
    assert whole["best_epoch"] < 3
    T.Trainer(_config(tmp_path, "part", **dict(config, epochs=3)), data=tiny).fit()
    for name in ("last.pt", "best.pt"):
        _as_written_before(tmp_path / "part" / name)
    resumed = T.resume(str(tmp_path / "part"), data=tiny, epochs=4)
    assert resumed["best_epoch"] == whole["best_epoch"] and resumed["test_auc"] == whole["test_auc"]


def test_a_criteo_run_from_before_the_text_encoding_resumes_and_predicts(tmp_path):
    """A run whose checkpoints predate ``text_encoding`` read its files as latin-1: resumed, analysed and
    predicted, it reads them so again, and its feature map (and the digest its checkpoints name) stays."""
    from test_data import write_criteo
    from sfg_fast.data import FEATURE_MAP_FILE
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_criteo(data_dir / "train.txt", num_rows=300)
    out = tmp_path / "run"
    T.train(dict(model="fm", dataset="criteo", data_dir=str(data_dir), cache_dir=False, epochs=1, batch_size=64,
                 embedding_dim=4, out=str(out), verbose=0, threads=1, text_encoding="latin-1"))
    map_before = (out / FEATURE_MAP_FILE).read_bytes()
    assert b"encoding" not in gzip.decompress(map_before)          # latin-1: no record, as maps were
    for name in ("last.pt", "best.pt"):
        _as_written_before(out / name)
    resumed = T.resume(str(out), epochs=2)
    assert resumed["config"]["text_encoding"] == "latin-1"
    assert (out / FEATURE_MAP_FILE).read_bytes() == map_before
    assert T.predict_checkpoint(str(out), out=str(tmp_path / "p"))["rows"] == 300
    T.analyze_checkpoint(str(out), max_samples=50, out=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="text_encoding must be"):
        T.Trainer(_config(tmp_path, "bad", text_encoding="ascii"))


def test_predict_names_a_malformed_line_and_an_int8_model_not_made_yet(tmp_path):
    from test_data import write_criteo
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = write_criteo(data_dir / "train.txt", num_rows=300)
    out = tmp_path / "run"
    T.train(dict(model="fm", dataset="criteo", data_dir=str(data_dir), cache_dir=False, epochs=1, batch_size=64,
                 embedding_dim=4, out=str(out), verbose=0, threads=1))
    new = tmp_path / "new"
    new.mkdir()
    lines = ["\t".join(r) for r in rows[:5]]
    lines[2] = "\t".join(rows[2][:-1])
    (new / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 3: expected 40 columns.*--unlabeled"):
        T.predict_checkpoint(str(out), data_dir=str(new), out=str(tmp_path / "p"))
    with pytest.raises(FileNotFoundError, match="quantize the run first"):
        T.predict_checkpoint(str(out), out=str(tmp_path / "p"), int8=str(out / "serving" / "model-int8.pt"))


def test_resume_of_a_run_that_kept_a_relative_data_dir(tmp_path, tiny, monkeypatch):
    """Runs that stored data_dir as typed (relative) resume with it given again, relative or absolute."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    T.Trainer(_config(tmp_path, epochs=1, data_dir=str(tmp_path / "data")), data=tiny).fit()
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    ckpt["config"]["data_dir"] = "data"
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    T.resume(str(tmp_path / "run"), data=tiny, epochs=1, data_dir="data")


def test_monitoring_a_gauc_no_group_defines_is_a_clear_error(tmp_path, tiny, monkeypatch):
    real = T.evaluate_model

    def no_gauc(*args, **kwargs):
        metrics = real(*args, **kwargs)
        return dict(metrics, gAUC=None)
    monkeypatch.setattr(T, "evaluate_model", no_gauc)
    with pytest.raises(ValueError, match="the validation gAUC is undefined"):
        T.Trainer(_config(tmp_path, epochs=1, monitor="gAUC", group_field="C1"), data=tiny).fit()


def test_checkpoint_config_fills_what_a_config_predates():
    """No monitor and no text_encoding: the run predates both (AUC, latin-1); monitor without text_encoding:
    a run that already read UTF-8; a recorded value stays; data_options may not bypass text_encoding."""
    assert T.checkpoint_config({"config": {}}) == {"monitor": "AUC", "text_encoding": "latin-1"}
    assert T.checkpoint_config({"config": {"monitor": "logloss"}})["text_encoding"] == "utf-8"
    assert T.checkpoint_config({"config": {"text_encoding": "utf-8"}})["text_encoding"] == "utf-8"
    with pytest.raises(ValueError, match="data_options may not set 'encoding'"):
        T.load_data(dict(dataset="criteo", data_dir="unused", data_options={"encoding": "utf-8"}))


def test_an_interrupted_compare_continues_where_it_stopped(tmp_path, monkeypatch):
    """Rerunning the same comparison after an interrupt resumes every run from its checkpoint (a finished
    one only re-evaluates) and ends with the uninterrupted comparison's numbers; --overwrite instead removes
    the interrupted comparison's runs, which no compare.json lists."""
    from sfg_fast.compare import compare
    overrides = dict(dataset="synthetic-criteo", num_rows=3000, data_seed=7, epochs=2, batch_size=512,
                     embedding_dim=4, verbose=0, threads=1)
    kw = dict(seeds=2, overrides=overrides, variants=("sfg",))
    full = compare(["fm"], out=str(tmp_path / "full"), **kw)
    real, calls = T.Trainer._train_epoch, []

    def interrupted_in_the_second_run(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:              # seed 2019's second epoch
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(T.Trainer, "_train_epoch", interrupted_in_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        compare(["fm"], out=str(tmp_path / "part"), **kw)
    monkeypatch.setattr(T.Trainer, "_train_epoch", real)
    assert not (tmp_path / "part" / "fm-sfg-seed2019" / "results.json").exists()
    part = compare(["fm"], out=str(tmp_path / "part"), **kw)
    strip = ("train_seconds", "samples_per_second")
    assert [{k: v for k, v in r.items() if k not in strip + ("out", "config")} for r in part["runs"]] == \
           [{k: v for k, v in r.items() if k not in strip + ("out", "config")} for r in full["runs"]]
    # another comparison's runs in the way: refused before anything trains
    with pytest.raises(ValueError, match="already holds the results of an earlier comparison"):
        compare(["fm"], out=str(tmp_path / "part"), **kw)
    (tmp_path / "part" / "compare.json").unlink()
    with pytest.raises(ValueError, match="fm-sfg-seed2019, a run this comparison does not plan"):
        compare(["fm"], out=str(tmp_path / "part"), **dict(kw, seeds=1))
    with pytest.raises(ValueError, match="cannot continue.*run 2 epochs, more than epochs=1"):
        compare(["fm"], out=str(tmp_path / "part"), **dict(kw, overrides=dict(overrides, epochs=1)))
    with pytest.raises(ValueError, match="cannot continue.*another comparison's run.*'lr'"):
        compare(["fm"], out=str(tmp_path / "part"), **dict(kw, overrides=dict(overrides, lr=0.5)))
    compare(["fm"], out=str(tmp_path / "part"), seeds=1, overrides=overrides, variants=("sfg",), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "part").iterdir() if p.is_dir()) == ["fm-sfg-seed2018"]


def test_a_resume_into_a_new_out_stopped_before_its_first_checkpoint_can_be_retried(tmp_path, tiny, monkeypatch):
    T.Trainer(_config(tmp_path, epochs=1), data=tiny).fit()

    def stop(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(T.Trainer, "_train_epoch", stop)
        with pytest.raises(KeyboardInterrupt):
            T.resume(str(tmp_path / "run"), data=tiny, epochs=2, out=str(tmp_path / "new"))
    assert (tmp_path / "new" / "best.pt").exists()        # copied before training, as the resume needs it
    again = T.resume(str(tmp_path / "run"), data=tiny, epochs=2, out=str(tmp_path / "new"))
    assert again["epochs_run"] == 2
    # a best.pt of another run there is still refused
    T.Trainer(_config(tmp_path, name="other", epochs=1, seed=5), data=tiny).fit()
    (tmp_path / "new2").mkdir()
    (tmp_path / "new2" / "best.pt").write_bytes((tmp_path / "other" / "best.pt").read_bytes())
    with pytest.raises(ValueError, match="already holds a best.pt"):
        T.resume(str(tmp_path / "run"), data=tiny, epochs=2, out=str(tmp_path / "new2"))


def test_a_resume_that_trains_on_drops_the_results_of_the_run_so_far(tmp_path, tiny, monkeypatch):
    T.Trainer(_config(tmp_path, epochs=1), data=tiny).fit()
    assert (tmp_path / "run" / "results.json").exists()

    def stop(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T.Trainer, "_train_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        T.resume(str(tmp_path / "run"), data=tiny, epochs=3)
    # stopped before the new end: no results.json describing a best.pt the new epochs may replace
    assert not (tmp_path / "run" / "results.json").exists()


def test_group_field_may_not_change_on_resume_while_early_stopping_scores_gauc(tmp_path):
    data = load_dataset("movielens100k")
    config = dict(model="fm", dataset="movielens100k", epochs=1, embedding_dim=4, verbose=0, threads=1,
                  monitor="gAUC", out=str(tmp_path / "run"))
    T.Trainer(config, data=data).fit()
    with pytest.raises(ValueError, match="cannot change 'group_field' when resuming.*scores gAUC"):
        T.resume(str(tmp_path / "run"), data=data, epochs=2, group_field="item_id")
    T.Trainer(dict(config, monitor="AUC", out=str(tmp_path / "auc")), data=data).fit()
    assert T.resume(str(tmp_path / "auc"), data=data, epochs=1, group_field="item_id")["group_field"] == "item_id"


def test_a_full_disk_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    """torch.save's zip writer turns a failed write into an unrelated RuntimeError; the atomic writer
    reports the write's own OSError, with the file, and leaves no temp file."""
    import errno
    from sfg_fast import _io
    real_write = _io._WriteErrors.write
    written = []

    def fill_up(self, data):
        written.append(len(data))
        if sum(written) > 1000:
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return real_write(self, data)

    monkeypatch.setattr(_io._WriteErrors, "write", fill_up)
    target = tmp_path / "model.pt"
    with pytest.raises(OSError, match="No space left on device") as caught:
        T.atomic_save({"w": torch.zeros(10000)}, str(target))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert not target.exists() and not _leftover_temp_files(tmp_path)
    monkeypatch.setattr(_io._WriteErrors, "write", real_write)
    import io
    assert isinstance(_io._WriteErrors(io.BytesIO()), io.IOBase)     # a file object to torch.export.save
    # an error reading a source names the source, not the file being written
    with pytest.raises(FileNotFoundError) as caught:
        _io.atomic_write(str(target), lambda fh: fh.write(open(tmp_path / "missing.pt", "rb").read()))
    assert caught.value.filename == str(tmp_path / "missing.pt")


def test_a_real_file_size_limit_is_an_oserror_naming_the_file(tmp_path):
    """The same with the kernel's own refusal (RLIMIT_FSIZE: EFBIG), in a child process."""
    import subprocess
    import sys
    code = ("import resource, sys, torch\nfrom sfg_fast import train as T\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000))\n"
            "try:\n    T.atomic_save({'w': torch.zeros(1000000)}, sys.argv[1])\n"
            "except OSError as exc:\n    print('OSError', exc.errno, exc.filename)\n")
    target = str(tmp_path / "big.pt")
    done = subprocess.run([sys.executable, "-c", code, target], capture_output=True, text=True, timeout=300)
    import errno
    assert done.stdout.split() == ["OSError", str(errno.EFBIG), target], done.stderr[-2000:]
    assert not _leftover_temp_files(tmp_path)


def test_resume_overrides_compare_as_the_checkpoint_stores_them():
    # a checkpoint's config is JSON-like: a tuple given again is the same value, not a change
    T.check_resume_overrides({"hidden_units": [8, 8], "lr": 0.1}, {"hidden_units": (8, 8), "lr": 0.1})
    with pytest.raises(ValueError, match="cannot change 'hidden_units'"):
        T.check_resume_overrides({"hidden_units": [8, 8]}, {"hidden_units": (8, 4)})
