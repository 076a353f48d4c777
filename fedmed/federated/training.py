"""A site's local training: its model, its Lightning trainer, DP-SGD, and the strategy's site part."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from fedmed.data.datamodule import SiteData, make_loader
from fedmed.errors import FedmedError
from fedmed.federated.attack import Attack
from fedmed.federated.callbacks import BestOnValidation, EpochProgress
from fedmed.federated.messages import StateDict, clone_state
from fedmed.federated.strategies.base import SitePart
from fedmed.models.classifier import Classifier
from fedmed.models.metrics import evaluate
from fedmed.privacy.dp import DPConfig, SitePrivacy

log = logging.getLogger("fedmed")

#: images per validation batch (validation never trains, so its batch size is only a matter of memory)
VAL_BATCH = 256


@dataclass(frozen=True)
class TrainingSettings:
    """How every site of a run trains.

    Args:
        batch_size: training batch size.
        trainer: extra ``lightning.Trainer`` arguments (accelerator, devices, limits...).
        seed: base seed of the run.
        planned_epochs: local epochs a site trains in the whole run (a DP target epsilon is
            spread over them, and a cosine learning rate decays over them).
        privacy: DP-SGD settings (None: off).
        shares: what the site agreed to tell the server beyond its updates
            (:mod:`fedmed.federated.statistics`): ``label_counts`` (its training images per class),
            ``class_features`` (per-class moments of the model's penultimate features).
        label_prior: ``site`` (a logit-adjusted loss uses the site's own label mix) or ``federation``
            (the summed counts the server sends with every round).
        min_class_images: ``class_features``: a class with fewer training images at the site is left out of
            what it sends (count, sum and outer products all 0): with one image, its "mean" is that image's
            feature vector. Under DP-SGD the noise protects them instead and nothing is left out.
        weighting: ``examples`` (the site's update weighs by its training images) or ``balanced`` (by
            :func:`~fedmed.aggregation.balanced_weight` of its label counts and the federation's totals the
            server sends with every round).
        releases: the class statistics this run computes from the site's training images (``label_counts``,
            ``class_features``; each once): under DP-SGD they are noised and counted in its epsilon.
        style_mix: probability that a training image is given another site's look, from the mean spectra the
            server relays with every round (:mod:`fedmed.data.style`; ``shares`` then holds
            ``style_spectrum``); 0: off.
        style_band: the share of the image side whose low frequencies make a site's look.
    """

    batch_size: int = 64
    trainer: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    planned_epochs: int = 1
    privacy: DPConfig | None = None
    shares: frozenset[str] = frozenset()
    label_prior: str = "site"
    min_class_images: int = 10
    weighting: str = "examples"
    releases: tuple[str, ...] = ()
    style_mix: float = 0.0
    style_band: float = 0.1


@dataclass
class RoundOutput:
    """One round of local training: where it started, where it ended, what it measured, what the strategy adds."""

    start: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    metrics: dict[str, float]
    extras: dict[str, Any]


def check_train_batch_limit(site: str, data: SiteData, batch_size: int, trainer: Mapping[str, Any]) -> None:
    """Refuse, before any training, a fractional ``trainer.limit_train_batches`` that leaves ``site`` no training
    batch: Lightning would only say so when the site's first round starts.

    Raises:
        FedmedError: one line naming the key, the site and the smallest fraction that gives it one batch.
    """
    limit, batches = trainer.get("limit_train_batches"), -(-len(data.train) // batch_size)
    if isinstance(limit, float) and 0 < limit < 1 and batches and int(batches * limit) == 0:
        raise FedmedError(f"trainer.limit_train_batches={limit} gives site {site} no batch (it has {batches}); "
                          f"use at least {1 / batches:.3g}, or a whole number of batches")


def site_seed(seed: int, round_idx: int, site_index: int) -> int:
    """Seed for one site's work in one round: independent of which other sites ran, or in what order."""
    return (seed * 1_000_003 + round_idx * 1_009 + site_index) % (2**31 - 1)


class LocalTraining:
    """Trains one site's model on its own data.

    Args:
        name: the site's name (for log lines).
        data: the site's train/val data.
        module: the site's :class:`Classifier`.
        settings: the run's :class:`TrainingSettings`.
        site_index: this site's position in the federation (mixes into its seeds).
    """

    def __init__(self, name: str, data: SiteData, module: Classifier, settings: TrainingSettings,
                 site_index: int = 0):
        self.name, self.data, self.module, self.settings = name, data, module, settings
        self.site_index = site_index
        check_train_batch_limit(name, data, settings.batch_size, settings.trainer)
        self.module.set_label_prior(data.train.y)  # for a logit-adjusted loss: this site's own label mix
        self.dp: SitePrivacy | None = None
        if settings.privacy is not None:
            self.dp = SitePrivacy(settings.privacy, len(data.train), settings.batch_size, settings.planned_epochs,
                                  settings.releases)
            log.info("  [%s] DP-SGD: noise multiplier %.3f, clip %.2f, sample rate %.4f, delta %g", name,
                     self.dp.noise_multiplier, settings.privacy.max_grad_norm, self.dp.sample_rate,
                     settings.privacy.delta)

    def weights(self) -> dict[str, torch.Tensor]:
        return clone_state(self.module.net.state_dict())

    def load(self, weights: StateDict) -> None:
        self.module.net.load_state_dict(weights, strict=True)

    def fit_round(self, weights: StateDict, round_idx: int, epochs: int, part: SitePart,
                  attack: Attack | None = None) -> RoundOutput:
        """Train ``epochs`` local epochs from ``weights`` (the strategy's part already configured)."""
        self.load(part.local_weights(weights))
        seed = site_seed(self.settings.seed, round_idx, self.site_index)
        L.seed_everything(seed, verbose=False)
        m = self.module
        train = attack.training_data(self.data.train, m.num_classes) if attack else self.data.train
        loader = make_loader(train, self.settings.batch_size, shuffle=True, seed=seed)
        part.before_training(m.net)
        m.schedule = ((round_idx - 1) * epochs, self.settings.planned_epochs)  # the run's lr curve goes on
        start = self.weights()
        trainer = self._trainer(epochs, [EpochProgress(self.name, f"round {round_idx}"), *part.callbacks()],
                                validate=False)
        t0 = time.perf_counter()
        self._fit(trainer, loader, epochs, seed, part)
        metrics = {"train_loss": float(trainer.callback_metrics.get("train_loss", float("nan"))),
                   "train_seconds": time.perf_counter() - t0}
        if self.dp is not None:  # reported to the server with the update (and logged on this site's run)
            rec = self.dp.record()
            metrics.update({"dp_epsilon": rec["epsilon"], "dp_delta": rec["delta"],
                            "dp_noise_multiplier": rec["noise_multiplier"], "dp_steps": rec["dp_steps"]})
        new = self.weights()
        factors = [m.lr_factor(m.schedule[0] + e) for e in range(epochs)]
        extras = part.after_training(start, new, int(trainer.global_step), factors)
        return RoundOutput(start, new, metrics, extras)

    def fit_alone(self, epochs: int, select: str = "best_val_loss", on_epoch=None,
                  average_from: int | None = None, calibrate: Callable[[StateDict], StateDict] | None = None,
                  calibrate_from: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """Train continuously for ``epochs`` with validation after each (local and centralized baselines).

        With ``average_from``, from that epoch on the candidate of each epoch is the mean of the epochs'
        models since then (as a federation's ``federation.average_from``); with ``calibrate_from``, from that
        epoch on it is that candidate passed through ``calibrate`` (as ``federation.calibrate_from``).

        Returns:
            (weights, epoch): the weights of the epoch with the best validation loss (or the best
            validation balanced accuracy, ``select="best_val_balanced_acc"``), or the last epoch's
            if ``select == "last"``.
        """
        seed = self.settings.seed
        L.seed_everything(site_seed(seed, 0, self.site_index), verbose=False)
        best = BestOnValidation(select, average_from, self.score_on_validation, self.name, calibrate, calibrate_from,
                                on_epoch)
        self.module.schedule = (0, epochs)
        trainer = self._trainer(epochs, [EpochProgress(self.name, "training", on_epoch), best], validate=True)
        loader = make_loader(self.data.train, self.settings.batch_size, shuffle=True, seed=seed)
        self._fit(trainer, loader, epochs, seed, None, validate=True)
        if select == "last" and best.last_candidate is not None:  # the last epoch's mean, or calibrated model
            return best.last_candidate, epochs
        if select == "last" or best.best_state is None:
            return self.weights(), epochs
        return best.best_state, best.best_epoch

    def score_on_validation(self, weights: StateDict) -> dict[str, float]:
        """``weights`` scored on the site's validation data (a copy of the network; training is not touched)."""
        net = copy.deepcopy(self.module.net)
        net.load_state_dict(weights, strict=True)
        metrics, _ = evaluate(net, make_loader(self.data.val, VAL_BATCH, shuffle=False), self.module.num_classes)
        return metrics

    def _fit(self, trainer: L.Trainer, loader, epochs: int, seed: int, part: SitePart | None,
             validate: bool = False) -> None:
        """``trainer.fit`` with the strategy's part and DP-SGD attached for exactly this fit."""
        m, gsm = self.module, None
        if self.dp is not None:
            self.dp.check_budget(epochs, self.name)  # raises PrivacyBudgetExhausted before any training
            gsm, loader, m.wrap_optimizer = self.dp.attach(m.net, loader, seed)
        m.hook = part
        try:
            val = make_loader(self.data.val, VAL_BATCH, shuffle=False) if validate else None
            trainer.fit(m, train_dataloaders=loader, val_dataloaders=val)
        finally:
            m.hook, m.wrap_optimizer = None, None
            if gsm is not None:
                self.dp.close(gsm)  # type: ignore[union-attr]

    def _trainer(self, epochs: int, callbacks: Sequence[L.Callback], validate: bool) -> L.Trainer:
        kwargs = dict(self.settings.trainer)
        if not validate:
            kwargs["limit_val_batches"] = 0
        return L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, num_sanity_val_steps=0, callbacks=list(callbacks), **kwargs)

    def device(self) -> torch.device:
        acc = str(self.settings.trainer.get("accelerator", "cpu"))
        if acc in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
