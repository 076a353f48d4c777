"""Style sharing (``federation.style_mix``): each site's mean low-frequency amplitude spectrum, training images given
other sites' looks, what a site checks before it uses a relayed spectrum, and what the server and config refuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmed.build import shares
from fedmed.config import compose
from fedmed.contract import first_difference, terms
from fedmed.data.datamodule import ArrayDataset, SiteData
from fedmed.data.style import STYLE_SPECTRUM, StyleMix, band_radius, check_spectrum, mean_amplitude
from fedmed.errors import FederationError
from fedmed.federated import FederationSettings, InProcessSite, Orchestrator, SiteClient, TrainingSettings
from fedmed.flower import grid as fgrid
from fedmed.models import CompactCNN
from tests.helpers import strategy as make_strategy
from tests.test_flower_app import LoopbackGrid, serverapp  # noqa: F401 - the fixture
from tests.test_orchestrator import factory


def images(n: int, seed: int, gain: float = 1.0, size: int = 16, channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g) * gain).float()


def numpy_band(x: np.ndarray, r: int) -> np.ndarray:
    """The mean amplitude of the (2r+1)^2 lowest frequencies, from numpy's FFT (independent of torch's)."""
    amp = np.abs(np.fft.fftshift(np.fft.fft2(x.astype(np.float64)), axes=(-2, -1)))
    h, w = x.shape[-2:]
    return amp[..., h // 2 - r:h // 2 + r + 1, w // 2 - r:w // 2 + r + 1].mean(0)


@pytest.mark.parametrize("size", [16, 15])
def test_mean_amplitude_is_numpys_low_band_mean(size):
    x = images(300, 0, size=size, channels=3)  # more than one chunk of 256
    r = band_radius(size, size, 0.25)
    assert r == size // 8
    got = mean_amplitude(x, 0.25)
    assert got.shape == (3, 2 * r + 1, 2 * r + 1)
    np.testing.assert_allclose(got, numpy_band(x.numpy(), r), rtol=1e-9)
    assert got[:, r, r] == pytest.approx(x.double().sum((2, 3)).mean(0).numpy(), rel=1e-9)  # zero frequency


def test_an_images_own_look_leaves_it_unchanged_and_prob_zero_does_nothing():
    x = images(8, 1)
    for i in range(len(x)):
        same = StyleMix({"me": mean_amplitude(x[i:i + 1], 0.25)}, prob=1.0)(x[i:i + 1])
        torch.testing.assert_close(same, x[i:i + 1], atol=1e-5, rtol=0)
    assert torch.equal(StyleMix({"b": mean_amplitude(images(8, 2), 0.25)}, prob=0.0)(x), x)


def test_another_look_moves_the_low_band_amplitude_towards_it_and_keeps_phase_and_high_frequencies():
    x = images(1, 3) * 0.5 + 0.25
    own = mean_amplitude(x, 0.25)
    brighter = own * 1.5  # another site's look: more energy in every low frequency
    out = StyleMix({"other": brighter}, prob=1.0)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)
    r = (own.shape[-1] - 1) // 2
    ratio = mean_amplitude(out, 0.25) / own
    lam = ratio[0, r, r] - 1  # (1 - lam) * own + lam * 1.5 * own
    assert 0 < lam <= 0.5 + 1e-9
    np.testing.assert_allclose(ratio, 1 + lam, rtol=1e-4)  # one lam for the whole band
    fx, fo = (torch.fft.fftshift(torch.fft.fft2(t.double()), dim=(-2, -1)) for t in (x, out))
    band = (slice(None), slice(None), slice(8 - r, 8 + r + 1), slice(8 - r, 8 + r + 1))
    high = torch.ones_like(fx.real, dtype=torch.bool)
    high[band] = False
    torch.testing.assert_close(fo[high], fx[high], atol=1e-4, rtol=0)  # only the low band changed
    torch.testing.assert_close(fo[band].angle(), fx[band].angle(), atol=1e-5, rtol=0)  # its phase kept


def test_style_mix_is_a_function_of_its_seed_and_changes_about_prob_of_the_images():
    x = images(32, 4)
    mix = StyleMix({"a": mean_amplitude(images(32, 5, 2.0), 0.25), "b": mean_amplitude(images(32, 6, 0.3), 0.25)},
                   prob=0.5)
    mix.set_random_state(7)
    first = mix(x)
    mix.set_random_state(7)
    assert torch.equal(mix(x), first)
    changed = (first != x).flatten(1).any(1)
    assert 8 <= int(changed.sum()) <= 24
    assert torch.isfinite(first).all()


def test_a_relayed_spectrum_is_checked_against_the_sites_own():
    own = mean_amplitude(images(16, 0), 0.25)
    np.testing.assert_array_equal(check_spectrum("b", own * 2, own), own * 2)
    for bad, why in ((own[:, :-1], "expected an array of shape"), ("x", "expected an array of shape"),
                     (np.where(own > 0, np.nan, 0.0), "NaN or Inf"), (-own, "negative"),
                     (own * 50, "50 times this site's own"), (own / 50, "0.02 times")):
        with pytest.raises(ValueError, match=f"the style spectrum of site b.*{why}"):
            check_spectrum("b", bad, own)


# -- in a federation ----------------------------------------------------------------------------------
def looks_site(k: int, n: int, gain: float, mix: float = 0.5, name: str | None = None) -> SiteClient:
    """A site whose camera has its own gain: class 1 is brighter in the upper half."""
    g = torch.Generator().manual_seed(k)
    y = (torch.rand(n, generator=g) < 0.5).long()
    x = torch.rand(n, 1, 12, 12, generator=g) * 0.2
    x[y == 1, :, :6] += 0.5
    x = x * gain
    settings = TrainingSettings(batch_size=16, trainer={"accelerator": "cpu"}, seed=5, style_mix=mix, style_band=0.3,
                                shares=frozenset({STYLE_SPECTRUM}) if mix else frozenset())
    return SiteClient(name or f"s{k}", SiteData(ArrayDataset(x, y), ArrayDataset(x[:8], y[:8])), factory, settings,
                      site_index=k)


def test_every_site_trains_on_the_other_sites_looks():
    sites = [looks_site(0, 40, 1.0), looks_site(1, 48, 0.5), looks_site(2, 32, 1.5)]
    orch = Orchestrator([InProcessSite(c) for c in sites], make_strategy("fedavg"),
                        FederationSettings(rounds=1, select="last", style_mix=0.5))
    orch.run(factory().net.state_dict())
    assert sorted(orch.style_spectra or {}) == ["s0", "s1", "s2"]
    for s in sites:
        np.testing.assert_allclose(orch.style_spectra[s.name], numpy_band(s.data.train.x.numpy(), 1))
        mix = s.data.train.style
        assert isinstance(mix, StyleMix) and mix.names == sorted({"s0", "s1", "s2"} - {s.name})


def test_a_site_refuses_style_spectra_it_did_not_agree_to_or_that_are_malformed():
    w = factory().net.state_dict()
    plain = looks_site(0, 40, 1.0, mix=0.0)
    with pytest.raises(PermissionError, match="does not share its style spectrum"):
        plain.style()
    own = looks_site(1, 40, 1.0).style()["spectrum"]
    with pytest.raises(ValueError, match="configured with federation.style_mix=0"):
        plain.train(w, 1, 1, {"style_spectra": {"s1": own}})
    site = looks_site(0, 40, 1.0)
    with pytest.raises(ValueError, match="the server sent no style spectra"):
        site.train(w, 1, 1, {})
    with pytest.raises(ValueError, match="name no other site"):
        site.train(w, 1, 1, {"style_spectra": {"s0": own}})
    with pytest.raises(ValueError, match="site s1 holds NaN"):
        site.train(w, 1, 1, {"style_spectra": {"s1": own * np.nan}})
    with pytest.raises(ValueError, match="too few|fewer than"):
        looks_site(2, 6, 1.0).style()


def test_a_site_that_sends_no_usable_spectrum_stops_the_federation_before_training():
    class Broken(InProcessSite):
        def style(self):
            return {"site": self.name, "spectrum": np.full((1, 3, 3), np.inf)}

    sites = [looks_site(0, 40, 1.0), looks_site(1, 40, 0.5)]
    orch = Orchestrator([InProcessSite(sites[0]), Broken(sites[1])], make_strategy("fedavg"),
                        FederationSettings(rounds=1, select="last", style_mix=0.5))
    with pytest.raises(FederationError, match="site s1 could not send its style spectrum.*not a finite"):
        orch.run(factory().net.state_dict())
    assert sites[0].data.train.__class__ is ArrayDataset  # nobody trained
    quiet = [looks_site(0, 40, 1.0), looks_site(1, 40, 0.5, mix=0.0)]
    orch = Orchestrator([InProcessSite(c) for c in quiet], make_strategy("fedavg"),
                        FederationSettings(rounds=1, select="last", style_mix=0.5))
    with pytest.raises(FederationError, match="site s1 could not send.*PermissionError"):
        orch.run(factory().net.state_dict())
    with pytest.raises(ValueError, match="secure aggregation"):
        FederationSettings(rounds=1, style_mix=0.5, secure_aggregation=True)


def test_over_flower_the_sites_train_what_in_process_sites_train(serverapp):  # noqa: F811 - the fixture
    """The spectra cross Flower's serialization twice (``query.style``, then with every round's instructions) and
    each message is answered by a site built afresh: the federation is the in-process one, bit for bit."""
    settings = FederationSettings(rounds=2, select="last", style_mix=0.5)
    torch.manual_seed(0)
    initial = factory().net.state_dict()
    results = []
    for remote in (False, True):
        makers = [lambda k=k, n=n, gain=gain: looks_site(k, n, gain) for k, (n, gain) in enumerate(((40, 1.0),
                                                                                                    (48, 0.5)))]
        if remote:
            sites = fgrid.accept(LoopbackGrid({10 + k: make for k, make in enumerate(makers)}), ["s0", "s1"],
                                 timeout=30, hello={})
        else:
            sites = [InProcessSite(make()) for make in makers]
        orch = Orchestrator(sites, make_strategy("fedavg"), settings)
        results.append((orch.run(initial), orch.style_spectra))
    (want, want_spectra), (got, got_spectra) = results
    assert want_spectra is not None and got_spectra is not None and sorted(got_spectra) == ["s0", "s1"]
    for name, spectrum in want_spectra.items():
        np.testing.assert_array_equal(got_spectra[name], spectrum)
    for k in want.final_weights:
        assert torch.equal(got.final_weights[k], want.final_weights[k]), k
    plain = Orchestrator([InProcessSite(looks_site(k, n, g, mix=0.0)) for k, (n, g) in enumerate(((40, 1.0),
                                                                                                  (48, 0.5)))],
                         make_strategy("fedavg"), FederationSettings(rounds=2, select="last")).run(initial)
    assert any(not torch.equal(plain.final_weights[k], want.final_weights[k]) for k in want.final_weights)


def test_a_site_under_another_style_setting_differs_in_the_federations_terms():
    cfg, other = (compose("fit", ["experiment=smoke", *extra]) for extra in ([], ["federation.style_mix=0.5"]))
    weights = CompactCNN(in_channels=1, num_classes=2).state_dict()
    why = first_difference(terms(cfg, weights), terms(other, weights))
    assert why is not None and "federation.style" in why and "mix=0.5" in why, why
    assert STYLE_SPECTRUM in shares(other, federated=True) and STYLE_SPECTRUM not in shares(cfg, federated=True)


def test_the_privacy_record_names_the_style_spectrum_among_what_each_site_sent():
    from fedmed.privacy.record import format_record, privacy_record

    rec = privacy_record(mode="federated", sites=["a", "b"], rounds_done=1, bytes_up=[1], bytes_down=[1],
                         compression="none", secure_aggregation=False, dp=None, dp_setting="off", audit=[],
                         num_train=10, class_statistics={STYLE_SPECTRUM})
    assert "mean low-frequency amplitude spectrum of the training images (style sharing, relayed to every other " \
           "site) (each site's, in the clear)" in format_record(rec)
