"""The one LightningModule: any registered network + Adam + cross-entropy + torchmetrics."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from fedmed.models.metrics import flatten_metrics, make_metrics


class Classifier(L.LightningModule):
    """Image classifier around a plain network that returns logits.

    Args:
        net: the network, e.g. :class:`fedmed.models.CompactCNN`.
        num_classes: number of classes.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        class_weights: optional per-class loss weights.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        class_weights: list[float] | None = None,
    ):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.lr, self.weight_decay = lr, weight_decay
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight)
        self.val_metrics = make_metrics(num_classes)
        self.last_val: dict[str, float] = {}
        # set by the site client for one round of federated training:
        self.prox_mu: float = 0.0  # FedProx: loss + mu/2 ||w - prox_ref||^2
        self.prox_ref: list[torch.Tensor] | None = None
        self.sgd_lr: float | None = None  # plain SGD at this rate instead of Adam (SCAFFOLD)
        self.wrap_optimizer = None  # DP-SGD: turns the optimizer into Opacus' DPOptimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (B, num_classes)."""
        return self.net(x).softmax(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        if self.prox_mu > 0 and self.prox_ref is not None:
            prox = sum(((p - r) ** 2).sum() for p, r in zip(self.net.parameters(), self.prox_ref))
            loss = loss + 0.5 * self.prox_mu * prox
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.val_metrics.update(logits.softmax(-1), y)

    def on_validation_epoch_end(self):
        scalars, _ = flatten_metrics(self.val_metrics.compute())
        self.val_metrics.reset()
        self.last_val = scalars
        self.log_dict({f"val_{k}": v for k, v in scalars.items() if "_class" not in k})

    def configure_optimizers(self):
        if self.sgd_lr is not None:
            opt = torch.optim.SGD(self.parameters(), lr=self.sgd_lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return self.wrap_optimizer(opt) if self.wrap_optimizer is not None else opt
