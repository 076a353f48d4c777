"""The site client: one hospital's data, its own Lightning trainer, its own MLflow run.

Its verbs follow MONAI's ``ClientAlgo`` (initialize / train / get_weights / evaluate /
finalize). It talks to the server only through weights and metrics, so a network transport
(Flower) carries the same calls. It is made of parts: :class:`~.training.LocalTraining` (the
trainer, with the strategy's :class:`~.strategies.base.SitePart`), the
:class:`~.channel.UpdateChannel` (compression, secure-aggregation masking), and the optional
:class:`~.heatmaps.SiteHeatmaps` and :class:`~.attack.Attack`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fedmed.aggregation import balanced_weight
from fedmed.data.datamodule import AugmentedDataset, SiteData, make_loader
from fedmed.data.style import STYLE_SPECTRUM, StyleMix, check_spectrum, mean_amplitude
from fedmed.federated.attack import Attack
from fedmed.federated.channel import UpdateChannel
from fedmed.federated.heatmaps import ExplainSettings, SiteHeatmaps
from fedmed.federated.messages import EvalResult, FitResult, StateDict
from fedmed.federated.statistics import (
    CLASS_FEATURES,
    LABEL_COUNTS,
    HeadCalibration,
    check_statistics,
    class_statistics,
    last_linear,
    noisy_statistics,
    statistics_vector,
    withhold_small_classes,
)
from fedmed.federated.strategies.base import SitePart
from fedmed.federated.training import VAL_BATCH, LocalTraining, TrainingSettings
from fedmed.models.classifier import Classifier
from fedmed.models.metrics import evaluate
from fedmed.tracking import RunLog


class SiteClient:
    """One site of a federation.

    Args:
        name: site name (``configs/site/<name>.yaml``).
        data: the site's train/val data, loaded from its manifest.
        module_factory: builds a fresh :class:`Classifier` (same architecture at every site).
        settings: how the run trains (batch size, trainer arguments, seed, planned epochs, DP).
        site_index: this site's position in the federation (mixes into its seeds).
        part: the strategy's site part (default: plain local training).
        channel: how updates leave the site (default: raw weights).
        heatmaps: explanations during :meth:`evaluate` (default: Grad-CAM of 16 validation images).
        attack: robustness testing only: this site poisons its updates.
        run: this site's own MLflow run (default: none).
        model_config: the config a model this site logs carries (the fine-tuned model of :meth:`finetune`).
    """

    def __init__(self, name: str, data: SiteData, module_factory: Callable[[], Classifier],
                 settings: TrainingSettings | None = None, site_index: int = 0, part: SitePart | None = None,
                 channel: UpdateChannel | None = None, heatmaps: SiteHeatmaps | None = None,
                 attack: Attack | None = None, run: RunLog | None = None, model_config: Any = None):
        self.name, self.data = name, data
        self.settings = settings or TrainingSettings()
        self.training = LocalTraining(name, data, module_factory(), self.settings, site_index)
        self.part = part or SitePart()
        self.channel = channel or UpdateChannel(name)
        self.heatmaps = heatmaps or SiteHeatmaps(name, data.val, self.module.num_classes, ExplainSettings(),
                                                 self.settings.seed)
        self.attack = attack
        self.run = run or RunLog()
        self.model_config = model_config
        self._spectrum: np.ndarray | None = None  # this site's look (federation.style_mix), once computed

    @property
    def module(self) -> Classifier:
        return self.training.module

    @property
    def dp(self):
        """This site's DP-SGD state (:class:`fedmed.privacy.dp.SitePrivacy`), or None."""
        return self.training.dp

    # -- ClientAlgo-style verbs ---------------------------------------------------------------
    def initialize(self) -> dict[str, int]:
        return {"num_train": len(self.data.train), "num_val": len(self.data.val)}

    def get_weights(self) -> dict[str, torch.Tensor]:
        return self.training.weights()

    def set_weights(self, weights: StateDict) -> None:
        self.training.load(weights)

    def train(self, weights: StateDict, round_idx: int, epochs: int, instructions: Mapping[str, Any] | None = None,
              send: bool = True) -> FitResult:
        """Start from ``weights``, train ``epochs`` local epochs, return the new weights and n_k.

        ``instructions`` are the strategy's for this round (:meth:`Strategy.configure_fit`), and
        ``secagg`` (peers' public keys: send a masked contribution). With ``send=False``
        (personalisation) the weights come back as they are, never compressed or masked.
        """
        instructions = dict(instructions or {})
        self.part.configure(instructions)
        self._use_prior(instructions.get("label_prior"))
        self._use_style(instructions.get("style_spectra"))
        weight = self._weight(instructions.get("class_totals"))
        out = self.training.fit_round(weights, round_idx, epochs, self.part, self.attack)
        new = self.attack.update(out.start, out.weights) if self.attack else out.weights
        self.run.log_metrics(out.metrics, step=round_idx)
        result = FitResult(self.name, new, weight, out.metrics, out.extras)
        return self.channel.package(result, out.start, instructions) if send else result

    def _server_counts(self, counts: Any, wanted: bool, what: str, setting: str) -> np.ndarray | None:
        """Per-class counts the server sent (``what``), checked; a site whose ``setting`` does not use them
        refuses them, and one whose setting does (``wanted``) refuses a round without them."""
        if counts is None:
            if wanted:
                raise ValueError(f"{setting}, but the server sent no {what}")
            return None
        if not wanted:
            raise ValueError(f"the server sent its {what}; this site is configured with {setting}")
        problem = check_statistics({"counts": np.asarray(counts)}, self.module.num_classes, features=False)
        if problem:
            raise ValueError(f"the server's {what}: {problem}")
        return np.asarray(counts)

    def _use_prior(self, counts: Any) -> None:
        """``model.logit_prior=federation``: train with the federation's label mix the server sent."""
        prior = self._server_counts(counts, self.settings.label_prior == "federation", "label prior",
                                    f"model.logit_prior={self.settings.label_prior}")
        if prior is not None:
            self.module.set_label_counts(torch.as_tensor(prior))

    def style(self) -> dict[str, Any]:
        """This site's look: the mean low-frequency amplitude spectrum of its training images
        (:func:`fedmed.data.style.mean_amplitude`), only where its config shares it (``federation.style_mix``;
        ``PermissionError`` otherwise) and it holds at least ``min_class_images`` training images."""
        if STYLE_SPECTRUM not in self.settings.shares:
            raise PermissionError(f"site {self.name} does not share its style spectrum: its config has "
                                  "federation.style_mix=0")
        if len(self.data.train) < self.settings.min_class_images:
            raise ValueError(f"site {self.name} holds {len(self.data.train)} training images, fewer than "
                             f"federation.calibrate_min_images={self.settings.min_class_images}: a mean spectrum "
                             "of so few would show single images' looks")
        return {"site": self.name, "spectrum": self._own_spectrum()}

    def _own_spectrum(self) -> np.ndarray:
        if self._spectrum is None:
            self._spectrum = mean_amplitude(self.data.train.x, self.settings.style_band)
        return self._spectrum

    def _use_style(self, spectra: Any) -> None:
        """``federation.style_mix``: train on the other sites' looks, from the spectra the server relayed (each
        checked against this site's own: :func:`fedmed.data.style.check_spectrum`)."""
        wanted = self.settings.style_mix > 0
        if spectra is None:
            if wanted:
                raise ValueError(f"federation.style_mix={self.settings.style_mix}, but the server sent no style "
                                 "spectra")
            return
        if not wanted:
            raise ValueError("the server sent style spectra; this site is configured with federation.style_mix=0")
        if not isinstance(spectra, Mapping) or not all(isinstance(k, str) for k in spectra):
            raise ValueError("the server's style spectra are not a mapping of site names to spectra")
        own = self._own_spectrum()
        others = {k: check_spectrum(k, v, own) for k, v in spectra.items() if k != self.name}
        if not others:
            raise ValueError("the server's style spectra name no other site")
        train = self.data.train
        if not isinstance(train, AugmentedDataset):
            train = self.data.train = AugmentedDataset(train, None, None)
        train.style = StyleMix(others, self.settings.style_mix)

    def _weight(self, totals: Any) -> int:
        """What this site's update weighs in the mean: its training images, or under ``federation.weighting=
        balanced`` its :func:`~fedmed.aggregation.balanced_weight` from the federation's class totals the server
        sent."""
        checked = self._server_counts(totals, self.settings.weighting == "balanced", "class totals",
                                      f"federation.weighting={self.settings.weighting}")
        if checked is None:
            return len(self.data.train)
        own = class_statistics(self.module.net, self.data.train, self.module.num_classes, features=False)["counts"]
        return balanced_weight(own.tolist(), checked.tolist())

    def statistics(self, weights: StateDict | None, features: bool,
                   secagg: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """This site's training images per class and, with ``features``, the per-class moments of ``weights``'
        penultimate features (:func:`~fedmed.federated.statistics.class_statistics`) of the classes with at least
        ``min_class_images`` images here: numbers only, and only what this site's config agreed to share
        (``PermissionError`` otherwise). With ``secagg`` (the peers' masking keys, as for an update) they are
        sent as one masked vector (``masked``); a site configured for secure aggregation sends them no other way.
        """
        want = CLASS_FEATURES if features else LABEL_COUNTS
        if want not in self.settings.shares and CLASS_FEATURES not in self.settings.shares:
            raise PermissionError(f"site {self.name} does not share {want.replace('_', ' ')}: its config has no "
                                  "model.logit_prior=federation, federation.weighting=balanced or "
                                  "federation.calibrate_head=true")
        plan = self.channel.plan(secagg, "its class statistics")
        stats = self.own_statistics(weights, features)
        if plan is not None:
            dim = last_linear(self.module.net)[1].in_features if features else None
            vector = statistics_vector(stats, self.module.num_classes, dim)
            return {"site": self.name, "masked": self.channel.mask(vector, plan), **self._dp_record()}
        return {"site": self.name, **stats, **self._dp_record()}

    def own_statistics(self, weights: StateDict | None, features: bool,
                       withhold: bool = True) -> dict[str, np.ndarray]:
        """The statistics :meth:`statistics` sends, computed here.

        Without DP-SGD a class with fewer than ``min_class_images`` images is left out (unless ``withhold`` is
        off: a run that re-fits its own head). Under DP-SGD the features are clipped, the Gaussian mechanism
        noises every class (:func:`~fedmed.federated.statistics.noisy_statistics`) and the release is counted
        in this site's epsilon, once per kind (:meth:`fedmed.privacy.dp.SitePrivacy.release`).
        """
        net, dp = self.module.net, self.training.dp
        if features:  # on a copy of the network: a baseline asks between two of its training epochs
            if weights is None:
                raise ValueError("feature statistics need the model's weights")
            net = copy.deepcopy(net)
            net.load_state_dict(self.part.local_weights(weights), strict=True)
        clip = dp.cfg.statistics_clip if dp is not None else None
        noise = dp.release(CLASS_FEATURES if features else LABEL_COUNTS, self.name) if dp is not None else None
        stats = class_statistics(net, self.data.train, self.module.num_classes, features, self.training.device(),
                                 clip=clip)
        if dp is not None:
            assert noise is not None and clip is not None
            dim = last_linear(net)[1].in_features if features else None
            return noisy_statistics(stats, self.module.num_classes, dim, noise, clip, len(self.data.train),
                                    np.random.default_rng())  # fresh entropy: the noise must not be reproducible
        if features and withhold:
            withhold_small_classes(stats, self.settings.min_class_images)
        return stats

    def _dp_record(self) -> dict[str, Any]:
        """Under DP-SGD, this site's accounting after a release (``dp``): its epsilon must include it."""
        return {"dp": self.training.dp.record()} if self.training.dp is not None else {}

    def public_key(self, round_idx: int) -> tuple[bytes, bytes]:
        """Secure aggregation: a fresh masking key for the round, and this site's signature over it."""
        return self.channel.public_key(round_idx)

    def attest(self, round_idx: int, survivors: list[str]) -> dict[str, bytes]:
        return self.channel.attest(round_idx, survivors)

    def dropout_correction(self, dropped: list[str], round_idx: int, length: int, survivors: list[str],
                           tags: Mapping[str, bytes]):
        return self.channel.dropout_correction(dropped, round_idx, length, survivors, tags)

    def evaluate(self, weights: StateDict, round_idx: int, log_metrics: bool = True,
                 explain: bool = False) -> EvalResult:
        """Evaluate ``weights`` on this site's validation data; log to the site's run as ``val_*`` (step = round).

        With ``explain=True`` the site also draws heatmaps of a fixed sample of its validation
        images into its own run (``heatmaps/round_NNN.png``) and returns only numbers.
        Per-class metrics are named after the classes where the site knows them
        (``f1_pneumonia``; else ``f1_class1``).
        """
        from fedmed.models.metrics import name_classes

        self.set_weights(self.part.local_weights(weights))  # FedBN: a site is evaluated with its own BN
        loader = make_loader(self.data.val, VAL_BATCH, shuffle=False)
        net = self.module.net.to(self.training.device())
        metrics, confmat = evaluate(net, loader, self.module.num_classes)
        metrics = name_classes(metrics, self.heatmaps.class_names)
        summary = None
        if explain:
            xai, summary = self.heatmaps.explain(net, round_idx, self.run.log_figure if self.run.active else None)
            metrics.update(xai)
        self.module.net.cpu()
        if log_metrics:
            self.run.log_metrics({f"val_{k}": v for k, v in metrics.items()}, step=round_idx)
        return EvalResult(self.name, len(self.data.val), metrics, confmat, summary)

    def score(self, weights: StateDict) -> dict[str, Any] | None:
        """Score ``weights`` (the final global model) on this site's own test images: a
        :class:`~fedmed.evaluation.Scores` as plain numbers (counts and bootstrap replicates, no image),
        or None where the site has no test images of its own."""
        if self.data.test is None or not len(self.data.test):
            return None
        from fedmed.evaluation import score
        from fedmed.evaluation.predict import class_probabilities

        self.module.net.load_state_dict(weights)
        probs, labels = class_probabilities(self.module.net, self.data.test)
        k = self.module.num_classes
        names = list(self.heatmaps.class_names or [f"class{i}" for i in range(k)])
        return score(probs, labels, names, self.name).to_dict()

    def finetune(self, weights: StateDict, round_idx: int, epochs: int,
                 instructions: Mapping[str, Any] | None = None) -> EvalResult:
        """Personalisation after the federation: train ``weights`` ``epochs`` epochs on this site's data
        and keep the result here. Logs ``personalized_val_*`` (step ``round_idx - 1``) and, in this
        site's run, the model as ``checkpoint/model.pt``; returns only the validation numbers.

        ``instructions``: the strategy's (as for a round), and ``trained_epochs``, the epochs behind ``weights``.
        """
        instructions = dict(instructions or {})
        tuned = self.train(weights, round_idx, epochs, instructions, send=False).weights
        ev = self.evaluate(tuned, round_idx, log_metrics=False)
        self.run.log_metrics({f"personalized_val_{k}": v for k, v in ev.metrics.items()}, step=round_idx - 1)
        if self.run.tracker is not None and self.run.run_id is not None:
            self.run.tracker.log_checkpoint(self.run.run_id, self.part.local_weights(tuned), self.model_config,
                                            self.heatmaps.class_names,
                                            int(instructions.get("trained_epochs", 0)) + epochs)
        return ev

    def train_alone(self, epochs: int, select: str = "best_val_loss", average_from: int | None = None,
                    calibrate: HeadCalibration | None = None, calibrate_from: int | None = None
                    ) -> tuple[dict[str, torch.Tensor], int]:
        """Train continuously with validation after each epoch (local and centralized baselines); with
        ``average_from``, candidates from that epoch on are the mean of the epochs' models since then; with
        ``calibrate_from``, from that epoch on they have their head re-fitted by ``calibrate`` on this site's
        own feature statistics."""
        refit = None
        if calibrate_from is not None:
            if calibrate is None:
                raise ValueError("calibrate_from needs a head calibration")
            refit = lambda w: calibrate.fit(self.module.net, w, self.own_statistics(w, True, withhold=False))  # noqa: E731
        return self.training.fit_alone(epochs, select, on_epoch=lambda e, m: self.run.log_metrics(m, step=e),
                                       average_from=average_from, calibrate=refit, calibrate_from=calibrate_from)

    def state_dict(self) -> dict[str, Any]:
        """What this site must keep to resume a federation: its strategy part, heatmap history,
        optimizer moments, DP accounting and compression residuals."""
        dp = self.training.dp
        return {"strategy": self.part.state_dict(), "xai_prev": self.heatmaps.previous,
                "optimizer": self.module.optimizer_state, "dp": dp.state_dict() if dp else None,
                **self.channel.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.part.load_state_dict(state.get("strategy") or {})
        self.heatmaps.previous = state.get("xai_prev")
        self.module.optimizer_state = state.get("optimizer")
        if self.training.dp is not None and state.get("dp"):
            self.training.dp.load_state_dict(state["dp"])
        self.channel.load_state_dict(state)
