"""Selection among head-calibrated models (``federation.calibrate_from``): from a round (an epoch, for the
baselines) on, the model the sites evaluate, that selection may keep and that the run returns has its classifier
layer re-fitted on virtual features of that round's statistics; training itself is not touched."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from fedmed.config import compose
from fedmed.contract import first_difference, terms
from fedmed.federated import FederationSettings, InProcessSite, Orchestrator
from fedmed.federated.statistics import LABEL_COUNTS, HeadCalibration, class_statistics, summed
from fedmed.flower import grid as fgrid
from fedmed.models.cnn import CompactCNN
from fedmed.tasks import fit
from tests.conftest import PNEUMONIA, needs
from tests.helpers import strategy as make_strategy
from tests.test_flower_app import LoopbackGrid, serverapp  # noqa: F401 - the fixture
from tests.test_orchestrator import factory
from tests.test_site_shift import make_site

CALIBRATION = HeadCalibration(samples=200, epochs=3, seed=0)
SIZES = (40, 90)


def refit_by_hand(weights: dict[str, torch.Tensor], datasets) -> dict[str, torch.Tensor]:
    """The head calibration of ``weights`` from the sites' training data, computed here: the moments of the
    network's penultimate features per site (every class holds >= 10 images: none is withheld), summed."""
    net = factory().net
    net.load_state_dict(weights)
    stats = [class_statistics(net, d, 2, True) for d in datasets]
    assert all(s["counts"].min() >= 10 for s in stats)
    return CALIBRATION.fit(factory().net, weights, summed(stats))


def federation(rounds: int, calibrate_from: int | None, select: str = "last", secure: bool = False,
               sizes=SIZES, shares=None, flower: bool = False):
    torch.manual_seed(0)
    initial = factory().net.state_dict()
    makers = [lambda k=k, n=n: make_site(k, n, prior="site", secure=secure,
                                         **({"shares": shares} if shares and k == 1 else {}))
              for k, n in enumerate(sizes)]
    sites = [m() for m in makers]
    transports = (fgrid.accept(LoopbackGrid({10 + k: m for k, m in enumerate(makers)}), [s.name for s in sites],
                               timeout=30, hello={}) if flower else [InProcessSite(s) for s in sites])
    orch = Orchestrator(transports, make_strategy("fedavg"),
                        FederationSettings(rounds=rounds, select=select, calibrate_from=calibrate_from,
                                           num_classes=2, secure_aggregation=secure),
                        head=(CALIBRATION, factory().net) if calibrate_from is not None else None)
    return orch.run(initial), sites


def test_from_the_given_round_the_model_returned_is_the_round_model_with_its_head_refitted():
    result, sites = federation(3, calibrate_from=2)
    assert [h.metrics["head_calibrated"] for h in result.history] == [0.0, 1.0, 1.0]
    expected = refit_by_hand(result.final_weights, [s.data.train for s in sites])
    for k, v in expected.items():
        assert torch.allclose(result.weights[k], v, atol=1e-6), k
    assert not torch.equal(result.weights["head.5.weight"], result.final_weights["head.5.weight"])
    body = [k for k in expected if not k.startswith("head.5.")]
    assert all(torch.equal(result.weights[k], result.final_weights[k]) for k in body)


def test_calibrating_the_candidates_does_not_change_training():
    """Every round trains from the plain global model: the final global model is the one of a federation that
    never calibrates."""
    calibrated, _ = federation(3, calibrate_from=1)
    plain, _ = federation(3, calibrate_from=None)
    for k, v in plain.final_weights.items():
        assert torch.equal(calibrated.final_weights[k], v), k
    assert "head_calibrated" not in plain.history[0].metrics


def test_selection_keeps_the_best_calibrated_round_and_its_evaluations():
    result, _ = federation(4, calibrate_from=3, select="best_val_balanced_acc")
    scores = {h.round: h.metrics["val_pooled_balanced_acc"] for h in result.history}
    assert result.round == max(scores, key=lambda r: (scores[r], -r))  # the first of the best
    chosen = next(h for h in result.history if h.round == result.round)
    assert chosen.metrics["val_loss"] == pytest.approx(
        sum(e.metrics["loss"] * e.num_samples for e in result.site_eval.values())
        / sum(e.num_samples for e in result.site_eval.values()))


def test_under_secure_aggregation_every_rounds_statistics_travel_masked_with_the_same_result():
    clear, _ = federation(2, calibrate_from=1, sizes=(40, 90, 60))
    masked, _ = federation(2, calibrate_from=1, secure=True, sizes=(40, 90, 60))
    assert [h.metrics["head_calibrated"] for h in masked.history] == [1.0, 1.0]
    for k, v in clear.weights.items():  # up to the masked sum's fixed point
        assert torch.allclose(masked.weights[k].float(), v.float(), atol=1e-4), k


def test_over_flower_every_rounds_statistics_give_the_same_model(serverapp):  # noqa: F811
    here, _ = federation(1, calibrate_from=1, secure=True, sizes=(40, 90, 60))
    remote, _ = federation(1, calibrate_from=1, secure=True, sizes=(40, 90, 60), flower=True)
    assert [h.metrics["head_calibrated"] for h in remote.history] == [1.0]
    for k, v in here.weights.items():
        assert torch.allclose(remote.weights[k], v, atol=1e-6), k


def test_a_round_whose_statistics_do_not_come_keeps_its_plain_model(caplog):
    result, _ = federation(2, calibrate_from=1, shares=frozenset({LABEL_COUNTS}))
    assert [h.metrics["head_calibrated"] for h in result.history] == [0.0, 0.0]
    assert torch.equal(result.weights["head.5.weight"], result.final_weights["head.5.weight"])
    assert "round 1/2: head calibration skipped: site s1 sent no usable feature statistics: PermissionError" \
        in caplog.text


def test_a_baseline_selects_among_calibrated_epochs_without_changing_its_training():
    trained = {}
    for calibrate_from in (None, 2):
        torch.manual_seed(0)  # the same starting weights
        site = make_site(1, 90, prior="site")
        weights, epoch = site.train_alone(3, "last", calibrate=CALIBRATION if calibrate_from else None,
                                          calibrate_from=calibrate_from)
        trained[calibrate_from] = (weights, epoch, site.training.weights(), site.data.train)
    plain, _, plain_net, _ = trained[None]
    weights, epoch, net, data = trained[2]
    assert epoch == 3 and all(torch.equal(net[k], plain_net[k]) for k in plain_net)  # the same training
    assert all(torch.equal(plain[k], plain_net[k]) for k in plain)  # no calibration: the last epoch's model
    for k, v in refit_by_hand(net, [data]).items():
        assert torch.allclose(weights[k], v, atol=1e-6), k
    assert not torch.equal(weights["head.5.weight"], net["head.5.weight"])


@needs(PNEUMONIA)
def test_a_federation_calibrated_every_round_is_not_calibrated_again(isolated):
    res = fit.run(compose("fit", [*isolated, "experiment=smoke", "privacy.audit=none", "logger.log_model=false",
                                  "federation.calibrate_head=true", "federation.calibrate_from=1",
                                  "federation.select=last", "federation.calibrate_min_images=1"]))
    assert res["selected"] == "round 1/1, head calibrated"
    assert res["privacy"]["class_features_from_round"] == 1
    cfg = compose("fit", isolated)
    run = MlflowClient(cfg.logger.tracking_uri).get_run(res["run_id"])
    assert run.data.metrics["head_calibrated"] == 1.0
    assert not any(k.startswith("calibrated_val_") for k in run.data.metrics)  # no second re-fit after the rounds


def test_calibrating_every_round_is_a_term_of_the_federation():
    """What a site agrees to send (its feature statistics once, or every round from a round on) is part of the
    settings a site must share to join."""
    once, every = (compose("fit", ["experiment=smoke", "federation.calibrate_head=true", *extra])
                   for extra in ([], ["federation.calibrate_from=1"]))
    weights = CompactCNN(in_channels=1, num_classes=2).state_dict()
    why = first_difference(terms(once, weights), terms(every, weights))
    assert why is not None and "federation.calibrate_head" in why and "every_round_from=1" in why, why


def test_a_baseline_reports_each_candidates_validation_scores():
    """The candidates a baseline selects among are scored on its validation data and reported per epoch (MLflow
    metrics ``candidate_val_*`` of the run), the returned one with the score it was reported with."""
    torch.manual_seed(0)
    site = make_site(0, 60, prior="site")
    seen: dict[int, dict[str, float]] = {}
    weights, epoch = site.training.fit_alone(3, "last", on_epoch=lambda e, m: seen.setdefault(e, {}).update(m),
                                             calibrate=lambda w: refit_by_hand(w, [site.data.train]), calibrate_from=2)
    assert "candidate_val_balanced_acc" not in seen[1]
    assert all({"candidate_val_loss", "candidate_val_balanced_acc", "val_loss"} <= set(seen[e]) for e in (2, 3))
    scored = site.training.score_on_validation(weights)
    assert seen[3]["candidate_val_balanced_acc"] == pytest.approx(scored["balanced_acc"])
    assert seen[3]["candidate_val_loss"] == pytest.approx(scored["loss"])
