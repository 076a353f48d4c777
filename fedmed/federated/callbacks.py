"""Lightning callbacks of a site's trainer: progress lines, best-on-validation selection, SCAFFOLD's gradient
correction."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import lightning as L
import torch

from fedmed.federated.messages import StateDict, clone_state
from fedmed.federated.tail_average import TailAverage

log = logging.getLogger("fedmed")


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
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.ndim == 0}
        nan = float("nan")
        extra = (f" val_loss={m['val_loss']:.4f} val_acc={m.get('val_acc', nan):.4f}"
                 f" val_bal_acc={m.get('val_balanced_acc', nan):.4f}" if "val_loss" in m else "")
        log.info(
            "  [%s] %s epoch %d/%d train_loss=%.4f%s (%.1fs)",
            self.site, self.label, trainer.current_epoch + 1, trainer.max_epochs,
            m.get("train_loss", float("nan")), extra, time.perf_counter() - self._t0,
        )
        if self.on_epoch:
            self.on_epoch(trainer.current_epoch + 1, m)


class BestOnValidation(L.Callback):
    """Keeps (in memory) the weights of the epoch with the lowest validation loss, or with the
    highest validation balanced accuracy (``select="best_val_balanced_acc"``, and
    ``best_val_site_balanced_acc``: with one site's data it is the same).

    With ``average_from``, from that epoch on the candidate is the mean of the epochs' models since then
    (:mod:`fedmed.federated.tail_average`); with ``calibrate_from``, from that epoch on it is the candidate
    passed through ``calibrate`` (a re-fitted head); either is scored by ``score`` (weights -> ``loss``,
    ``balanced_acc``), kept as ``last_candidate`` and reported (``candidate_val_loss``,
    ``candidate_val_balanced_acc``) to ``report``.
    """

    def __init__(self, select: str = "best_val_loss", average_from: int | None = None,
                 score: Callable[[StateDict], dict[str, float]] | None = None, site: str = "",
                 calibrate: Callable[[StateDict], StateDict] | None = None, calibrate_from: int | None = None,
                 report: Callable[[int, dict[str, float]], None] | None = None) -> None:
        # one site's data: the mean of the sites' balanced accuracies is its own
        by_acc = select in ("best_val_balanced_acc", "best_val_site_balanced_acc")
        self.key, self.sign = ("val_balanced_acc", -1.0) if by_acc else ("val_loss", 1.0)
        self.best_loss, self.best_epoch = float("inf"), 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_candidate: dict[str, torch.Tensor] | None = None
        if (average_from is not None or calibrate_from is not None) and score is None:
            raise ValueError("averaging or calibrating the epochs' models needs a score for the candidate")
        if calibrate_from is not None and calibrate is None:
            raise ValueError("calibrate_from needs calibrate")
        self.tail = TailAverage(average_from) if average_from is not None else None
        self.score, self.site = score, site
        self.calibrate, self.calibrate_from, self.report = calibrate, calibrate_from, report

    def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation, with its metrics reduced
        with torch.random.fork_rng(devices=[]):  # scoring and calibrating draw nothing from training's RNG stream
            self._consider(trainer.current_epoch + 1, trainer, pl_module)

    def _consider(self, epoch: int, trainer, pl_module) -> None:
        candidate, what = None, ""
        if self.tail is not None:
            candidate = self.tail.update(epoch, pl_module.net.state_dict())
            what = f"mean of the models of epochs {self.tail.start}-{epoch}" if candidate is not None else ""
        if self.calibrate_from is not None and epoch >= self.calibrate_from:
            assert self.calibrate is not None
            candidate = dict(self.calibrate(candidate if candidate is not None
                                            else clone_state(pl_module.net.state_dict())))
            what = (what + ", head calibrated") if what else f"model of epoch {epoch}, head calibrated"
        if candidate is not None:
            assert self.score is not None
            m = self.score(candidate)
            log.info("  [%s] %s: val_loss=%.4f val_bal_acc=%.4f", self.site, what, m["loss"], m["balanced_acc"])
            if self.report is not None:
                self.report(epoch, {"candidate_val_loss": m["loss"], "candidate_val_balanced_acc": m["balanced_acc"]})
            value, state = m[self.key.removeprefix("val_")], candidate
            self.last_candidate = candidate
        elif self.key in trainer.callback_metrics:
            value, state = float(trainer.callback_metrics[self.key]), None
        else:
            return
        loss = self.sign * float(value)  # lower is better
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, epoch
            self.best_state = state if state is not None else clone_state(pl_module.net.state_dict())


class GradientCorrection(L.Callback):
    """Adds SCAFFOLD's correction (c - c_i) to every gradient before the optimizer step."""

    def __init__(self, correction: dict[str, torch.Tensor]):
        self.correction = correction

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for name, p in pl_module.net.named_parameters():
            if p.grad is not None and name in self.correction:
                p.grad.add_(self.correction[name].to(p.grad.dtype))
