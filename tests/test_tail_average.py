"""federation.average_from: the mean of the global models of the last rounds (or of a baseline's last epochs) is
what is evaluated, selected and returned, while training goes on from the plain model."""

from __future__ import annotations

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from fedmed.cli import main
from fedmed.errors import FederationError
from fedmed.federated import (
    FederationSettings,
    InProcessSite,
    Orchestrator,
    SiteClient,
    Strategy,
    TrainingSettings,
    fedavg,
)
from fedmed.federated.tail_average import TailAverage
from fedmed.models import CompactCNN
from fedmed.models.classifier import Classifier
from fedmed.models.metrics import evaluate
from tests.test_orchestrator import clients as two_sites
from tests.test_orchestrator import factory, synthetic_site


def clients():
    """Two classes that overlap: the validation loss stays well above 0 and moves from round to round."""
    return two_sites(noise=1.0, shift=0.3)


def test_running_mean_matches_torch_averaged_model():
    """The same equal-weight mean as torch's own stochastic weight averaging (``AveragedModel``, buffers too)."""
    torch.manual_seed(0)
    nets = [CompactCNN(in_channels=1, num_classes=3, hidden=8) for _ in range(4)]
    for k, net in enumerate(nets):  # BatchNorm statistics and batch counters that differ between the models
        net.train()
        for _ in range(k + 1):
            net(torch.randn(8, 1, 12, 12) + k)
    tail = TailAverage(start=2)
    reference = AveragedModel(nets[1], use_buffers=True)
    reference.update_parameters(nets[1])  # torch's mean starts with the first model it is given
    assert tail.update(1, nets[0].state_dict()) is None  # before the start: nothing is averaged
    mean = tail.update(2, nets[1].state_dict())
    for net in nets[2:]:
        reference.update_parameters(net)
        mean = tail.update(3, net.state_dict())
    assert mean is not None and tail.count == 3
    expected = reference.module.state_dict()
    floats = [k for k, v in mean.items() if v.is_floating_point()]
    assert any("running_mean" in k for k in floats)
    for k in floats:
        torch.testing.assert_close(mean[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
        # and not simply the last model
        assert not torch.allclose(mean[k], nets[-1].state_dict()[k]) or torch.allclose(
            nets[-1].state_dict()[k], nets[1].state_dict()[k]), k
    counters = [k for k, v in mean.items() if not v.is_floating_point()]
    assert counters and all(torch.equal(mean[k], nets[-1].state_dict()[k]) for k in counters)  # the latest's

    again = TailAverage(start=2)
    again.load_state_dict(tail.state_dict())
    assert again.count == 3 and all(torch.equal(again.mean[k], mean[k]) for k in mean)  # type: ignore[index]
    with pytest.raises(ValueError, match="same tensors"):
        tail.update(4, {"other": torch.zeros(1)})


def test_federation_evaluates_selects_and_returns_the_mean_of_the_last_rounds():
    torch.manual_seed(0)
    initial = factory().net.state_dict()
    orch = Orchestrator([InProcessSite(c) for c in clients()], Strategy(),
                        FederationSettings(rounds=4, local_epochs=1, select="last", average_from=3))
    result = orch.run(initial)
    # replay by hand: every round trains from the plain FedAvg model, whatever is averaged
    fresh = clients()
    w, globals_ = initial, []
    for r in range(1, 5):
        fits = [c.train(w, r, 1) for c in fresh]
        w = fedavg([f.weights for f in fits], [f.num_samples for f in fits])
        globals_.append(w)
    for k in w:
        assert torch.equal(result.final_weights[k], w[k]), k  # training went on from the plain model
    mean = {k: (globals_[2][k] + globals_[3][k]) / 2 if w[k].is_floating_point() else w[k] for k in w}
    for k in w:
        torch.testing.assert_close(result.weights[k], mean[k], msg=k)
    assert result.round == 4
    # what the sites evaluated at round 4 is the mean, not the plain model
    net = factory().net
    net.load_state_dict(result.weights)
    losses = [(evaluate(net, torch.utils.data.DataLoader(c.data.val, 256), 2)[0]["loss"], len(c.data.val))
              for c in fresh]
    expected_loss = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert result.history[-1].metrics["val_loss"] == pytest.approx(expected_loss, rel=1e-5)
    net.load_state_dict(w)
    plain = sum(evaluate(net, torch.utils.data.DataLoader(c.data.val, 256), 2)[0]["loss"] * len(c.data.val)
                for c in fresh) / sum(len(c.data.val) for c in fresh)
    assert expected_loss > 0.05 and plain != pytest.approx(expected_loss, rel=1e-5)
    with pytest.raises(ValueError, match="average_from"):
        FederationSettings(rounds=4, average_from=5)


def test_resumed_federation_keeps_averaging(tmp_path):
    """A federation stopped after round 3 of 4 and resumed ends with the same mean as one run straight through."""
    torch.manual_seed(0)
    initial = factory().net.state_dict()
    settings = FederationSettings(rounds=4, local_epochs=1, select="last", average_from=2)
    straight = Orchestrator([InProcessSite(c) for c in clients()], Strategy(), settings).run(initial)
    Orchestrator([InProcessSite(c) for c in clients()], Strategy(),
                 FederationSettings(rounds=3, local_epochs=1, select="last", average_from=2),
                 checkpoint_dir=tmp_path).run(initial)
    after3 = torch.load(tmp_path / "server.pt", weights_only=False)
    assert after3["tail_average"]["count"] == 2  # rounds 2 and 3
    resumed = Orchestrator([InProcessSite(c) for c in clients()], Strategy(), settings).run(initial, resume=after3)
    for k in straight.weights:
        torch.testing.assert_close(resumed.weights[k], straight.weights[k], msg=k)
    for kept in (None, {**after3["tail_average"], "start": 3}):  # not averaging, or from another round
        with pytest.raises(FederationError, match="average_from"):
            Orchestrator([InProcessSite(c) for c in clients()], Strategy(), settings).run(
                initial, resume={**after3, "tail_average": kept})
    mean = after3["tail_average"]["mean"]
    for bad in ({**after3["tail_average"], "count": "2"},  # a checkpoint from elsewhere is checked, not trusted
                {**after3["tail_average"], "mean": {k: v for k, v in mean.items() if "head" not in k}},
                {**after3["tail_average"], "mean": {k: v.double() for k, v in mean.items()}},
                {**after3["tail_average"], "mean": None}):
        with pytest.raises(FederationError, match="unusable"):
            Orchestrator([InProcessSite(c) for c in clients()], Strategy(), settings).run(
                initial, resume={**after3, "tail_average": bad})


def test_baseline_returns_the_mean_of_its_last_epochs():
    states: list[dict[str, torch.Tensor]] = []

    class Recording(Classifier):
        def on_train_epoch_end(self):
            states.append({k: v.detach().clone() for k, v in self.net.state_dict().items()})

    def recording_factory():
        return Recording(CompactCNN(in_channels=1, num_classes=2, hidden=16), 2, lr=1e-2)

    client = SiteClient("s0", synthetic_site(0, 60, 0.4), recording_factory,
                        TrainingSettings(batch_size=16, trainer={"accelerator": "cpu"}, seed=5))
    weights, epoch = client.train_alone(4, select="last", average_from=2)
    assert len(states) == 4 and epoch == 4
    for k, v in weights.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(s[k] for s in states[1:]) / 3, msg=k)
    best, chosen = client.train_alone(4, select="best_val_loss", average_from=3)
    assert 1 <= chosen <= 4


def test_average_from_beyond_the_rounds_is_refused(isolated, capsys):
    assert main(["fit", *isolated, "federation.rounds=3", "federation.average_from=4"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "federation.average_from=4" in err and "federation.rounds=3" in err
    assert main(["fit", *isolated, "federation.average_from=0"]) == 1
    assert "federation.average_from=0" in capsys.readouterr().err
