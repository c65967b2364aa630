"""run_distributed_training over 2 gloo ranks: max_steps stop + resume inside an epoch, resume checks,
one rank failing alone; and the option handling of the distributed path (no processes needed)."""
import json
import math
import os
import socket
import sys
import time
from types import SimpleNamespace

import pytest

from sfg_fast.integrations import torchrec_unavailable_reason

_REASON = torchrec_unavailable_reason()
needs_torchrec = pytest.mark.skipif(_REASON is not None, reason=f"TorchRec integration unavailable: {_REASON}")

BASE = dict(model="fm", dataset="synthetic-criteo", num_rows=1200, batch_size=64, embedding_dim=4, epochs=1,
            verbose=0, threads=1, encoder_dropout=0.3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# option handling (no process group)
# ---------------------------------------------------------------------------------------------

def test_cli_accepts_distributed_keys_in_set():
    from sfg_fast.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--distributed", "--model", "fm", "--set", "embedding_lr=0.05",
                                      "--set", "embedding_optimizer=sgd", "--set", "max_steps=3"])
    config = config_from_args(args)
    assert config["embedding_lr"] == 0.05 and config["embedding_optimizer"] == "sgd" and config["max_steps"] == 3
    # without --distributed they configure embedding="fused" tables, and need them
    from sfg_fast import models
    from sfg_fast.train import split_config
    plain = config_from_args(build_parser().parse_args(["train", "--model", "fm", "--set", "embedding_lr=0.05"]))
    with pytest.raises(ValueError, match="embedding_lr.*embedding='fused'"):
        models.build("fm", [3, 4], **split_config(plain)[1])


def test_batch_norm_is_refused_in_distributed_config():
    from sfg_fast.distributed import _split_dist_config

    with pytest.raises(ValueError, match="batch_norm"):
        _split_dist_config({"model": "deepfm", "batch_norm": True})


def test_device_key_is_not_silently_ignored():
    import torch

    from sfg_fast.distributed import _check_trainer_keys

    _check_trainer_keys({"device": "auto"}, torch.device("cpu"))
    _check_trainer_keys({"device": "cpu"}, torch.device("cpu"))
    with pytest.raises(ValueError, match="device"):
        _check_trainer_keys({"device": "cuda"}, torch.device("cpu"))
    _check_trainer_keys({"compile": False}, torch.device("cpu"))
    with pytest.raises(ValueError, match="compile is not supported by distributed runs"):
        _check_trainer_keys({"compile": True}, torch.device("cpu"))


def _plan(sharding_type, column_offsets):
    shards = [SimpleNamespace(shard_offsets=[0, c]) for c in column_offsets]
    spec = SimpleNamespace(shards=shards)
    return SimpleNamespace(plan={"embedding.ebc": {"t_f0": SimpleNamespace(sharding_type=sharding_type,
                                                                            sharding_spec=spec)}})


def test_optimizer_state_layout_mismatch_is_refused():
    from sfg_fast.distributed import _check_table_layout, _table_layout

    tw = _table_layout(_plan("table_wise", [0]), "rowwise_adagrad")
    cw2 = _table_layout(_plan("column_wise", [0, 512]), "rowwise_adagrad")
    cw1 = _table_layout(_plan("column_wise", [0]), "rowwise_adagrad")
    dp = _table_layout(_plan("data_parallel", [0]), "rowwise_adagrad")
    assert cw2["t_f0"]["row_state_shards"] == 2
    _check_table_layout(tw, cw1)  # one column shard: the same per-row state
    _check_table_layout(None, tw)  # old checkpoints carry no layout
    # element-wise state reshards freely
    _check_table_layout(_table_layout(_plan("table_wise", [0]), "adagrad"),
                        _table_layout(_plan("column_wise", [0, 512]), "adagrad"))
    with pytest.raises(ValueError, match="per 1 column shard"):
        _check_table_layout(tw, cw2)
    with pytest.raises(ValueError, match="data_parallel"):
        _check_table_layout(tw, dp)
    with pytest.raises(ValueError, match="embedding_optimizer"):
        _check_table_layout(tw, _table_layout(_plan("table_wise", [0]), "sgd"))


def test_resume_with_another_experiment_is_refused():
    from sfg_fast.distributed import _check_resume

    config = {"seed": 1, "lr": 0.01, "epochs": 2, "max_steps": None, "out": "a", "monitor": "AUC",
              "text_encoding": "utf-8"}
    manifest = {"config": dict(config), "world_size": 2, "data_fingerprint": "abc"}
    _check_resume(manifest, dict(config, epochs=5, max_steps=9, out="b"), 2, "abc", "ckpt")
    # a manifest from before monitor and text_encoding: its run monitored AUC and read latin-1
    old = {"config": {k: v for k, v in config.items() if k not in ("monitor", "text_encoding")}, "world_size": 2,
           "data_fingerprint": "abc"}
    with pytest.raises(ValueError, match="text_encoding: 'latin-1' -> 'utf-8'"):
        _check_resume(old, config, 2, "abc", "ckpt")
    _check_resume(old, dict(config, text_encoding="latin-1"), 2, "abc", "ckpt")
    with pytest.raises(ValueError, match="lr"):
        _check_resume(manifest, dict(config, lr=0.1), 2, "abc", "ckpt")
    with pytest.raises(ValueError, match="on 3 ranks"):
        _check_resume(manifest, config, 3, "abc", "ckpt")
    with pytest.raises(ValueError, match="dataset differs"):
        _check_resume(manifest, config, 2, "xyz", "ckpt")


# ---------------------------------------------------------------------------------------------
# whole runs
# ---------------------------------------------------------------------------------------------

def _runs_worker(rank, ports, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2")
    from sfg_fast import distributed as D

    cache = os.path.join(out_dir, "cache")
    report = {}

    def run(name, port, **cfg):
        os.environ["MASTER_PORT"] = str(port)
        try:
            report[name] = D.run_distributed_training(dict(BASE, cache_dir=cache, **cfg))
        except (ValueError, FileExistsError) as exc:
            report[name] = {"error": str(exc)}

    run("full", ports[0], out=os.path.join(out_dir, "full"))
    part = os.path.join(out_dir, "part")
    run("part", ports[1], out=part, max_steps=3)
    with open(os.path.join(part, "checkpoint", "manifest.json")) as fh:
        report["part_manifest"] = json.load(fh)
    run("other_lr", ports[2], out=part, lr=0.05, resume=os.path.join(part, "checkpoint"))
    run("resumed", ports[3], out=part, resume=os.path.join(part, "checkpoint"))
    run("again", ports[4], out=os.path.join(out_dir, "full"))      # a second fresh run into a finished one
    if rank == 0:
        import torch

        torch.save(report, os.path.join(out_dir, "report.pt"))


@needs_torchrec
@pytest.mark.slow
def test_max_steps_stop_and_resume_equals_uninterrupted(tmp_path):
    """Stopped by max_steps inside an epoch, resumed: the same steps, losses and AUCs, bit for bit (dropout
    included: its masks come from (seed, rank, step)); a resume with another lr is refused."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_runs_worker, args=([_free_port() for _ in range(5)], str(tmp_path)), nprocs=2, join=True)
    report = torch.load(tmp_path / "report.pt", weights_only=False)
    full, part, resumed = report["full"], report["part"], report["resumed"]
    steps = full["steps"]
    assert steps > 3 and full["epochs_run"] == 1
    assert part["steps"] == 3 and part["epochs_run"] == 0 and part["history"] == []
    assert report["part_manifest"]["epoch"] == 0 and report["part_manifest"]["epoch_step"] == 3
    assert "cannot resume" in report["other_lr"]["error"] and "lr" in report["other_lr"]["error"]
    assert resumed["steps"] == steps and resumed["epochs_run"] == 1
    assert resumed["history"] == full["history"]
    assert resumed["test_auc"] == full["test_auc"] and resumed["test_logloss"] == full["test_logloss"]
    assert math.isfinite(full["history"][0]["train_loss"])
    assert "already holds a run" in report["again"]["error"]
    assert json.loads((tmp_path / "full" / "results.json").read_text())["test_auc"] == full["test_auc"]


def _raising_worker(rank, port, out_dir, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from sfg_fast import distributed as D

    if rank == 1:  # rank 1 fails alone (as a bounds IndexError would) while rank 0 is in a collective
        real = D.ShardedModel.train_step

        def train_step(self, ids, labels):
            if self.step == 2:
                raise IndexError("simulated bad id on rank 1")
            return real(self, ids, labels)

        D.ShardedModel.train_step = train_step
    try:
        D.run_distributed_training(dict(BASE, cache_dir=os.path.join(out_dir, "cache"), out=os.path.join(out_dir, "r")))
        queue.put((rank, "finished"))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, type(exc).__name__))


@needs_torchrec
@pytest.mark.slow
def test_one_rank_failing_does_not_hang_the_others(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_raising_worker, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + 120
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.time()))
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not any(alive), "a rank hung after another rank raised"
    outcomes = dict(queue.get(timeout=5) for _ in range(2))
    assert outcomes[1] == "IndexError"
    assert outcomes[0] != "finished"  # its collective failed instead of waiting forever


def _plateau_worker(rank, ports, out_dir):
    """Validation AUC scripted to fall after epoch 1, so the plateau decays the rates at epochs 2, 3 and 4."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2")
    from sfg_fast import distributed as D

    real = D.distributed_auc

    def falling(session, ids, labels, batch_size=16384, name="valid"):
        metrics = real(session, ids, labels, batch_size, name)
        if name == "valid":
            metrics["AUC"] = 0.9 - 0.1 * len(calls)
            calls.append(1)
        inside.append(torch.are_deterministic_algorithms_enabled())
        return metrics
    import torch
    inside = []
    calls = []
    D.distributed_auc = falling
    cache, report = os.path.join(out_dir, "cache"), {}
    config = dict(BASE, cache_dir=cache, encoder_dropout=0.0, reduce_lr_on_plateau=True, patience=None,
                  lr_decay_factor=0.5, embedding_lr=0.08)
    os.environ["MASTER_PORT"] = str(ports[0])
    report["full"] = D.run_distributed_training(dict(config, epochs=4, out=os.path.join(out_dir, "full")))
    # deterministic (the default) holds inside the run, as in the single-process trainer, and is undone after
    report["deterministic"] = (all(inside) and bool(inside), torch.are_deterministic_algorithms_enabled())
    calls.clear()
    part = os.path.join(out_dir, "part")
    os.environ["MASTER_PORT"] = str(ports[1])
    D.run_distributed_training(dict(config, epochs=3, out=part))
    manifest_path = os.path.join(part, "checkpoint", "manifest.json")
    with open(manifest_path) as fh:
        report["manifest"] = json.load(fh)
    # per-group rates that do not line up with this plan's groups (as after a change of sharding): the
    # resume must take the rates from the decay count, not from these
    spoiled = dict(report["manifest"], lrs=[1.0] * len(report["manifest"]["lrs"]))
    tmp = f"{manifest_path}.{rank}.tmp"
    with open(tmp, "w") as fh:
        json.dump(spoiled, fh)
    os.replace(tmp, manifest_path)      # both ranks write the same content; either copy is the one read
    os.environ["MASTER_PORT"] = str(ports[2])
    report["resumed"] = D.run_distributed_training(dict(config, epochs=4, out=part,
                                                        resume=os.path.join(part, "checkpoint")))
    if rank == 0:
        import torch

        torch.save(report, os.path.join(out_dir, "report.pt"))


@needs_torchrec
@pytest.mark.slow
def test_plateau_decays_survive_a_resume(tmp_path):
    """The manifest counts the plateau's decays; a resume replays them on every optimizer group's starting
    rate (right for any plan, where saved per-group rates may not line up) and continues exactly: the
    same rates and history as the uninterrupted run. Two decays before the resume: the fused tables' kernels
    must use the replayed rate from the resumed run's first step (TorchRec hands a group's rate to them only
    in zero_grad / step), where one decay happened to land on the same rate either way."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_plateau_worker, args=([_free_port() for _ in range(3)], str(tmp_path)), nprocs=2, join=True)
    report = torch.load(tmp_path / "report.pt", weights_only=False)
    full, resumed = report["full"], report["resumed"]
    assert report["deterministic"] == (True, False)
    assert report["manifest"]["lr_decays"] == 2                 # epochs 2 and 3 fell below epoch 1
    assert [h["embedding_lr"] for h in full["history"]] == pytest.approx([0.08, 0.08, 0.04, 0.02])
    assert resumed["history"] == full["history"]
    assert resumed["test_auc"] == full["test_auc"]
