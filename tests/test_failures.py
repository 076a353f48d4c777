"""Sites that raise, hang, or send malformed updates are left out of the round; too few successes stop it cleanly."""

import time

import pytest
import torch
from mlflow import MlflowClient

from fedmed.federated import FederationError, FederationSettings, InProcessSite, Orchestrator, Strategy, fedavg
from fedmed.federated.updates import check_update
from fedmed.tracking import RunLog, Tracker
from tests.test_orchestrator import clients, factory


class Misbehaving(InProcessSite):
    """A real site whose answer to ``fit`` is spoiled in one of the ways a network or a bug would."""

    def __init__(self, client, how: str):
        super().__init__(client)
        self.how = how

    def fit(self, weights, round_idx, epochs, config=None):
        if self.how == "raise":
            raise RuntimeError("disk full at the site")
        if self.how == "hang":
            time.sleep(30)
        result = super().fit(weights, round_idx, epochs, config)
        w = result.weights
        key = next(iter(w))
        if self.how == "nan":
            w[key] = w[key].clone().fill_(float("nan"))
        elif self.how == "inf":
            w[key] = w[key].clone().fill_(float("inf"))
        elif self.how == "shape":
            w[key] = torch.zeros(3)
        elif self.how == "dtype":
            w[key] = w[key].double()
        elif self.how == "keys":
            w["extra.weight"] = w.pop(key)
        elif self.how == "samples":
            result.num_samples = 0
        return result


REASONS = {"raise": "RuntimeError: disk full", "nan": "NaN or Inf", "inf": "NaN or Inf", "shape": "has shape",
           "dtype": "has dtype", "keys": "wrong keys", "samples": "num_samples"}


def test_bad_sites_are_excluded_and_named(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "t", str(tmp_path / "art"))
    run_id = tracker.start_run("fed")
    sizes = (40,) * (1 + len(REASONS))
    good, *bad = clients(sizes)
    torch.manual_seed(0)
    initial = factory().net.state_dict()
    sites = [InProcessSite(good)] + [Misbehaving(c, how) for c, how in zip(bad, REASONS, strict=True)]
    result = Orchestrator(sites, Strategy(), FederationSettings(rounds=1, select="last"),
                          RunLog(tracker, run_id)).run(initial)
    # the round went on with the good site alone: its update is the new global model
    replay = clients(sizes)[0].train(initial, 1, 1)
    for k, v in fedavg([replay.weights], [replay.num_samples]).items():
        assert torch.equal(v, result.final_weights[k]), k
    assert result.history[0].sites == ["s0"] and result.history[0].metrics["sites_failed"] == len(REASONS)
    tags = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run(run_id).data.tags
    for k, reason in enumerate(REASONS.values(), start=1):
        assert reason in tags[f"excluded.round_001.s{k}"], (k, tags)


def test_site_over_the_timeout_is_left_out():
    good, slow = clients((40, 40))
    orch = Orchestrator([InProcessSite(good), Misbehaving(slow, "hang")], Strategy(),
                        FederationSettings(rounds=1, site_timeout=5))
    t0 = time.perf_counter()
    result = orch.run(factory().net.state_dict())
    assert time.perf_counter() - t0 < 25 and result.history[0].sites == ["s0"]


def test_too_few_successful_sites_fail_the_round_cleanly(tmp_path):
    a, b = clients((40, 40))
    orch = Orchestrator([Misbehaving(a, "raise"), Misbehaving(b, "nan")], Strategy(),
                        FederationSettings(rounds=2, min_sites=1), checkpoint_dir=tmp_path)
    with pytest.raises(FederationError, match=r"round 1: only 0 of 2 sites.*min_sites=1"):
        orch.run(factory().net.state_dict())
    a, b = clients((40, 40))
    orch = Orchestrator([InProcessSite(a), Misbehaving(b, "raise")], Strategy(),
                        FederationSettings(rounds=1, min_sites=2))
    with pytest.raises(FederationError, match="only 1 of 2"):
        orch.run(factory().net.state_dict())


def test_check_update_accepts_a_good_update():
    site = clients((40,))[0]
    w = factory().net.state_dict()
    assert check_update(w, site.train(w, 1, 1)) is None
    assert "not a FitResult" in check_update(w, {"w": 1})
