"""Feature decorrelation: a penalty against the dimensional collapse that skewed sites cause.

Training on a site whose labels are mostly one class squeezes the penultimate features into few
directions, and averaging such sites keeps the collapse (Shi et al., "Towards understanding and mitigating
dimensional collapse in heterogeneous federated learning", ICLR 2023). The penalty is the squared
off-diagonal correlation of the features within a batch, which spreads them over more directions.
"""

from __future__ import annotations

import torch


def decorrelation_penalty(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``B * mean_{i != j} corr_ij**2`` of a batch of ``B`` feature vectors (B, d): the batch's Pearson
    correlations between feature dimensions, off the diagonal, squared and averaged, times the batch size
    (the scale of Shi et al., so their weight 0.1 at batch 64 carries over). 0 when the dimensions are
    uncorrelated, ``B`` when all are one direction. A constant dimension (a dead ReLU) counts as uncorrelated;
    a batch of one image, or one dimension, gives 0."""
    z = features.flatten(1).float()
    n, d = z.shape
    if n < 2 or d < 2:
        return z.sum() * 0.0  # keeps the graph (and the device) of ``features``
    z = z - z.mean(0, keepdim=True)
    z = z / (z.pow(2).mean(0, keepdim=True) + eps).sqrt()
    corr = z.T @ z / n
    off = corr.pow(2).sum() - corr.diagonal().pow(2).sum()
    return n * off / (d * (d - 1))

