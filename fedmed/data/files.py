"""Reading one sample file: PNG/JPEG/BMP/TIFF images and NIfTI volumes, with errors that name the file.

Images are read by MONAI's ``LoadImage`` (PIL for 2D files, nibabel for ``.nii`` / ``.nii.gz``;
:class:`fedmed.data.file_source.LoadFiled` sets the readers up). A file that cannot be a sample
(absent, empty, truncated, corrupt, of the wrong rank or channel count) raises :class:`DataError`
with the path and the reason, never a trace from inside a reader.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fedmed.errors import FedmedError

if TYPE_CHECKING:
    from nibabel.dataobj_images import DataobjImage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii", ".nii.gz")


def file_kind(path: str | Path) -> str | None:
    """``image`` (2D file), ``volume`` (NIfTI) or None for other files."""
    name = str(path).lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    return None


class DataError(FedmedError):
    """A file that cannot be used as a sample (corrupt, truncated, empty, wrong shape)."""


def load_file(path: str, loaders: Mapping[str, Callable[[str], Any]]) -> Any:
    """Decode ``path`` with ``loaders[file_kind(path)]`` and check the result's rank and channels.

    Raises:
        DataError: the file is absent, empty, undecodable, or not a 2D image / 3D volume.
    """
    kind = file_kind(path)
    if kind is None:
        raise DataError(f"{path}: not an image or NIfTI file (suffixes {IMAGE_SUFFIXES + VOLUME_SUFFIXES})")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file does not exist")
    if p.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        x = loaders[kind](path)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
        raise DataError(f"{path}: cannot be decoded ({_reason(path, kind, exc)})") from None
    want = 3 if kind == "image" else 4  # channel + spatial axes
    if x.ndim != want:
        raise DataError(f"{path}: decoded to shape {tuple(x.shape)}, expected a {want - 1}D "
                        f"{'image' if kind == 'image' else 'volume'} (channel first)")
    if kind == "volume" and x.shape[0] != 1:
        raise DataError(f"{path}: is a 4D image of shape {tuple(x.shape[1:])} + {x.shape[0]} frames, "
                        "expected a 3D volume")
    if kind == "image" and x.shape[0] not in (1, 3, 4):
        raise DataError(f"{path}: has {x.shape[0]} channels, expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    finite = _finite(x)
    if finite < x.numel():
        raise DataError(f"{path}: {x.numel() - finite} of {x.numel()} values are NaN or infinite")
    return x


def _finite(x: Any) -> int:
    import torch

    t = torch.as_tensor(x)
    return int(torch.isfinite(t).sum()) if t.is_floating_point() else t.numel()


def by_mode(image: Any) -> Any:
    """A PIL image whose channels are not colours as displayed (CMYK, YCbCr, LAB, HSV) as RGB: a CMYK file
    would otherwise be taken as RGBA and its black channel dropped. Other modes are read as they are."""
    if image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    return image


def _reason(path: str, kind: str, exc: Exception) -> str:
    """The decoder's own complaint (MONAI reports any reader failure as 'no suitable reader')."""
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(path) as im:
                im.load()
        else:
            import nibabel

            cast("DataobjImage", nibabel.load(path)).get_fdata()
    except Exception as direct:  # noqa: BLE001
        exc = direct
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first[:160]}"
