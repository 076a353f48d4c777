"""Site manifests: which samples a site holds, as MONAI-datalist-style JSON (no images).

Layout of ``data_manifests/<dataset>/<partition>/<site>.json``::

    {"dataset": "pneumoniamnist", "site": "hospital_a",
     "source": {"file": "pneumoniamnist.npz", "md5": "..."},
     "partition": {"method": "dirichlet", "alpha": 0.5, "seed": 42, "sites": [...]},
     "num_classes": 2, "class_names": [...],
     "training":   [{"image": "train/17", "label": 1}, ...],
     "validation": [{"image": "val/3", "label": 0}, ...]}

``image`` is the sample id in the source (``<official split>/<index>``).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmed.errors import ManifestError

SECTIONS = ("training", "validation")


@dataclass
class Manifest:
    """The samples one site holds (the JSON layout above).

    Args:
        dataset: the dataset's name.
        site: the site's name.
        source: identity of the data it was written for: ``{"file", "md5"}``.
        partition: the partition settings (:func:`fedmed.data.sites.partition_spec`).
        num_classes: number of classes.
        class_names: class names in label order.
        training: ``{"image": sample id, "label": int}`` per training sample.
        validation: the same for validation samples.
    """

    dataset: str
    site: str
    source: dict[str, str]
    partition: dict[str, Any]
    num_classes: int
    class_names: list[str]
    training: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def section(self, name: str) -> list[dict[str, Any]]:
        if name not in SECTIONS:
            raise ManifestError(f"manifest section {name!r} is not one of {SECTIONS}")
        return getattr(self, name)


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write atomically and never over another manifest: a temp file, then a hard link to ``path`` that
    fails if ``path`` exists, so an interrupted run never leaves half a manifest.

    Runs started together may write the same path at once: site processes of one federation write
    the same (deterministic) manifest, which is fine; runs with other partition settings under the
    same name are not. Whichever wrote second reads what is there and, if it is another partition,
    raises :class:`ManifestError` naming the file: it never trains on a partition no file records.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.write("\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        there = read_manifest(path)
        if there.to_json() != manifest.to_json():
            raise ManifestError(f"{path} was written by another run at the same time, for partition "
                                f"{there.partition} (this run: {manifest.partition}); start this run again, or give "
                                "it another partition.dirname") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_manifest(path: str | Path) -> Manifest:
    """Read and structurally validate a manifest; errors name the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest {path} is not readable JSON: {exc}") from exc
    required = ("dataset", "site", "source", "partition", "num_classes", "class_names", *SECTIONS)
    missing = [k for k in required if k not in raw]
    if missing:
        raise ManifestError(f"manifest {path} lacks keys {missing}")
    for section in SECTIONS:
        for i, item in enumerate(raw[section]):
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise ManifestError(f"manifest {path}: {section}[{i}] must have 'image' and 'label', got {item!r}")
            label = item["label"]
            if not isinstance(label, int) or not 0 <= label < raw["num_classes"]:
                raise ManifestError(
                    f"manifest {path}: {section}[{i}] ({item['image']}) has label {label!r}, "
                    f"outside 0..{raw['num_classes'] - 1}"
                )
    return Manifest(**{k: raw[k] for k in required})
