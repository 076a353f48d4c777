"""Class statistics under DP-SGD: the Gaussian mechanism on clipped features, accounted in each site's epsilon
(planned before training, each release once), checked against the exact privacy curve of the Gaussian mechanism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fedmed.build import dp_records_from_history
from fedmed.data.datamodule import ArrayDataset
from fedmed.federated import FederationSettings, InProcessSite, Orchestrator, SiteClient, TrainingSettings
from fedmed.federated.checkpoint import CHECKPOINT, load_checkpoint
from fedmed.federated.statistics import (
    CLASS_FEATURES,
    LABEL_COUNTS,
    HeadCalibration,
    class_statistics,
    noisy_statistics,
    statistics_vector,
)
from fedmed.models.classifier import Classifier
from fedmed.models.cnn import CompactCNN
from fedmed.privacy.dp import DPConfig, PrivacyBudgetExhausted, SitePrivacy, dp_compatible, epsilon_of, release_noise
from tests.helpers import strategy as make_strategy
from tests.test_orchestrator import synthetic_site

BOTH = (LABEL_COUNTS, CLASS_FEATURES)


def _exact_epsilon(z: float, delta: float) -> float:
    """The Gaussian mechanism's exact epsilon at ``delta`` for noise multiplier z (Balle & Wang, ICML 2018, Thm 8):
    delta(eps) = Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z)."""
    def gap(eps: float) -> float:
        return norm.cdf(1 / (2 * z) - eps * z) - math.exp(eps) * norm.cdf(-1 / (2 * z) - eps * z) - delta

    return brentq(gap, 0.0, 100.0)


@pytest.mark.parametrize("features", [False, True])
def test_a_release_is_accounted_as_the_gaussian_mechanism(features):
    z = release_noise(3.0, features)
    assert z == pytest.approx(3.0 / math.sqrt(3 if features else 1))
    exact = _exact_epsilon(z, 1e-5)
    assert epsilon_of([(z, 1.0, 1)], 1e-5, "prv") == pytest.approx(exact, rel=0.02)  # PRV: near exact
    assert epsilon_of([(z, 1.0, 1)], 1e-5, "rdp") >= exact  # RDP: an upper bound


def test_one_image_moves_each_block_of_a_release_by_at_most_its_sensitivity():
    """Removing one image changes the counts by 1, the clipped sums by at most C and the outer products' upper
    triangles by at most C^2 (L2): every block over its scale has sensitivity <= 1."""
    torch.manual_seed(0)
    net = CompactCNN(in_channels=1, num_classes=2, hidden=16).eval()
    data = synthetic_site(3, 60, 0.5).train
    clip = 0.05  # below the features' norms here (about 0.1): clipping binds
    dim = 16
    full = class_statistics(net, data, 2, True, clip=clip)
    norms = []
    for drop in (0, 17, 59):
        keep = [i for i in range(len(data)) if i != drop]
        less = class_statistics(net, ArrayDataset(data.x[keep], data.y[keep]), 2, True, clip=clip)
        diff = statistics_vector(full, 2, dim) - statistics_vector(less, 2, dim)
        blocks = (diff[:2], diff[2:2 + 2 * dim] / clip, diff[2 + 2 * dim:] / clip**2)
        norms.append([float(np.linalg.norm(b)) for b in blocks])
    assert np.allclose([n[0] for n in norms], 1.0)
    assert max(max(n[1:]) for n in norms) <= 1.0 + 1e-9
    assert max(n[1] for n in norms) > 0.99  # the clip binds: the bound is reached, so it is the right one
    raw = class_statistics(net, data, 2, True)
    assert not np.allclose(raw["sum"], full["sum"])


def test_noisy_statistics_have_the_stated_noise_and_keep_counts_within_the_site():
    stats = {"counts": np.array([30, 5]), "sum": np.zeros((2, 3)), "outer": np.zeros((2, 3, 3))}
    draws = [noisy_statistics(stats, 2, 3, noise=2.0, clip=4.0, most=35, rng=np.random.default_rng(i))
             for i in range(400)]
    sums = np.stack([d["sum"] for d in draws])
    assert sums.std() == pytest.approx(2.0 * 4.0, rel=0.1)  # noise x clip on the sums
    outer = np.stack([d["outer"] for d in draws])
    assert outer[:, 0, 1].std() == pytest.approx(2.0 * 16.0, rel=0.1)  # noise x clip^2 on the outer products
    assert np.array_equal(outer, outer.transpose(0, 1, 3, 2))  # symmetric
    counts = np.stack([d["counts"] for d in draws])
    assert counts.min() >= 0 and counts.sum(1).max() <= 35 and counts.dtype.kind == "i"
    assert abs(counts[:, 1].mean() - 5) < 0.5 and counts[:, 1].std() == pytest.approx(2.0, rel=0.15)


def test_dp_sgd_leaves_room_for_the_planned_releases_and_each_is_sent_once():
    cfg = DPConfig.from_config({"epsilon": 4.0, "delta": 1e-4, "statistics_noise": 8.0})
    plain = SitePrivacy(cfg, 1000, 100, 4)
    planned = SitePrivacy(cfg, 1000, 100, 4, BOTH)
    assert planned.noise_multiplier > plain.noise_multiplier  # DP-SGD gets less of the budget
    whole = [(planned.noise_multiplier, planned.sample_rate, 40), *[(release_noise(8.0, f), 1.0, 1)
                                                                     for f in (False, True)]]
    assert 3.95 <= epsilon_of(whole, 1e-4, "rdp") <= 4.0  # the plan spends the target, not more
    planned.release(LABEL_COUNTS, "h")
    with pytest.raises(PermissionError, match="already sent its noisy label counts once"):
        planned.release(LABEL_COUNTS, "h")
    with pytest.raises(PermissionError, match="were not planned"):
        SitePrivacy(cfg, 1000, 100, 4, (LABEL_COUNTS,)).release(CLASS_FEATURES, "h")
    tight = DPConfig.from_config({"noise_multiplier": 1.0, "delta": 1e-4, "statistics_noise": 0.5, "budget": 1.0})
    with pytest.raises(PrivacyBudgetExhausted, match="sending its class features would spend epsilon"):
        SitePrivacy(tight, 1000, 100, 4, BOTH).release(CLASS_FEATURES, "h")
    with pytest.raises(Exception, match="the class statistics alone spend epsilon"):
        SitePrivacy(DPConfig.from_config({"epsilon": 0.5, "delta": 1e-4, "statistics_noise": 0.5}), 1000, 100, 4,
                    BOTH)
    with pytest.raises(Exception, match="needs privacy.statistics_noise"):
        SitePrivacy(DPConfig.from_config({"epsilon": 4.0, "delta": 1e-4}), 1000, 100, 4, BOTH)
    state = planned.state_dict()  # a site rebuilt for its next message keeps what it sent
    again = SitePrivacy(cfg, 1000, 100, 4, BOTH)
    again.load_state_dict(state)
    with pytest.raises(PermissionError, match="already sent"):
        again.release(LABEL_COUNTS, "h")


def test_a_federation_under_dp_calibrates_its_head_from_noisy_statistics_within_each_budget(tmp_path):
    dp = DPConfig.from_config({"epsilon": 8.0, "delta": 1e-3, "statistics_noise": 4.0, "statistics_clip": 5.0})

    def module():
        net, _ = dp_compatible(CompactCNN(in_channels=1, num_classes=2, hidden=16))
        m = Classifier(net, 2, lr=1e-2)
        m.logit_adjust = 1.0
        return m

    sites = [SiteClient(f"s{k}", synthetic_site(k, n, 0.3 + 0.4 * k), module,
                        TrainingSettings(batch_size=16, trainer={"accelerator": "cpu"}, seed=5, privacy=dp,
                                         planned_epochs=2, shares=frozenset(BOTH), label_prior="federation",
                                         releases=BOTH), site_index=k)
             for k, n in enumerate((80, 120))]
    orch = Orchestrator([InProcessSite(c) for c in sites], make_strategy("fedavg"),
                        FederationSettings(rounds=2, select="last", label_prior=True, num_classes=2),
                        checkpoint_dir=tmp_path)
    torch.manual_seed(0)
    result = orch.run(module().net.state_dict())
    true = np.bincount(np.concatenate([c.data.train.y.numpy() for c in sites]), minlength=2)
    # noised (std 4 per count and site; that noise is measured in test_noisy_statistics_have_the_stated_noise...)
    assert np.abs(np.array(orch.label_counts) - true).max() < 4 * 4 * 2
    calibrated = orch.calibrate_head(result.weights, HeadCalibration(samples=200, epochs=3), module().net)
    assert calibrated is not None
    record = dp_records_from_history(result.history, orch.statistics_dp)  # what the privacy record prints
    for c in sites:  # every release in the site's accounting, within its target
        rec = orch.statistics_dp[c.name]
        assert rec["statistics_releases"] == 2 and rec["epsilon"] == pytest.approx(c.dp.epsilon)
        assert 7.5 < c.dp.epsilon <= 8.0
        last_fit = result.history[-1].site_metrics[c.name]["dp_epsilon"]
        assert c.dp.epsilon > last_fit  # the head calibration's release came after the last round
        assert record[c.name]["epsilon"] == pytest.approx(c.dp.epsilon) and record[c.name]["statistics_releases"] == 2
        with pytest.raises(PermissionError, match="already sent"):  # a curious server asking again
            c.statistics(result.weights, True)
    # a resumed federation keeps the prior it trained with and does not ask the sites for a second draw
    again = Orchestrator([InProcessSite(c) for c in sites], make_strategy("fedavg"),
                         FederationSettings(rounds=2, select="last", label_prior=True, num_classes=2))
    again.run(module().net.state_dict(), load_checkpoint(tmp_path / CHECKPOINT))
    assert again.label_counts == orch.label_counts
