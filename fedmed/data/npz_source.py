"""Image classification sets stored as one plain npz file of arrays (e.g. Fashion-MNIST's
``x_train``, ``y_train``, ``x_test``, ``y_test``), with a validation share carved from train where the
file has no validation split."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.data.medmnist_source import md5sum
from fedmed.data.source import SPLITS, Rows, check_split
from fedmed.data.splits import group_stratified_split
from fedmed.errors import DataNotFoundError, FedmedError


@dataclass
class NpzSource:
    """A dataset held as arrays in one ``.npz`` file: images (N,H,W) or (N,H,W,C) uint8 and labels (N,).

    The arrays are named by ``image_key`` / ``label_key`` with ``{split}`` in them (Fashion-MNIST:
    ``x_{split}`` / ``y_{split}``). Splits the file holds are kept as they are; a missing ``val``
    split is carved from ``train`` (``val_fraction`` of every class, a fixed function of
    ``split_seed``). The test split is never touched.

    Sample ids name the file's own array and row, ``<file split>/<row>`` (a validation image carved
    from train keeps its ``train/<row>`` id), so they stay the same whatever the validation share.

    Args:
        name: dataset name (manifests live under ``data_manifests/<name>``).
        root: the folder that holds the file.
        file: the npz file, relative to ``root`` (or absolute).
        class_names: one name per label, in label order.
        image_key, label_key: array names, with ``{split}`` standing for train / val / test.
        val_fraction: share of train carved out as validation where the file has no val arrays.
        split_seed: seed of that carve-out.
    """

    name: str
    root: str
    file: str
    class_names: list[str]
    image_key: str = "x_{split}"
    label_key: str = "y_{split}"
    val_fraction: float = 0.1
    split_seed: int = 0

    def __post_init__(self) -> None:
        self.class_names = [str(c) for c in self.class_names]
        if not 0 < self.val_fraction < 1:
            raise FedmedError(f"data.source.val_fraction must be in (0, 1), got {self.val_fraction}")

    # -- identity -------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return Path(self.root).expanduser().resolve() / Path(self.file).expanduser()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def spatial_dims(self) -> int:
        return 2

    @cached_property
    def md5(self) -> str:
        return md5sum(self.ensure_available())

    @property
    def identity(self) -> dict[str, str]:
        return {"file": self.path.name, "md5": self.md5}

    def ensure_available(self) -> Path:
        path = self.path
        if not path.is_file():
            raise DataNotFoundError(
                f"{self.name}: {path} does not exist. Put the npz file there, or point FEDMED_DATA_DIR "
                "(or data.source.root) at the folder that holds it."
            )
        return path

    # -- loading --------------------------------------------------------------------------
    @cached_property
    def _arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``{split: (images, labels, file ids)}`` for the three splits."""
        path = self.ensure_available()
        try:
            with np.load(path) as npz:
                keys = set(npz.files)
                raw = {}
                for split in SPLITS:
                    xk, yk = self.image_key.format(split=split), self.label_key.format(split=split)
                    if xk in keys and yk in keys:
                        raw[split] = (npz[xk], np.asarray(npz[yk]).reshape(-1).astype(np.int64))
        except (OSError, ValueError) as exc:
            raise FedmedError(f"could not read {path}: {exc}") from None
        for split in ("train", "test"):
            if split not in raw:
                want = (self.image_key.format(split=split), self.label_key.format(split=split))
                raise FedmedError(f"{path} has no arrays {want}; it holds {sorted(keys)}")
        for split, (x, y) in raw.items():
            if len(x) != len(y):
                raise FedmedError(f"{path}: {split} has {len(x)} images but {len(y)} labels")
            if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
                raise FedmedError(f"{path}: {split} images have shape {x.shape}; expected (N,H,W) or (N,H,W,C)")
            bad = (y < 0) | (y >= self.num_classes)
            if bad.any():
                raise FedmedError(f"{path}: {split} has labels outside 0..{self.num_classes - 1} "
                                  f"(e.g. {int(y[bad][0])}); data.source.class_names has {self.num_classes} names")
        out = {split: (x, y, np.array([f"{split}/{i}" for i in range(len(y))])) for split, (x, y) in raw.items()}
        if "val" not in out:  # carve a stratified validation share from train
            x, y, ids = out["train"]
            assign = group_stratified_split(y, None, {"val": self.val_fraction}, self.split_seed)
            for split in ("train", "val"):
                rows = np.flatnonzero(assign == split)
                out[split] = (x[rows], y[rows], ids[rows])
        return out

    @cached_property
    def _index(self) -> dict[str, tuple[str, int]]:
        return {str(i): (split, r) for split in SPLITS for r, i in enumerate(self._arrays[split][2])}

    def images(self, split: str) -> np.ndarray:
        """(N,H,W[,C]) uint8 images of ``split``, as the file holds them."""
        check_split(split)
        return self._arrays[split][0]

    def labels(self, split: str) -> np.ndarray:
        check_split(split)
        return self._arrays[split][1]

    def ids(self, split: str) -> list[str]:
        check_split(split)
        return [str(i) for i in self._arrays[split][2]]

    def locate(self, sample_id: str) -> tuple[str, int] | None:
        return self._index.get(str(sample_id))

    def column(self, split: str, name: str) -> np.ndarray:
        raise FedmedError(f"{self.name} (npz arrays) has no metadata column {name!r}; use partition=iid or dirichlet")

    def items(self, split: str, rows: Rows = None) -> list[dict[str, Any]]:
        """MONAI data dicts ``{"image": channel-first float32 array (0..255), "label", "id"}``."""
        check_split(split)
        x, y, ids = self._arrays[split]
        index = np.arange(len(y)) if rows is None else np.asarray(rows, dtype=np.int64)
        images = x[index]
        images = images.transpose(0, 3, 1, 2) if images.ndim == 4 else images[:, None]
        return [{"image": images[k].astype(np.float32), "label": int(y[r]), "id": str(ids[r])}
                for k, r in enumerate(index)]

    def loader(self) -> None:
        """Items already hold arrays: nothing to read."""
        return None
