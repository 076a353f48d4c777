"""Each site's look, shared as one mean low-frequency amplitude spectrum, and training on the other sites' looks.

In the spirit of FedDG's continuous frequency-space interpolation (Liu et al., CVPR 2021), with one change in
what leaves a site: not a bank of per-image spectra but a single spectrum, the mean over all of the site's
training images of the amplitude of their 2D Fourier transform in a small square of low frequencies around the
zero frequency (:func:`mean_amplitude`). Illumination, colour cast, vignetting and contrast of a camera live
mostly there; the phase, which carries the lesion's shape, is never shared.

During training (:class:`StyleMix`) an image is, with probability ``prob``, given another site's look: its
low-frequency amplitude becomes ``(1 - lam) * own + lam * other`` (``lam`` uniform in [0, 1], ``other`` one of
the other sites' mean spectra, drawn at random) and its phase is kept; the result is not clipped (a brighter look
may leave the source's range of values a little). For images of ``C`` channels and ``H x W`` pixels the spectrum
is ``(C, 2r + 1, 2r + 1)`` with ``r = max(1, floor(band * min(H, W) / 2))``.

Before a site uses the spectra the server relays, it checks them (:func:`check_spectrum`): the shape of its own,
finite, non-negative, and within a factor :data:`MAX_RATIO` of its own spectrum's total, so a spectrum cannot
blow up or black out its images.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

#: what a site with federation.style_mix > 0 agrees to tell the server (and, through it, its peers)
STYLE_SPECTRUM = "style_spectrum"
#: a relayed spectrum whose total amplitude is more than this many times the site's own (or less than its
#: inverse) is refused: real cameras differ by far less
MAX_RATIO = 10.0
_CHUNK = 256  # images per FFT batch: bounds the memory of a site's spectrum


def band_radius(height: int, width: int, band: float) -> int:
    """Half-width ``r`` of the square of low frequencies kept: ``max(1, floor(band * min(H, W) / 2))``."""
    return max(1, int(band * min(height, width) / 2))


def _centred(x: torch.Tensor) -> torch.Tensor:
    """The 2D Fourier transform of the last two axes, zero frequency at index ``(H // 2, W // 2)``."""
    return torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))


def _window(height: int, width: int, r: int) -> tuple[slice, slice]:
    return slice(height // 2 - r, height // 2 + r + 1), slice(width // 2 - r, width // 2 + r + 1)


def mean_amplitude(images: torch.Tensor, band: float) -> np.ndarray:
    """The mean amplitude spectrum of ``images`` (N, C, H, W) in the low-frequency square (C, 2r+1, 2r+1),
    float64; computed in chunks of images."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"a style spectrum needs a non-empty batch of 2D images (N, C, H, W), got shape "
                         f"{tuple(images.shape)}")
    h, w = images.shape[-2:]
    rows, cols = _window(h, w, band_radius(h, w, band))
    total = torch.zeros(images.shape[1], rows.stop - rows.start, cols.stop - cols.start, dtype=torch.float64)
    for start in range(0, len(images), _CHUNK):
        chunk = images[start:start + _CHUNK].double()
        total += _centred(chunk)[..., rows, cols].abs().sum(0)
    return (total / len(images)).numpy()


def check_spectrum(name: str, spectrum: object, own: np.ndarray) -> np.ndarray:
    """``spectrum`` (from site ``name``, relayed by the server) as float64, checked against this site's ``own``.

    Raises:
        ValueError: naming the site and what is wrong (not an array of ``own``'s shape, NaN or Inf, negative,
            or a total amplitude out of ``[own / MAX_RATIO, own * MAX_RATIO]``).
    """
    a = np.asarray(spectrum, dtype=np.float64) if isinstance(spectrum, np.ndarray | list | tuple) else None
    if a is None or a.shape != own.shape:
        got = getattr(a, "shape", type(spectrum).__name__)
        raise ValueError(f"the style spectrum of site {name}: expected an array of shape {own.shape}, got {got}")
    if not np.isfinite(a).all():
        raise ValueError(f"the style spectrum of site {name} holds NaN or Inf")
    if (a < 0).any():
        raise ValueError(f"the style spectrum of site {name} holds negative amplitudes")
    ratio = a.sum() / max(float(own.sum()), 1e-12)
    if not 1 / MAX_RATIO <= ratio <= MAX_RATIO:
        raise ValueError(f"the style spectrum of site {name} is {ratio:.3g} times this site's own in total "
                         f"amplitude (at most {MAX_RATIO:g} either way)")
    return a


class StyleMix:
    """Give training images other sites' looks (the module docstring), a batch (B, C, H, W) at a time.

    Args:
        spectra: the other sites' mean spectra, by site name (each ``(C, 2r+1, 2r+1)``).
        prob: probability that an image is given another site's look.
    """

    def __init__(self, spectra: Mapping[str, np.ndarray], prob: float):
        if not spectra:
            raise ValueError("StyleMix needs at least one other site's spectrum")
        self.names = sorted(spectra)
        self.bank = torch.as_tensor(np.stack([spectra[n] for n in self.names]), dtype=torch.float64)
        self.prob = float(prob)
        self.r = (self.bank.shape[-1] - 1) // 2
        self.gen = torch.Generator().manual_seed(0)

    def set_random_state(self, seed: int) -> None:
        self.gen.manual_seed(int(seed))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        chosen = (torch.rand(n, generator=self.gen) < self.prob).nonzero().flatten()
        lam = torch.rand(len(chosen), generator=self.gen, dtype=torch.float64)
        which = torch.randint(len(self.names), (len(chosen),), generator=self.gen)
        if len(chosen) == 0:
            return x
        h, w = x.shape[-2:]
        if self.bank.shape[1:] != (x.shape[1], 2 * self.r + 1, 2 * self.r + 1) or self.r > min(h, w) // 2 - 1:
            raise ValueError(f"style spectra of shape {tuple(self.bank.shape[1:])} do not fit images of shape "
                             f"{tuple(x.shape[1:])}")
        rows, cols = _window(h, w, self.r)
        spectrum = _centred(x[chosen].double())
        band = spectrum[..., rows, cols]  # only the band changes: rescale it to the new amplitude, phase kept
        low = band.abs()
        lam = lam.view(-1, 1, 1, 1)
        new = (1 - lam) * low + lam * self.bank[which]
        spectrum[..., rows, cols] = torch.where(low > 0, band * (new / low.clamp_min(1e-300)), new.to(band.dtype))
        mixed = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real
        out = x.clone()
        out[chosen] = mixed.to(x.dtype)
        return out
