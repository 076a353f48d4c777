"""Datasets stored as files: image folders, CSV/JSON lists of (path, label), NIfTI volumes.

Every file-backed source exposes the same interface as :class:`~fedmed.data.MedMNISTSource`
(``labels(split)``, ``ids(split)``, ``items(split, rows)``, ``locate(id)``, ``identity`` …), so
partitioning, manifests, caching and training do not care where images come from.

Images are read by MONAI's ``LoadImage`` (PIL for PNG/JPEG/BMP/TIFF, nibabel for ``.nii`` /
``.nii.gz``). A sample's id is its path relative to the source root, which is what manifests store.
Sources without an official split get a deterministic one (:func:`group_stratified_split`), by
group (e.g. lesion) where a group column is given, so that no lesion is in two splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from monai.transforms import MapTransform

from fedmed.data.splits import group_stratified_split
from fedmed.errors import DataNotFoundError, FedmedError

log = logging.getLogger("fedmed")

SPLITS = ("train", "val", "test")
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


class LoadFiled(MapTransform):
    """Read ``item["image"]`` (a path) into a channel-first float tensor with MONAI's ``LoadImage``.

    Errors name the file: a corrupt, truncated or empty image or a volume of the wrong rank raises
    :class:`DataError` instead of a trace from inside a reader.
    """

    def __init__(self, keys=("image",)):
        super().__init__(keys)
        from monai.data import NibabelReader, PILReader
        from monai.transforms import LoadImage

        self._load = {
            "image": LoadImage(reader=PILReader(reverse_indexing=False), image_only=True, ensure_channel_first=True),
            "volume": LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True),
        }

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_file(d[key], self._load)
        return d


def load_file(path: str, loaders: dict) -> Any:
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
        raise DataError(f"{path}: is a 4D image of shape {tuple(x.shape[1:])} + {x.shape[0]} frames, expected a 3D volume")
    if kind == "image" and x.shape[0] not in (1, 3, 4):
        raise DataError(f"{path}: has {x.shape[0]} channels, expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    return x


def _reason(path: str, kind: str, exc: Exception) -> str:
    """The decoder's own complaint (MONAI reports any reader failure as 'no suitable reader')."""
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(path) as im:
                im.load()
        else:
            import nibabel

            nibabel.load(path).get_fdata()
    except Exception as direct:  # noqa: BLE001
        exc = direct
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first[:160]}"


class FileSource:
    """Shared machinery of file-backed sources; subclasses build :attr:`table`.

    ``table`` has one row per sample: ``id`` (path relative to ``root``), ``path`` (absolute),
    ``label`` (int), ``split`` and any metadata columns. Problems found while listing (missing
    files, unknown labels) are collected in :attr:`problems`; :meth:`ensure_available` raises
    them all at once, and ``fedmed data check`` prints them.
    """

    name: str
    root: Path
    spatial_dims: int = 2

    # -- to implement ------------------------------------------------------------------
    def _build(self) -> tuple[pd.DataFrame, list[str], list[str]]:
        """Return (table, class_names, problems)."""
        raise NotImplementedError

    @cached_property
    def _built(self) -> tuple[pd.DataFrame, list[str], list[str]]:
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

    ensure_file = ensure_available

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

    def items(self, split: str, rows: np.ndarray | list[int] | None = None) -> list[dict[str, Any]]:
        """MONAI data dicts ``{"image": path, "label", "id", "path", "stamp"}`` for ``rows`` of ``split``.

        ``stamp`` (size and modification time) makes a changed file miss the disk cache.
        """
        t = self._split(split)
        if rows is not None:
            t = t.iloc[np.asarray(rows, dtype=np.int64)]
        return [{"image": p, "path": p, "label": int(y), "id": i, "stamp": s}
                for p, y, i, s in zip(t.path, t.label, t.id, t["stamp"])]

    def loader(self) -> MapTransform:
        return LoadFiled(["image"])

    @property
    def file_kinds(self) -> set[str]:
        return {file_kind(p) for p in self.table.path}

    def _split(self, split: str) -> pd.DataFrame:
        if split not in SPLITS:
            raise FedmedError(f"split={split!r} is not one of {SPLITS}")
        return self._by_split[split]

    def _finish(self, rows: list[dict], class_names: list[str], problems: list[str],
                group_column: str | None, fractions: dict[str, float], split_seed: int):
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

    def _build(self):
        problems: list[str] = []
        if not self.root.exists():
            return pd.DataFrame(columns=["id", "path", "label", "split", "size"]), list(self._class_names or []), []
        train_dir = self.root / self.splits["train"]
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
                    if f.is_file() and file_kind(f):
                        rows.append({"id": f.relative_to(self.root).as_posix(), "path": str(f),
                                     "label": names.index(class_dir.name),
                                     # without a val folder, train is re-split into train/val below
                                     "split": None if split == "train" and not self.splits.get("val") else split})
        return self._finish(rows, names, problems, None, {"val": self.val_fraction}, self.split_seed)


class TableSource(FileSource):
    """Images (or NIfTI volumes) listed in a CSV or JSON table of (path, label[, metadata]).

    HAM10000's ``HAM10000_metadata.csv`` (``image_id``, ``dx``, ``lesion_id``, …) works with
    ``path_column: image_id``, ``path_template: "{}.jpg"``, ``label_column: dx``,
    ``group_column: lesion_id``. A JSON file may be a list of records or a MONAI datalist
    (``{"training": [{"image": ..., "label": ...}], "validation": [...], "test": [...]}``).

    Args:
        name: dataset name.
        root: the dataset folder (a site points this at its own copy).
        table: the CSV or JSON file, relative to ``root`` (or absolute).
        image_root: folder(s) under ``root`` the paths are relative to, searched in order
            (default: ``root``).
        path_column, label_column: column names.
        path_template: format applied to the path column (e.g. ``"images/{}.jpg"``).
        class_names: class order; labels may be these names or their indices. Default: sorted labels.
        split_column: column with train/val/test per row; if absent, a split is made by group.
        group_column: rows sharing a value (a patient, a lesion) never straddle two splits.
        val_fraction, test_fraction, split_seed: the generated split.
        spatial_dims: 2 for images or slices, 3 for volumes.
    """

    def __init__(self, name: str, root: str, table: str, image_root: str | list[str] | None = None,
                 path_column: str = "path", label_column: str = "label", path_template: str = "{}",
                 class_names: list[str] | None = None, split_column: str | None = None,
                 group_column: str | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0, spatial_dims: int = 2):
        self.name = name
        self.root = Path(root).expanduser().resolve()
        self.table_path = self.root / Path(table).expanduser()
        dirs = [image_root] if isinstance(image_root, str) else list(image_root or ["."])
        self.image_dirs = [self.root / d for d in dirs]
        self.path_column, self.label_column, self.path_template = path_column, label_column, path_template
        self._class_names, self.split_column, self.group_column = class_names, split_column, group_column
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.split_seed, self.spatial_dims = split_seed, spatial_dims

    def _read(self) -> pd.DataFrame:
        f = self.table_path
        if not self.root.exists():
            raise DataNotFoundError(f"data.source.root: {self.root} does not exist (dataset {self.name})")
        if not f.exists():
            raise DataNotFoundError(f"data.source.table: {f} does not exist (dataset {self.name})")
        try:
            if f.suffix.lower() == ".json":
                raw = json.loads(f.read_text())
                if isinstance(raw, dict):  # MONAI datalist
                    keys = {"training": "train", "validation": "val", "test": "test", "testing": "test"}
                    recs = [{**r, "split": keys[k]} for k, v in raw.items() if k in keys for r in v]
                    self.split_column = self.split_column or "split"
                    return pd.DataFrame(recs)
                return pd.DataFrame(raw)
            return pd.read_csv(f, dtype=str, keep_default_na=False)
        except (OSError, ValueError) as exc:
            raise FedmedError(f"cannot read {f}: {exc}") from None

    def _build(self):
        df = self._read()
        where = self.table_path.name
        for col in (self.path_column, self.label_column, self.split_column, self.group_column):
            if col and col not in df.columns:
                raise FedmedError(f"{self.table_path} has no column {col!r}; columns: {list(df.columns)}")
        raw_labels = df[self.label_column].astype(str).str.strip()
        names = list(self._class_names or sorted(raw_labels.unique()))
        index = {n: i for i, n in enumerate(names)} | {str(i): i for i in range(len(names))}
        problems, rows = [], []
        line0 = 2 if self.table_path.suffix.lower() != ".json" else 0  # CSV line of the first row
        for k, rec in enumerate(df.to_dict("records")):
            label = raw_labels.iloc[k]
            rel = self.path_template.format(str(rec[self.path_column]).strip())
            if label not in index:
                problems.append(f"{where} row {k + line0}: label {label!r} of {rel} is not one of {names}")
                continue
            split = None
            if self.split_column:
                split = {"training": "train", "validation": "val", "testing": "test"}.get(rec[self.split_column],
                                                                                             rec[self.split_column])
                if split not in SPLITS:
                    problems.append(f"{where} row {k + line0}: split {rec[self.split_column]!r} is not one of {SPLITS}")
                    continue
            path = next((d / rel for d in self.image_dirs if (d / rel).exists()), self.image_dirs[0] / rel)
            rel = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else rel
            meta = {c: str(v) for c, v in rec.items() if c not in (self.path_column, self.label_column, "split")}
            rows.append({**meta, "id": rel, "path": str(path), "label": index[label], "split": split})
        table, names, problems = self._finish(rows, names, problems, self.group_column, self.fractions,
                                              self.split_seed)
        dup = table.id[table.id.duplicated()]
        problems += [f"{where}: {i} is listed more than once" for i in dup.unique()[:20]]
        return table.drop_duplicates("id").reset_index(drop=True), names, problems
