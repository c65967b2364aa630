"""gAUC (sfg_fast.metrics.group_auc) against per-group sklearn AUCs, and its place in the training job."""
import numpy as np
import torch
import pytest
from sklearn.metrics import roc_auc_score

from sfg_fast.metrics import group_auc


def _loop_gauc(y, s, g):
    num = den = count = 0
    for key in np.unique(g):
        m = g == key
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * roc_auc_score(y[m], s[m])
            den += m.sum()
            count += 1
    return num / den, count


@pytest.mark.parametrize("ties", [False, True])
def test_group_auc_equals_the_weighted_mean_of_per_group_aucs(ties):
    rng = np.random.default_rng(3)
    n = 4000
    g = rng.integers(0, 250, n) * 7 - 500            # negative and sparse group keys
    y = (rng.random(n) < 0.3).astype(np.float64)
    s = rng.normal(size=n) + 0.6 * y
    if ties:
        s = np.round(s, 1)                            # many tied scores inside groups
    got, count = group_auc(y, s, g)
    want, want_count = _loop_gauc(y, s, g)
    assert count == want_count and abs(got - want) < 1e-12


def test_single_class_groups_are_skipped_and_none_when_no_group_counts():
    y = np.array([1, 0, 1, 1, 0, 0])
    s = np.array([0.9, 0.1, 0.3, 0.2, 0.5, 0.4])
    g = np.array([0, 0, 1, 1, 2, 2])                  # only group 0 holds both classes
    assert group_auc(y, s, g) == (1.0, 1)
    assert group_auc(y, s, np.array([0, 1, 2, 3, 4, 5])) == (None, 0)
    assert group_auc([], [], []) == (None, 0)


def test_an_excluded_group_is_left_out():
    """exclude (the OOV id of the group field) drops its samples, as if they were not there."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    scores = rng.normal(size=400)
    groups = rng.integers(0, 6, 400)
    keep = groups != 5
    assert group_auc(labels, scores, groups, exclude=5) == group_auc(labels[keep], scores[keep], groups[keep])
    assert group_auc(labels, scores, groups, exclude=5) != group_auc(labels, scores, groups)
    assert group_auc(labels, scores, groups, exclude=7) == group_auc(labels, scores, groups)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one value per sample"):
        group_auc([1, 0], [0.1, 0.2, 0.3], [0, 0])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        group_auc([1, 0.5], [0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="scores must be finite"):
        group_auc([1, 0], [0.1, float("nan")], [0, 0])


def test_training_reports_gauc_for_a_group_field(tmp_path):
    from sfg_fast import train as T
    from sfg_fast.compare import format_table
    from sfg_fast.data import load_dataset
    data = load_dataset("synthetic-criteo", num_rows=3000, seed=7)
    config = dict(model="fm", dataset="synthetic-criteo", num_rows=3000, data_seed=7, embedding_dim=4, epochs=1,
                  batch_size=256, seed=11, verbose=0, threads=1, out=str(tmp_path / "run"), group_field="C1")
    result = T.train(config, data=data)
    column = data.schema.field_names.index("C1")
    ids, labels = T._split_tensors(data.test, "test")
    model = T.Trainer(dict(config, out=str(tmp_path / "probe")), data=data).model
    model.load_state_dict(T.load_checkpoint(str(tmp_path / "run" / "best.pt"))["model_state"])
    oov = data.schema.oov_ids[column]
    metrics = T.evaluate_model(model, ids, labels, T._resolve_device("cpu"), name="test", group_column=column,
                               group_exclude=oov)
    assert result["group_field"] == "C1" and result["test_gauc"] == metrics["gAUC"]
    # rows of the field's OOV id (every rare or unseen value at once) are no group of their own
    assert result["test_gauc_excluded_rows"] == int((ids[:, column] == oov).sum())
    assert 0 < result["test_gauc"] < 1 and result["test_gauc_groups"] > 1
    assert "valid_gauc" in result["history"][0]
    with pytest.raises(ValueError, match="group_field 'user' is not a field"):
        T.train(dict(config, group_field="user", out=str(tmp_path / "bad")), data=data)
    summary = {"results": {"fm": {"sfg": {"n": 1, "test_auc": {"mean": 0.7, "std": 0.0},
                                          "test_logloss": {"mean": 0.5, "std": 0.0},
                                          "test_gauc": {"mean": 0.61, "std": 0.01},
                                          "best_epoch": {"mean": 1.0}, "train_seconds": {"mean": 1.0},
                                          "samples_per_second": {"mean": 10.0}, "num_parameters": 5}}}}
    table = format_table(summary)
    assert "test gAUC" in table and "0.61000 ± 0.01000" in table


def test_movielens_reports_per_user_gauc_by_default_and_group_field_false_turns_it_off(tmp_path):
    from sfg_fast import train as T
    from sfg_fast.data import load_dataset
    data = load_dataset("movielens100k")
    config = dict(model="fm", dataset="movielens100k", embedding_dim=4, epochs=1, batch_size=4096, verbose=0,
                  threads=1, out=str(tmp_path / "ml"))
    result = T.train(config, data=data)
    assert result["group_field"] == "user_id" and 0.5 < result["test_gauc"] < 1
    assert result["test_gauc_groups"] > 100                   # users with both a click and a non-click in test
    off = T.train(dict(config, group_field=False, out=str(tmp_path / "off")), data=data)
    assert "test_gauc" not in off and "group_field" not in off
    with pytest.raises(ValueError, match="group_field must be a field name"):
        T.train(dict(config, group_field=3, out=str(tmp_path / "bad")), data=data)


def test_shapes_must_agree_and_tensors_of_any_dtype_are_read():
    with pytest.raises(ValueError, match="one value per sample"):       # [2, 3] against [6]: no re-pairing
        group_auc(np.array([0, 1, 1, 0, 1, 0]).reshape(2, 3), [.1, .9, .3, .4, .8, .2], [1, 1, 1, 2, 2, 2])
    scores = torch.tensor([.1, .9, .3, .4]).bfloat16().requires_grad_()
    got = group_auc(torch.tensor([0, 1, 1, 0]), scores, torch.tensor([1, 1, 2, 2]))
    assert got == group_auc([0, 1, 1, 0], [.1, .9, .3, .4], [1, 1, 2, 2]) == (0.5, 2)
    assert group_auc(np.array([[0], [1]]), np.array([[.1], [.9]]), np.array([[1], [1]])) == (1.0, 1)
    assert group_auc(np.array([0, 1]), np.array([[.1], [.9]]), np.array([1, 1])) == (1.0, 1)     # [n] with [n, 1]
