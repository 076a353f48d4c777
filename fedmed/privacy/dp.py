"""Differential privacy at a site: DP-SGD with Opacus, a privacy accountant per site, and a budget.

A site's model is trained with per-sample gradient clipping and Gaussian noise (Opacus
``GradSampleModule`` + ``DPOptimizer``) on Poisson-sampled batches (``DPDataLoader``). Each site
keeps its own accountant across rounds, so its (epsilon, delta) is for everything its data went
into. Before a round the site predicts what the whole run would have spent after it and refuses
the round (raising :class:`PrivacyBudgetExhausted`) if that would pass its budget: the budget is
never exceeded.

Class statistics a site sends beyond its updates (the federation's label prior, head calibration:
:mod:`fedmed.federated.statistics`) are released with the Gaussian mechanism under the same
accountant (``privacy.statistics_noise``): each is one entry of the site's history, planned
before training so that DP-SGD's noise leaves room for it within ``privacy.epsilon``, and each is
answered once.

Noise is calibrated and budgets are enforced only with accountants that bound epsilon from above:
``rdp`` (Renyi DP) and ``prv`` (Gopi et al. 2021, its upper error bound). ``gdp`` (the central-limit
Gaussian DP approximation of Bu et al. 2020) can under-state epsilon (noise calibrated with it for
epsilon 8 spends about 9 by a PLD accountant), so it is accepted only to report a fixed noise
multiplier's epsilon, with no budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedmed.errors import FedmedError

log = logging.getLogger("fedmed")

ACCOUNTANTS = ("rdp", "prv", "gdp")
#: accountants whose epsilon is an upper bound: the only ones that calibrate noise and enforce a budget
UPPER_BOUNDS = ("rdp", "prv")


class PrivacyBudgetExhausted(FedmedError):
    """The site's next round would take its (epsilon, delta) past ``privacy.budget``; it does not train."""


def dp_compatible(net: nn.Module) -> tuple[nn.Module, list[str]]:
    """``net`` with every layer Opacus cannot train privately replaced (BatchNorm -> GroupNorm).

    BatchNorm mixes the samples of a batch, so per-sample gradients (and so DP-SGD) are undefined
    for it. In-place activations are made out-of-place (Opacus' backward hooks forbid modifying
    their outputs in place; the numbers are the same). Returns the fixed network and one line
    per change, e.g. ``features.block1.norm: BatchNorm2d -> GroupNorm(32 groups)``.
    """
    from opacus.validators import ModuleValidator

    before = {n: type(m).__name__ for n, m in net.named_modules()}
    fixed = ModuleValidator.fix(net)
    changes = []
    for n, m in fixed.named_modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            changes.append(f"{n}: {type(m).__name__}(inplace) -> {type(m).__name__}")
    for n, m in fixed.named_modules():
        if n in before and before[n] != type(m).__name__:
            detail = f"{m.num_groups} groups" if isinstance(m, nn.GroupNorm) else ""
            changes.append(f"{n}: {before[n]} -> {type(m).__name__}({detail})")
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise FedmedError(f"this model cannot be trained with DP-SGD even after fixing: {errors[:3]}")
    return fixed, changes


def make_accountant(kind: str):
    from opacus.accountants import create_accountant

    if kind not in ACCOUNTANTS:
        raise FedmedError(f"privacy.accountant={kind!r} is not one of {ACCOUNTANTS}")
    return create_accountant(mechanism=kind)


#: RDP orders searched: Opacus' defaults reach 63; large noise (small epsilon) wants higher ones
RDP_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 100, 128, 160, 200, 256, 384, 512]


def _kwargs(kind: str) -> dict:
    return {"alphas": RDP_ALPHAS} if kind == "rdp" else {}


def require_upper_bound(kind: str, use: str) -> None:
    """Refuse ``kind`` for ``use`` (calibrating noise, enforcing a budget) unless its epsilon is an upper bound."""
    if kind not in UPPER_BOUNDS:
        raise FedmedError(f"privacy.accountant={kind} is an approximation that can under-state epsilon and cannot "
                          f"{use}; use rdp or prv")


def gdp_epsilon(history: list, delta: float) -> float:
    """Epsilon of the whole ``history`` under the GDP approximation (Poisson sampling).

    Each entry is sqrt(T) q sqrt(exp(1/sigma^2) - 1)-GDP; GDP composes as mu = sqrt(sum mu_i^2).
    (Opacus' own GDP accountant reads only the last entry of its history.)
    """
    from opacus.accountants.analysis.gdp import compute_mu_poisson, delta_eps_mu, eps_from_mu

    mu = math.sqrt(sum(compute_mu_poisson(steps=t, noise_multiplier=s, sample_rate=q) ** 2 for s, q, t in history))
    if mu == 0 or delta_eps_mu(eps=0.0, mu=mu) <= delta:
        return 0.0
    if delta_eps_mu(eps=500.0, mu=mu) > delta:  # beyond the range Opacus' root finder searches
        return math.inf
    return float(eps_from_mu(mu=mu, delta=delta))


def epsilon_of(history: list, delta: float, kind: str) -> float:
    """Epsilon at ``delta`` after every step in ``history`` ([(noise_multiplier, sample_rate, steps)])."""
    if not history:
        return 0.0
    if kind == "gdp":
        return gdp_epsilon(history, delta)
    acc = make_accountant(kind)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta, **_kwargs(kind)))


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, kind: str,
                    fixed: Sequence[tuple[float, float, int]] = ()) -> float:
    """The smallest noise multiplier whose ``steps`` DP-SGD steps at ``sample_rate`` spend at most epsilon,
    together with the ``fixed`` releases [(noise multiplier, sample rate, steps)] planned beside them."""
    from opacus.accountants.utils import get_noise_multiplier

    require_upper_bound(kind, "calibrate the noise to privacy.epsilon")
    if not fixed:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=kind, epsilon_tolerance=0.01, **_kwargs(kind)))

    def spent(sigma: float) -> float:
        return epsilon_of([*fixed, (sigma, sample_rate, steps)], delta, kind)

    lo, hi = 0.0, 1.0
    while spent(hi) > epsilon:
        if hi > 1e6:  # the fixed releases alone spend it (planned_releases refuses that first)
            raise FedmedError(f"no DP-SGD noise keeps epsilon within {epsilon:g} beside the class statistics")
        lo, hi = hi, hi * 2
    while hi - lo > 1e-3 * hi:  # eps(hi) <= epsilon throughout: hi is the answer
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) > epsilon else (lo, mid)
    return hi


def planned_releases(cfg: DPConfig, releases: Sequence[str]) -> list[tuple[float, float, int]]:
    """The accountant's entries for ``releases`` of class statistics (``label_counts``, ``class_features``), refused
    without ``privacy.statistics_noise`` or where they alone would spend the target epsilon."""
    if not releases:
        return []
    if cfg.statistics_noise is None:
        raise FedmedError(f"sending {' and '.join(r.replace('_', ' ') for r in releases)} under DP-SGD needs "
                          "privacy.statistics_noise (their noise; their epsilon counts in the site's budget)")
    fixed = [release_entry(cfg, r) for r in releases]
    if cfg.epsilon is not None and (alone := epsilon_of(fixed, cfg.delta, cfg.accountant)) >= cfg.epsilon:
        raise FedmedError(f"the class statistics alone spend epsilon {alone:.3f} >= privacy.epsilon={cfg.epsilon:g} "
                          f"at delta={cfg.delta:g}: raise privacy.statistics_noise")
    return fixed


def release_entry(cfg: DPConfig, what: str) -> tuple[float, float, int]:
    """The accountant's entry for one release of ``what`` (``label_counts``, ``class_features``): one Gaussian
    mechanism on the whole data (sample rate 1, one step)."""
    if cfg.statistics_noise is None:
        raise FedmedError(f"{what.replace('_', ' ')} under DP-SGD need privacy.statistics_noise")
    return release_noise(float(cfg.statistics_noise), what == "class_features"), 1.0, 1


def release_noise(statistics_noise: float, features: bool) -> float:
    """The noise multiplier of one release of class statistics for the accountant. Each block of the release
    (counts; sums / C; outer products / C^2, for features clipped to norm C) has L2 sensitivity at most 1 to
    adding or removing one image, and gets Gaussian noise of std ``statistics_noise``: the release is the
    Gaussian mechanism with noise ``statistics_noise / sqrt(blocks)`` times its sensitivity sqrt(blocks)."""
    return statistics_noise / math.sqrt(3 if features else 1)


@dataclass
class DPConfig:
    """``privacy.*`` as a site needs it. DP is on when ``epsilon`` or ``noise_multiplier`` is set.

    Args:
        epsilon: target epsilon per site for the whole federation (all rounds and fine-tuning);
            the noise multiplier is calibrated from it.
        delta: target delta (must be below 1 / n_k at every site).
        noise_multiplier: fixed noise multiplier instead of a target epsilon.
        max_grad_norm: per-sample gradient clipping norm C.
        budget: a site refuses any round that would take its epsilon past this (default: ``epsilon``).
        accountant: ``rdp`` (Renyi DP), ``prv`` (PRV, tighter) or ``gdp`` (an approximation: only
            with ``noise_multiplier`` and no ``budget``, to report).
        statistics_noise: noise std, per unit of sensitivity, of the class statistics a site sends
            (None: it sends none under DP).
        statistics_clip: features are clipped to this L2 norm before their moments are summed.
    """

    epsilon: float | None = None
    delta: float = 1e-5
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    budget: float | None = None
    accountant: str = "rdp"
    statistics_noise: float | None = None
    statistics_clip: float = 10.0

    @classmethod
    def from_config(cls, privacy: Mapping[str, Any] | None) -> DPConfig | None:
        """The DP settings of ``privacy`` (a ``privacy`` config node), or None when DP is off."""
        if not privacy or (privacy.get("epsilon") is None and privacy.get("noise_multiplier") is None):
            return None
        out = cls(epsilon=privacy.get("epsilon"), delta=float(privacy.get("delta", 1e-5)),
                  noise_multiplier=privacy.get("noise_multiplier"),
                  max_grad_norm=float(privacy.get("max_grad_norm", 1.0)), budget=privacy.get("budget"),
                  accountant=str(privacy.get("accountant", "rdp")),
                  statistics_noise=privacy.get("statistics_noise"),
                  statistics_clip=float(privacy.get("statistics_clip", 10.0)))
        if out.epsilon is not None and out.noise_multiplier is not None:
            raise FedmedError("set privacy.epsilon (noise calibrated to it) or privacy.noise_multiplier, not both")
        if out.epsilon is not None and out.epsilon <= 0:
            raise FedmedError(f"privacy.epsilon must be > 0, got {out.epsilon}")
        if out.noise_multiplier is not None and out.noise_multiplier <= 0:
            raise FedmedError(f"privacy.noise_multiplier must be > 0, got {out.noise_multiplier}")
        if not 0 < out.delta < 1:
            raise FedmedError(f"privacy.delta must be in (0, 1), got {out.delta}")
        if out.max_grad_norm <= 0:
            raise FedmedError(f"privacy.max_grad_norm must be > 0, got {out.max_grad_norm}")
        make_accountant(out.accountant)  # validates the name
        if out.budget is None:
            out.budget = out.epsilon
        if out.epsilon is not None:
            require_upper_bound(out.accountant, "calibrate the noise to privacy.epsilon")
        if out.budget is not None:
            require_upper_bound(out.accountant, "enforce privacy.budget")
        return out


class SitePrivacy:
    """One site's DP-SGD: its noise multiplier, its accountant, and the budget check.

    Args:
        cfg: the DP settings.
        num_samples: the site's training samples n_k.
        batch_size: expected batch size B (Poisson sampling rate q = B / n_k).
        planned_epochs: local epochs this site will train in the whole federation; a target
            epsilon is spread over exactly these.
        releases: the class statistics it will send (``label_counts``, ``class_features``), each once;
            a target epsilon leaves room for them.
    """

    def __init__(self, cfg: DPConfig, num_samples: int, batch_size: int, planned_epochs: int,
                 releases: Sequence[str] = ()):
        if cfg.delta >= 1 / num_samples:
            raise FedmedError(f"privacy.delta={cfg.delta:g} must be below 1/n = {1 / num_samples:.2g} for a site "
                              f"with {num_samples} training samples")
        self.cfg = cfg
        self.num_samples, self.batch_size = num_samples, batch_size
        # as Opacus' DPDataLoader: ceil(n / B) Poisson batches per epoch, each sample in with q = 1 / that
        self.steps_per_epoch = math.ceil(num_samples / batch_size)
        self.sample_rate = 1 / self.steps_per_epoch
        self.planned = list(releases)
        fixed = planned_releases(cfg, self.planned)
        if cfg.noise_multiplier is not None:
            self.noise_multiplier = float(cfg.noise_multiplier)
        elif cfg.epsilon is not None:
            self.noise_multiplier = calibrate_noise(cfg.epsilon, cfg.delta, self.sample_rate,
                                                    planned_epochs * self.steps_per_epoch, cfg.accountant, fixed)
        else:
            raise FedmedError("set privacy.epsilon or privacy.noise_multiplier for DP-SGD")
        self.history: list[tuple[float, float, int]] = []  # (noise multiplier, sample rate, steps)
        self.released: list[tuple[str, int]] = []  # class statistics sent: (what, its entry in history)

    def release(self, what: str, site: str) -> float:
        """Account one release of class statistics (``label_counts`` or ``class_features``) and return the noise
        std per unit of sensitivity to add. Refused (nothing is sent) if it was not planned, was sent before (a
        second draw would average the noise away) or would pass the budget."""
        if what not in self.planned:
            raise PermissionError(f"site {site}: {what.replace('_', ' ')} under DP-SGD were not planned for this run")
        if what in (w for w, _ in self.released):
            raise PermissionError(f"site {site} already sent its noisy {what.replace('_', ' ')} once; a second draw "
                                  "would average the noise away")
        entry = release_entry(self.cfg, what)
        after = epsilon_of([*self.history, entry], self.cfg.delta, self.cfg.accountant)
        if self.cfg.budget is not None and after > self.cfg.budget * (1 + 1e-6):
            raise PrivacyBudgetExhausted(f"site {site}: sending its {what.replace('_', ' ')} would spend epsilon "
                                         f"{after:.3f} > privacy.budget={self.cfg.budget:g}; not sent")
        self.history.append(entry)
        self.released.append((what, len(self.history) - 1))
        return float(self.cfg.statistics_noise or 0.0)  # set: release_entry refuses a release without it

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far, at ``delta``."""
        return epsilon_of(self.history, self.cfg.delta, self.cfg.accountant)

    def _after(self, steps: int) -> list:
        return [*self.history, (self.noise_multiplier, self.sample_rate, steps)]

    def check_budget(self, epochs: int, site: str) -> float:
        """Epsilon after ``epochs`` more local epochs; raise if that passes the budget."""
        budget = self.cfg.budget
        if budget is not None:
            require_upper_bound(self.cfg.accountant, "enforce privacy.budget")
        after = epsilon_of(self._after(epochs * self.steps_per_epoch), self.cfg.delta, self.cfg.accountant)
        if budget is not None and after > budget * (1 + 1e-6):
            raise PrivacyBudgetExhausted(
                f"site {site}: {epochs} more epoch(s) would spend epsilon {after:.3f} > privacy.budget={budget:g} "
                f"(spent so far {self.epsilon:.3f} at delta={self.cfg.delta:g}); it trains no more")
        return after

    def attach(self, net: nn.Module, loader: torch.utils.data.DataLoader, seed: int):
        """Private training set-up for one round.

        Returns:
            (grad_sample_module, dp_loader, wrap): ``wrap(optimizer)`` turns the round's optimizer
            into a ``DPOptimizer`` whose every step is recorded here. Call ``close(gsm)`` after.
        """
        from opacus import GradSampleModule
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(net)  # hooks on net's layers: calling net(x) records per-sample grads
        dp_loader = DPDataLoader.from_data_loader(loader, generator=torch.Generator().manual_seed(seed))
        if abs(dp_loader.sample_rate - self.sample_rate) > 1e-12:  # the accountant must use the loader's rate
            raise FedmedError(f"DP loader samples at q={dp_loader.sample_rate}, "
                              f"the accountant assumed {self.sample_rate}")

        def wrap(optimizer: torch.optim.Optimizer) -> DPOptimizer:
            dp_opt = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                 max_grad_norm=self.cfg.max_grad_norm, expected_batch_size=self.batch_size)
            dp_opt.attach_step_hook(self._record_step)
            return dp_opt

        return gsm, dp_loader, wrap

    def _record_step(self, _optimizer) -> None:
        last = len(self.history) - 1
        if (self.history and self.history[-1][:2] == (self.noise_multiplier, self.sample_rate)
                and all(i != last for _, i in self.released)):  # a release stays an entry of its own
            sigma, q, steps = self.history[-1]
            self.history[-1] = (sigma, q, steps + 1)
        else:
            self.history.append((self.noise_multiplier, self.sample_rate, 1))

    @staticmethod
    def close(gsm) -> None:
        """Remove Opacus' hooks and per-sample gradients from the network."""
        gsm._close()

    def record(self) -> dict[str, float]:
        """What the privacy record shows for this site."""
        steps = sum(h[2] for h in self.history) - len(self.released)
        return {"epsilon": self.epsilon, "delta": self.cfg.delta, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.cfg.max_grad_norm, "sample_rate": self.sample_rate, "dp_steps": steps,
                "statistics_releases": len(self.released)}

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "released": [list(r) for r in self.released]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [tuple(h) for h in state["history"]]
        self.noise_multiplier, self.sample_rate = state["noise_multiplier"], state["sample_rate"]
        self.released = [(str(w), int(i)) for w, i in state.get("released", [])]


def describe(cfg: DPConfig | None) -> str:
    if cfg is None:
        return "off"
    target = f"epsilon={cfg.epsilon:g}" if cfg.epsilon is not None else f"noise_multiplier={cfg.noise_multiplier:g}"
    bound = "" if cfg.accountant in UPPER_BOUNDS else " (an approximation, not an upper bound)"
    stats = (f"; class statistics: noise {cfg.statistics_noise:g}, features clipped to {cfg.statistics_clip:g}"
             if cfg.statistics_noise is not None else "")
    return (f"DP-SGD {target}, delta={cfg.delta:g}, C={cfg.max_grad_norm:g}, {cfg.accountant} accountant{bound}"
            + stats)


__all__ = ["DPConfig", "SitePrivacy", "PrivacyBudgetExhausted", "dp_compatible", "calibrate_noise", "epsilon_of",
           "describe"]
