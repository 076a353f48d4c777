"""Partitioning: deterministic, disjoint, covering, skew grows as alpha falls."""

import numpy as np
import pytest

from fedmed.data.partition import label_skew, partition_by_group, partition_labels
from fedmed.data.splits import group_stratified_split
from fedmed.errors import FedmedError


def toy_labels(n=3000, k=4, seed=0):
    return {"train": np.random.default_rng(seed).integers(0, k, n),
            "val": np.random.default_rng(seed + 1).integers(0, k, n // 5)}


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_deterministic_disjoint_covering(method):
    labels = toy_labels()
    a = partition_labels(labels, 5, method, alpha=0.5, seed=3)
    b = partition_labels(labels, 5, method, alpha=0.5, seed=3)
    c = partition_labels(labels, 5, method, alpha=0.5, seed=4)
    for split, y in labels.items():
        assert all(np.array_equal(x, z) for x, z in zip(a[split], b[split], strict=True))
        joined = np.concatenate(a[split])
        assert len(joined) == len(np.unique(joined)) == len(y)  # disjoint and covering
    if method == "dirichlet":
        assert not all(np.array_equal(x, z) for x, z in zip(a["train"], c["train"], strict=True))


def test_skew_grows_as_alpha_falls():
    labels = toy_labels(6000)
    def skew(alpha, method="dirichlet"):
        vals = [label_skew(labels["train"],
                           partition_labels(labels, 4, method, alpha, seed=s, min_samples=1)["train"], 4)
                for s in range(8)]
        return float(np.mean(vals))
    iid, a100, a1, a01 = skew(None, "iid"), skew(100.0), skew(1.0), skew(0.1)
    assert iid < 0.02
    assert iid < a100 < a1 < a01


def test_train_and_val_share_site_proportions(pneumonia):
    labels = {"train": pneumonia.labels("train"), "val": pneumonia.labels("val")}
    parts = partition_labels(labels, 3, "dirichlet", 0.5, seed=42)
    for tr, va in zip(parts["train"], parts["val"], strict=True):
        share_tr = labels["train"][tr].mean() if len(tr) else 0
        share_va = labels["val"][va].mean() if len(va) else 0
        assert abs(share_tr - share_va) < 0.1


def test_impossible_minimum_is_a_clear_error():
    with pytest.raises(FedmedError, match="at least|>= 500"):
        partition_labels(toy_labels(100), 5, "dirichlet", 0.5, seed=0, min_samples=500, max_tries=5)
    with pytest.raises(FedmedError, match="alpha"):
        partition_labels(toy_labels(), 3, "dirichlet", 0.0, seed=0)
    with pytest.raises(FedmedError, match="partition.method"):
        partition_labels(toy_labels(), 3, "natural", 0.5, seed=0)


def test_quantity_skew_varies_sizes_not_label_mix():
    labels = toy_labels(3000)["train"]
    parts = partition_labels({"train": labels}, 4, "quantity", 0.5, seed=3)["train"]
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == len(labels) and sizes.max() > 2 * sizes.min()
    assert label_skew(labels, parts, int(labels.max()) + 1) < 0.05  # every site keeps the pooled mix
    dirichlet = partition_labels({"train": labels}, 4, "dirichlet", 0.5, seed=3)["train"]
    assert label_skew(labels, dirichlet, int(labels.max()) + 1) > 0.2


def test_natural_partition_by_group_values():
    groups = np.array(["x", "y", "x", "z", "y", "x"])
    parts = partition_by_group({"train": groups}, [["x"], ["y", "z"]])["train"]
    assert parts[0].tolist() == [0, 2, 5] and parts[1].tolist() == [1, 3, 4]
    with pytest.raises(FedmedError, match="two sites"):
        partition_by_group({"train": groups}, [["x"], ["x", "y"]])


def test_group_split_keeps_groups_whole_and_classes_in_every_split():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 400, 1500)
    labels = groups % 3  # a group's images share a label, as lesions do
    split = group_stratified_split(labels, groups, {"val": 0.15, "test": 0.15}, seed=0)
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1
    for s, lo, hi in (("val", 0.11, 0.19), ("test", 0.11, 0.19), ("train", 0.62, 0.78)):
        share = (split == s).mean()
        assert lo < share < hi, (s, share)
        assert set(labels[split == s]) == {0, 1, 2}
    assert (group_stratified_split(labels, groups, {"val": 0.15, "test": 0.15}, seed=0) == split).all()


def test_a_site_with_a_single_class_is_named_when_the_partition_is_drawn(pneumonia):
    from fedmed.data.sites import build_manifests, one_class_sites

    sites = ["hospital_a", "hospital_b", "hospital_c"]
    skewed = build_manifests(pneumonia, sites, "dirichlet", 0.5, seed=7)  # hospital_a: normal only
    said = one_class_sites(skewed)
    assert any(w.startswith("site hospital_a: its training data holds only class 'normal'") for w in said), said
    assert any("hospital_a: its validation data" in w and "AUROC is undefined" in w for w in said), said
    assert one_class_sites(build_manifests(pneumonia, sites, "iid", None, seed=7)) == []
