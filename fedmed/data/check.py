"""``fedmed data check``: read every sample a dataset (and its site manifests) names, report every problem.

Each file is decoded and preprocessed exactly as training would do it; a problem (missing,
empty, truncated or corrupt file, wrong rank or channel count, a label out of range, a manifest
entry the data lacks or labels differently, a test sample in a site's training data, a file in two
splits by path or by identical content, a class without train or test images) is collected with
the file's name, and all problems are reported together. A class without validation images is a
note: training and testing still work, selection on validation cannot see that class.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from fedmed.data.datamodule import Pipeline, _root_fedmed_error
from fedmed.data.manifest import Manifest
from fedmed.errors import FedmedError, ManifestError

#: a sample's file: (resolved path, md5 of its bytes, None where it cannot be read)
File = tuple[str, str | None]


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    Args:
        dataset: the dataset's name.
        counts: per split, the number of images of each class name.
        shapes: the number of images of each preprocessed shape.
        problems: one line per problem, naming the file or manifest.
        notes: one line per finding that does not stop training (a class without validation images).
        checked: samples decoded and preprocessed.
    """

    dataset: str
    counts: dict[str, Counter] = field(default_factory=dict)  # split -> class name -> images
    shapes: Counter = field(default_factory=Counter)           # preprocessed shape -> images
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
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

    def decode(item: dict[str, Any]) -> tuple[tuple[int, ...] | None, str | None]:
        if not 0 <= item["label"] < src.num_classes:
            return None, f"{item.get('path', item['id'])}: label {item['label']} outside 0..{src.num_classes - 1}"
        try:
            x = transform(item)["image"]
        except Exception as exc:  # noqa: BLE001 - every failure is reported, with the file
            err = _root_fedmed_error(exc)
            return None, str(err) if err else f"{item.get('path', item['id'])}: {type(exc).__name__}: {exc}"
        return tuple(x.shape), None

    def one(item: dict[str, Any]) -> tuple[tuple[int, ...] | None, str | None, File | None]:
        return *decode(item), _file(item)

    files: dict[str, list[File]] = {}  # split -> (resolved path, md5 of the bytes) of its files
    for split in splits:
        try:
            items = src.items(split)
        except FedmedError as exc:  # e.g. a MedMNIST file with the wrong md5, a missing table
            report.problems.append(str(exc))
            break
        report.counts[split] = Counter(src.class_names[it["label"]] for it in items
                                       if 0 <= it["label"] < src.num_classes)
        files[split] = []
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = pool.map(one, items)
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(items), desc=f"checking {split}", leave=False)
            for shape, problem, file in results:
                report.checked += 1
                if file is not None:
                    files[split].append(file)
                if problem:
                    report.problems.append(problem)
                else:
                    report.shapes[shape] += 1
    report.problems += shared_files(files)
    missing, report.notes = missing_classes(report.counts, src.class_names)
    report.problems += missing
    if len(report.shapes) > 1:
        common = report.shapes.most_common(1)[0][0]
        report.problems.append(f"preprocessed shapes differ: {dict(report.shapes)} (most are {common}); "
                               "set data.transforms.size")
    for m in manifests:
        try:
            pipe.check_manifest(m)
        except (ManifestError, FedmedError) as exc:
            report.problems.append(str(exc))
    report.problems = list(dict.fromkeys(report.problems))  # a file every check trips over is named once
    return report


def _file(item: dict[str, Any]) -> File | None:
    """The resolved path and content hash of an item read from a file (None: the item holds an array)."""
    path = item.get("path")
    if not isinstance(path, str):
        return None
    try:
        digest: str | None = hashlib.md5(Path(path).read_bytes(), usedforsecurity=False).hexdigest()
    except OSError:  # reported by the decoding step
        digest = None
    return os.path.realpath(path), digest


def _examples(names: Sequence[str], k: int = 3) -> str:
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def shared_files(files: dict[str, list[File]]) -> list[str]:
    """One line per pair of splits holding the same files: by resolved path, then by identical content."""
    problems = []
    for a, b in combinations(files, 2):
        paths_a = {p for p, _ in files[a]}
        same = sorted({p for p, _ in files[b]} & paths_a)
        if same:
            problems.append(f"{len(same)} file(s) are in both {a} and {b}: {_examples(same)}; "
                            "give each split its own files (a test image seen in training inflates the test metrics)")
        content_a = {d: p for p, d in sorted(files[a]) if d is not None}
        copies = sorted(f"{p} = {content_a[d]}" for p, d in files[b]
                        if d in content_a and p not in paths_a)
        if copies:
            problems.append(f"{len(copies)} {b} file(s) have the same content as a {a} file: {_examples(copies)}; "
                            f"remove one file of each pair so that {b} does not repeat {a}")
    return problems


_WHY = {"train": "the model cannot learn it", "test": "its test metrics (AUROC, recall) cannot be measured",
        "val": "selection on validation cannot see it"}


def missing_classes(counts: dict[str, Counter], class_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(problems, notes): a line for each class without images in a split; train and test are problems."""
    problems: list[str] = []
    notes: list[str] = []
    for split, n in counts.items():
        for name in class_names:
            if not n.get(name):
                line = f"{split} has no images of class {name!r}: {_WHY.get(split, 'it is absent there')}"
                (notes if split == "val" else problems).append(line)
    return problems, notes
