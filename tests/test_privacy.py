"""DP-SGD (Opacus) and its accounting, the membership-inference audit, and the privacy record of a run."""

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from fedmed.config import compose
from fedmed.data.datamodule import ArrayDataset, SiteData
from fedmed.errors import FedmedError
from fedmed.federated import SiteClient, TrainingSettings
from fedmed.models import CompactCNN, SmallInputDenseNet
from fedmed.models.classifier import Classifier
from fedmed.privacy.audit import attack_metrics, candidates, lira_attack, loss_attack
from fedmed.privacy.dp import (
    DPConfig,
    PrivacyBudgetExhausted,
    SitePrivacy,
    calibrate_noise,
    describe,
    dp_compatible,
    epsilon_of,
)
from tests.conftest import PNEUMONIA, needs


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Epsilon of a mu-GDP mechanism at delta (Balle & Wang 2018, Dong et al. 2019), by bisection."""
    phi = NormalDist().cdf
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        d = phi(-mid / mu + mu / 2) - math.exp(mid) * phi(-mid / mu - mu / 2)
        lo, hi = (mid, hi) if d > delta else (lo, mid)
    return lo


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 10), (5.0, 50)])
def test_accounting_matches_the_exact_gaussian_mechanism(sigma, steps):
    """Without subsampling, T steps of noise sigma are exactly sqrt(T)/sigma-GDP: a closed form to check against."""
    exact = exact_gaussian_epsilon(math.sqrt(steps) / sigma, 1e-5)
    prv = epsilon_of([(sigma, 1.0, steps)], 1e-5, "prv")
    rdp = epsilon_of([(sigma, 1.0, steps)], 1e-5, "rdp")
    assert prv == pytest.approx(exact, rel=0.01)  # PRV is (numerically) exact
    assert exact <= rdp <= 1.12 * exact  # RDP is a valid, slightly loose upper bound


def test_noise_calibration_spends_the_target():
    sigma = calibrate_noise(2.0, 1e-5, 0.01, 1000, "rdp")
    assert 1.9 <= epsilon_of([(sigma, 0.01, 1000)], 1e-5, "rdp") <= 2.0
    assert epsilon_of([(sigma * 1.2, 0.01, 1000)], 1e-5, "rdp") < 1.9  # more noise, less spent


def test_dp_replaces_batchnorm_visibly():
    net, changes = dp_compatible(CompactCNN(in_channels=1, num_classes=2))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in net.modules()) == 3
    assert sum("BatchNorm2d -> GroupNorm" in c for c in changes) == 3
    dense, changes = dp_compatible(SmallInputDenseNet(in_channels=1, num_classes=2))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dense.modules()) and changes


def test_dp_config_errors_name_the_key():
    with pytest.raises(FedmedError, match="not both"):
        DPConfig.from_config({"epsilon": 1, "noise_multiplier": 1})
    with pytest.raises(FedmedError, match="privacy.delta"):
        DPConfig.from_config({"epsilon": 1, "delta": 2})
    with pytest.raises(FedmedError, match="privacy.accountant"):
        DPConfig.from_config({"epsilon": 1, "accountant": "moments"})
    assert DPConfig.from_config({"epsilon": None}) is None


@pytest.fixture(scope="module")
def pneumonia_small():
    if not PNEUMONIA.exists():
        pytest.skip(f"{PNEUMONIA} not present")
    with np.load(PNEUMONIA) as f:
        x = torch.from_numpy(f["train_images"][:1200]).float()[:, None] / 255
        y = torch.from_numpy(f["train_labels"][:1200, 0]).long()
        xt = torch.from_numpy(f["test_images"][:600]).float()[:, None] / 255
        yt = torch.from_numpy(f["test_labels"][:600, 0]).long()
    return x, y, xt, yt


def _dp_module():
    net, _ = dp_compatible(CompactCNN(in_channels=1, num_classes=2))
    return Classifier(net, 2, lr=2e-3)


@needs(PNEUMONIA)
def test_dp_sgd_trains_and_stops_at_its_budget(pneumonia_small):
    x, y, xt, yt = pneumonia_small
    data = SiteData(ArrayDataset(x[:1000], y[:1000]), ArrayDataset(xt, yt))
    cfg = DPConfig.from_config({"epsilon": 20.0, "delta": 1e-4})
    client = SiteClient("h", data, _dp_module, TrainingSettings(batch_size=100, trainer={"accelerator": "cpu"}, seed=1,
                                                                privacy=cfg, planned_epochs=4))
    w = client.get_weights()
    for r in (1, 2):
        res = client.train(w, r, 2)
        w = res.weights
        assert 0 < res.metrics["dp_epsilon"] <= 20.0
    assert client.dp.record()["dp_steps"] == 4 * 10  # Poisson batches: ceil(1000 / 100) per epoch
    assert client.dp.epsilon == pytest.approx(20.0, rel=0.02)  # the planned epochs spend the target
    auroc = client.evaluate(w, 2, log_metrics=False).metrics["auroc"]
    assert auroc > 0.85  # it learned to rank pneumonia above normal (an untrained model: ~0.5)
    with pytest.raises(PrivacyBudgetExhausted, match="privacy.budget=20"):
        client.train(w, 3, 1)
    assert client.dp.epsilon <= 20.0  # the refused round spent nothing
    # a resumed federation restores each site's accountant with the rest of its state
    again = SiteClient("h", data, _dp_module, TrainingSettings(batch_size=100, seed=1, privacy=cfg, planned_epochs=4))
    again.load_state_dict(client.state_dict())
    assert again.dp.epsilon == client.dp.epsilon and again.dp.noise_multiplier == client.dp.noise_multiplier


@needs(PNEUMONIA)
def test_audit_finds_an_overfit_model_and_not_a_random_one(pneumonia_small):
    x, y, xt, yt = pneumonia_small
    members, non = np.arange(120), np.arange(120)
    # members: the first 200 images; non-members: the next 200 (same split, never trained on). Labels are
    # random, so the only way to fit the members is to memorise them: a deliberately overfit model.
    cx = x[:240]
    cy = torch.randint(0, 2, (240,), generator=torch.Generator().manual_seed(0))
    is_member = np.r_[np.ones(120), np.zeros(120)]

    def train(idx: np.ndarray, seed: int, epochs: int = 60) -> nn.Module:
        torch.manual_seed(seed)
        net = CompactCNN(in_channels=1, num_classes=2, dropout=0.0)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        xi, yi = cx[idx], cy[idx]
        for _ in range(epochs):
            net.train()
            for b in torch.randperm(len(idx)).split(40):
                opt.zero_grad()
                nn.functional.cross_entropy(net(xi[b]), yi[b]).backward()
                opt.step()
        return net.eval()

    overfit = train(np.arange(120), 0)  # memorises its 120 members
    torch.manual_seed(1)
    untrained = CompactCNN(in_channels=1, num_classes=2).eval()
    assert loss_attack(overfit, cx, cy, is_member).auc > 0.8
    assert abs(loss_attack(untrained, cx, cy, is_member).auc - 0.5) < 0.08
    # shadows trained like the target
    online, offline = lira_attack(overfit, cx, cy, is_member, train, shadows=4, seed=0)
    assert online.auc > 0.65 and offline.auc > 0.65 and max(online.tpr_at_1pct, offline.tpr_at_1pct) > 0.02
    assert candidates(members, non, 50, 0)[0].shape == (50,)


def test_settings_that_cannot_work_are_refused_before_training(isolated):
    from fedmed.tasks import fit

    for overrides, match in (
        (["privacy.epsilon=1", "strategy=fedprox"], "fedprox"),
        (["privacy.epsilon=1", "strategy=scaffold"], "scaffold"),
        (["privacy.secure_aggregation=true", "federation.compression=int8"], "choose one"),
        (["privacy.secure_aggregation=true", "strategy=median"], "secure_aggregation"),
        (["privacy.audit=shadow"], "privacy.audit"),
        (["strategy=fedbn", "model.net.norm=group"], "BatchNorm"),
        (["model.optimizer.name=rmsprop"], "model.optimizer.name='rmsprop'"),
        (["model.net.norm=layer"], "model.net.norm='layer': expected one of batch, group"),
    ):
        with pytest.raises(FedmedError, match=match):
            fit.run(compose("fit", [*isolated, "experiment=smoke", *overrides]))


@needs(PNEUMONIA)
def test_fit_with_dp_and_secure_aggregation_records_privacy_and_audits(isolated, tmp_path, capsys):
    from fedmed.cli import main

    rc = main(["fit", *isolated, "experiment=smoke", "privacy.epsilon=8", "privacy.secure_aggregation=true",
               "privacy.audit_n=100", "logger.log_model=false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "privacy record" in out and "secure aggregation:       on" in out and "epsilon=" in out
    client = MlflowClient(isolated[1].split("=", 1)[1])
    parent = client.search_runs(client.get_experiment_by_name("fedmed").experiment_id,
                                "tags.mode = 'federated'")[0]
    record_file = client.download_artifacts(parent.info.run_id, "privacy/record.json", str(tmp_path))
    rec = json.loads(Path(record_file).read_text())
    assert rec["raw_images_shared"] == 0 and rec["secure_aggregation"] is True
    assert set(rec["dp_per_site"]) == {"hospital_a", "hospital_b"}
    assert all(0 < d["epsilon"] <= 8.0 for d in rec["dp_per_site"].values())
    assert rec["membership_inference"][0]["members"] == 100
    assert parent.data.metrics["privacy_update_bytes_sent"] == rec["update_bytes_sent"] > 0
    assert 0 <= parent.data.metrics["mia_loss_auc"] <= 1
    assert "GroupNorm" in parent.data.tags["privacy.dp"] or "DP-SGD" in parent.data.tags["privacy.dp"]

    # the audit verb on that run's checkpoint (a DP model with GroupNorm) logs a nested run
    rc = main(["audit", "privacy", *isolated[1:], f"checkpoint=runs:/{parent.info.run_id}", "privacy.audit=loss",
               "privacy.audit_n=100", f"paths.output_dir={tmp_path}"])
    assert rc == 0
    assert "loss" in capsys.readouterr().out
    audits = client.search_runs(parent.info.experiment_id, "tags.role = 'audit'")
    assert audits and audits[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "mia_loss_auc" in audits[0].data.metrics


def _gdp_mu(history: list) -> float:
    """mu of the CLT approximation (Bu et al. 2020) for Poisson-subsampled Gaussian steps, composed over history."""
    return math.sqrt(sum(q * q * steps * math.expm1(sigma**-2) for sigma, q, steps in history))


def test_gdp_epsilon_composes_the_whole_history():
    history = [(1.2, 0.05, 100), (1.2, 0.05, 100), (2.0, 0.05, 50)]
    exact = exact_gaussian_epsilon(_gdp_mu(history), 1e-5)
    assert epsilon_of(history, 1e-5, "gdp") == pytest.approx(exact, rel=1e-4)
    assert epsilon_of(history[:2], 1e-5, "gdp") == pytest.approx(epsilon_of([(1.2, 0.05, 200)], 1e-5, "gdp"), rel=1e-9)
    assert epsilon_of([(1e4, 0.01, 10)], 1e-5, "gdp") == 0.0  # so little spent that delta alone covers it


def test_a_gdp_report_counts_every_round_before_the_next():
    cfg = DPConfig.from_config({"noise_multiplier": 1.0, "accountant": "gdp"})
    site = SitePrivacy(cfg, num_samples=1000, batch_size=50, planned_epochs=4)  # q = 1/20, 20 steps an epoch
    for _ in range(3 * site.steps_per_epoch):  # three epochs trained
        site._record_step(None)
    spent = exact_gaussian_epsilon(_gdp_mu([(1.0, 0.05, 60)]), 1e-5)
    assert site.epsilon == pytest.approx(spent, rel=1e-4)
    # the prediction for one more epoch is for all 80 steps, not for the 20 of that epoch alone
    after = exact_gaussian_epsilon(_gdp_mu([(1.0, 0.05, 80)]), 1e-5)
    assert site.check_budget(1, "a") == pytest.approx(after, rel=1e-4)
    assert "gdp accountant (an approximation, not an upper bound)" in describe(cfg)


def test_gdp_neither_calibrates_noise_nor_enforces_a_budget():
    """GDP (a central-limit approximation) can under-state epsilon: it may only report, never decide."""
    for privacy in ({"epsilon": 8.0, "accountant": "gdp"},
                    {"noise_multiplier": 1.0, "budget": 3.0, "accountant": "gdp"}):
        with pytest.raises(FedmedError, match=r"^privacy\.accountant=gdp .*rdp or prv"):
            DPConfig.from_config(privacy)
    with pytest.raises(FedmedError, match="privacy.accountant"):
        calibrate_noise(8.0, 1e-5, 0.1, 40, "gdp")
    cfg = DPConfig(noise_multiplier=1.0, budget=3.0, accountant="gdp")  # built around from_config
    with pytest.raises(FedmedError, match="privacy.accountant"):
        SitePrivacy(cfg, num_samples=1000, batch_size=50, planned_epochs=4).check_budget(1, "a")


def test_the_budget_check_counts_every_round():
    """A round that alone stays well inside the budget is refused once the run as a whole would pass it."""
    cfg = DPConfig.from_config({"noise_multiplier": 1.0, "budget": 3.0})
    site = SitePrivacy(cfg, num_samples=1000, batch_size=50, planned_epochs=10)
    epochs = 0
    while epochs < 50:
        try:
            site.check_budget(1, "a")
        except PrivacyBudgetExhausted:
            break
        for _ in range(site.steps_per_epoch):
            site._record_step(None)
        epochs += 1
    assert 1 < epochs < 50 and site.epsilon <= 3.0
    assert epsilon_of([(1.0, 0.05, (epochs + 1) * 20)], 1e-5, "rdp") > 3.0  # the refused epoch would have passed it


def test_attack_metrics_rank_raw_scores_like_scikit_learn():
    """Large raw scores (LiRA likelihood ratios, logit gaps) keep their order: nothing squashes them into ties."""
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    non = rng.normal(0.0, 1.0, 1000)
    non[:2] = [55.0, 50.0]  # two confident false positives
    members = np.r_[np.linspace(60.0, 80.0, 20), rng.normal(1.0, 1.0, 980)]  # 20 members above them all
    scores, is_member = np.r_[members, non], np.r_[np.ones(1000), np.zeros(1000)]
    fpr, tpr, _ = roc_curve(is_member, scores)
    ref_low = float(tpr[fpr <= 0.001].max())
    assert ref_low == pytest.approx(0.02)
    res = attack_metrics("raw", scores, is_member)
    assert res.tpr_at_01pct == pytest.approx(ref_low)
    assert res.tpr_at_1pct == pytest.approx(float(tpr[fpr <= 0.01].max()))
    assert res.auc == pytest.approx(roc_auc_score(is_member, scores), abs=1e-12)
    # ties count half, as in scikit-learn
    tied = np.round(scores)
    assert attack_metrics("tied", tied, is_member).auc == pytest.approx(roc_auc_score(is_member, tied), abs=1e-12)


def test_the_privacy_record_names_a_site_without_dp_accounting():
    from fedmed.privacy.record import format_record, privacy_record

    report = {"epsilon": 8.0, "delta": 1e-5, "noise_multiplier": 1.1, "dp_steps": 10}
    rec = privacy_record(mode="federated", sites=["a", "b"], rounds_done=1, bytes_up=[1], bytes_down=[1],
                         compression="none", secure_aggregation=False, dp={"a": report},
                         dp_setting="DP-SGD epsilon=8", audit=[], num_train=10)
    assert rec["dp_unreported"] == ["b"]
    assert "b: NO DP-SGD accounting reported" in format_record(rec)
    off = privacy_record(mode="federated", sites=["a", "b"], rounds_done=1, bytes_up=[1], bytes_down=[1],
                         compression="none", secure_aggregation=False, dp=None, dp_setting="off", audit=[],
                         num_train=10)
    assert off["dp_unreported"] == []


def test_the_privacy_record_says_which_class_statistics_the_sites_sent():
    from fedmed.privacy.record import format_record, privacy_record

    common = dict(sites=["a", "b"], rounds_done=1, bytes_up=[1], bytes_down=[1], compression="none",
                  secure_aggregation=False, dp=None, dp_setting="off", audit=[], num_train=10)
    rec = privacy_record(mode="federated", class_statistics={"class_features", "label_counts"}, **common)
    assert rec["class_statistics_shared"] == ["class_features", "label_counts"]
    text = format_record(rec)
    assert "statistics sent:          per-class mean and covariance of the model's penultimate features" in text
    assert "training images per class (each site's, in the clear)" in text
    assert "statistics sent" not in format_record(privacy_record(mode="federated", **common))
    masked = format_record(privacy_record(mode="federated", class_statistics={"label_counts"},
                                          **{**common, "secure_aggregation": True}))
    assert "training images per class (masked: the server saw only the federation's sum)" in masked
