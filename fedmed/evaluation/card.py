"""A model card (Markdown) for a trained model: what it is for, what it learned from, how it did where."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedmed.evaluation.scores import HEADLINE, LABELS, Scores, fmt
from fedmed.models.metrics import class_keys


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def model_card(config: DictConfig, evaluations: Sequence[tuple[str, Scores]], *, name: str,
               training_counts: Mapping[str, Sequence[int]] | None = None, privacy: str = "none",
               command: str | None = None, level: float = 0.95) -> str:
    """The card of a model trained with ``config``.

    Args:
        config: the trained model's config (as stored in its checkpoint).
        evaluations: (``internal`` or ``external``, its scores) per data set it was scored on.
        name: the model (its MLflow run name or id).
        training_counts: training images per site and class (no images), where known.
        privacy: the DP setting in words, with its epsilon.
        command: the command that reproduces the model.
    """
    cfg = config
    classes = list(evaluations[0][1].class_names) if evaluations else []
    fed = cfg.federation
    mode = str(cfg.get("mode", "federated")) if not cfg.get("site") else "local"
    lines = [f"# Model card: {name}", "",
             "**Not for clinical use.** A research model trained with fedmed; it has not been validated "
             "prospectively or cleared by any regulator. Use it to study federated training and explanations.", "",
             "## Model", "",
             f"- Task: {len(classes)}-class image classification on `{cfg.data.name}`: {', '.join(classes)}.",
             f"- Network: `{cfg.model.name}` (`{cfg.model.net._target_}`), input "
             f"{cfg.data.transforms.get('channels', '?')} channel(s) at {cfg.data.get('image_size', '?')} px.",
             f"- Training: {mode}"
             + (f", strategy `{cfg.strategy._target_.rsplit('.', 1)[-1]}`, {fed.rounds} rounds x "
                f"{fed.local_epochs} local epoch(s)" if mode == "federated" else f", {fed.rounds * fed.local_epochs} "
                "epochs") + f", selection `{fed.select}` (validation data only), seed {cfg.seed}"
             + (f"; started from `model.pretrained={cfg.model.pretrained}`" if cfg.model.get("pretrained") else "")
             + ("; logit-adjusted loss with the federation's label prior"
                if cfg.model.get("logit_adjust") and cfg.model.get("logit_prior") == "federation" else "")
             + ("; each site's update weighed by its class-balanced share (`federation.weighting=balanced`)"
                if mode == "federated" and fed.get("weighting") == "balanced" else "")
             + ("; last layer re-fitted on class-balanced virtual features (`federation.calibrate_head`)"
                if fed.get("calibrate_head") else "") + ".",
             f"- Privacy: DP-SGD {privacy}; secure aggregation {'on' if cfg.privacy.secure_aggregation else 'off'}; "
             f"update compression `{fed.compression}`.", "",
             "## Preprocessing (augmentation: training only)", "", "```yaml",
             OmegaConf.to_yaml(cfg.data.transforms).rstrip(), "```", ""]
    if training_counts:
        lines += ["## Training data (images per class at each site; no image leaves its site)", ""]
        lines += _table(["site", *classes, "total"],
                        [[s, *map(int, c), int(np.sum(c))] for s, c in training_counts.items()])
        lines += [""]
    lines += ["## Evaluations", "",
              f"Each value with its {level:.0%} stratified bootstrap interval "
              f"({evaluations[0][1].n_boot if evaluations else 0} resamples within each class, seed "
              f"{evaluations[0][1].seed if evaluations else 0}). Internal: test images of the data the model trained "
              "on, never used for training or selection; external: a site that never took part.", ""]
    summaries = [s.summary(level) for _, s in evaluations]  # each computed once
    lines += _table(["data", "kind", "images", *[LABELS[m] for m in HEADLINE]],
                    [[s.name, kind, int(s.support.sum()), *[fmt(summary[m]) for m in HEADLINE]]
                     for (kind, s), summary in zip(evaluations, summaries, strict=True)])
    lines += ["", "Images per class:", ""]
    lines += _table(["data", *classes], [[s.name, *map(int, s.support)] for _, s in evaluations])
    lines += ["", "## Known failure modes", ""]
    for (kind, s), summary in zip(evaluations, summaries, strict=True):
        keys = class_keys(s.class_names)
        recalls = {c: (summary[f"recall_{k}"], int(n)) for c, k, n in zip(classes, keys, s.support, strict=True)
                   if np.isfinite(summary[f"recall_{k}"]["value"])}
        worst = min(recalls, key=lambda c: recalls[c][0]["value"]) if recalls else None
        if worst is not None:
            lines.append(f"- {s.name} ({kind}): lowest recall for **{worst}**, {fmt(recalls[worst][0])} "
                         f"({recalls[worst][1]} image{'s' if recalls[worst][1] != 1 else ''}); "
                         f"calibration error {fmt(summary['ece'])}.")
    if len(evaluations) > 1:
        at = min(range(len(evaluations)), key=lambda i: summaries[i]["balanced_acc"]["value"])
        lines.append(f"- Worst data set by balanced accuracy: **{evaluations[at][1].name}** "
                     f"({fmt(summaries[at]['balanced_acc'])}).")
    lines += ["", "## Reproduce", "", f"```\n{command}\n```" if command else
              "The full config is `config.yaml` in the model's MLflow run.", ""]
    return "\n".join(lines)

