"""The one LightningModule: any network + Adam + cross-entropy + torchmetrics."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import lightning as L
import torch
from torch import nn

from fedmed.models.decorrelation import decorrelation_penalty
from fedmed.models.head import last_linear, penultimate
from fedmed.models.metrics import compute_metrics, make_metrics
from fedmed.models.sam import SAM

LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "sgd")


class TrainingHook(Protocol):
    """What a federated strategy may change in a site's training (its site part)."""

    @property
    def keeps_optimizer_state(self) -> bool: ...

    def extra_loss(self, net: nn.Module) -> torch.Tensor | None: ...

    def make_optimizer(self, params: Iterable[nn.Parameter], weight_decay: float) -> torch.optim.Optimizer | None: ...


class Classifier(L.LightningModule):
    """Image classifier around a plain network that returns logits.

    Args:
        net: the network, e.g. :class:`fedmed.models.CompactCNN`.
        num_classes: number of classes.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        class_weights: optional per-class loss weights.
        logit_adjust: tau of the logit-adjusted loss (Menon et al., ICLR 2021): training adds
            ``tau * log(prior)`` of the training labels (:meth:`set_label_prior`) to the logits
            before the cross-entropy, so the raw logits learn a class-balanced classifier. Each
            federated site uses its own label mix, which removes the pull of a skewed site towards
            its majority class, or the federation's (:meth:`set_label_counts`,
            ``model.logit_prior=federation``). 0 is plain cross-entropy. Evaluation always uses the raw logits.
        lr_schedule: ``constant``, or ``cosine``: the learning rate follows a half cosine from
            ``lr`` down to ``min_lr_ratio * lr`` over the whole run's epochs, stepped per epoch.
            The caller sets :attr:`schedule` = (first epoch, total epochs) before each fit; a
            federated site continues the curve round after round, so its rate depends only on
            the round (a resumed run is unchanged).
        min_lr_ratio: the cosine schedule's final rate, as a share of ``lr``.
        optimizer: ``adam`` or ``sgd`` (with ``momentum``).
        decorrelation: weight of the feature decorrelation penalty
            (:func:`fedmed.models.decorrelation.decorrelation_penalty`) on the input of the network's last
            linear layer, each training batch (Shi et al., ICLR 2023, use 0.1). It couples the images of a
            batch, so it cannot go with DP-SGD's per-image gradients. 0 is off.
        freeze_head: the network's last linear layer keeps its initial weights (its parameters do not require
            gradients): only the body learns, so a skewed site cannot turn the classifier towards its own
            classes (FedBABU, Oh et al., ICLR 2022). Head calibration re-fits it after the federation.
        keep_state: each fit resumes the optimizer state (moments, step counts) that the last fit
            ended with, kept in :attr:`optimizer_state`; the learning rate still comes from the
            schedule. A federated site's Adam then goes on across rounds instead of restarting with
            full-size bias-corrected steps. Not with DP-SGD, nor when the :attr:`hook` says no
            (SCAFFOLD's plain SGD, FedProx's proximal term start fresh).
        fix_batchnorm_from: from this epoch of the run on (1-based; a federated site's round with one local
            epoch), the network's BatchNorm layers normalise with their running statistics while training and
            stop updating them, as they do at evaluation (FixBN, Zhong et al., 2024): a federated site then
            trains under the global model's normalisation, not its own batches'. Their scale and shift
            still learn. None is off.
        sam_rho: radius of sharpness-aware minimisation (:class:`fedmed.models.sam.SAM`) around the optimizer
            (FedSAM where every site trains so); each step costs two forward and backward passes, and
            the training loss logged is the one at the unperturbed weights. 0 is off; not with DP-SGD.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        class_weights: list[float] | None = None,
        logit_adjust: float = 0.0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.05,
        optimizer: str = "adam",
        momentum: float = 0.9,
        keep_state: bool = False,
        decorrelation: float = 0.0,
        freeze_head: bool = False,
        sam_rho: float = 0.0,
        fix_batchnorm_from: int | None = None,
    ):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.lr, self.weight_decay = lr, weight_decay
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight)
        self.logit_adjust = float(logit_adjust)
        self.log_prior = torch.zeros(num_classes)  # set from the training labels by set_label_prior
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        self.lr_schedule, self.min_lr_ratio = lr_schedule, float(min_lr_ratio)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer_name, self.momentum = optimizer, float(momentum)
        self.keep_state = bool(keep_state)
        self.decorrelation = float(decorrelation)
        self.freeze_head = bool(freeze_head)
        if sam_rho < 0:
            raise ValueError(f"sam_rho must be >= 0, got {sam_rho}")
        self.sam_rho = float(sam_rho)
        self.sam: SAM | None = None  # the optimizer of the current fit, where sam_rho > 0
        if fix_batchnorm_from is not None and fix_batchnorm_from < 1:
            raise ValueError(f"fix_batchnorm_from must be an epoch >= 1 or None, got {fix_batchnorm_from}")
        self.fix_batchnorm_from = fix_batchnorm_from
        if self.freeze_head:
            last_linear(net)[1].requires_grad_(False)
        self.optimizer_state: dict | None = None  # keep_state: the moments at the end of the last fit
        self.schedule: tuple[int, int] = (0, 1)  # (first epoch of this fit, epochs of the whole run)
        self.val_metrics = make_metrics(num_classes)
        self.last_val: dict[str, float] = {}
        # set by the site's trainer for one fit:
        self.hook: TrainingHook | None = None  # the strategy's site part: extra loss, own optimizer
        self.wrap_optimizer = None  # DP-SGD: turns the optimizer into Opacus' DPOptimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (B, num_classes)."""
        return self.net(x).softmax(-1)

    def set_label_prior(self, labels: torch.Tensor) -> None:
        """Use the class frequencies of ``labels`` (a site's training labels) for ``logit_adjust``.

        Add-one smoothing keeps a class that a site lacks finite (log(1 / (n + C))).
        """
        self.set_label_counts(torch.bincount(torch.as_tensor(labels).long().flatten(), minlength=self.num_classes))

    def set_label_counts(self, counts) -> None:
        """Use the label mix of per-class ``counts`` for ``logit_adjust`` (a site's own, or the federation's
        summed over its sites), with the same add-one smoothing."""
        counts = torch.as_tensor(counts).double()
        self.log_prior = ((counts + 1) / (counts.sum() + self.num_classes)).log().float()

    @property
    def batchnorm_fixed(self) -> bool:
        """Whether this epoch's BatchNorm layers normalise with their running statistics (``fix_batchnorm_from``)."""
        epoch = self.schedule[0] + self.current_epoch + 1
        return self.fix_batchnorm_from is not None and epoch >= self.fix_batchnorm_from

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.batchnorm_fixed:  # every step (a few isinstance checks): whatever calls net.train() in between
            for layer in self.net.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()
        log = self.sam is None or not self.sam.perturbed  # SAM's second pass only serves its gradient
        if self.decorrelation:
            with penultimate(self.net) as seen:
                logits = self.net(x)
            penalty = self.decorrelation * decorrelation_penalty(seen[0])
            if log:
                self.log("train_decorrelation", penalty, on_step=False, on_epoch=True, batch_size=len(y))
        else:
            logits, penalty = self.net(x), None
        if self.logit_adjust:
            logits = logits + self.logit_adjust * self.log_prior.to(logits.device)
        loss = self.loss_fn(logits, y)
        if log:
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        if penalty is not None:
            loss = loss + penalty
        extra = self.hook.extra_loss(self.net) if self.hook is not None else None
        if extra is not None:
            loss = loss + extra
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.val_metrics.update(logits.softmax(-1), y)

    def on_validation_epoch_end(self):
        scalars, _ = compute_metrics(self.val_metrics)
        self.val_metrics.reset()
        self.last_val = scalars
        self.log_dict({f"val_{k}": v for k, v in scalars.items() if "_class" not in k})

    @property
    def keeps_state(self) -> bool:
        """Whether this fit resumes (and keeps) the optimizer state: not under DP-SGD, nor when the hook says no."""
        hook_keeps = self.hook is None or self.hook.keeps_optimizer_state
        return self.keep_state and self.wrap_optimizer is None and hook_keeps

    def on_train_end(self):
        if self.keeps_state:
            self.optimizer_state = self.trainer.optimizers[0].state_dict()["state"]

    def lr_factor(self, epoch: int) -> float:
        """The learning rate of run epoch ``epoch`` (0-based) as a share of ``lr``."""
        if self.lr_schedule == "constant":
            return 1.0
        total = max(self.schedule[1], 1)
        cos = 0.5 * (1.0 + math.cos(math.pi * min(epoch, total) / total))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos

    def configure_optimizers(self):
        opt = self.hook.make_optimizer(self.parameters(), self.weight_decay) if self.hook is not None else None
        if opt is None and self.optimizer_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        elif opt is None:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.keeps_state and self.optimizer_state is not None:
            fresh = opt.state_dict()
            opt.load_state_dict({"state": self.optimizer_state, "param_groups": fresh["param_groups"]})
        if self.sam_rho and self.wrap_optimizer is not None:
            raise ValueError("sam_rho > 0 with DP-SGD: each step would compute two clipped, noised gradients")
        opt = self.wrap_optimizer(opt) if self.wrap_optimizer is not None else opt
        self.sam = SAM(opt, self.sam_rho, self.net) if self.sam_rho else None
        opt = self.sam or opt
        if self.lr_schedule == "constant":
            return opt
        start = self.schedule[0]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: self.lr_factor(start + e))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
