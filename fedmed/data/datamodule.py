"""In-memory datasets for one site, built only from what the site's manifest names."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedmed.data.manifest import Manifest
from fedmed.data.medmnist_source import MedMNISTSource, md5sum
from fedmed.errors import ManifestError


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W) or (N,H,W,C) or (N,D,H,W) -> float32 channel-first in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    if x.ndim == 4 and x.shape[-1] in (1, 3):  # (N,H,W,C) -> (N,C,H,W)
        return x.permute(0, 3, 1, 2).contiguous()
    return x.unsqueeze(1)  # (N,H,W) -> (N,1,H,W); (N,D,H,W) -> (N,1,D,H,W)


class ArrayDataset(Dataset):
    """(image, label) pairs held as tensors: x (N,C,H,W[,D]) float32, y (N,) int64."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, ids: list[str] | None = None):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x, self.y, self.ids = x, y, ids or [str(i) for i in range(len(x))]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader whose shuffling order depends only on ``seed``."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)


@dataclass
class SiteData:
    """The training and validation data of one site."""

    train: ArrayDataset
    val: ArrayDataset

    @classmethod
    def from_manifest(cls, manifest: Manifest, source: MedMNISTSource) -> SiteData:
        """Load exactly the samples the manifest names, checking they exist with the stated labels.

        Raises:
            ManifestError: the manifest was made from another file (md5), names a sample the
                local file lacks, or states a label that differs from the file's.
        """
        path = source.ensure_file()
        if manifest.dataset != source.name:
            raise ManifestError(f"manifest of site {manifest.site} is for {manifest.dataset!r}, data is {source.name!r}")
        want = manifest.source.get("md5")
        if want and want != source.expected_md5 and want != md5sum(path):
            raise ManifestError(
                f"manifest of site {manifest.site} was written for a file with md5 {want}, "
                f"but {path} has md5 {md5sum(path)}: the site holds different data"
            )
        return cls(
            train=_select(manifest, "training", source),
            val=_select(manifest, "validation", source),
        )

    @classmethod
    def pooled(cls, source: MedMNISTSource) -> SiteData:
        """The whole official train and val splits (centralized baseline)."""
        return cls(train=split_dataset(source, "train"), val=split_dataset(source, "val"))


def split_dataset(source: MedMNISTSource, split: str) -> ArrayDataset:
    """One whole official split as a dataset."""
    labels = source.labels(split)
    return ArrayDataset(
        to_tensor(source.images(split)),
        torch.from_numpy(labels),
        [source.sample_id(split, i) for i in range(len(labels))],
    )


def _select(manifest: Manifest, section: str, source: MedMNISTSource) -> ArrayDataset:
    items = manifest.section(section)
    rows: list[int] = []
    for item in items:
        split, _, index = str(item["image"]).partition("/")
        n = len(source.labels(split)) if split in ("train", "val", "test") else 0
        if not index.isdigit() or int(index) >= n:
            raise ManifestError(
                f"manifest of site {manifest.site} names {item['image']!r}, which {source.path.name} does not have"
            )
        if split == "test":
            raise ManifestError(f"manifest of site {manifest.site} puts test sample {item['image']} in {section}")
        rows.append(int(index))
        actual = int(source.labels(split)[int(index)])
        if actual != item["label"]:
            raise ManifestError(
                f"manifest of site {manifest.site}: {item['image']} has label {item['label']}, "
                f"{source.path.name} says {actual}"
            )
    split = "train" if section == "training" else "val"
    idx = np.asarray(rows, dtype=np.int64)
    return ArrayDataset(
        to_tensor(source.images(split)[idx]),
        torch.from_numpy(source.labels(split)[idx]),
        [str(item["image"]) for item in items],
    )
