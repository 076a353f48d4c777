"""Shared fixtures. Real data comes from $FEDMED_DATA_DIR (CI: ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("FEDMED_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
PNEUMONIA = DATA_DIR / "medmnist" / "pneumoniamnist.npz"


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"real data file {path} not present (set FEDMED_DATA_DIR)")


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> list[str]:
    """Overrides that send manifests and MLflow output to a temp folder (never into the repo)."""
    monkeypatch.setenv("FEDMED_DATA_DIR", str(DATA_DIR))
    return [
        f"paths.manifests={tmp_path / 'data_manifests'}",
        f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"logger.artifact_location={tmp_path / 'mlruns'}",
    ]


@pytest.fixture(scope="session")
def pneumonia():
    if not PNEUMONIA.exists():
        pytest.skip(f"{PNEUMONIA} not present")
    from fedmed.data import MedMNISTSource

    return MedMNISTSource("pneumoniamnist", str(PNEUMONIA.parent))
