"""The site client: one hospital's data, its own Lightning Trainer, its own MLflow run.

Its verbs follow MONAI's ``ClientAlgo`` (initialize / train / get_weights / evaluate /
finalize). It talks to the server only through weights and metrics, so a network transport
(Flower) can carry the same calls.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch.utils.data import default_collate

from fedmed.data.datamodule import SiteData, make_loader
from fedmed.federated.compression import UpdateEncoder
from fedmed.models.classifier import Classifier
from fedmed.models.metrics import evaluate

log = logging.getLogger("fedmed")

StateDict = Mapping[str, torch.Tensor]

# Lightning prints device banners for every Trainer; a federation makes one per site per round.
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*number of training batches.*smaller than the logging interval.*")
warnings.filterwarnings("ignore", ".*defined a `validation_step` but have no `val_dataloader`.*")
warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# Opacus: its per-layer INFO lines (fedmed logs the model changes itself) and two harmless warnings
logging.getLogger("opacus").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*Full backward hook is firing.*")
warnings.filterwarnings("ignore", ".*Secure RNG turned off.*")
warnings.filterwarnings("ignore", ".*Optimal order is the (largest|smallest) alpha.*")


@dataclass
class FitResult:
    """What a site returns after local training."""

    site: str
    weights: dict[str, torch.Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # strategy-specific (SCAFFOLD's delta c)
    #: with federation.compression: the encoded update (``weights`` is then empty until the server decodes it)
    payload: dict | None = None
    #: with secure aggregation: the masked fixed-point contribution (``weights`` stays empty)
    masked: Any = None
    #: bytes this update took on the wire (measured by the server on receipt)
    wire_bytes: int = 0


@dataclass
class EvalResult:
    """What a site returns after evaluating weights on its validation data."""

    site: str
    num_samples: int
    metrics: dict[str, float]
    confmat: torch.Tensor | None = None
    #: per-class mean heatmap pooled to a coarse grid (numbers only, no image), when explained
    xai_summary: torch.Tensor | None = None


def clone_state(state: StateDict) -> dict[str, torch.Tensor]:
    """Detached CPU copies, so later training never mutates what was sent."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def site_seed(seed: int, round_idx: int, site_index: int) -> int:
    """Seed for one site's work in one round: independent of which other sites ran, or in what order."""
    return (seed * 1_000_003 + round_idx * 1_009 + site_index) % (2**31 - 1)


class EpochProgress(L.Callback):
    """One log line per local epoch, and (for baselines) per-epoch metrics to the site's MLflow run."""

    def __init__(self, site: str, label: str, on_epoch: Callable[[int, dict[str, float]], None] | None = None):
        self.site, self.label, self.on_epoch = site, label, on_epoch
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        # Lightning runs the epoch's validation before this hook, and reduces train_loss just
        # before it: here both are in callback_metrics (in on_validation_epoch_end neither is yet).
        self._report(trainer, pl_module)

    def _report(self, trainer, pl_module):
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.ndim == 0}
        extra = f" val_loss={m['val_loss']:.4f} val_acc={m.get('val_acc', float('nan')):.4f}" if "val_loss" in m else ""
        log.info(
            "  [%s] %s epoch %d/%d train_loss=%.4f%s (%.1fs)",
            self.site, self.label, trainer.current_epoch + 1, trainer.max_epochs,
            m.get("train_loss", float("nan")), extra, time.perf_counter() - self._t0,
        )
        if self.on_epoch:
            self.on_epoch(trainer.current_epoch + 1, m)


class BestOnValidation(L.Callback):
    """Keeps (in memory) the weights of the epoch with the lowest validation loss."""

    def __init__(self):
        self.best_loss, self.best_epoch, self.best_state = float("inf"), 0, None

    def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation, with its metrics reduced
        if "val_loss" not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics["val_loss"])
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, trainer.current_epoch + 1
            self.best_state = clone_state(pl_module.net.state_dict())


class ScaffoldCorrection(L.Callback):
    """Adds SCAFFOLD's correction (c - c_i) to every gradient before the optimizer step."""

    def __init__(self, correction: dict[str, torch.Tensor]):
        self.correction = correction

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for name, p in pl_module.net.named_parameters():
            if p.grad is not None and name in self.correction:
                p.grad.add_(self.correction[name].to(p.grad.dtype))


class LabelFlipped(torch.utils.data.Dataset):
    """A poisoned view of a dataset: label y becomes C - 1 - y (a test attacker)."""

    def __init__(self, base, num_classes: int):
        self.base, self.num_classes = base, num_classes

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, self.num_classes - 1 - y

    def reseed(self, seed: int) -> None:
        if hasattr(self.base, "reseed"):
            self.base.reseed(seed)

    def collate(self, samples: list):
        collate = getattr(self.base, "collate", None)
        return collate(samples) if collate is not None else default_collate(samples)


ATTACKS = (None, "scale", "signflip", "labelflip")


class SiteClient:
    """One site of a federation.

    Args:
        name: site name (``configs/site/<name>.yaml``).
        data: the site's train/val data, loaded from its manifest.
        module_factory: builds a fresh :class:`Classifier` (same architecture at every site).
        batch_size: training batch size.
        trainer_kwargs: extra ``lightning.Trainer`` arguments (accelerator, devices, limits...).
        seed: base seed of the run.
        site_index: this site's position in the federation (mixes into its seeds).
        tracker: optional :class:`fedmed.tracking.Tracker`; with ``run_id``, the site logs there.
        run_id: this site's own MLflow run.
        explain: ``{"method": ..., "n": ...}`` for heatmaps during :meth:`evaluate` (``explain=True``).
        class_names: names of the classes, for figures.
        attack, attack_scale: robustness testing only: this site poisons its updates.
        privacy: a :class:`fedmed.privacy.dp.DPConfig`: train with DP-SGD (None: off).
        planned_epochs: local epochs this site trains in the whole run (a DP target epsilon is
            spread over them, and a cosine learning rate decays over them).
        encoder: a :class:`fedmed.federated.compression.UpdateEncoder`: send compressed updates.
    """

    def __init__(
        self,
        name: str,
        data: SiteData,
        module_factory: Callable[[], Classifier],
        batch_size: int = 64,
        trainer_kwargs: Mapping[str, Any] | None = None,
        seed: int = 0,
        site_index: int = 0,
        tracker=None,
        run_id: str | None = None,
        explain: Mapping[str, Any] | None = None,
        class_names: list[str] | None = None,
        attack: str | None = None,
        attack_scale: float = 10.0,
        privacy=None,
        planned_epochs: int = 1,
        encoder: UpdateEncoder | None = None,
    ):
        if attack not in ATTACKS:
            raise ValueError(f"site attack must be one of {ATTACKS}, got {attack!r}")
        self.attack, self.attack_scale = attack, attack_scale
        self._local: dict[str, torch.Tensor] | None = None  # FedBN: this site's own BatchNorm layers
        self._local_keys: list[str] = []
        self._c_i: dict[str, torch.Tensor] | None = None  # SCAFFOLD: this site's control variate
        self.name, self.data, self.batch_size = name, data, batch_size
        self.explain_cfg = dict(explain or {"method": "gradcam", "n": 16})
        self.class_names = class_names
        self._xai_prev: torch.Tensor | None = None
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.seed, self.site_index = seed, site_index
        self.tracker, self.run_id = tracker, run_id
        self.module = module_factory()
        self.module.set_label_prior(data.train.y)  # for a logit-adjusted loss: this site's own label mix
        self.planned_epochs = planned_epochs
        self.dp = None
        if privacy is not None:
            from fedmed.privacy.dp import SitePrivacy

            self.dp = SitePrivacy(privacy, len(data.train), batch_size, planned_epochs)
            log.info("  [%s] DP-SGD: noise multiplier %.3f, clip %.2f, sample rate %.4f, delta %g",
                     name, self.dp.noise_multiplier, privacy.max_grad_norm, self.dp.sample_rate, privacy.delta)
        self.encoder = encoder
        self._mask_key = None  # secure aggregation key pair, made on first use

    # -- ClientAlgo-style verbs ---------------------------------------------------------------
    def initialize(self) -> dict[str, int]:
        return {"num_train": len(self.data.train), "num_val": len(self.data.val)}

    def get_weights(self) -> dict[str, torch.Tensor]:
        return clone_state(self.module.net.state_dict())

    def set_weights(self, weights: StateDict) -> None:
        self.module.net.load_state_dict(weights, strict=True)

    def _with_local(self, weights: StateDict) -> StateDict:
        """The global weights with this site's own layers (FedBN) in place of the global ones."""
        if not self._local_keys or self._local is None:
            return weights
        return {**weights, **{k: self._local[k] for k in self._local_keys}}

    def train(self, weights: StateDict, round_idx: int, epochs: int, config: Mapping[str, Any] | None = None,
              send: bool = True) -> FitResult:
        """Start from ``weights``, train ``epochs`` local epochs, return the new weights and n_k.

        ``config`` carries what the strategy asks of sites: ``prox_mu`` (FedProx), ``local_keys``
        (FedBN: layers this site keeps), ``scaffold_c`` and ``sgd_lr`` (SCAFFOLD), ``secagg``
        (peers' public keys: send a masked contribution). With ``send=False`` (personalisation)
        the weights come back as they are, never compressed or masked.
        """
        config = dict(config or {})
        self._local_keys = list(config.get("local_keys", []))
        self.set_weights(self._with_local(weights))
        seed = site_seed(self.seed, round_idx, self.site_index)
        L.seed_everything(seed, verbose=False)
        train = LabelFlipped(self.data.train, self.module.num_classes) if self.attack == "labelflip" else self.data.train
        loader = make_loader(train, self.batch_size, shuffle=True, seed=seed)
        callbacks: list = [EpochProgress(self.name, f"round {round_idx}")]
        m = self.module
        m.prox_mu = float(config.get("prox_mu", 0.0))
        m.prox_ref = [p.detach().clone() for p in m.net.parameters()] if m.prox_mu > 0 else None
        m.sgd_lr = config.get("sgd_lr") if "scaffold_c" in config else None
        m.schedule = ((round_idx - 1) * epochs, self.planned_epochs)  # the run's lr curve goes on across rounds
        start = self.get_weights()
        if "scaffold_c" in config:
            c = config["scaffold_c"]
            if self._c_i is None:
                self._c_i = {k: torch.zeros_like(v) for k, v in c.items()}
            callbacks.append(ScaffoldCorrection({k: c[k] - self._c_i[k] for k in c}))
        trainer = self._trainer(epochs, callbacks, validate=False)
        t0 = time.perf_counter()
        gsm = None
        if self.dp is not None:
            self.dp.check_budget(epochs, self.name)  # raises PrivacyBudgetExhausted before any training
            gsm, loader, m.wrap_optimizer = self.dp.attach(m.net, loader, seed)
        try:
            trainer.fit(m, train_dataloaders=loader)
        finally:
            m.prox_mu, m.prox_ref, m.sgd_lr, m.wrap_optimizer = 0.0, None, None, None
            if gsm is not None:
                self.dp.close(gsm)
        metrics = {"train_loss": float(trainer.callback_metrics.get("train_loss", float("nan"))),
                   "train_seconds": time.perf_counter() - t0}
        if self.dp is not None:  # reported to the server with the update (and logged on this site's run)
            rec = self.dp.record()
            metrics.update({"dp_epsilon": rec["epsilon"], "dp_delta": rec["delta"],
                            "dp_noise_multiplier": rec["noise_multiplier"], "dp_steps": rec["dp_steps"]})
        new = self.get_weights()
        extras: dict[str, Any] = {}
        if "scaffold_c" in config:
            steps = max(int(trainer.global_step), 1)
            c = config["scaffold_c"]
            lr = config["sgd_lr"] * sum(m.lr_factor(m.schedule[0] + e) for e in range(epochs)) / epochs  # mean rate
            c_new = {k: self._c_i[k] - c[k] + (start[k].double() - new[k].double()) / (steps * lr)
                     for k in c}
            extras["scaffold_delta_c"] = {k: c_new[k] - self._c_i[k] for k in c}
            self._c_i = c_new
        if self._local_keys:
            self._local = {k: new[k].clone() for k in self._local_keys}
        if self.attack in ("scale", "signflip"):  # a test attacker: a boosted or reversed update
            factor = self.attack_scale if self.attack == "scale" else -self.attack_scale
            new = {k: (start[k] + factor * (v - start[k])).to(v.dtype) if v.is_floating_point() else v
                   for k, v in new.items()}
        if self.tracker and self.run_id:
            self.tracker.log_metrics(self.run_id, metrics, step=round_idx)
        result = FitResult(self.name, new, len(self.data.train), metrics, extras)
        return self._package(result, start, config) if send else result

    def public_key(self) -> bytes:
        """This site's public key for secure aggregation (the private half stays here)."""
        from fedmed.privacy.secagg import MaskingKey

        if self._mask_key is None:
            self._mask_key = MaskingKey()
        return self._mask_key.public

    def _package(self, result: FitResult, start: StateDict, config: Mapping[str, Any]) -> FitResult:
        """What leaves the site: the weights, or a compressed update, or a masked contribution."""
        secagg = config.get("secagg")
        if secagg is not None:
            from fedmed.privacy import secagg as sa

            bad = [k for k, v in result.weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:  # the server cannot look inside a masked update: the site checks its own
                raise ValueError(f"site {self.name}: its update has NaN/Inf in {bad[:3]}; not sent")
            self.public_key()
            vector = sa.contribution(result.weights, result.num_samples, secagg["pooled_bn"])
            result.masked = sa.mask(vector, self._mask_key, self.name, secagg["peers"], secagg["round"])
            result.weights = {}
        elif self.encoder is not None:
            result.payload = self.encoder.encode(result.weights, start)
            result.weights = {}
        return result

    def dropout_correction(self, dropped: Mapping[str, bytes], round_idx: int, length: int):
        """Secure aggregation: this site's masks with the sites that dropped out of the round."""
        from fedmed.privacy.secagg import dropout_correction

        return dropout_correction(self._mask_key, self.name, dropped, round_idx, length)

    def state_dict(self) -> dict[str, Any]:
        """What this site must keep to resume a federation: its own layers, control variate and optimizer moments."""
        return {"local": self._local, "local_keys": self._local_keys, "c_i": self._c_i, "xai_prev": self._xai_prev,
                "optimizer": self.module.optimizer_state,
                "dp": self.dp.state_dict() if self.dp else None,
                "encoder": self.encoder.state_dict() if self.encoder else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._local, self._local_keys = state.get("local"), list(state.get("local_keys") or [])
        self._c_i, self._xai_prev = state.get("c_i"), state.get("xai_prev")
        self.module.optimizer_state = state.get("optimizer")
        if self.dp is not None and state.get("dp"):
            self.dp.load_state_dict(state["dp"])
        if self.encoder is not None and state.get("encoder"):
            self.encoder.load_state_dict(state["encoder"])

    def evaluate(self, weights: StateDict, round_idx: int, log_metrics: bool = True, explain: bool = False) -> EvalResult:
        """Evaluate ``weights`` on this site's validation data; log to the site's run as ``val_*`` (step = round).

        With ``explain=True`` the site also draws heatmaps of a fixed sample of its validation
        images into its own run (``heatmaps/round_NNN.png``) and returns only numbers: deletion /
        insertion AUC, consistency with its previous explained round, and a coarse per-class
        mean map for cross-site comparison.
        """
        self.set_weights(self._with_local(weights))  # FedBN: a site is evaluated with its own BN
        loader = make_loader(self.data.val, 256, shuffle=False)
        net = self.module.net.to(self._device())
        metrics, confmat = evaluate(net, loader, self.module.num_classes)
        summary = None
        if explain:
            xai, summary = self._explain(net, round_idx)
            metrics.update(xai)
        self.module.net.cpu()
        if log_metrics and self.tracker and self.run_id:
            self.tracker.log_metrics(self.run_id, {f"val_{k}": v for k, v in metrics.items()}, step=round_idx)
        return EvalResult(self.name, len(self.data.val), metrics, confmat, summary)

    def _explain(self, net, round_idx: int) -> tuple[dict[str, float], torch.Tensor]:
        import matplotlib.pyplot as plt

        from fedmed.explain import class_mean_maps, deletion_insertion, explain, heatmap_grid, map_correlation, predict
        from fedmed.explain.sampling import stratified_sample

        method, k = self.explain_cfg["method"], self.module.num_classes
        idx = stratified_sample(self.data.val.y, int(self.explain_cfg["n"]), self.seed)  # same images every round
        x, y = self.data.val.x[idx], self.data.val.y[idx]
        pred, conf = predict(net, x)
        maps = explain(net, x, method, pred)
        deletion, insertion = deletion_insertion(net, x, maps, pred, seed=self.seed)
        xai = {"xai_deletion_auc": float(deletion.mean()), "xai_insertion_auc": float(insertion.mean())}
        means = class_mean_maps(maps, y, k)
        if self._xai_prev is not None:
            xai["xai_round_consistency"] = map_correlation(means, self._xai_prev)
        self._xai_prev = means
        if self.tracker and self.run_id:
            names = self.class_names or [str(c) for c in range(k)]
            fig = heatmap_grid(x, maps, y, pred, conf, names, f"{self.name}, round {round_idx}: {method} of the global model")
            self.tracker.log_figure(self.run_id, fig, f"heatmaps/round_{round_idx:03d}.png")
            plt.close(fig)
        pool = torch.nn.functional.adaptive_avg_pool2d if means.ndim == 3 else torch.nn.functional.adaptive_avg_pool3d
        return xai, pool(means, 7)  # (C, 7, 7[, 7]): numbers only

    def finalize(self, status: str = "FINISHED") -> None:
        if self.tracker and self.run_id:
            self.tracker.end_run(self.run_id, status)

    # -- training alone (local and centralized baselines) --------------------------------------
    def train_alone(self, epochs: int, select: str = "best_val_loss") -> tuple[dict[str, torch.Tensor], int]:
        """Train continuously for ``epochs`` with validation after each epoch.

        Returns:
            (weights, epoch): the best-validation-loss epoch's weights, or the last epoch's if
            ``select == "last"``.
        """
        L.seed_everything(site_seed(self.seed, 0, self.site_index), verbose=False)
        best = BestOnValidation()

        def log_epoch(epoch: int, m: dict[str, float]) -> None:
            if self.tracker and self.run_id:
                self.tracker.log_metrics(self.run_id, m, step=epoch)

        self.module.schedule = (0, epochs)
        trainer = self._trainer(epochs, [EpochProgress(self.name, "training", log_epoch), best], validate=True)
        loader = make_loader(self.data.train, self.batch_size, shuffle=True, seed=self.seed)
        gsm = None
        if self.dp is not None:
            self.dp.check_budget(epochs, self.name)
            gsm, loader, self.module.wrap_optimizer = self.dp.attach(self.module.net, loader, self.seed)
        try:
            trainer.fit(self.module, train_dataloaders=loader,
                        val_dataloaders=make_loader(self.data.val, 256, shuffle=False))
        finally:
            self.module.wrap_optimizer = None
            if gsm is not None:
                self.dp.close(gsm)
        if select == "last" or best.best_state is None:
            return self.get_weights(), epochs
        return best.best_state, best.best_epoch

    # -- helpers --------------------------------------------------------------------------
    def _trainer(self, epochs: int, callbacks: list, validate: bool) -> L.Trainer:
        kwargs = dict(self.trainer_kwargs)
        if not validate:
            kwargs["limit_val_batches"] = 0
        return L.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
            **kwargs,
        )

    def _device(self) -> torch.device:
        acc = str(self.trainer_kwargs.get("accelerator", "cpu"))
        if acc in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
