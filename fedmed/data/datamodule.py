"""Datasets for one site (or the pool, or a test split), built only from what a manifest names.

One data path for every source: the source turns sample rows into MONAI data dicts, the
deterministic preprocessing (:func:`~fedmed.data.transforms.deterministic_transforms`) runs once
per sample through MONAI's ``CacheDataset`` (threaded) or ``PersistentDataset`` (on disk, reused
across runs), and the results are stacked into tensors. Training sets then apply the random
augmentation per sample and epoch; validation and test sets are plain tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from fedmed.data.file_source import LoadFiled
from fedmed.data.manifest import Manifest
from fedmed.data.medmnist_source import md5sum
from fedmed.data.preprocessing import Preprocessing
from fedmed.data.source import DataSource, Rows
from fedmed.data.style import StyleMix
from fedmed.data.transforms import augmentation_transforms, deterministic_transforms, mask_transforms
from fedmed.errors import FedmedError, ManifestError

log = logging.getLogger("fedmed")
CACHES = ("memory", "disk")


class ArrayDataset(Dataset):
    """(image, label) pairs held as tensors: x (N,C,H,W[,D]) float32, y (N,) int64.

    Args:
        x: the images.
        y: the labels.
        ids: the sample ids (default ``"0"``, ``"1"``, ...).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, ids: list[str] | None = None):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x, self.y, self.ids = x, y, ids or [str(i) for i in range(len(x))]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class AugmentedDataset(ArrayDataset):
    """Cached tensors plus random augmentation on every access.

    Per-image MONAI steps (flips, intensity jitter, cutout) run in ``__getitem__``; rotation and
    zoom run on the whole batch in :meth:`collate` (:class:`fedmed.data.transforms.BatchRandAffine`),
    which :func:`make_loader` uses, after ``style`` (other sites' looks, :class:`fedmed.data.style.StyleMix`,
    set by the site when the federation shares them). :meth:`reseed` makes all of them a function of a seed
    (the site client reseeds each round), so runs with the same seed see the same augmented images.

    Args:
        base: the cached tensors.
        augment: per-image MONAI transform (a ``Compose``), or None.
        batch_augment: batched rotation/zoom, or None.
    """

    def __init__(self, base: ArrayDataset, augment, batch_augment=None):
        super().__init__(base.x, base.y, base.ids)
        self.augment, self.batch_augment = augment, batch_augment
        self.style: StyleMix | None = None  # other sites' looks, where the federation shares them

    def reseed(self, seed: int) -> None:
        for t in (self.augment, self.batch_augment, self.style):
            if t is not None:
                t.set_random_state(seed=int(seed) % (2**32))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is None:
            return self.x[i], self.y[i]
        from monai.data.meta_obj import get_track_meta, set_track_meta

        before = get_track_meta()
        set_track_meta(False)  # plain tensors: MONAI's metadata tracking triples the cost here
        try:
            return self.augment({"image": self.x[i]})["image"], self.y[i]
        finally:
            set_track_meta(before)

    def collate(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = default_collate(samples)
        if self.style is not None:
            x = self.style(x)
        return (self.batch_augment(x) if self.batch_augment is not None else x), y


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader whose order (and augmentation, if any) depends only on ``seed``."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    if hasattr(ds, "reseed"):
        ds.reseed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0,
                      collate_fn=getattr(ds, "collate", None))


@dataclass
class Pipeline:
    """A source plus its preprocessing: makes the datasets a site, the pool, or a test split needs.

    Args:
        source: a MedMNIST, image-folder or table source.
        pre: the dataset's preprocessing config.
        spatial_dims: of the model input (2, or 3 for volumes).
        cache: ``memory`` (MONAI CacheDataset, recomputed each run) or ``disk`` (MONAI
            PersistentDataset under ``cache_dir``, reused by later runs).
        cache_dir: folder of the disk cache.
        workers: threads (memory) or processes (disk) that compute the cache.
    """

    source: DataSource
    pre: Preprocessing
    spatial_dims: int = 2
    cache: str = "memory"
    cache_dir: str | None = None
    workers: int = 2

    def __post_init__(self):
        if self.cache not in CACHES:
            raise FedmedError(f"data.cache={self.cache!r} is not one of {CACHES}")
        kinds = getattr(self.source, "file_kinds", set())
        if "volume" in kinds and self.spatial_dims == 2 and self.pre.slice_axis is None:
            raise FedmedError(f"{self.source.name} holds 3D volumes but the model is 2D: set "
                              "data.transforms.slice_axis (e.g. 2 for axial) or data.spatial_dims=3")

    @classmethod
    def from_config(cls, data_cfg, source=None) -> Pipeline:
        """Build from a ``data`` config node (``source`` overrides ``data.source``, e.g. a site's copy)."""
        from hydra.utils import instantiate

        return cls(source if source is not None else instantiate(data_cfg.source),
                   Preprocessing.from_config(data_cfg.get("transforms")), int(data_cfg.get("spatial_dims", 2)),
                   str(data_cfg.get("cache", "memory")), data_cfg.get("cache_dir"),
                   int(data_cfg.get("cache_workers", 2)))

    # -- datasets -------------------------------------------------------------------------
    def dataset(self, split: str, rows: Rows = None, train: bool = False) -> ArrayDataset:
        """Rows of one split, preprocessed (and, for ``train``, with augmentation if configured)."""
        base = self._materialize(self.source.items(split, rows))
        augment, batch = augmentation_transforms(self.pre.augment, self.spatial_dims) if train else (None, None)
        return AugmentedDataset(base, augment, batch) if augment is not None or batch is not None else base

    def site(self, manifest: Manifest, masks: bool = False) -> SiteData:
        """The train/val data of a site, checked against the source (see :meth:`check_manifest`); with
        ``masks``, also the evidence masks of its validation images where the source has them."""
        rows = self.check_manifest(manifest)
        val_masks = self.masks("val", rows["validation"]) if masks and self.has_masks else None
        return SiteData(self.dataset("train", rows["training"], train=True), self.dataset("val", rows["validation"]),
                        val_masks=val_masks)

    @property
    def has_masks(self) -> bool:
        """Whether the source carries evidence masks (``data.source.mask_root``)."""
        return getattr(self.source, "mask_root", None) is not None

    def pooled(self) -> SiteData:
        """The whole train and val splits (centralized baseline)."""
        return SiteData(self.dataset("train", train=True), self.dataset("val"))

    def check_manifest(self, manifest: Manifest) -> dict[str, np.ndarray]:
        """Rows of the manifest's samples; raises if it does not fit the site's data.

        Raises:
            ManifestError: the manifest is for another dataset or another copy of the data (md5),
                names a sample the site lacks, states a different label, or uses a test sample.
        """
        src = self.source
        src.ensure_available()
        if manifest.dataset != src.name:
            raise ManifestError(f"manifest of site {manifest.site} is for {manifest.dataset!r}, data is {src.name!r}")
        want, have = manifest.source.get("md5"), src.identity["md5"]
        if want and want != have and not (hasattr(src, "path") and want == md5sum(src.path)):
            raise ManifestError(f"manifest of site {manifest.site} was written for data with md5 {want}, but "
                                f"{src.identity['file']} has md5 {have}: the site holds different data")
        out = {}
        for section, split in (("training", "train"), ("validation", "val")):
            rows = []
            for item in manifest.section(section):
                where = src.locate(item["image"])
                if where is None:
                    raise ManifestError(f"manifest of site {manifest.site} names {item['image']!r}, "
                                        f"which {src.identity['file']} does not have")
                if where[0] == "test":
                    raise ManifestError(f"manifest of site {manifest.site} puts test sample {item['image']} "
                                        f"in {section}")
                if where[0] != split:
                    raise ManifestError(f"manifest of site {manifest.site} puts {where[0]} sample {item['image']} "
                                        f"in {section}")
                actual = int(src.labels(split)[where[1]])
                if actual != item["label"]:
                    raise ManifestError(f"manifest of site {manifest.site}: {item['image']} has label "
                                        f"{item['label']}, {src.identity['file']} says {actual}")
                rows.append(where[1])
            out[section] = np.asarray(rows, dtype=np.int64)
        return out

    def masks(self, split: str, rows: Rows = None) -> torch.Tensor:
        """The evidence masks (e.g. expert lesion outlines) of rows of ``split``: (N, 1, *spatial) bool, through
        the images' spatial preprocessing and no other step. Only explanations are scored against them;
        nothing that trains or selects a model reads them.

        Raises:
            FedmedError: the source has no masks, or one is missing (the error names its file).
        """
        from monai.transforms import Compose

        items = getattr(self.source, "mask_items", lambda *_: None)(split, rows)
        if items is None:
            raise FedmedError(f"{self.source.name} has no evidence masks (data.source.mask_root)")
        chain = Compose([*(t for t in (self.source.loader(),) if t is not None),
                         *mask_transforms(self.pre, self.spatial_dims).transforms])
        try:
            masks = self._run_cache(items, chain)
        except Exception as exc:  # noqa: BLE001 - the file's own error, not MONAI's wrapper
            raise _root_fedmed_error(exc) or exc from None
        return torch.stack(masks) > 127.5 if masks else torch.zeros(0, dtype=torch.bool)

    # -- caching --------------------------------------------------------------------------
    def deterministic(self):
        """The cached part of the chain: the source's loader (files only), then the deterministic transforms."""
        from monai.transforms import Compose

        steps = [t for t in (self.source.loader(),) if t is not None]
        return Compose([*steps, *deterministic_transforms(self.pre, self.spatial_dims).transforms])

    def _materialize(self, items: list[dict]) -> ArrayDataset:
        try:
            images = self._run_cache(items, self.deterministic())
        except Exception as exc:  # surface the file-naming error, not MONAI's wrapper around it
            raise _root_fedmed_error(exc) or exc from None
        shapes = {tuple(x.shape) for x in images}
        if len(shapes) > 1:
            raise FedmedError(f"{self.source.name}: images have different shapes after preprocessing "
                              f"({sorted(shapes)[:4]}...); set data.transforms.size to resize them")
        x = torch.stack(images) if images else torch.empty(0)
        y = torch.tensor([it["label"] for it in items], dtype=torch.int64)
        return ArrayDataset(x, y, [it["id"] for it in items])

    def _run_cache(self, items: list[dict], transform) -> list[torch.Tensor]:
        import sys

        from monai.data import CacheDataset, PersistentDataset
        from monai.data.utils import pickle_hashing

        from_files = isinstance(transform.transforms[0], LoadFiled)
        progress = len(items) >= 1000 and from_files and sys.stderr.isatty()
        if self.cache == "memory" or not from_files:  # arrays in memory: nothing to save on disk
            cached = CacheDataset(items, transform, cache_rate=1.0, num_workers=self.workers, progress=progress,
                                  copy_cache=False)
            return [cached[i]["image"] for i in range(len(cached))]
        cache_dir = Path(self.cache_dir or ".cache") / self.source.name
        cache_dir.mkdir(parents=True, exist_ok=True)
        persistent = PersistentDataset(items, transform, cache_dir=cache_dir, hash_transform=pickle_hashing)
        loader = DataLoader(persistent, batch_size=None, num_workers=self.workers, collate_fn=lambda d: d)
        return [d["image"] for d in _progress(loader, len(items), progress, f"caching {self.source.name}")]


def _progress(it, total: int, show: bool, desc: str):
    if not show:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False)


def _root_fedmed_error(exc: BaseException) -> FedmedError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FedmedError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@dataclass
class SiteData:
    """The training and validation data of one site, and its own test images where the partition says
    which they are (a natural partition: the test rows of its source).

    Args:
        train: the training set (augmented, if configured).
        val: the validation set.
        test: the site's own test images: scored once, at the end, by the final model; never used for
            training or selection.
        val_masks: evidence masks of the validation images (N, 1, *spatial), where the data has them:
            only the site's explanations are scored against them.
    """

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset | None = None
    val_masks: torch.Tensor | None = None
