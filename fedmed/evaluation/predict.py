"""A network's class probabilities on a data set (what :func:`fedmed.evaluation.score` scores)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedmed.data.datamodule import ArrayDataset, make_loader


@torch.no_grad()
def class_probabilities(net: nn.Module, data: ArrayDataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities (n, K), true labels (n,)) of ``net`` in eval mode on ``data``, in its order."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    probs, labels = [], []
    for x, y in make_loader(data, batch_size, False):
        probs.append(net(x.to(device)).softmax(-1).double().cpu())
        labels.append(y)
    net.train(was_training)
    if not probs:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()
