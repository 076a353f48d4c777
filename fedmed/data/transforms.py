"""Preprocessing as MONAI dictionary transforms, configured per dataset (``data.transforms``,
read into :class:`~fedmed.data.preprocessing.Preprocessing`).

Two chains act on ``{"image": ..., "label": ...}`` items:

- :func:`deterministic_transforms`: load (done by the source), channel conversion, optional NIfTI
  orientation / 2D slice, resize, intensity scaling, denoising, contrast enhancement, colour
  constancy, z-score.
  Computed once per sample and cached (see :mod:`fedmed.data.datamodule`).
- :func:`augmentation_transforms`: random flips, rotation, zoom, brightness/contrast jitter and
  coarse dropout ("cutout"), applied to training samples only, on the cached tensors (rotation and
  zoom batched: :class:`BatchRandAffine`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.transforms import (
    AdjustContrastd,
    Compose,
    EnsureTyped,
    GaussianSmoothd,
    HistogramNormalized,
    MapTransform,
    MedianSmoothd,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandCoarseDropoutd,
    RandFlipd,
    RandScaleIntensityd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
)

from fedmed.data.preprocessing import Augmentation, Preprocessing
from fedmed.errors import FedmedError


class ToChannelsd(MapTransform):
    """Make a channel-first image have 1 or 3 channels: RGB(A) -> luminance, grey -> repeated.

    Args:
        keys: the item keys to convert.
        channels: 1 or 3.
    """

    def __init__(self, keys, channels: int):
        super().__init__(keys)
        self.channels = channels

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key] if isinstance(d[key], torch.Tensor) else torch.as_tensor(d[key])
            c = x.shape[0]
            if c == 4:  # RGBA: drop alpha
                x, c = x[:3], 3
            if c == self.channels:
                pass
            elif c == 3 and self.channels == 1:
                w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, *([1] * (x.ndim - 1)))
                x = (x * w).sum(0, keepdim=True)
            elif c == 1 and self.channels == 3:
                x = x.repeat(3, *([1] * (x.ndim - 1)))
            else:
                raise FedmedError(f"{_name(d)} has {c} channels; fedmed converts 1, 3 or 4 channels to {self.channels}")
            d[key] = x
        return d


class ShadesOfGrayd(MapTransform):
    """Colour constancy by Shades of Gray (Finlayson and Trezzi, 2004) on channel-first RGB in [0, 1].

    The illuminant is the Minkowski ``power``-mean of each channel, ``e_c = mean(x_c ** p) ** (1/p)``;
    each channel is divided by ``sqrt(3) * e_c / |e|`` (a grey illuminant leaves the image as it is)
    and clipped to [0, 1].

    Args:
        keys: the item keys to correct.
        power: the Minkowski norm p (1: grey world; large: max-RGB).
    """

    def __init__(self, keys, power: float = 6.0):
        super().__init__(keys)
        self.power = float(power)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key], dtype=torch.float32)
            if x.shape[0] != 3:
                raise FedmedError(f"{_name(d)} has {x.shape[0]} channels; shades_of_gray needs RGB")
            flat = x.reshape(3, -1).double()
            illuminant = flat.pow(self.power).mean(1).pow(1.0 / self.power)
            norm = illuminant.norm()
            if not norm > 0:  # an all-black image: nothing to correct
                d[key] = x
                continue
            gain = (norm / (math.sqrt(3.0) * illuminant.clamp_min(1e-6))).float()
            d[key] = (x * gain.view(3, *([1] * (x.ndim - 1)))).clamp(0.0, 1.0)
        return d


class Sliced(MapTransform):
    """Take one 2D slice of a channel-first 3D volume: ``(C, X, Y, Z)`` -> ``(C, ., .)``.

    Args:
        keys: the item keys to slice.
        axis: spatial axis (0, 1 or 2) across which the slice is taken.
        index: ``"center"``, an index, or a fraction in (0, 1) of the axis length.
    """

    def __init__(self, keys, axis: int, index: Any = "center"):
        super().__init__(keys)
        self.axis, self.index = int(axis), index

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if x.ndim != 4:
                raise FedmedError(f"{_name(d)} has shape {tuple(x.shape[1:])}; slicing needs a 3D volume")
            n = x.shape[1 + self.axis]
            i = self.index
            if i == "center":
                i = n // 2
            elif isinstance(i, float) and 0 < i < 1:
                i = int(i * n)
            if not isinstance(i, int) or not 0 <= i < n:
                raise FedmedError(f"slice_index={self.index!r} is outside axis {self.axis} of length {n} ({_name(d)})")
            d[key] = x.select(1 + self.axis, i)
        return d


def _name(d: dict) -> str:
    return str(d.get("path") or d.get("id") or "an image")


def deterministic_transforms(pre: Preprocessing, spatial_dims: int) -> Compose:
    """The cached part of preprocessing for ``spatial_dims``-D model inputs."""
    k = ["image"]
    steps: list = [ToChannelsd(k, pre.channels), *_spatial_steps(pre, spatial_dims)]
    if pre.intensity == "uint8":
        steps.append(ScaleIntensityRanged(k, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True))
    elif pre.intensity == "minmax":
        steps.append(ScaleIntensityd(k, minv=0.0, maxv=1.0))
    elif pre.intensity == "percentile":
        steps.append(ScaleIntensityRangePercentilesd(k, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True))
    if pre.denoise == "gaussian":
        steps.append(GaussianSmoothd(k, sigma=pre.denoise_sigma))
    elif pre.denoise == "median":
        steps.append(MedianSmoothd(k, radius=pre.denoise_radius))
    if pre.contrast == "histeq":
        steps.append(HistogramNormalized(k, num_bins=256, min=0, max=1))
    elif pre.contrast == "gamma":
        steps.append(AdjustContrastd(k, gamma=pre.gamma))
    if pre.colour == "shades_of_gray":
        steps.append(ShadesOfGrayd(k, power=pre.colour_power))
    if pre.zscore:
        steps.append(NormalizeIntensityd(k, channel_wise=True))
    steps.append(EnsureTyped(k, data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(steps)


def mask_transforms(pre: Preprocessing, spatial_dims: int) -> Compose:
    """The spatial steps of :func:`deterministic_transforms` for a binary mask (read as greyscale): the same
    orientation, slice and resize (area, as the image), then thresholded at half; no intensity step."""
    k = ["image"]
    steps = [ToChannelsd(k, 1), *_spatial_steps(pre, spatial_dims),
             EnsureTyped(k, data_type="tensor", dtype=torch.float32, track_meta=False)]
    return Compose(steps)


def _spatial_steps(pre: Preprocessing, spatial_dims: int) -> list:
    """Orientation, slice and resize: the steps an image and its mask share."""
    k = ["image"]
    steps: list = []
    if pre.orientation:
        steps.append(Orientationd(k, axcodes=pre.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if pre.slice_axis is not None:
        steps.append(Sliced(k, pre.slice_axis, pre.slice_index))
    if pre.size:
        steps.append(Resized(k, spatial_size=(int(pre.size),) * spatial_dims, mode="area"))
    return steps


class BatchRandAffine:
    """Random rotation and zoom for a whole batch at once: one draw per image, one resampling call.

    MONAI's per-image ``RandAffined`` builds a sampling grid for every image, which makes it
    slower than the model step it feeds (``benchmarks/pipeline_bench.py`` measures both).
    This draws each image's rotation (+-``rotate_degrees``, about every axis in 3D) and isotropic
    zoom (1 +- ``zoom``) with probability ``prob`` and resamples the chosen images together through
    MONAI's ``AffineTransform`` (bilinear, zero padding). :meth:`set_random_state` seeds it.

    Args:
        prob: probability that an image is transformed.
        rotate_degrees: rotation angles are uniform in +- this.
        zoom: zoom factors are uniform in [1 - zoom, 1 + zoom].
        spatial_dims: 2 for images, 3 for volumes.
    """

    def __init__(self, prob: float, rotate_degrees: float, zoom: float, spatial_dims: int):
        from monai.networks.layers import AffineTransform

        self.prob, self.rot, self.zoom, self.dims = prob, math.radians(rotate_degrees), zoom, spatial_dims
        self.layer = AffineTransform(normalized=True, mode="bilinear", padding_mode="zeros")
        self.gen = torch.Generator().manual_seed(0)

    def set_random_state(self, seed: int) -> None:
        self.gen.manual_seed(int(seed))

    def _rotation(self, n: int) -> torch.Tensor:
        def axis(a: torch.Tensor, i: int, j: int) -> torch.Tensor:
            r = torch.eye(self.dims).repeat(n, 1, 1)
            r[:, i, i], r[:, j, j], r[:, i, j], r[:, j, i] = a.cos(), a.cos(), -a.sin(), a.sin()
            return r

        def draw() -> torch.Tensor:
            return (torch.rand(n, generator=self.gen) * 2 - 1) * self.rot

        if self.dims == 2:
            return axis(draw(), 0, 1)
        return axis(draw(), 0, 1) @ axis(draw(), 0, 2) @ axis(draw(), 1, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, *spatial)
        chosen = (torch.rand(len(x), generator=self.gen) < self.prob).nonzero().flatten()
        rotation = self._rotation(len(chosen))  # drawn before the zoom factors
        scale = 1 + (torch.rand(len(chosen), generator=self.gen) * 2 - 1) * self.zoom
        if len(chosen) == 0:
            return x
        theta = torch.cat([rotation * scale[:, None, None], torch.zeros(len(chosen), self.dims, 1)], dim=2)
        out = x.clone()
        out[chosen] = self.layer(x[chosen], theta.to(x), spatial_size=tuple(x.shape[2:]))
        return out


def augmentation_transforms(aug: Augmentation, spatial_dims: int) -> tuple[Compose | None, BatchRandAffine | None]:
    """Random training-time augmentation on cached tensors: (per-image steps, batched rotation/zoom).

    Either is None when its steps are all off.
    """
    if not aug.enabled:
        return None, None
    k = ["image"]
    steps: list[MapTransform] = []
    if aug.flip_prob > 0:
        steps.append(RandFlipd(k, prob=aug.flip_prob, spatial_axis=spatial_dims - 1))
    batch = None
    if aug.affine_prob > 0 and (aug.rotate_degrees > 0 or aug.zoom > 0):
        batch = BatchRandAffine(aug.affine_prob, aug.rotate_degrees, aug.zoom, spatial_dims)
    if aug.brightness_prob > 0:
        steps.append(RandScaleIntensityd(k, factors=aug.brightness, prob=aug.brightness_prob))
    if aug.contrast_prob > 0:
        g = aug.contrast_gamma
        steps.append(RandAdjustContrastd(k, prob=aug.contrast_prob, gamma=(max(1 - g, 0.05), 1 + g)))
    if aug.cutout_prob > 0 and aug.cutout_holes > 0:
        steps.append(RandCoarseDropoutd(k, holes=aug.cutout_holes, spatial_size=aug.cutout_size, fill_value=0.0,
                                        prob=aug.cutout_prob))
    steps.append(EnsureTyped(k, data_type="tensor", dtype=torch.float32, track_meta=False))
    return (Compose(steps) if len(steps) > 1 else None), batch
