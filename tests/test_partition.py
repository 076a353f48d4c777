"""Partitioning: deterministic, disjoint, covering, skew grows as alpha falls."""

import numpy as np
import pytest

from fedmed.data.partition import label_skew, partition_labels
from fedmed.errors import FedmedError


def toy_labels(n=3000, k=4, seed=0):
    return {"train": np.random.default_rng(seed).integers(0, k, n), "val": np.random.default_rng(seed + 1).integers(0, k, n // 5)}


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_deterministic_disjoint_covering(method):
    labels = toy_labels()
    a = partition_labels(labels, 5, method, alpha=0.5, seed=3)
    b = partition_labels(labels, 5, method, alpha=0.5, seed=3)
    c = partition_labels(labels, 5, method, alpha=0.5, seed=4)
    for split, y in labels.items():
        assert all(np.array_equal(x, z) for x, z in zip(a[split], b[split]))
        joined = np.concatenate(a[split])
        assert len(joined) == len(np.unique(joined)) == len(y)  # disjoint and covering
    if method == "dirichlet":
        assert not all(np.array_equal(x, z) for x, z in zip(a["train"], c["train"]))


def test_skew_grows_as_alpha_falls():
    labels = toy_labels(6000)
    def skew(alpha, method="dirichlet"):
        vals = [label_skew(labels["train"], partition_labels(labels, 4, method, alpha, seed=s, min_samples=1)["train"], 4)
                for s in range(8)]
        return float(np.mean(vals))
    iid, a100, a1, a01 = skew(None, "iid"), skew(100.0), skew(1.0), skew(0.1)
    assert iid < 0.02
    assert iid < a100 < a1 < a01


def test_train_and_val_share_site_proportions(pneumonia):
    labels = {"train": pneumonia.labels("train"), "val": pneumonia.labels("val")}
    parts = partition_labels(labels, 3, "dirichlet", 0.5, seed=42)
    for tr, va in zip(parts["train"], parts["val"]):
        share_tr = labels["train"][tr].mean() if len(tr) else 0
        share_va = labels["val"][va].mean() if len(va) else 0
        assert abs(share_tr - share_va) < 0.1


def test_impossible_minimum_is_a_clear_error():
    with pytest.raises(FedmedError, match="at least|>= 500"):
        partition_labels(toy_labels(100), 5, "dirichlet", 0.5, seed=0, min_samples=500, max_tries=5)
    with pytest.raises(FedmedError, match="alpha"):
        partition_labels(toy_labels(), 3, "dirichlet", 0.0, seed=0)
    with pytest.raises(FedmedError, match="partition.method"):
        partition_labels(toy_labels(), 3, "quantity", 0.5, seed=0)
