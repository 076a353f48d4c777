"""What a data source is: the interface every source kind implements, and the official split names.

A source turns a dataset (a MedMNIST npz file, an image folder, a table of files) into labelled
samples with stable ids. Partitioning (:mod:`fedmed.data.sites`), manifests, the data check and
the datasets (:class:`fedmed.data.Pipeline`) use a source only through :class:`DataSource`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np

from fedmed.errors import FedmedError

#: the official splits of every source; only ``train`` and ``val`` are ever partitioned among sites
SPLITS = ("train", "val", "test")

#: the sample rows a source is asked for: row indices into one split
Rows: TypeAlias = np.ndarray | Sequence[int] | None


def check_split(split: str) -> None:
    """Raise :class:`FedmedError` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise FedmedError(f"split={split!r} is not one of {SPLITS}")


@runtime_checkable
class DataSource(Protocol):
    """A labelled dataset split into :data:`SPLITS`, whose samples have stable string ids.

    Implemented by :class:`~fedmed.data.MedMNISTSource`, :class:`~fedmed.data.ImageFolderSource`
    and :class:`~fedmed.data.TableSource`. Extras that only some sources have are looked up with
    ``getattr``: ``problems`` (listing problems, file sources), ``file_kinds`` (``image`` /
    ``volume``, file sources) and ``path`` (the npz file, MedMNIST).

    ``isinstance(obj, DataSource)`` checks that the members exist; on Python < 3.12 that reads
    the properties, which for a file source lists its files.
    """

    @property
    def name(self) -> str:
        """Dataset name; manifests live under ``data_manifests/<name>``."""
        ...

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        ...

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        ...

    @property
    def spatial_dims(self) -> int:
        """2 for images (or slices), 3 for volumes."""
        ...

    @property
    def identity(self) -> dict[str, str]:
        """``{"file": where the data is, "md5": checksum of the data}``, as recorded in manifests."""
        ...

    def ensure_available(self) -> Path:
        """Raise a :class:`~fedmed.errors.FedmedError` naming the problem unless the data is usable."""
        ...

    def labels(self, split: str) -> np.ndarray:
        """(N,) int64 labels of ``split``."""
        ...

    def ids(self, split: str) -> list[str]:
        """Sample ids of ``split``, in row order."""
        ...

    def locate(self, sample_id: str) -> tuple[str, int] | None:
        """(split, row) of a sample id, or None if the source lacks it."""
        ...

    def column(self, split: str, name: str) -> np.ndarray:
        """Metadata column ``name`` of ``split`` as strings (e.g. the acquisition site)."""
        ...

    def items(self, split: str, rows: Rows = None) -> list[dict[str, Any]]:
        """MONAI data dicts (``image``, ``label``, ``id``, …) for ``rows`` of ``split`` (all if None)."""
        ...

    def loader(self) -> Callable[[Any], Any] | None:
        """The transform that reads ``item["image"]`` into an array, or None when items hold arrays."""
        ...
