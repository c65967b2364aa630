"""Sharded (TorchRec DistributedModelParallel, 2 gloo ranks) vs unsharded single-process training.

One spawn of two real processes runs every scenario (the imports and the process group dominate
the cost); rank 0 writes what it observed and the tests below compare it with an unsharded
reference computed here, in the test process, from the same seed and the same global batch.
"""
import os
import socket

import pytest
import torch

from sfg_fast.integrations import torchrec_unavailable_reason

_REASON = torchrec_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"TorchRec integration unavailable: {_REASON}")

WORLD = 2
FIELD_DIMS = [7, 5, 9, 4]
DIM = 8
LOCAL_BATCH = 4
LR = 0.1
MODEL = dict(name="deepfm", hidden_units=(8,))


def _global_batch(seed: int, rows: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, d, (rows,), generator=gen) for d in FIELD_DIMS], dim=1)
    labels = torch.randint(0, 2, (rows,), generator=gen).float()
    return ids, labels


def _build(embedding: str, seed: int = 11):
    """The test model; the TorchRec twin carries exactly the native model's weights."""
    from sfg_fast import models

    torch.manual_seed(seed)
    native = models.build(MODEL["name"], FIELD_DIMS, DIM, hidden_units=MODEL["hidden_units"])
    # identity-started SFG layers would hide sharding bugs behind symmetric values: perturb them
    with torch.no_grad():
        for p in native.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if embedding == "native":
        return native
    from sfg_fast.integrations.torchrec import convert_native_state_dict

    model = models.build(MODEL["name"], FIELD_DIMS, DIM, hidden_units=MODEL["hidden_units"], embedding=embedding)
    model.load_state_dict(convert_native_state_dict(native.state_dict(), model))
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from sfg_fast import distributed as D

    D.init_distributed("gloo")
    lo, hi = rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH
    report = {}
    for sharding in ("table_wise", "column_wise", "data_parallel"):
        session = D.shard_model(_build("torchrec"), sharding=sharding, embedding_optimizer="sgd", embedding_lr=LR,
                                dense_optimizer=lambda params: torch.optim.SGD(params, lr=LR))
        for step in range(2):
            ids, labels = _global_batch(100 + step, WORLD * LOCAL_BATCH)
            session.train_step(ids[lo:hi], labels[lo:hi])
        eval_ids, _ = _global_batch(200, WORLD * LOCAL_BATCH)
        preds = D.gather_to_all(session.predict(eval_ids[lo:hi]))
        state = session.full_state_dict(dst=0)
        report[sharding] = {"preds": preds, "state": state, "plan": str(session.plan),
                            "global_loss": session.last_loss_sum / session.last_rows}
        session.close()

    # data-parallel tables must be stepped by the requested table optimizer (here row-wise Adagrad),
    # exactly like the fused one of a table-wise plan, not by the dense optimizer
    for sharding in ("table_wise", "data_parallel"):
        session = D.shard_model(_build("torchrec"), sharding=sharding, embedding_optimizer="rowwise_adagrad",
                                embedding_lr=LR, dense_optimizer=lambda params: torch.optim.SGD(params, lr=LR))
        for step in range(2):
            ids, labels = _global_batch(100 + step, WORLD * LOCAL_BATCH)
            session.train_step(ids[lo:hi], labels[lo:hi])
        dense_keys = list(session.optimizer.optimizers[-1][1].params)
        report["rowwise_" + sharding] = {"state": session.full_state_dict(dst=0), "dense_keys": dense_keys}
        session.close()

    # clip_grad_norm clips the dense (DDP) gradients
    session = D.shard_model(_build("torchrec"), sharding="table_wise", embedding_optimizer="sgd", embedding_lr=LR,
                            dense_optimizer=lambda params: torch.optim.SGD(params, lr=LR), clip_grad_norm=1e-3)
    ids, labels = _global_batch(100, WORLD * LOCAL_BATCH)
    session.train_step(ids[lo:hi], labels[lo:hi])
    report["clipped"] = session.full_state_dict(dst=0)
    # a non-finite loss on ONE rank raises on every rank, before any parameter moves
    before = session.full_state_dict(dst=None)
    real_bce = D.SF.bce_with_logits
    if rank == 1:  # rank 1's loss (only) becomes NaN
        D.SF.bce_with_logits = lambda *args, **kwargs: real_bce(*args, **kwargs) * float("nan")
    try:
        session.train_step(ids[lo:hi], labels[lo:hi])
        report["nan"] = "no error"
    except FloatingPointError as exc:
        report["nan"] = str(exc)
    finally:
        D.SF.bce_with_logits = real_bce
    after = session.full_state_dict(dst=None)
    report["nan_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    session.close()

    # dropout: every rank draws its own masks, reproducibly from (seed, rank, step)
    from sfg_fast import models

    torch.manual_seed(5)
    dropped = D.shard_model(models.build("deepfm", FIELD_DIMS, DIM, hidden_units=(8,), dropout=0.5,
                                         embedding="torchrec"), sharding="table_wise", embedding_optimizer="sgd",
                            embedding_lr=LR)
    ids, _ = _global_batch(100, LOCAL_BATCH)  # the same rows on both ranks
    dropped.dmp.train()
    outs = []
    for _ in range(2):
        D._seed_step(3, rank, 7)
        with torch.no_grad():
            outs.append(D.gather_to_all(dropped.dmp(ids)))
    report["dropout"] = outs
    dropped.close()

    # refused up front, naming the argument: adam on CPU, batch norm
    refusals = {}
    try:
        D.shard_model(_build("torchrec"), embedding_optimizer="adam")
    except ValueError as exc:
        refusals["adam"] = str(exc)
    try:
        D.shard_model(models.build("deepfm", FIELD_DIMS, DIM, hidden_units=(8,), batch_norm=True,
                                   embedding="torchrec"))
    except ValueError as exc:
        refusals["batch_norm"] = str(exc)
    report["refusals"] = refusals

    # resume: run 1 step, checkpoint, run a second step; a fresh (differently initialised) model loads
    # the checkpoint and runs the same second step: the states must agree, optimizer moments included.
    ckpt = os.path.join(out_dir, "ckpt")
    batches = [_global_batch(300 + step, WORLD * LOCAL_BATCH) for step in range(2)]
    first = D.shard_model(_build("torchrec"), sharding="table_wise", embedding_optimizer="rowwise_adagrad",
                          embedding_lr=LR, dense_lr=0.01)
    first.save(ckpt, {"note": "before any step"})  # replaced below: a second save into the folder
    first.train_step(batches[0][0][lo:hi], batches[0][1][lo:hi])
    first.save(ckpt, {"note": "after one step"})
    committed = sorted(os.listdir(ckpt))
    first.train_step(batches[1][0][lo:hi], batches[1][1][lo:hi])
    # a save killed after writing its shards but before the commit must leave the step-1 checkpoint
    # intact: the resume below has to reproduce step 2 from it exactly
    real_commit = D._commit_checkpoint

    def die(path, info):
        raise RuntimeError("killed before the commit")

    D._commit_checkpoint = die
    try:
        first.save(ckpt, {"note": "torn"})
    except RuntimeError:
        pass
    D._commit_checkpoint = real_commit
    torn = sorted(os.listdir(ckpt))
    uninterrupted = first.full_state_dict(dst=0)
    first.close()
    second = D.shard_model(_build("torchrec", seed=99), sharding="table_wise", embedding_optimizer="rowwise_adagrad",
                           embedding_lr=LR, dense_lr=0.01)
    before = second.full_state_dict(dst=0)
    manifest = second.load(ckpt)
    second.train_step(batches[1][0][lo:hi], batches[1][1][lo:hi])
    # a table-wise checkpoint cannot be loaded into data-parallel tables (other optimizer state layout)
    dp = D.shard_model(_build("torchrec"), sharding="data_parallel", embedding_optimizer="rowwise_adagrad",
                       embedding_lr=LR, dense_lr=0.01)
    try:
        dp.load(ckpt)
        report["dp_load"] = "loaded"
    except ValueError as exc:
        report["dp_load"] = str(exc)
    dp.close()
    report["resume"] = {"uninterrupted": uninterrupted, "resumed": second.full_state_dict(dst=0),
                        "fresh": before, "manifest": manifest, "step": second.step,
                        "committed_files": committed, "torn_files": torn}

    # distributed evaluation over an odd-sized split: every row scored once, AUC over the whole set
    eval_ids, eval_labels = _global_batch(400, 23)
    eval_labels[:2] = torch.tensor([0.0, 1.0])
    report["auc"] = D.distributed_auc(second, eval_ids, eval_labels, batch_size=5)
    # gAUC grouped by field 1's ids, its id 0 standing in for the OOV id that is left out
    report["gauc"] = D.distributed_auc(second, eval_ids, eval_labels, batch_size=5, group_column=1, group_exclude=0)
    report["auc_state"] = second.full_state_dict(dst=0)
    second.close(destroy=True)
    if rank == 0:
        torch.save(report, os.path.join(out_dir, "report.pt"))
    assert not dist.is_initialized()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import torch.multiprocessing as mp

    out_dir = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    return torch.load(os.path.join(out_dir, "report.pt"), weights_only=False)


def _reference():
    """Unsharded native model, two SGD steps on the mean loss over the global batch."""
    from sfg_fast import functional as SF
    from sfg_fast.integrations.torchrec import convert_native_state_dict

    model = _build("native")
    for step in range(2):
        ids, labels = _global_batch(100 + step, WORLD * LOCAL_BATCH)
        model.zero_grad()
        SF.bce_with_logits(model(ids), labels).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    eval_ids, _ = _global_batch(200, WORLD * LOCAL_BATCH)
    with torch.no_grad():
        preds = model(eval_ids)
    return preds, convert_native_state_dict(model.state_dict(), _build("torchrec"))


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "data_parallel"])
def test_sharded_step_matches_unsharded_reference(report, sharding):
    from sfg_fast.integrations.torchrec import convert_native_state_dict

    preds, state = _reference()
    got = report[sharding]
    assert set(got["state"]) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(got["preds"], preds, rtol=1e-5, atol=1e-6)
    # the steps must have moved every table (embedding and first-order), else equality proves little
    start = convert_native_state_dict(_build("native").state_dict(), _build("torchrec"))
    moved = [k for k in state if "embedding_bags" in k and not torch.equal(start[k], state[k])]
    assert len(moved) == 2 * len(FIELD_DIMS), moved


@pytest.mark.slow
def test_each_plan_uses_the_requested_sharding_type(report):
    for sharding in ("table_wise", "column_wise", "data_parallel"):
        plan = report[sharding]["plan"]
        assert sharding in plan
        assert not any(other in plan for other in ("table_wise", "column_wise", "data_parallel", "row_wise")
                       if other != sharding), plan


@pytest.mark.slow
def test_resume_continues_exactly(report):
    res = report["resume"]
    assert res["manifest"]["step"] == 1 and res["manifest"]["note"] == "after one step"
    assert res["step"] == 2
    # the fresh model differs from the checkpoint, so equality below comes from loading it
    assert any(not torch.equal(res["fresh"][k], res["uninterrupted"][k]) for k in res["fresh"])
    for key, value in res["uninterrupted"].items():
        torch.testing.assert_close(res["resumed"][key], value, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
def test_checkpoint_save_commits_atomically(report):
    res = report["resume"]
    shards = res["manifest"]["shards"]
    # the second save replaced the first: one manifest and the one shards folder it names
    assert res["committed_files"] == ["manifest.json", shards]
    # the interrupted save left its folder behind, but the manifest still names the step-1 shards
    extra = [f for f in res["torn_files"] if f not in res["committed_files"]]
    assert len(extra) == 1 and extra[0].startswith("shards-") and extra[0] != shards


@pytest.mark.slow
def test_distributed_auc_covers_the_whole_split(report):
    from sklearn.metrics import roc_auc_score

    model = _build("torchrec")
    model.load_state_dict(report["auc_state"])
    ids, labels = _global_batch(400, 23)
    labels[:2] = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        probs = torch.sigmoid(model(ids).double())
    expected = roc_auc_score(labels.numpy(), probs.numpy())
    assert report["auc"]["AUC"] == pytest.approx(expected, abs=1e-6)
    # gAUC over the gathered logits, as a single-process run computes it from its own logits
    from sfg_fast.train import logit_metrics
    with torch.no_grad():
        single = logit_metrics(model(ids).double(), labels, ids, "valid", group_column=1, group_exclude=0)
    assert "gAUC" not in report["auc"]
    for key in ("AUC", "gAUC"):
        assert report["gauc"][key] == pytest.approx(single[key], abs=1e-6)
    assert report["gauc"]["gAUC_groups"] == single["gAUC_groups"] > 1
    assert report["gauc"]["gAUC_excluded_rows"] == single["gAUC_excluded_rows"] > 0


@pytest.mark.slow
def test_cli_distributed_trains_checkpoints_and_resumes(tmp_path):
    """``sfg-fast train --distributed`` under torchrun: 2 gloo ranks, then a resume for one more epoch."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
            "-m", "sfg_fast", "train", "--distributed", "--model", "fm", "--dataset", "synthetic-criteo",
            "--num-rows", "3000", "--batch-size", "256", "--embedding-dim", "4", "--out", str(out), "--quiet",
            "--cache-dir", str(tmp_path / "cache"), "--set", "group_field=C1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(base + ["--epochs", "1"], capture_output=True, text=True, timeout=240, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_run"] == 1 and results["backend"] == "gloo"
    assert 0.0 < results["test_auc"] < 1.0 and results["steps"] >= 1
    # gAUC by a named field, as single-process runs report it
    assert results["group_field"] == "C1" and 0.0 < results["test_gauc"] < 1.0 and results["test_gauc_groups"] > 1
    assert 0.0 < results["history"][0]["valid_gauc"] < 1.0
    # the final model's validation at the top, under the single-process trainer's keys
    for key in ("valid_auc", "valid_logloss", "valid_gauc"):
        assert results[key] == results["history"][-1][key]
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["step"] == results["steps"] and manifest["world_size"] == 2
    second = subprocess.run(base + ["--epochs", "2", "--resume", str(out / "checkpoint")], capture_output=True,
                            text=True, timeout=240, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["epochs_run"] == 2 and resumed["steps"] == 2 * results["steps"]
    assert resumed["history"][0] == results["history"][0]  # the first epoch came from the checkpoint


@pytest.mark.slow
def test_data_parallel_tables_use_the_table_optimizer(report):
    """Data-parallel tables are stepped by embedding_optimizer at embedding_lr (not the dense optimizer):
    row-wise Adagrad on replicated tables gives what the fused row-wise Adagrad of a table-wise plan gives."""
    tw, dp = report["rowwise_table_wise"], report["rowwise_data_parallel"]
    assert not any("embedding_bags" in k for k in dp["dense_keys"]), dp["dense_keys"]
    for key, value in tw["state"].items():
        torch.testing.assert_close(dp["state"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
def test_table_wise_checkpoint_is_refused_under_data_parallel(report):
    assert "data_parallel" in report["dp_load"] and "cannot load" in report["dp_load"], report["dp_load"]


@pytest.mark.slow
def test_train_step_reports_the_global_mean_loss(report):
    from sfg_fast import functional as SF

    model = _build("native")
    ids, labels = _global_batch(101, WORLD * LOCAL_BATCH)
    # the second step's loss (the reference's state before its second step)
    model.zero_grad()
    first_ids, first_labels = _global_batch(100, WORLD * LOCAL_BATCH)
    SF.bce_with_logits(model(first_ids), first_labels).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
        expected = float(SF.bce_with_logits(model(ids), labels))
    assert report["table_wise"]["global_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_clip_grad_norm_clips_the_dense_gradients(report):
    from sfg_fast.integrations.torchrec import convert_native_state_dict

    start = convert_native_state_dict(_build("native").state_dict(), _build("torchrec"))
    dense = [k for k in start if "embedding_bags" not in k and start[k].is_floating_point()]
    assert dense
    squared = sum(float(((report["clipped"][k] - start[k]) ** 2).sum()) for k in dense)
    assert 0 < squared ** 0.5 <= LR * 1e-3 * 1.001  # the step of SGD(lr) on a gradient of norm <= 1e-3


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_raises_on_every_rank(report):
    assert "rank(s) [1]" in report["nan"], report["nan"]  # seen by rank 0, whose own loss was finite
    assert report["nan_unchanged"]


@pytest.mark.slow
def test_dropout_masks_differ_per_rank_and_are_reproducible(report):
    first, second = report["dropout"]
    assert torch.equal(first, second)
    assert not torch.equal(first[:LOCAL_BATCH], first[LOCAL_BATCH:])


@pytest.mark.slow
def test_unsupported_options_are_refused_up_front(report):
    assert "embedding_optimizer='adam'" in report["refusals"]["adam"] and "cpu" in report["refusals"]["adam"]
    assert "batch_norm" in report["refusals"]["batch_norm"]


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo"])
def test_gathers_run_where_the_group_has_a_backend(backend, monkeypatch):
    """The gathered logits (and full tables) travel on the device the group's backend map names: the CPU
    when it has a CPU backend (gloo; init_distributed's "cpu:gloo,cuda:nccl" on GPUs, since NCCL refuses
    CPU tensors); an NCCL-only group would gather on the current CUDA device (GPU only, not run here)."""
    import torch.distributed as dist

    from sfg_fast import distributed as D
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend=backend, rank=0, world_size=1)
    try:
        assert D.collective_device() == torch.device("cpu")
        assert torch.equal(D.gather_to_all(torch.arange(5.0).view(5, 1)), torch.arange(5.0))
    finally:
        dist.destroy_process_group()
