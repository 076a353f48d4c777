"""Class statistics a site may share beyond its updates, and what the server does with them.

Two levers against label and feature shift between sites use them:

- **the federation's label prior** (``model.logit_prior=federation``): each site sends its count of
  training images per class once; the logit-adjusted loss of every site then uses the summed
  counts instead of its own label mix;
- **classifier calibration with virtual representations** (``federation.calibrate_head``; Luo et
  al., NeurIPS 2021): after the federation each site sends, for the selected model, per class the
  count, the sum and the sum of outer products of its training images' penultimate features (the
  input of the network's last linear layer); the server forms each class's mean and covariance
  from the summed moments, draws the same number of virtual features for every class from those
  Gaussians, and re-fits the last linear layer on them. No image and no single feature vector
  leaves a site, but the per-class moments are about the site's data (docs: Privacy).

A site answers only for what its own config agreed to share (``TrainingSettings.shares``); the server checks what
comes back (:func:`check_statistics`) before it uses it. Under secure aggregation a site sends its statistics as
one masked vector (:func:`statistics_vector`: the counts, the sums and the upper triangles of the outer products)
and the server learns only the federation's sum, which it checks the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmed.data.datamodule import make_loader
from fedmed.models.head import last_linear, penultimate

LABEL_COUNTS, CLASS_FEATURES = "label_counts", "class_features"


@torch.no_grad()
def feature_batches(net: nn.Module, dataset, device: torch.device | str = "cpu"
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The network's penultimate features (the input of its last linear layer, float64, flattened) and the
    labels of ``dataset``, batch by batch, the network in eval mode (its mode and device are restored after)."""
    was_training = net.training
    net.eval().to(device)
    try:
        with penultimate(net) as seen:
            for x, y in make_loader(dataset, 256, shuffle=False):
                seen.clear()
                net(x.to(device))
                yield seen[0].detach().double().cpu().reshape(len(y), -1), torch.as_tensor(y)
    finally:
        net.train(was_training)
        net.cpu()


def class_statistics(net: nn.Module, dataset, num_classes: int, features: bool,
                     device: torch.device | str = "cpu", clip: float | None = None) -> dict[str, np.ndarray]:
    """Per-class count of ``dataset``'s labels and, with ``features``, the per-class sum and sum of
    outer products of the network's penultimate features (float64), the network in eval mode; with ``clip``
    each feature vector is first scaled down to at most that L2 norm (bounded sensitivity for DP)."""
    labels = torch.as_tensor(dataset.y).long().flatten()
    out = {"counts": torch.bincount(labels, minlength=num_classes).numpy().astype(np.int64)}
    if not features:
        return out
    dim = last_linear(net)[1].in_features
    sums, outer = np.zeros((num_classes, dim)), np.zeros((num_classes, dim, dim))
    for f, y in feature_batches(net, dataset, device):
        if clip is not None:
            f = f * (clip / f.norm(dim=1, keepdim=True).clamp_min(clip))
        for c in torch.unique(y).tolist():
            fc = f[y == c]
            sums[c] += fc.sum(0).numpy()
            outer[c] += (fc.T @ fc).numpy()
    return {**out, "sum": sums, "outer": outer}


def withhold_small_classes(stats: dict[str, np.ndarray], min_images: int) -> dict[str, np.ndarray]:
    """Zero, in place, the count and feature moments of every class with fewer than ``min_images`` images (a
    class that small would give away single images' features); returns ``stats``."""
    few = stats["counts"] < min_images
    for key in ("counts", "sum", "outer"):
        stats[key][few] = 0
    return stats


def check_statistics(stats: Any, num_classes: int, features: bool, dim: int | None = None,
                     max_count: int | None = None) -> str | None:
    """What is wrong with a site's statistics (None: usable). Counts: ``num_classes`` non-negative integers,
    at most ``max_count`` in all; features: finite sums ``(C, dim)`` and symmetric outer products ``(C, dim, dim)``."""
    if not isinstance(stats, Mapping) or "counts" not in stats:
        return "no counts"
    counts = np.asarray(stats["counts"])
    if counts.shape != (num_classes,) or counts.dtype.kind not in "iu" or (counts < 0).any():
        return f"counts must be {num_classes} non-negative integers, got {counts.tolist()!r}"[:200]
    if max_count is not None and int(counts.sum()) > max_count:
        return f"counts add up to {int(counts.sum())}, more than the {max_count} training images the site declared"
    if not features:
        return None
    sums, outer = np.asarray(stats.get("sum")), np.asarray(stats.get("outer"))
    if sums.ndim != 2 or sums.shape[0] != num_classes or (dim is not None and sums.shape[1] != dim):
        return f"feature sums have shape {sums.shape}, expected ({num_classes}, {dim})"
    d = sums.shape[1]
    if outer.shape != (num_classes, d, d):
        return f"outer products have shape {outer.shape}, expected ({num_classes}, {d}, {d})"
    if not (np.isfinite(sums).all() and np.isfinite(outer).all()):
        return "feature statistics hold NaN or Inf"
    if not np.allclose(outer, outer.transpose(0, 2, 1), rtol=1e-6, atol=1e-6):
        return "outer products are not symmetric"
    return None


def statistics_length(num_classes: int, dim: int | None) -> int:
    """Length of :func:`statistics_vector` for ``num_classes`` classes and ``dim`` features (None: counts only)."""
    return num_classes if dim is None else num_classes * (1 + dim + dim * (dim + 1) // 2)


def statistics_vector(stats: Mapping[str, Any], num_classes: int, dim: int | None) -> np.ndarray:
    """A site's statistics as one float64 vector to mask: counts, then (with ``dim``) the per-class sums and
    the upper triangles of the per-class outer products."""
    parts = [np.asarray(stats["counts"], dtype=np.float64).reshape(num_classes)]
    if dim is not None:
        upper = np.triu_indices(dim)
        parts += [np.asarray(stats["sum"], dtype=np.float64).reshape(-1),
                  np.stack([np.asarray(o, dtype=np.float64)[upper] for o in stats["outer"]]).reshape(-1)]
    return np.concatenate(parts)


def statistics_from_vector(vector: np.ndarray, num_classes: int, dim: int | None) -> dict[str, np.ndarray]:
    """The statistics a (summed) :func:`statistics_vector` holds; counts rounded to integers."""
    length = statistics_length(num_classes, dim)
    if vector.shape != (length,):
        raise ValueError(f"a statistics vector of shape {vector.shape}, expected ({length},)")
    out = {"counts": np.rint(vector[:num_classes]).astype(np.int64)}
    if dim is not None:
        out["sum"] = vector[num_classes:num_classes * (1 + dim)].reshape(num_classes, dim)
        outer = np.zeros((num_classes, dim, dim))
        upper = np.triu_indices(dim)
        for c, tri in enumerate(vector[num_classes * (1 + dim):].reshape(num_classes, -1)):
            outer[c][upper] = tri
            outer[c] = outer[c] + np.triu(outer[c], 1).T
        out["outer"] = outer
    return out


def noisy_statistics(stats: Mapping[str, Any], num_classes: int, dim: int | None, noise: float, clip: float,
                     most: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The Gaussian mechanism on a site's statistics (features clipped to ``clip``): Gaussian noise of std
    ``noise``, ``noise * clip`` and ``noise * clip^2`` on the counts, the sums and the upper triangles of the outer
    products (each block has sensitivity 1, ``clip``, ``clip^2`` to one image; accounted by
    :func:`fedmed.privacy.dp.release_noise`). Counts are then rounded and kept within [0, ``most``] (the site's
    declared images): post-processing, which costs no privacy."""
    vector = statistics_vector(stats, num_classes, dim)
    scale = np.ones_like(vector)
    if dim is not None:
        scale[num_classes:num_classes * (1 + dim)] = clip
        scale[num_classes * (1 + dim):] = clip**2
    out = statistics_from_vector(vector + rng.normal(0.0, noise, size=vector.shape) * scale, num_classes, dim)
    counts = np.clip(out["counts"], 0, most)
    while counts.sum() > most:  # remove from the largest: the total never exceeds what the site declared
        counts[np.argmax(counts)] -= 1
    out["counts"] = counts
    return out


def summed(stats: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The federation's statistics: every site's counts (and moments) added up."""
    keys = set.intersection(*(set(s) for s in stats)) & {"counts", "sum", "outer"}
    return {k: np.sum([np.asarray(s[k], dtype=np.float64 if k != "counts" else np.int64) for s in stats], axis=0)
            for k in keys}


def class_gaussians(total: Mapping[str, np.ndarray], ridge: float = 1e-3
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and covariance of each class's features from summed moments (classes with at least 2 images).

    The covariance is the unbiased sample covariance plus ``ridge`` times the mean feature variance on
    the diagonal, so that a class with fewer images than feature dimensions still has a proper Gaussian.
    Moments with noise (DP) can give a covariance with negative eigenvalues: it is replaced by the nearest
    positive semi-definite matrix (negative eigenvalues set to 0) first.
    """
    out = {}
    for c, n in enumerate(np.asarray(total["counts"]).tolist()):
        if n < 2:
            continue
        mean = total["sum"][c] / n
        cov = (total["outer"][c] - n * np.outer(mean, mean)) / (n - 1)
        cov = (cov + cov.T) / 2
        eig, vec = np.linalg.eigh(cov)
        if eig.min() < -1e-6 * max(abs(float(eig.max())), 1e-12):  # noised (DP) moments: the nearest PSD matrix
            cov = (vec * np.clip(eig, 0.0, None)) @ vec.T
        cov += np.eye(len(mean)) * (ridge * max(float(np.trace(cov)) / len(mean), 1e-8))
        out[c] = (torch.as_tensor(mean), torch.as_tensor(cov))
    return out


@dataclass(frozen=True)
class HeadCalibration:
    """How the server re-fits the classifier layer on virtual features.

    Args:
        samples: virtual features drawn per class (the same for every class: a balanced head).
        epochs: passes over them (Adam, batch 256).
        lr: Adam's learning rate.
        seed: seeds the draws and the shuffling.
    """

    samples: int = 1000
    epochs: int = 20
    lr: float = 1e-3
    seed: int = 0

    def fit(self, net: nn.Module, weights: Mapping[str, torch.Tensor], total: Mapping[str, np.ndarray]
            ) -> dict[str, torch.Tensor]:
        """``weights`` with the last linear layer re-fitted on class-balanced virtual features from ``total``.

        Classes that no site holds (fewer than 2 images in all) get no virtual features; the layer is
        trained from its federated values, so their rows only move through the softmax.
        """
        name, _ = last_linear(net)
        gen = torch.Generator().manual_seed(self.seed)
        xs, ys = [], []
        for c, (mean, cov) in class_gaussians(total).items():
            chol = torch.linalg.cholesky(cov)
            z = torch.randn(self.samples, len(mean), generator=gen, dtype=torch.float64)
            xs.append((mean + z @ chol.T).float())
            ys.append(torch.full((self.samples,), c, dtype=torch.long))
        if not xs:
            raise ValueError("no class has 2 or more training images in all: nothing to calibrate on")
        x, y = torch.cat(xs), torch.cat(ys)
        w, b = weights[f"{name}.weight"].clone().float(), weights[f"{name}.bias"].clone().float()
        layer = torch.nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0])  # its values are loaded below:
        layer.load_state_dict({"weight": w, "bias": b})  # drawing them would move the global RNG
        opt = torch.optim.Adam(layer.parameters(), lr=self.lr)
        for _ in range(self.epochs):
            for idx in torch.randperm(len(x), generator=gen).split(256):
                opt.zero_grad()
                nn.functional.cross_entropy(layer(x[idx]), y[idx]).backward()
                opt.step()
        out = {k: v.clone() for k, v in weights.items()}
        out[f"{name}.weight"] = layer.weight.detach().to(weights[f"{name}.weight"].dtype)
        out[f"{name}.bias"] = layer.bias.detach().to(weights[f"{name}.bias"].dtype)
        return out
