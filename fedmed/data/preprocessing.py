"""The ``data.transforms`` config of a dataset: preprocessing and augmentation settings, validated.

:func:`fedmed.data.transforms.deterministic_transforms` and
:func:`fedmed.data.transforms.augmentation_transforms` turn these settings into MONAI transforms.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from fedmed.errors import FedmedError

INTENSITY = ("uint8", "minmax", "percentile", "none")
DENOISE = (None, "gaussian", "median")
CONTRAST = (None, "histeq", "gamma")
COLOUR = (None, "shades_of_gray")


@dataclass
class Augmentation:
    """Random training-time augmentation; every probability 0 (the default) switches that step off.

    Args:
        flip_prob: probability of a horizontal (last axis) flip.
        rotate_degrees: rotation uniform in +-degrees (in-plane; about every axis in 3D).
        zoom: zoom uniform in [1 - zoom, 1 + zoom], size kept.
        affine_prob: probability of the rotation and zoom, applied together (one resampling).
        brightness: intensity scaled by a factor uniform in [1 - b, 1 + b].
        brightness_prob: probability of the brightness scaling.
        contrast_gamma: gamma uniform in [1 - g, 1 + g].
        contrast_prob: probability of the gamma change.
        cutout_holes: coarse dropout: this many holes of ``cutout_size**dims`` pixels set to 0.
        cutout_size: side of a hole in pixels.
        cutout_prob: probability of the coarse dropout.
    """

    flip_prob: float = 0.0
    rotate_degrees: float = 0.0
    zoom: float = 0.0
    affine_prob: float = 0.0
    brightness: float = 0.0
    brightness_prob: float = 0.0
    contrast_gamma: float = 0.0
    contrast_prob: float = 0.0
    cutout_holes: int = 0
    cutout_size: int = 8
    cutout_prob: float = 0.0

    @property
    def enabled(self) -> bool:
        return any(p > 0 for p in (self.flip_prob, self.affine_prob, self.brightness_prob,
                                   self.contrast_prob, self.cutout_prob))


@dataclass
class Preprocessing:
    """The ``data.transforms`` config of a dataset. Unknown keys are an error that names them.

    Args:
        channels: 1 (greyscale: RGB is converted by luminance) or 3 (grey is repeated).
        size: resize every spatial axis to this; None keeps the source size.
        orientation: e.g. ``RAS``: reorient NIfTI volumes (uses their affine).
        slice_axis: take one 2D slice of a 3D volume along this spatial axis (2 = axial in RAS).
        slice_index: ``"center"``, an index, or a fraction in (0, 1) of the axis length.
        intensity: ``uint8`` (x / 255), ``minmax`` (per image to [0, 1]), ``percentile``
            (0.5-99.5 %) or ``none``.
        zscore: then subtract the image mean and divide by its std, per channel.
        denoise: None, ``gaussian`` or ``median``.
        denoise_sigma: gaussian sigma in pixels.
        denoise_radius: median filter radius in pixels.
        contrast: None, ``histeq`` (histogram equalisation) or ``gamma``.
        gamma: for ``contrast="gamma"``; < 1 brightens dark tissue.
        colour: None, or ``shades_of_gray``: colour constancy (Finlayson and Trezzi, 2004), each RGB
            image divided by its illuminant, the Minkowski ``colour_power``-mean of each channel, so a
            grey surface looks grey whatever the camera and light; against the colour cast that
            differs between acquisition sites. RGB only (``channels: 3``).
        colour_power: the Minkowski norm of ``shades_of_gray`` (1: grey world; large: max-RGB); 6 is
            the usual choice for dermoscopy.
        augment: the random training-time augmentation.
    """

    channels: int = 1
    size: int | None = None
    orientation: str | None = None
    slice_axis: int | None = None
    slice_index: Any = "center"
    intensity: str = "uint8"
    zscore: bool = False
    denoise: str | None = None
    denoise_sigma: float = 0.5
    denoise_radius: int = 1
    contrast: str | None = None
    gamma: float = 1.0
    colour: str | None = None
    colour_power: float = 6.0
    augment: Augmentation = field(default_factory=Augmentation)

    @classmethod
    def from_config(cls, cfg: Any, where: str = "data.transforms") -> Preprocessing:
        raw = dict(cfg or {})
        aug = dict(raw.pop("augment", None) or {})
        _check_keys(raw, cls, where)
        _check_keys(aug, Augmentation, f"{where}.augment")
        pre = cls(**raw, augment=Augmentation(**aug))
        for key, value, allowed in (("intensity", pre.intensity, INTENSITY), ("denoise", pre.denoise, DENOISE),
                                    ("contrast", pre.contrast, CONTRAST), ("colour", pre.colour, COLOUR)):
            if value not in allowed:
                raise FedmedError(f"{where}.{key}={value!r} is not one of {allowed}")
        if pre.channels not in (1, 3):
            raise FedmedError(f"{where}.channels={pre.channels} must be 1 or 3")
        if pre.colour is not None and pre.channels != 3:
            raise FedmedError(f"{where}.colour={pre.colour} needs RGB images ({where}.channels=3, "
                              f"not {pre.channels})")
        if not pre.colour_power >= 1:
            raise FedmedError(f"{where}.colour_power={pre.colour_power} must be at least 1")
        return pre


def _check_keys(raw: dict, cls: type, where: str) -> None:
    import difflib

    known = [f.name for f in fields(cls) if f.name != "augment"] + (["augment"] if cls is Preprocessing else [])
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise FedmedError(f"unknown key {where}.{key}.{hint} Known: {', '.join(known)}")
