"""Membership-inference audits: can an attacker tell a site's training images from unseen ones?

Two attacks against a trained (global) model, on a balanced candidate set of members (images
the model trained on) and non-members (held-out images of the same distribution):

* **loss threshold** (Yeom et al. 2018): score = -cross-entropy of the true label. Members tend
  to have lower loss. Needs no extra training.
* **LiRA** (Carlini et al. 2022): S shadow models, each trained the way the target was (same
  architecture and recipe, centrally) with a random half of the candidate set. For each
  candidate, the shadows that saw it (IN) and those that did not (OUT) give two Gaussians of
  its logit-scaled confidence phi = log p_y - log(1 - p_y). *Online*: the likelihood ratio of the
  target's phi under IN vs OUT. *Offline*: how far the target's phi lies above the OUT Gaussian,
  (phi - mu_out) / sigma_out. Offline is the one to trust for a federated target: centrally
  trained shadows cannot match a federation's overall confidence, and a uniform offset between
  target and shadows shifts every offline score alike (ranking kept) but scrambles the online
  ratio. Both are reported.

Reported per attack: ROC AUC and TPR at FPR = 1% and 0.1% (the regime that matters: confidently
identified members). With fewer than 1000 non-members, TPR@0.1%FPR is TPR at zero false positives.
The ROC is computed on the raw scores (a threshold between every two distinct scores, ties kept
together, as scikit-learn's ``roc_curve``): squashing them first (a sigmoid, as torchmetrics does
with scores outside [0, 1]) turns every score above ~37 into 1.0 and ties the most confident ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger("fedmed")


@torch.no_grad()
def true_class_scores(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: (cross-entropy loss, phi = log p_y - log(1 - p_y)), the model in eval mode."""
    net.eval()
    losses, phis = [], []
    for i in range(0, len(x), batch):
        logits = net(x[i:i + batch]).double()
        yy = y[i:i + batch].long()
        logp = logits.log_softmax(-1)
        lp_y = logp.gather(1, yy[:, None])[:, 0]
        others = logp.clone()
        others[torch.arange(len(yy)), yy] = -torch.inf
        losses.append((-lp_y).numpy())
        phis.append((lp_y - others.logsumexp(-1)).numpy())
    return np.concatenate(losses), np.concatenate(phis)


@dataclass
class AttackResult:
    name: str
    auc: float
    tpr_at_1pct: float
    tpr_at_01pct: float
    members: int
    non_members: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}auc": self.auc, f"{prefix}tpr_at_fpr_1pct": self.tpr_at_1pct,
                f"{prefix}tpr_at_fpr_0.1pct": self.tpr_at_01pct}


def roc(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold of the raw ``scores``, from (0, 0) to (1, 1); ties stay together."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(is_member).astype(bool)
    if np.isnan(s).any():
        raise ValueError("attack scores contain NaN")
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(t)[last]
    fps = last + 1 - tps
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def attack_metrics(name: str, scores: np.ndarray, is_member: np.ndarray) -> AttackResult:
    """ROC AUC and TPR at FPR <= 1% and 0.1% of ``scores`` (higher = more likely a member)."""
    members = int(np.asarray(is_member).astype(bool).sum())
    if members == 0 or members == len(is_member):
        raise ValueError("an audit needs both members and non-members")
    fpr, tpr = roc(scores, is_member)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids: a tie counts half

    def tpr_at(limit: float) -> float:
        return float(tpr[fpr <= limit + 1e-12].max())  # (0, 0) is always on the curve

    return AttackResult(name, auc, tpr_at(0.01), tpr_at(0.001), members, len(is_member) - members)


def loss_attack(net: nn.Module, x: torch.Tensor, y: torch.Tensor, is_member: np.ndarray) -> AttackResult:
    loss, _ = true_class_scores(net, x, y)
    return attack_metrics("loss", -loss, is_member)


def lira_attack(net: nn.Module, x: torch.Tensor, y: torch.Tensor, is_member: np.ndarray,
                train_shadow: Callable[[np.ndarray, int], nn.Module], shadows: int = 8, seed: int = 0,
                progress: Callable[[int], None] | None = None) -> list[AttackResult]:
    """LiRA with ``shadows`` shadow models: [online result, offline result].

    Args:
        net: the target model.
        x, y: the candidate images and labels.
        is_member: 1 where the target trained on the candidate.
        train_shadow: ``train_shadow(indices, seed)`` trains a fresh model on ``x[indices]``
            the way the target was trained, and returns it.
        shadows: number of shadow models (each candidate is IN for about half of them).
    """
    if shadows < 4:  # each candidate must be IN for >= 2 and OUT for >= 2 shadows, or a variance is 0
        raise ValueError(f"LiRA needs at least 4 shadow models, got {shadows}")
    rng = np.random.default_rng(seed)
    n = len(x)
    # balanced assignment: every candidate is IN for exactly half of the shadows
    inside = np.zeros((shadows, n), dtype=bool)
    for j in range(n):
        inside[rng.permutation(shadows)[: shadows // 2], j] = True
    phis = np.zeros((shadows, n))
    for s in range(shadows):
        model = train_shadow(np.flatnonzero(inside[s]), seed * 1000 + s)
        phis[s] = true_class_scores(model, x, y)[1]
        if progress:
            progress(s + 1)
    target = true_class_scores(net, x, y)[1]
    in_mask = inside.astype(float)
    mu_in = (phis * in_mask).sum(0) / in_mask.sum(0).clip(1)
    mu_out = (phis * (1 - in_mask)).sum(0) / (1 - in_mask).sum(0).clip(1)
    # with few shadows, a global variance per side is more stable than per-example ones (Carlini et al.)
    sd_in = max(float(np.sqrt(((phis - mu_in) ** 2 * in_mask).sum() / in_mask.sum())), 1e-6)
    sd_out = max(float(np.sqrt(((phis - mu_out) ** 2 * (1 - in_mask)).sum() / (1 - in_mask).sum())), 1e-6)
    log_in = -0.5 * ((target - mu_in) / sd_in) ** 2 - np.log(sd_in)
    online = log_in - (-0.5 * ((target - mu_out) / sd_out) ** 2 - np.log(sd_out))
    offline = (target - mu_out) / sd_out
    return [attack_metrics(f"lira-online ({shadows} shadows)", online, is_member),
            attack_metrics(f"lira-offline ({shadows} shadows)", offline, is_member)]


def candidates(members: np.ndarray, non_members: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A balanced draw of up to ``n`` members and ``n`` non-members: (indices into each pool)."""
    rng = np.random.default_rng(seed)
    k = min(n, len(members), len(non_members))
    return np.sort(rng.choice(members, k, replace=False)), np.sort(rng.choice(non_members, k, replace=False))
