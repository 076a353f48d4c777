"""Datasets listed in a CSV or JSON table of (path, label[, split][, metadata]) rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from fedmed.data.file_source import Built, FileSource
from fedmed.data.source import SPLITS
from fedmed.errors import DataNotFoundError, FedmedError


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
        mask_root: folder under ``root`` of evidence masks (e.g. expert lesion outlines), one per image:
            ``<image stem>.png``, 0 outside and 255 inside. Used only to score explanations.
        keep: only the rows whose metadata column has one of the listed values, e.g.
            ``{source: [rosendahl, vidir_modern]}`` (leave-one-site-out). Applied after the split, so
            every kept row stays in the split it has in the whole table.
    """

    def __init__(self, name: str, root: str, table: str, image_root: str | list[str] | None = None,
                 path_column: str = "path", label_column: str = "label", path_template: str = "{}",
                 class_names: list[str] | None = None, split_column: str | None = None,
                 group_column: str | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0, spatial_dims: int = 2, keep: dict[str, list[str]] | None = None,
                 mask_root: str | None = None):
        self.name = name
        self.root = Path(root).expanduser().resolve()
        self.table_path = self.root / Path(table).expanduser()
        dirs = [image_root] if isinstance(image_root, str) else list(image_root or ["."])
        self.image_dirs = [self.root / d for d in dirs]
        self.path_column, self.label_column, self.path_template = path_column, label_column, path_template
        self._class_names, self.split_column, self.group_column = class_names, split_column, group_column
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.split_seed, self.spatial_dims = split_seed, spatial_dims
        self.keep = {str(k): [str(v) for v in vs] for k, vs in dict(keep or {}).items()}
        self.mask_root = self.root / mask_root if mask_root else None

    def mask_items(self, split: str, rows=None) -> list[dict] | None:
        """Data dicts of the evidence masks of ``rows`` of ``split`` (None: this source has none)."""
        if self.mask_root is None:
            return None
        if not self.mask_root.is_dir():
            raise DataNotFoundError(f"data.source.mask_root: {self.mask_root} is not a folder (dataset {self.name})")
        items = []
        for it in self.items(split, rows):
            path = self.mask_root / f"{Path(it['path']).stem}.png"
            if not path.is_file():
                raise DataNotFoundError(f"data.source.mask_root: no mask {path} for {it['id']}")
            items.append({**it, "image": str(path), "path": str(path), "stamp": str(path.stat().st_size)})
        return items

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

    def _build(self) -> Built:
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
        return self._kept(table.drop_duplicates("id").reset_index(drop=True)), names, problems

    def _kept(self, table: pd.DataFrame) -> pd.DataFrame:
        """The rows ``keep`` selects (all of them without it)."""
        for column, values in self.keep.items():
            if column not in table.columns:
                raise FedmedError(f"data.source.keep: {self.table_path} has no column {column!r}; "
                                  f"columns: {[c for c in table.columns if c not in ('path', 'size', 'stamp')]}")
            missing = sorted(set(values) - set(table[column].astype(str)))
            if missing:
                values_seen = sorted(table[column].astype(str).unique())
                raise FedmedError(f"data.source.keep: no row of {self.table_path} has {column} = "
                                  f"{', '.join(map(repr, missing))}; values: {values_seen}")
            table = table[table[column].astype(str).isin(values)]
        return table.reset_index(drop=True)
