"""Shared fixtures. Real data comes from $FEDMED_DATA_DIR (CI: ../shared/data)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("FEDMED_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
PNEUMONIA = DATA_DIR / "medmnist" / "pneumoniamnist.npz"


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"real data file {path} not present (set FEDMED_DATA_DIR)")


@pytest.fixture(autouse=True)
def _outputs_in_tmp(tmp_path, monkeypatch):
    """Whatever a test does not send elsewhere goes under its own temp folder, never into the checkout."""
    monkeypatch.setenv("FEDMED_OUTPUT_DIR", str(tmp_path / "fedmed-output"))


def _litter() -> set[str]:
    """The checkout's untracked and ignored paths (git's view), or nothing outside a git checkout."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"], cwd=REPO,
                         capture_output=True, text=True)
    found = {line[3:] for line in out.stdout.splitlines() if line[:2] in ("??", "!!")} if out.returncode == 0 else set()
    return found - {".pytest_cache/"}  # pytest's own


def pytest_configure(config):
    config.stash[_BEFORE] = _litter()


def pytest_sessionfinish(session, exitstatus):
    """The suite fails if it left anything in the checkout (tests write only under their temp folders)."""
    left = sorted(_litter() - session.config.stash.get(_BEFORE, set()))
    if left:
        print(f"\nthe tests wrote into the checkout {REPO}: {', '.join(left)}")
        session.exitstatus = 1


_BEFORE = pytest.StashKey[set]()


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
