"""``fedmed data check``: read every sample a dataset (and its site manifests) names, report every problem.

Each file is decoded and preprocessed exactly as training would do it; a problem (missing,
empty, truncated or corrupt file, wrong rank or channel count, a label out of range, a manifest
entry the data lacks or labels differently, a test sample in a site's training data) is
collected with the file's name, and all problems are reported together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fedmed.data.datamodule import Pipeline, _root_fedmed_error
from fedmed.data.manifest import Manifest
from fedmed.errors import FedmedError, ManifestError


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    Args:
        dataset: the dataset's name.
        counts: per split, the number of images of each class name.
        shapes: the number of images of each preprocessed shape.
        problems: one line per problem, naming the file or manifest.
        checked: samples decoded and preprocessed.
    """

    dataset: str
    counts: dict[str, Counter] = field(default_factory=dict)  # split -> class name -> images
    shapes: Counter = field(default_factory=Counter)           # preprocessed shape -> images
    problems: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(pipe: Pipeline, splits: Sequence[str] = ("train", "val", "test"), manifests: Sequence[Manifest] = (),
                  workers: int = 2, progress: bool = False) -> CheckReport:
    """Decode and preprocess every sample of ``splits``; check ``manifests`` against the data."""
    src = pipe.source
    report = CheckReport(src.name)
    report.problems += list(getattr(src, "problems", []))
    transform = pipe.deterministic()

    def one(item: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, ...] | None, str | None]:
        if not 0 <= item["label"] < src.num_classes:
            return item, None, f"{item.get('path', item['id'])}: label {item['label']} outside 0..{src.num_classes - 1}"
        try:
            x = transform(item)["image"]
        except Exception as exc:  # noqa: BLE001 - every failure is reported, with the file
            err = _root_fedmed_error(exc)
            return item, None, str(err) if err else f"{item.get('path', item['id'])}: {type(exc).__name__}: {exc}"
        return item, tuple(x.shape), None

    for split in splits:
        try:
            items = src.items(split)
        except FedmedError as exc:  # e.g. a MedMNIST file with the wrong md5, a missing table
            report.problems.append(str(exc))
            break
        report.counts[split] = Counter(src.class_names[it["label"]] for it in items
                                       if 0 <= it["label"] < src.num_classes)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = pool.map(one, items)
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(items), desc=f"checking {split}", leave=False)
            for _item, shape, problem in results:
                report.checked += 1
                if problem:
                    report.problems.append(problem)
                else:
                    report.shapes[shape] += 1
    if len(report.shapes) > 1:
        common = report.shapes.most_common(1)[0][0]
        report.problems.append(f"preprocessed shapes differ: {dict(report.shapes)} (most are {common}); "
                               "set data.transforms.size")
    for m in manifests:
        try:
            pipe.check_manifest(m)
        except (ManifestError, FedmedError) as exc:
            report.problems.append(str(exc))
    return report
