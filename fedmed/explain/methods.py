"""Heatmaps for a batch: the Grad-CAM family (pytorch-grad-cam) and gradient attributions (Captum).

Every method returns one non-negative map per image with the input's spatial shape, scaled so
each map's maximum is 1 (2D: (B,H,W); 3D: (B,D,H,W)). Target layers come from the network's
``target_layers`` attribute.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch
from torch import nn

from fedmed.choices import CAM_METHODS, EXPLAIN_METHODS

METHODS = EXPLAIN_METHODS
#: Integrated Gradients' path steps (Gauss-Legendre). Completeness error |sum of attributions -
#: (f(x) - f(0))| / |f(x) - f(0)| of the compact CNN on 28x28 images, mean over a batch: 24 steps
#: 2-3% for trained networks and 7-25% for untrained ones with data BatchNorm statistics; 128 steps
#: under 0.5% and about 1.6% (docs/crosschecks.md).
IG_STEPS = 128


def _cam_class(name: str):
    import pytorch_grad_cam as pgc

    return {
        "gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "hirescam": pgc.HiResCAM,
        "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM, "scorecam": pgc.ScoreCAM,
    }[name]


def target_layers(net: nn.Module) -> list[nn.Module]:
    """The layers the network declares for CAMs (``net.target_layers``, dotted paths)."""
    paths: Sequence[str] = getattr(net, "target_layers", ())
    if not paths:
        raise ValueError(f"{type(net).__name__} declares no target_layers for CAM methods")
    return [net.get_submodule(p) for p in paths]


@torch.no_grad()
def predict(net: nn.Module, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, its probability) per image, on the CPU; ``net`` is run on its own device."""
    device = next(net.parameters()).device
    probs = torch.cat([net(x[i : i + batch_size].to(device)).softmax(-1).cpu() for i in range(0, len(x), batch_size)])
    conf, pred = probs.max(-1)
    return pred, conf


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Clamp to >= 0 and scale each map to max 1 (an all-zero map stays zero)."""
    maps = maps.clamp(min=0)
    peak = maps.flatten(1).amax(1).clamp(min=1e-12)
    return maps / peak.view(-1, *([1] * (maps.ndim - 1)))


def explain(
    net: nn.Module,
    x: torch.Tensor,
    method: str = "gradcam",
    targets: torch.Tensor | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Heatmaps of ``net`` for the classes ``targets`` (default: the predicted class).

    Args:
        net: a network returning logits, in any mode (it is evaluated in eval mode).
        x: input batch (B,C,H,W) or (B,C,D,H,W).
        method: one of :data:`METHODS`.
        targets: (B,) class index per image; ``None`` explains the predicted class.
        batch_size: images per backward pass.

    Returns:
        (B, *spatial) float32 maps in [0, 1] on the CPU.
    """
    if method not in METHODS:
        raise ValueError(f"explain method {method!r} is not one of {METHODS}")
    if method == "scorecam" and x.ndim == 5:
        raise ValueError("scorecam has no 3D implementation in pytorch-grad-cam; use gradcam or another method")
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = []
    try:
        with torch.enable_grad():  # Lightning's validation runs under no_grad
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size].to(device)
                tb = targets[i : i + batch_size].to(device) if targets is not None else None
                if tb is None:
                    with torch.no_grad():
                        tb = net(xb).argmax(-1)
                out.append(_explain_batch(net, xb, method, tb).float().cpu())
    finally:
        net.train(was_training)
    return _normalise(torch.cat(out))


def _explain_batch(net: nn.Module, x: torch.Tensor, method: str, targets: torch.Tensor) -> torch.Tensor:
    if method in CAM_METHODS:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        with _cam_class(method)(model=net, target_layers=target_layers(net)) as cam:
            cam.batch_size = 64  # ScoreCAM: masked inputs per forward pass
            # ScoreCAM draws a tqdm bar per image; keep logs clean
            with contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext():
                maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        return torch.from_numpy(maps)
    import captum.attr as ca

    x = x.detach().requires_grad_(True)
    t = targets.long()
    if method == "saliency":
        attr = ca.Saliency(net).attribute(x, target=t, abs=True)
    elif method == "inputxgradient":
        attr = ca.InputXGradient(net).attribute(x, target=t)
    elif method == "integratedgradients":
        attr = integrated_gradients(net, x, t)
    else:  # gradientshap: expected gradients against a zero and a mean-intensity baseline
        baselines = torch.stack([torch.zeros_like(x[0]), x.mean(0).detach()])
        attr = ca.GradientShap(net).attribute(x, baselines=baselines, target=t, n_samples=8, stdevs=0.05)
    return attr.detach().clamp(min=0).sum(1)  # positive evidence, summed over channels


def integrated_gradients(net: nn.Module, x: torch.Tensor, targets: torch.Tensor, n_steps: int = IG_STEPS
                         ) -> torch.Tensor:
    """Raw Integrated Gradients (Captum) of the ``targets`` logits from a zero baseline, shaped like ``x``."""
    import captum.attr as ca

    return ca.IntegratedGradients(net).attribute(x, target=targets.long(), baselines=torch.zeros_like(x),
                                                 n_steps=n_steps, internal_batch_size=len(x) * 8)
