"""fedmed against independent reference implementations (docs/crosschecks.md).

Aggregation against Flower's (``flwr.server.strategy.aggregate``, ``FedAdam``), privacy accounting
against Google's ``dp_accounting`` (RDP and PLD), metrics and membership-inference ROC against
scikit-learn, Grad-CAM against MONAI's ``monai.visualize.GradCAM``; the secure sum against plain
FedAvg, and Integrated Gradients against its own completeness axiom. Where fedmed differs from a
reference on purpose, the test compares the parts where they agree and names the difference.
"""

from __future__ import annotations

import math
import warnings

import dp_accounting as dpa
import flwr.server.strategy.aggregate as flwr_agg
import numpy as np
import pytest
import sklearn.metrics as skm
import torch
from torch import nn

from fedmed import aggregation as agg
from fedmed.errors import FedmedError
from fedmed.explain.methods import IG_STEPS, explain, integrated_gradients
from fedmed.models import CompactCNN
from fedmed.models.metrics import compute_metrics, evaluate, make_metrics
from fedmed.privacy import secagg as sa
from fedmed.privacy.audit import attack_metrics, roc
from fedmed.privacy.dp import RDP_ALPHAS, calibrate_noise, epsilon_of


# -- aggregation vs Flower --------------------------------------------------------------------
def _states(k: int, seed: int, bn: bool = True, dtype: torch.dtype = torch.float64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        s = {"conv.weight": torch.randn(4, 3, 3, generator=g, dtype=dtype),
             "fc.bias": torch.randn(5, generator=g, dtype=dtype)}
        if bn:
            s.update({"bn.running_mean": torch.randn(4, generator=g, dtype=dtype),
                      "bn.running_var": torch.rand(4, generator=g, dtype=dtype) + 0.5,
                      "bn.num_batches_tracked": torch.tensor(10 * (i + 1))})
        out.append(s)
    return out


def _results(states, ns) -> list[tuple[list[np.ndarray], int]]:
    """Flower's input: (list of arrays, num_examples) per site, keys in the states' order."""
    return [([t.numpy() for t in s.values()], int(n)) for s, n in zip(states, ns, strict=True)]


def _as_dict(arrays, like) -> dict[str, np.ndarray]:
    return dict(zip(like, arrays, strict=True))


def test_fedavg_matches_flower_aggregate():
    states, ns = _states(4, 0), [10, 30, 25, 7]
    ref = _as_dict(flwr_agg.aggregate(_results(states, ns)), states[0])
    plain = agg.fedavg(states, ns, bn_stats="mean")
    for k, v in plain.items():
        if v.is_floating_point():
            np.testing.assert_allclose(v.numpy(), ref[k], rtol=1e-12, atol=1e-15, err_msg=k)
    # integer buffers: Flower returns the float mean; fedmed keeps the dtype, rounding to the nearest integer
    assert plain["bn.num_batches_tracked"].dtype == torch.int64
    assert int(plain["bn.num_batches_tracked"]) == round(float(ref["bn.num_batches_tracked"]))
    # BatchNorm pooled (fedmed's default): the variance of the pooled data = the mean of the variances (Flower's
    # plain mean) + the weighted spread of the site means, itself a Flower weighted mean
    pooled = agg.fedavg(states, ns, bn_stats="pooled")
    spread = flwr_agg.aggregate([([(s["bn.running_mean"].numpy() - ref["bn.running_mean"]) ** 2], n)
                                 for s, n in zip(states, ns, strict=True)])[0]
    np.testing.assert_allclose(pooled["bn.running_mean"].numpy(), ref["bn.running_mean"], rtol=1e-12)
    np.testing.assert_allclose(pooled["bn.running_var"].numpy(), ref["bn.running_var"] + spread, rtol=1e-12)
    assert not np.allclose(pooled["bn.running_var"].numpy(), ref["bn.running_var"])  # the difference is real


def test_fedavg_in_float32_matches_flower_to_float32_rounding():
    states, ns = _states(3, 1, bn=False, dtype=torch.float32), [5, 50, 500]
    ref = _as_dict(flwr_agg.aggregate(_results(states, ns)), states[0])
    for k, v in agg.fedavg(states, ns).items():
        assert v.dtype == torch.float32
        np.testing.assert_allclose(v.numpy(), ref[k], rtol=2e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_coordinate_median_matches_flower(k):
    states = _states(k, k)
    ref = _as_dict(flwr_agg.aggregate_median(_results(states, [1] * k)), states[0])
    for key, v in agg.coordinate_median(states).items():
        if v.is_floating_point():
            np.testing.assert_allclose(v.numpy(), ref[key], rtol=1e-12, atol=1e-15, err_msg=key)
        else:  # an even count's median of integers is a half-integer in Flower; fedmed rounds it
            assert torch.equal(v, torch.as_tensor(np.round(ref[key])).to(v.dtype))


@pytest.mark.parametrize("k,beta", [(5, 0.2), (7, 0.3), (10, 0.1), (10, 0.25)])
def test_trimmed_mean_matches_flower(k, beta):
    states = _states(k, 10 + k, bn=False)
    ref = _as_dict(flwr_agg.aggregate_trimmed_avg(_results(states, [1] * k), beta), states[0])
    for key, v in agg.trimmed_mean(states, beta).items():
        np.testing.assert_allclose(v.numpy(), ref[key], rtol=1e-12, atol=1e-15, err_msg=key)


def test_trimmed_mean_drops_one_per_end_where_flower_drops_none():
    """beta * K < 1 (0.2 * 4): Flower cuts nothing (a plain mean, which one attacker controls); fedmed cuts one."""
    states = _states(4, 3, bn=False)
    ours = agg.trimmed_mean(states, 0.2)
    no_cut = _as_dict(flwr_agg.aggregate_trimmed_avg(_results(states, [1] * 4), 0.2), states[0])
    one_cut = _as_dict(flwr_agg.aggregate_trimmed_avg(_results(states, [1] * 4), 0.25), states[0])
    for key, v in ours.items():
        np.testing.assert_allclose(v.numpy(), one_cut[key], rtol=1e-12, atol=1e-15, err_msg=key)
        assert not np.allclose(v.numpy(), no_cut[key])


@pytest.mark.parametrize("f,m", [(1, 1), (1, 3), (2, 2)])
def test_krum_matches_flower(f, m):
    states, ns = _states(8, 20 + f, bn=False), [3, 9, 4, 12, 7, 5, 6, 10]
    for t in states[5].values():  # a Byzantine site far from the rest
        t.add_(8.0)
    ours, kept = agg.krum(states, ns, f=f, m=m)
    ref = flwr_agg.aggregate_krum(_results(states, ns), num_malicious=f, to_keep=0 if m == 1 else m)
    assert 5 not in kept and len(kept) == m
    for key, arr in _as_dict(ref, states[0]).items():
        np.testing.assert_allclose(ours[key].numpy(), arr, rtol=1e-12, atol=1e-15, err_msg=key)


def test_fedadam_moments_match_flower():
    """FedAdam (Reddi et al. 2021) over three rounds, from the same global weights each round.

    The first moment is Flower's exactly. The second starts at tau^2 in fedmed and at 0 in Flower, so
    v_fedmed = v_flower + beta2^t tau^2. Flower also scales the step by Adam's bias correction
    sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)); fedmed does not: its step is lr m / (sqrt(v) + tau).
    """
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.strategy import FedAdam

    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    global_w = _states(1, 30, bn=False)[0]
    strategy = FedAdam(initial_parameters=ndarrays_to_parameters([t.numpy() for t in global_w.values()]),
                       eta=lr, beta_1=b1, beta_2=b2, tau=tau)
    moments = None
    for r in (1, 2, 3):
        states, ns = _states(3, 30 + r, bn=False), [4, 8, 12]
        fits = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(a), n, {})) for a, n in _results(states, ns)]
        strategy.current_weights = [t.numpy().copy() for t in global_w.values()]
        strategy.aggregate_fit(r, fits, [])
        new, moments = agg.server_opt_step(global_w, agg.fedavg(states, ns), moments, "adam", lr, b1, b2, tau)
        for i, key in enumerate(global_w):
            m_ref, v_ref = strategy.m_t[i], strategy.v_t[i] + b2**r * tau**2
            np.testing.assert_allclose(moments["m"][key].numpy(), m_ref, rtol=1e-10, atol=1e-15, err_msg=key)
            np.testing.assert_allclose(moments["v"][key].numpy(), v_ref, rtol=1e-10, atol=1e-15, err_msg=key)
            step = global_w[key].numpy() + lr * m_ref / (np.sqrt(v_ref) + tau)
            np.testing.assert_allclose(new[key].numpy(), step, rtol=1e-10, atol=1e-13, err_msg=key)
        global_w = new


def test_fedavgm_server_momentum_matches_flower():
    """FedAvgM over four rounds against Flower's ``FedAvgM`` (server lr 0.7, momentum 0.9), each
    strategy feeding its own result back as the next global model."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvgM

    from fedmed.federated.messages import FitResult
    from fedmed.federated.strategies.fedavgm import FedAvgM as Ours

    global_w = _states(1, 40, bn=False)[0]
    ref = FedAvgM(initial_parameters=ndarrays_to_parameters([t.numpy() for t in global_w.values()]),
                  server_learning_rate=0.7, server_momentum=0.9)
    ours = Ours(server_lr=0.7, server_momentum=0.9)
    for r in (1, 2, 3, 4):
        states, ns = _states(3, 40 + r, bn=False), [5, 9, 2]
        fits = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(a), n, {})) for a, n in _results(states, ns)]
        params, _ = ref.aggregate_fit(r, fits, [])
        updates = [FitResult(f"s{i}", s, n) for i, (s, n) in enumerate(zip(states, ns, strict=True))]
        new = ours.aggregate_fit(global_w, updates)
        for key, arr in _as_dict(parameters_to_ndarrays(params), global_w).items():
            np.testing.assert_allclose(new[key].numpy(), arr, rtol=1e-10, atol=1e-13, err_msg=f"round {r} {key}")
        assert not np.allclose(new["fc.bias"].numpy(), agg.fedavg(states, ns)["fc.bias"].numpy())
        global_w = new


def test_pooled_validation_balanced_accuracy_matches_sklearn():
    """The sites' confusion matrices summed give scikit-learn's balanced accuracy of their labels together."""
    from fedmed.federated.messages import EvalResult
    from fedmed.federated.orchestrator import pooled_balanced_acc
    from fedmed.models.metrics import make_metrics

    rng = np.random.default_rng(3)
    ys, ps, results = [], [], []
    for i, (n, classes) in enumerate([(40, [0, 1]), (25, [1, 2, 3]), (9, [3])]):  # class 4 nowhere, 0 at one site
        y = rng.choice(classes, n)
        p = np.where(rng.random(n) < 0.6, y, rng.integers(0, 5, n))
        m = make_metrics(5)
        m.update(torch.nn.functional.one_hot(torch.as_tensor(p), 5).float(), torch.as_tensor(y))
        results.append(EvalResult(f"s{i}", n, {}, m.compute()["confmat"]))
        ys.append(y)
        ps.append(p)
    ref = skm.balanced_accuracy_score(np.concatenate(ys), np.concatenate(ps))
    assert pooled_balanced_acc(results) == pytest.approx(ref, abs=1e-12)
    assert math.isnan(pooled_balanced_acc([*results, EvalResult("no-confmat", 3, {})]))


# -- privacy accounting vs dp_accounting -------------------------------------------------------
def _event(history):
    return dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), t)
                                for s, q, t in history])


def _pld_epsilon(history, delta: float) -> float:
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)  # pessimistic: an upper bound
    acc.compose(_event(history))
    return float(acc.get_epsilon(delta))


def _rdp_epsilon(history, delta: float, orders) -> float:
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant(list(orders))
    acc.compose(_event(history))
    return float(acc.get_epsilon(delta))


INTEGER_ORDERS = [a for a in RDP_ALPHAS if float(a).is_integer()]
HISTORIES = [([(3.0, 0.01, 2000)], 1e-6), ([(10.0, 0.2, 50)], 1e-5), ([(1.0, 0.1, 100)], 1e-5),
             ([(0.8, 0.05, 300), (1.5, 0.05, 200)], 1e-5)]


@pytest.mark.parametrize("history,delta", HISTORIES)
def test_rdp_epsilon_matches_dp_accounting(history, delta):
    """Equal where the best Renyi order is an integer; below dp_accounting where it is fractional.

    dp_accounting bounds the RDP of fractional orders from above (it can be loose there by several
    percent); Opacus computes them exactly. Either way an RDP epsilon can never be below the PLD one.
    """
    ours = epsilon_of(history, delta, "rdp")
    ref = _rdp_epsilon(history, delta, INTEGER_ORDERS)
    if history[0][0] >= 3:  # large noise: the optimum is an integer order
        assert ours == pytest.approx(ref, rel=1e-6)
    assert _pld_epsilon(history, delta) <= ours <= ref * (1 + 1e-9)


@pytest.mark.parametrize("history,delta", HISTORIES)
def test_prv_epsilon_matches_pld(history, delta):
    # PRV's epsilon_error is 0.01 and PLD's discretisation 1e-3: both are upper bounds within that of the truth
    assert epsilon_of(history, delta, "prv") == pytest.approx(_pld_epsilon(history, delta), abs=0.02)


def test_gdp_composition_matches_pld_in_its_own_regime():
    """GDP's central-limit approximation is close for many steps of small sampling rate and large noise."""
    history = [(2.0, 0.01, 5000)]
    assert epsilon_of(history, 1e-5, "gdp") == pytest.approx(_pld_epsilon(history, 1e-5), rel=0.05)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_calibrated_noise_spends_at_most_the_target_by_pld(kind):
    q, steps, delta, target = 0.1, 40, 1e-4, 8.0
    sigma = calibrate_noise(target, delta, q, steps, kind)
    spent = _pld_epsilon([(sigma, q, steps)], delta)
    assert spent <= target
    assert spent >= (0.8 if kind == "rdp" else 0.99) * target  # and not far below it (RDP is looser)


def test_gdp_calibration_overspends_and_is_refused():
    """Why gdp may not calibrate: Opacus' GDP-calibrated noise for epsilon 8 spends about 9 by PLD."""
    from opacus.accountants.utils import get_noise_multiplier

    q, steps, delta = 0.1, 40, 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma = get_noise_multiplier(target_epsilon=8.0, target_delta=delta, sample_rate=q, steps=steps,
                                     accountant="gdp", epsilon_tolerance=0.01)
    assert _pld_epsilon([(sigma, q, steps)], delta) > 8.5
    with pytest.raises(FedmedError, match="privacy.accountant"):
        calibrate_noise(8.0, delta, q, steps, "gdp")


# -- metrics and the membership-inference ROC vs scikit-learn -----------------------------------
def _fedmed_metrics(probs: torch.Tensor, y: torch.Tensor, k: int):
    m = make_metrics(k)
    m.update(probs[:50], y[:50])
    m.update(probs[50:], y[50:])
    return compute_metrics(m)


@pytest.mark.parametrize("case", ["all classes", "a class never seen", "a class never labelled but predicted"])
def test_metrics_match_scikit_learn(case):
    """Macro averages run over the classes in the labels or the predictions (scikit-learn's default labels)."""
    g = torch.Generator().manual_seed(3)
    k, n = 4, 150
    y = torch.randint(0, k if case == "all classes" else k - 1, (n,), generator=g)
    logits = torch.randn(n, k, generator=g) + 1.5 * nn.functional.one_hot(y, k)
    if case == "a class never seen":
        logits[:, k - 1] = -10.0
    elif case == "a class never labelled but predicted":
        logits[:, k - 1] += 1.0
    probs = logits.softmax(-1)
    scalars, confmat = _fedmed_metrics(probs, y, k)
    yn, pred, p = y.numpy(), probs.argmax(-1).numpy(), probs.double().numpy()
    assert (pred == k - 1).any() == (case != "a class never seen")
    assert scalars["acc"] == pytest.approx(skm.accuracy_score(yn, pred), rel=1e-6)
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        assert scalars[name] == pytest.approx(fn(yn, pred, average="macro", zero_division=0), rel=1e-6), name
    per_class = skm.f1_score(yn, pred, average=None, labels=list(range(k)), zero_division=0)
    assert [scalars[f"f1_class{i}"] for i in range(k)] == pytest.approx(per_class, rel=1e-6, abs=1e-7)
    defined = [c for c in range(k) if 0 < (yn == c).sum() < n]  # one-vs-rest AUROC needs both kinds
    assert scalars["auroc"] == pytest.approx(np.mean([skm.roc_auc_score(yn == c, p[:, c]) for c in defined]), rel=1e-6)
    assert np.array_equal(confmat.numpy(), skm.confusion_matrix(yn, pred, labels=list(range(k))))


def test_binary_auroc_and_loss_match_scikit_learn():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(120, 6, generator=g), torch.randint(0, 2, (120,), generator=g)
    torch.manual_seed(0)
    net = nn.Linear(6, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    scalars, _ = evaluate(net, loader, 2)
    with torch.no_grad():
        p = net(x).double().softmax(-1).numpy()
    assert scalars["auroc"] == pytest.approx(skm.roc_auc_score(y.numpy(), p[:, 1]), rel=1e-6)
    assert scalars["loss"] == pytest.approx(skm.log_loss(y.numpy(), p, labels=[0, 1]), rel=1e-5)


@pytest.mark.parametrize("scale,ties", [(1.0, False), (1e3, False), (1.0, True)])
def test_attack_roc_matches_scikit_learn(scale, ties):
    rng = np.random.default_rng(int(scale) + ties)
    is_member = np.r_[np.ones(700), np.zeros(1300)]
    scores = scale * (rng.normal(0, 1, 2000) + 0.8 * is_member)  # raw LiRA-like scores, far outside [0, 1]
    if ties:
        scores = np.round(scores * 2) / 2
    fpr, tpr = roc(scores, is_member)
    ref_fpr, ref_tpr, _ = skm.roc_curve(is_member, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-15)
    res = attack_metrics("x", scores, is_member)
    assert res.auc == pytest.approx(skm.roc_auc_score(is_member, scores), abs=1e-12)
    for got, limit in ((res.tpr_at_1pct, 0.01), (res.tpr_at_01pct, 0.001)):
        assert got == pytest.approx(float(ref_tpr[ref_fpr <= limit].max()), abs=1e-15)
    assert res.tpr_at_01pct > 0  # a score ranking this good finds some members at 0.1% FPR


# -- Grad-CAM vs MONAI ---------------------------------------------------------------------------
def test_gradcam_matches_monai(seed: int = 0):
    """MONAI's default post-processing maps (min, max) to (1, 0); fedmed's maps max to 1, hence 1 - MONAI's."""
    from monai.visualize import GradCAM

    torch.manual_seed(seed)
    net = CompactCNN(in_channels=1, num_classes=3).eval()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    cam = GradCAM(nn_module=net, target_layers=net.target_layers[0])
    for c in range(3):  # MONAI takes one class index for the whole batch
        ours = explain(net, x, "gradcam", targets=torch.full((4,), c))
        ref = 1 - cam(x, class_idx=c)[:, 0]
        assert ours.shape == ref.shape == (4, 28, 28)
        assert torch.allclose(ours, ref.float(), atol=1e-5), (c, float((ours - ref).abs().max()))


def test_gradcam_3d_agrees_with_monai_up_to_resampling():
    """Volumes: pytorch-grad-cam resizes with scipy.ndimage.zoom, MONAI interpolates trilinearly."""
    from monai.visualize import GradCAM

    torch.manual_seed(0)
    net = CompactCNN(in_channels=1, num_classes=2, spatial_dims=3).eval()
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = explain(net, x, "gradcam", targets=torch.ones(2, dtype=torch.long))
    ref = 1 - GradCAM(nn_module=net, target_layers=net.target_layers[0])(x, class_idx=1)[:, 0].float()
    for a, b in zip(ours, ref, strict=True):
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95


# -- secure aggregation vs plain FedAvg -----------------------------------------------------------
def _secure_mean(states, ns):
    names = [f"site{i}" for i in range(len(states))]
    keys = {n: sa.MaskingKey() for n in names}
    peers = {n: keys[n].public for n in names}
    masked = [sa.mask(sa.contribution(s, k), keys[n], n, peers, 1) for s, k, n in zip(states, ns, names, strict=True)]
    revealed = [sa.reveal(keys[n], n, {}, 1, len(masked[0])) for n in names]  # each site's self mask
    return sa.mean_state(sa.unmask_sum(masked, revealed), states[0])


def test_secure_sum_equals_fedavg_at_extreme_values():
    """Exact up to the fixed-point step 2^-24 of each n_k * w, from tiny values to the ring's limit."""
    k, ns = 4, [3, 5, 7, 9]
    largest = sa.contribution_limit(k) * (1 - 2.0**-40) / 2.0**sa.FRAC_BITS / max(ns)  # n_k |w| just below the limit
    g = torch.Generator().manual_seed(0)
    states = []
    for i, n in enumerate(ns):
        w = torch.randn(6, generator=g, dtype=torch.float64)
        big = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64) * largest * (1.0 if n == max(ns) else 0.9)
        states.append({"w.big": big, "w.tiny": w * 1e-9, "w.mid": w, "bn.running_mean": w[:3] * 100,
                       "bn.running_var": w[3:].abs() + 1, "bn.num_batches_tracked": torch.tensor(40 + i)})
    mean, total = _secure_mean(states, ns)
    ref = agg.fedavg(states, ns)
    assert total == sum(ns)
    step = k * 2.0**-sa.FRAC_BITS / sum(ns)  # rounding of each of the k contributions, divided by n
    means = torch.stack([s["bn.running_mean"].abs() for s in states]).amax(0)
    for key, v in ref.items():
        assert mean[key].dtype == v.dtype
        if v.is_floating_point():
            scale = torch.stack([s[key].abs() for s in states]).amax(0)  # float64 rounding of n_k * w and the sum
            if key == "bn.running_var":  # sent as var + mean^2; the server subtracts its mean^2 (error 2 |mean| step)
                scale, tol = scale + means**2, step * (1 + 2 * means)
            else:
                tol = torch.full_like(scale, step)
            assert bool(((mean[key] - v).abs() <= tol + 16 * 2.0**-52 * scale).all()), key
        else:
            assert torch.equal(mean[key], v)
    assert torch.sign(mean["w.big"]).tolist() == [1.0, -1.0, 1.0, 0.0]  # no wrap: the signs survive


def test_secure_sum_refuses_what_plain_fedavg_would_still_average():
    states, ns = _states(4, 7, bn=False), [1, 1, 1, 1]
    for s in states:
        s["conv.weight"][0, 0, 0] = 0.6 * 2.0**62 / 2.0**sa.FRAC_BITS  # fits the ring alone, not four of them
    assert math.isfinite(float(agg.fedavg(states, ns)["conv.weight"][0, 0, 0]))
    with pytest.raises(FedmedError, match="privacy.secure_aggregation"):
        _secure_mean(states, ns)


# -- Integrated Gradients: completeness --------------------------------------------------------------
def _blobs(n: int, seed: int) -> torch.Tensor:
    """Images with one bright Gaussian blob on a noisy background."""
    g = torch.Generator().manual_seed(seed)
    cx, cy = 4 + 20 * torch.rand(n, generator=g), 4 + 20 * torch.rand(n, generator=g)
    r = torch.arange(28.0)
    blob = torch.exp(-((r[None, None] - cx[:, None, None]) ** 2 + (r[None, :, None] - cy[:, None, None]) ** 2) / 18)
    return (0.3 * torch.rand(n, 28, 28, generator=g) + blob).clamp(0, 1)[:, None]


def _completeness_error(net: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Per image |sum of attributions - (f(x) - f(0))| / |f(x) - f(0)|, f the explained logit."""
    with torch.no_grad():
        t = net(x).argmax(-1)
        gap = (net(x) - net(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    attr = integrated_gradients(net, x, t, n_steps=steps)
    return (attr.flatten(1).sum(1).detach() - gap).abs() / gap.abs()


def _cnn_with_data_statistics(seed: int) -> nn.Module:
    """An untrained compact CNN whose BatchNorm layers hold the statistics of blob images (as after training)."""
    torch.manual_seed(seed)
    net = CompactCNN(in_channels=1, num_classes=2)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one pass sets the statistics of that batch
    net.train()
    with torch.no_grad():
        net(_blobs(64, 99))
    return net.eval()


def test_integrated_gradients_default_steps_keep_completeness():
    """With IG_STEPS the attributions sum to f(x) - f(0) within 2% on average; 24 steps miss by more than 5%."""
    net = _cnn_with_data_statistics(0)
    x = _blobs(8, 0)
    assert float(_completeness_error(net, x, IG_STEPS).mean()) < 0.02  # 1.6% (64 steps: 2.5%, 24: 8%)
    assert float(_completeness_error(net, x, 24).mean()) > 0.05  # the measure can tell too few steps
