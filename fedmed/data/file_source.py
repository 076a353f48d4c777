"""Datasets stored as files: the shared machinery of file-backed sources, and image folders.

A file source lists its samples in a table (:attr:`FileSource.table`) and implements
:class:`~fedmed.data.source.DataSource` on it, so partitioning, manifests, caching and training do
not care where images come from. A sample's id is its path relative to the source root, which is
what manifests store. Sources without an official split get a deterministic one
(:func:`~fedmed.data.splits.group_stratified_split`), by group (e.g. lesion) where a group column is
given, so that no lesion is in two splits. Files are read by :class:`LoadFiled` (decoding and its
errors: :mod:`fedmed.data.files`); tables of files are :class:`~fedmed.data.table_source.TableSource`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, TypeAlias, cast

import numpy as np
import pandas as pd
from monai.transforms import MapTransform

from fedmed.data.files import IMAGE_SUFFIXES, VOLUME_SUFFIXES, by_mode, file_kind, load_file
from fedmed.data.source import SPLITS, Rows, check_split
from fedmed.data.splits import group_stratified_split
from fedmed.errors import DataNotFoundError, FedmedError

#: what :meth:`FileSource._build` returns: (table, class names, problems)
Built: TypeAlias = tuple[pd.DataFrame, list[str], list[str]]


class LoadFiled(MapTransform):
    """Read ``item["image"]`` (a path) into a channel-first float tensor with MONAI's ``LoadImage``.

    Errors name the file: a corrupt, truncated or empty image or a volume of the wrong rank raises
    :class:`~fedmed.data.files.DataError` instead of a trace from inside a reader.

    Args:
        keys: the item keys that hold paths to read.
    """

    def __init__(self, keys: Sequence[Hashable] = ("image",)):
        super().__init__(keys)
        from monai.data import NibabelReader, PILReader
        from monai.transforms import LoadImage

        self._load = {
            "image": LoadImage(reader=PILReader(converter=by_mode, reverse_indexing=False), image_only=True,
                               ensure_channel_first=True),
            "volume": LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True),
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_file(d[key], self._load)
        return d


class FileSource:
    """Shared machinery of file-backed sources; subclasses build :attr:`table`.

    ``table`` has one row per sample: ``id`` (path relative to ``root``), ``path`` (absolute),
    ``label`` (int), ``split`` and any metadata columns. Problems found while listing (missing
    files, unknown labels) are collected in :attr:`problems`; :meth:`ensure_available` raises
    them all at once, and ``fedmed data check`` prints them.

    Subclasses set the attributes below in their ``__init__`` and implement :meth:`_build`.

    Attributes:
        name: dataset name (manifests live under ``data_manifests/<name>``).
        root: the dataset folder.
        spatial_dims: 2 for images or slices, 3 for volumes.
    """

    name: str
    root: Path
    spatial_dims: int = 2

    # -- to implement ------------------------------------------------------------------
    def _build(self) -> Built:
        """Return (table, class_names, problems)."""
        raise NotImplementedError

    @cached_property
    def _built(self) -> Built:
        return self._build()

    @property
    def table(self) -> pd.DataFrame:
        return self._built[0]

    @property
    def class_names(self) -> list[str]:
        return self._built[1]

    @property
    def problems(self) -> list[str]:
        return self._built[2]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- the source interface -------------------------------------------------------------
    def ensure_available(self) -> Path:
        """Return the root; raise :class:`DataNotFoundError` listing the problems if there are any."""
        if not self.root.exists():
            raise DataNotFoundError(f"data.source.root: {self.root} does not exist (dataset {self.name})")
        if self.problems:
            head = "\n  ".join(self.problems[:10])
            more = f"\n  ... and {len(self.problems) - 10} more" if len(self.problems) > 10 else ""
            raise DataNotFoundError(f"{self.name}: {len(self.problems)} problem(s) in {self.root}:\n  {head}{more}\n"
                                    f"(`fedmed data check data={self.name}` lists every file)")
        if not len(self.table):
            raise DataNotFoundError(f"{self.name}: no images found under {self.root}")
        return self.root

    @cached_property
    def identity(self) -> dict[str, str]:
        """Where the data is and an md5 of its listing (ids, labels, splits, file sizes)."""
        h = hashlib.md5()
        for row in self.table[["id", "label", "split", "size"]].itertuples(index=False):
            h.update(f"{row.id}\t{row.label}\t{row.split}\t{row.size}\n".encode())
        return {"file": str(self.root), "md5": h.hexdigest()}

    @property
    def expected_md5(self) -> str:
        return self.identity["md5"]

    @property
    def filename(self) -> str:
        return self.root.name

    @cached_property
    def _by_split(self) -> dict[str, pd.DataFrame]:
        return {s: self.table[self.table.split == s].reset_index(drop=True) for s in SPLITS}

    @cached_property
    def _where(self) -> dict[str, tuple[str, int]]:
        return {i: (s, r) for s, t in self._by_split.items() for r, i in enumerate(t.id)}

    def labels(self, split: str) -> np.ndarray:
        return self._split(split).label.to_numpy(np.int64)

    def ids(self, split: str) -> list[str]:
        return self._split(split).id.tolist()

    def column(self, split: str, name: str) -> np.ndarray:
        t = self._split(split)
        if name not in t.columns:
            raise FedmedError(f"{self.name} has no metadata column {name!r}; columns: {sorted(t.columns)}")
        return t[name].astype(str).to_numpy()

    def locate(self, sample_id: str) -> tuple[str, int] | None:
        """(split, row) of a sample id, or None if the source lacks it."""
        return self._where.get(str(sample_id))

    def items(self, split: str, rows: Rows = None) -> list[dict[str, Any]]:
        """MONAI data dicts ``{"image": path, "label", "id", "path", "stamp"}`` for ``rows`` of ``split``.

        ``stamp`` (size and modification time) makes a changed file miss the disk cache.
        """
        t = self._split(split)
        if rows is not None:
            t = t.iloc[np.asarray(rows, dtype=np.int64)]
        return [{"image": p, "path": p, "label": int(y), "id": i, "stamp": s}
                for p, y, i, s in zip(t.path, t.label, t.id, t["stamp"], strict=True)]

    def loader(self) -> LoadFiled:
        return LoadFiled(["image"])

    @property
    def file_kinds(self) -> set[str | None]:
        return {file_kind(p) for p in self.table.path}

    def _split(self, split: str) -> pd.DataFrame:
        check_split(split)
        return self._by_split[split]

    def _finish(self, rows: list[dict[str, Any]], class_names: list[str], problems: list[str],
                group_column: str | None, fractions: dict[str, float], split_seed: int) -> Built:
        """Common tail of ``_build``: sizes, missing files, and a split where the source has none."""
        table = pd.DataFrame(rows, columns=sorted({k for r in rows for k in r}) or ["id", "path", "label", "split"])
        sizes, stamps = [], []
        for p in table.path:
            try:
                st = Path(p).stat()
                sizes.append(st.st_size)
                stamps.append(f"{st.st_size}-{st.st_mtime_ns}")  # part of the disk-cache key
            except OSError:
                problems.append(f"{p}: file does not exist")
                sizes.append(-1)
                stamps.append("")
        table["size"], table["stamp"] = sizes, stamps
        table = table[table["size"] >= 0].reset_index(drop=True)
        todo = table.split.isna() if "split" in table else pd.Series(True, index=table.index)
        if todo.any():
            part = table[todo]
            groups = part[group_column].to_numpy() if group_column else None
            table.loc[todo, "split"] = group_stratified_split(part.label.to_numpy(), groups, fractions, split_seed)
        return table, class_names, problems


class ImageFolderSource(FileSource):
    """Images in ``<root>/<split folder>/<class>/*.{png,jpg,...}`` (also ``.nii``/``.nii.gz``).

    Args:
        name: dataset name (manifests live under ``data_manifests/<name>``).
        root: the dataset folder.
        splits: folder name of each split, e.g. ``{"train": "Training", "test": "Testing"}``. A split
            without a folder (usually ``val``) is carved out of ``train``, stratified by class.
        class_names: class order; default the sorted sub-folders of the train folder.
        val_fraction: share of the train folder used for validation when there is no val folder.
        split_seed: seed of that carve-out (fixed per dataset, so the splits never move).
        spatial_dims: 2 for images or slices, 3 for volumes.
    """

    def __init__(self, name: str, root: str, splits: dict[str, str | None] | None = None,
                 class_names: list[str] | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                 spatial_dims: int = 2):
        self.name, self.root = name, Path(root).expanduser().resolve()
        self.splits = dict(splits or {"train": "train", "val": "val", "test": "test"})
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise FedmedError(f"data.source.splits has keys {sorted(unknown)}; allowed: {SPLITS}")
        if not self.splits.get("train") or not self.splits.get("test"):
            raise FedmedError("data.source.splits needs a folder for train and for test")
        self._class_names, self.val_fraction, self.split_seed = class_names, val_fraction, split_seed
        self.spatial_dims = spatial_dims

    def _build(self) -> Built:
        problems: list[str] = []
        if not self.root.exists():
            return pd.DataFrame(columns=["id", "path", "label", "split", "size"]), list(self._class_names or []), []
        train_dir = self.root / cast(str, self.splits["train"])  # __init__ made sure there is one
        if not train_dir.is_dir():
            raise DataNotFoundError(f"{train_dir} does not exist (data.source.splits.train of {self.name})")
        names = list(self._class_names or sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
        rows = []
        for split, folder in self.splits.items():
            if not folder:
                continue
            split_dir = self.root / folder
            if not split_dir.is_dir():
                raise DataNotFoundError(f"{split_dir} does not exist (data.source.splits.{split} of {self.name})")
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                if class_dir.name not in names:
                    problems.append(f"{class_dir}: class folder {class_dir.name!r} is not one of {names}")
                    continue
                for f in sorted(class_dir.rglob("*")):
                    if f.is_file() and not file_kind(f) and not f.name.startswith("."):
                        problems.append(f"{f}: not read: fedmed reads {', '.join(IMAGE_SUFFIXES + VOLUME_SUFFIXES)}"
                                        " (convert the file, or move it out of the class folder)")
                    if f.is_file() and file_kind(f):
                        rows.append({"id": f.relative_to(self.root).as_posix(), "path": str(f),
                                     "label": names.index(class_dir.name),
                                     # without a val folder, train is re-split into train/val below
                                     "split": None if split == "train" and not self.splits.get("val") else split})
        return self._finish(rows, names, problems, None, {"val": self.val_fraction}, self.split_seed)
