"""MedMNIST datasets by name, read through the ``medmnist`` package from its official npz files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.data.source import SPLITS, Rows, check_split
from fedmed.errors import DataNotFoundError, FedmedError


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class MedMNISTSource:
    """One MedMNIST dataset (e.g. ``pneumoniamnist``) stored as medmnist's official npz file.

    The file lives at ``<root>/<flag>[_<size>].npz``, exactly where ``medmnist`` puts it. If it is
    absent, medmnist's ordinary download runs; if that fails (no network), a
    :class:`DataNotFoundError` says where to put the file. The md5 is checked against
    ``medmnist.INFO``.

    Args:
        name: medmnist flag, e.g. ``pneumoniamnist`` or ``breastmnist``.
        root: folder that holds (or will hold) the npz file.
        size: image size, 28 (default) or one of 64/128/224 for MedMNIST+.
        download: try medmnist's download when the file is absent.
    """

    name: str
    root: str
    size: int = 28
    download: bool = True

    def __post_init__(self) -> None:
        import medmnist

        if self.name not in medmnist.INFO:
            known = ", ".join(sorted(medmnist.INFO))
            raise FedmedError(f"data.name={self.name!r} is not a MedMNIST dataset; known: {known}")
        self.info = medmnist.INFO[self.name]
        sizes = [28] + [int(k[4:]) for k in self.info if k.startswith("MD5_")]
        if self.size not in sizes:
            raise FedmedError(f"data.source.size={self.size} is not offered for {self.name} (sizes: {sizes})")

    # -- identity -------------------------------------------------------------------------
    @property
    def filename(self) -> str:
        return f"{self.name}.npz" if self.size == 28 else f"{self.name}_{self.size}.npz"

    @property
    def path(self) -> Path:
        return Path(self.root).expanduser().resolve() / self.filename

    @property
    def expected_md5(self) -> str:
        return self.info["MD5"] if self.size == 28 else self.info[f"MD5_{self.size}"]

    @property
    def class_names(self) -> list[str]:
        labels = self.info["label"]
        return [labels[str(i)] for i in range(len(labels))]

    @property
    def num_classes(self) -> int:
        return len(self.info["label"])

    @property
    def task(self) -> str:
        return self.info["task"]

    @property
    def spatial_dims(self) -> int:
        return 3 if self.name.endswith("3d") else 2

    @property
    def identity(self) -> dict[str, str]:
        return {"file": self.filename, "md5": self.expected_md5}

    # -- loading --------------------------------------------------------------------------
    def ensure_available(self) -> Path:
        """Make sure the npz exists and matches medmnist's md5; return its path."""
        path = self.path
        if not path.exists():
            if not self.download:
                raise DataNotFoundError(
                    f"{self.filename} is not in {path.parent} (download disabled). Put the official file at "
                    f"{path}, or point FEDMED_DATA_DIR (or data.source.root) at the folder that holds it."
                )
            self._download()
        actual = md5sum(path)
        if actual != self.expected_md5:
            raise FedmedError(
                f"{path} is corrupt or not the official file: md5 {actual}, "
                f"medmnist expects {self.expected_md5}. Replace it with the official {self.filename}."
            )
        return path

    def _download(self) -> None:
        import medmnist

        url = self.info["url"] if self.size == 28 else self.info[f"url_{self.size}"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cls = getattr(medmnist, self.info["python_class"])
        try:  # the ordinary medmnist download (md5-checked by it)
            cls(split="train", root=str(self.path.parent), download=True, size=self.size)
        except Exception as exc:  # noqa: BLE001 - any network/IO failure gets the same advice
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise DataNotFoundError(
                f"{self.filename} is not in {self.path.parent} and medmnist's download failed ({first}). "
                f"Download {url} (md5 {self.expected_md5}) and put it at {self.path}, "
                "or point FEDMED_DATA_DIR (or data.source.root) at the folder that holds it."
            ) from None
        if not self.path.exists():
            raise DataNotFoundError(f"medmnist's download did not produce {self.path}")

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """All splits as arrays: ``{split}_images`` (N,H,W[,C]) uint8 and ``{split}_labels`` (N,)."""
        path = self.ensure_available()
        try:
            with np.load(path) as npz:
                out = {}
                for split in SPLITS:
                    out[f"{split}_images"] = npz[f"{split}_images"]
                    out[f"{split}_labels"] = npz[f"{split}_labels"].reshape(len(npz[f"{split}_labels"]), -1)
        except (OSError, ValueError, KeyError) as exc:
            raise FedmedError(f"could not read {path}: {exc}") from exc
        if self.task.startswith("multi-label"):
            raise FedmedError(f"{self.name} is multi-label ({self.task}); fedmed classifies one label per image")
        for split in SPLITS:
            out[f"{split}_labels"] = out[f"{split}_labels"][:, 0].astype(np.int64)
        return out

    def images(self, split: str) -> np.ndarray:
        check_split(split)
        return self.arrays[f"{split}_images"]

    def labels(self, split: str) -> np.ndarray:
        check_split(split)
        return self.arrays[f"{split}_labels"]

    def sample_id(self, split: str, index: int) -> str:
        """Stable id of one sample: ``<split>/<index in the official split>``."""
        return f"{split}/{index}"

    def ids(self, split: str) -> list[str]:
        return [self.sample_id(split, i) for i in range(len(self.labels(split)))]

    def locate(self, sample_id: str) -> tuple[str, int] | None:
        """(split, row) of a sample id, or None if the file lacks it."""
        split, _, index = str(sample_id).partition("/")
        if split not in SPLITS or not index.isdigit() or int(index) >= len(self.labels(split)):
            return None
        return split, int(index)

    def column(self, split: str, name: str) -> np.ndarray:
        raise FedmedError(f"{self.name} (MedMNIST) has no metadata column {name!r}; use partition=iid or dirichlet")

    def items(self, split: str, rows: Rows = None) -> list[dict[str, Any]]:
        """MONAI data dicts ``{"image": channel-first float32 array (0..255), "label", "id"}``."""
        index = np.arange(len(self.labels(split))) if rows is None else np.asarray(rows, dtype=np.int64)
        images = self.images(split)[index]
        # (N,H,W,C) -> (N,C,H,W); (N,H,W) / (N,D,H,W): add the channel axis
        images = images.transpose(0, 3, 1, 2) if images.ndim == 4 and self.spatial_dims == 2 else images[:, None]
        labels = self.labels(split)[index]
        return [{"image": images[k].astype(np.float32), "label": int(labels[k]), "id": self.sample_id(split, int(r))}
                for k, r in enumerate(index)]

    def loader(self) -> None:
        """Items already hold arrays: nothing to read."""
        return None
