"""Scores with bootstrap intervals: the same numbers as scikit-learn and torchmetrics on the same
predictions, intervals that cover the truth as often as they claim, pooling that equals scoring the union."""

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from torchmetrics.functional.classification import multiclass_calibration_error

from fedmed.evaluation import Scores, pool, score
from fedmed.evaluation.bootstrap import stratified_indices

CLASSES = ["akiec", "bcc", "bkl", "df", "mel"]


def predictions(n: int, k: int, seed: int, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.choice(k, size=n, p=np.linspace(1, 3, k) / np.linspace(1, 3, k).sum())
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    logits[:, 0] -= 3  # class 0 is rarely predicted: precision's zero division shows up
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True), y


def test_every_metric_equals_scikit_learn_and_the_calibration_error_torchmetrics():
    probs, y = predictions(700, 5, seed=1)
    pred = probs.argmax(1)
    s = score(probs, y, CLASSES, "site", n_boot=200, seed=3)
    m = {k: v["value"] for k, v in s.summary().items()}
    np.testing.assert_array_equal(s.confmat[0], confusion_matrix(y, pred, labels=range(5)))
    assert m["acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)
    prec = precision_score(y, pred, average=None, labels=range(5), zero_division=0)
    rec = recall_score(y, pred, average=None, labels=range(5))
    f1 = f1_score(y, pred, average=None, labels=range(5), zero_division=0)
    for c, name in enumerate(CLASSES):
        assert m[f"precision_{name}"] == pytest.approx(prec[c], abs=1e-12)
        assert m[f"recall_{name}"] == pytest.approx(rec[c], abs=1e-12)
        assert m[f"f1_{name}"] == pytest.approx(f1[c], abs=1e-12)
        assert m[f"auroc_{name}"] == pytest.approx(roc_auc_score(y == c, probs[:, c]), abs=1e-12)
    ece = multiclass_calibration_error(torch.as_tensor(probs), torch.as_tensor(y), 5, n_bins=15, norm="l1")
    assert m["ece"] == pytest.approx(float(ece), abs=1e-6)
    assert (pred == 0).sum() < 5  # the rare class really is (almost) never predicted


def test_every_bootstrap_replicate_keeps_the_class_counts_and_is_scored_like_the_data():
    probs, y = predictions(300, 5, seed=2)
    rows = stratified_indices(y, 50, seed=0)
    assert all((np.bincount(y[r], minlength=5) == np.bincount(y, minlength=5)).all() for r in rows)
    s = score(probs, y, CLASSES, "site", n_boot=50, seed=0)
    b = 17  # replicate b is the score of its resample
    again = score(probs[rows[b - 1]], y[rows[b - 1]], CLASSES, "resample", n_boot=100)
    np.testing.assert_array_equal(s.confmat[b], again.confmat[0])
    np.testing.assert_allclose(s.auroc[b], again.auroc[0])
    np.testing.assert_allclose(s.calibration[b], again.calibration[0])


def test_the_95_percent_interval_covers_the_true_balanced_accuracy_about_95_percent_of_the_time():
    """A known answer: class-conditional hit rates 0.6 and 0.85, so the true balanced accuracy is 0.725."""
    rng = np.random.default_rng(0)
    truth, hits, trials = (0.6 + 0.85) / 2, 0, 300
    y = np.repeat([0, 1], [80, 220])
    for t in range(trials):
        right = rng.random(len(y)) < np.where(y == 0, 0.6, 0.85)
        pred = np.where(right, y, 1 - y)
        probs = np.stack([pred == 0, pred == 1], 1) * 0.8 + 0.1
        entry = score(probs, y, ["a", "b"], "x", n_boot=400, seed=t).summary()["balanced_acc"]
        hits += entry["low"] <= truth <= entry["high"]
    assert 0.90 <= hits / trials <= 0.985, hits / trials


def test_pooled_scores_equal_the_scores_of_the_union_and_their_interval_is_narrower():
    pa, ya = predictions(400, 5, seed=3)
    pb, yb = predictions(250, 5, seed=4, signal=2.0)
    a, b = score(pa, ya, CLASSES, "a", n_boot=300, seed=1), score(pb, yb, CLASSES, "b", n_boot=300, seed=2)
    pooled = pool([a, b])
    union = score(np.vstack([pa, pb]), np.concatenate([ya, yb]), CLASSES, "union", n_boot=10)
    np.testing.assert_array_equal(pooled.confmat[0], union.confmat[0])
    for key in ("acc", "balanced_acc", "f1", "ece"):
        assert pooled.summary()[key]["value"] == pytest.approx(union.summary()[key]["value"], abs=1e-12), key
    width = {s.name: s.summary()["acc"]["high"] - s.summary()["acc"]["low"] for s in (a, b, pooled)}
    assert width["pooled"] < min(width["a"], width["b"])
    assert np.isnan(pooled.summary()["auroc"]["value"])  # needs the scores, which stay at the sites
    with pytest.raises(ValueError, match="differ"):
        pool([a, score(pa[:, :4] / pa[:, :4].sum(1, keepdims=True), np.minimum(ya, 3), CLASSES[:4], "c", 300)])


def test_scores_from_another_party_are_checked_before_use():
    probs, y = predictions(100, 5, seed=5)
    sent = score(probs, y, CLASSES, "site", n_boot=20).to_dict()
    assert Scores.from_dict(sent).summary()["acc"] == score(probs, y, CLASSES, "site", n_boot=20).summary()["acc"]
    for bad in ({"confmat": np.zeros((21, 4, 4)).tolist()}, {"confmat": (-np.ones((21, 5, 5))).tolist()},
                {"auroc": np.zeros((3, 5)).tolist()}):
        with pytest.raises(ValueError, match="shapes"):
            Scores.from_dict({**sent, **bad})
