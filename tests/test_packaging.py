"""fedmed as a released tool: a built wheel carries its configs and runs from any directory, writing
only under the working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib

from tests.conftest import DATA_DIR, PNEUMONIA, REPO, needs


def test_every_package_folder_is_in_the_wheel_list():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "fedmed").rglob("__init__.py")}
    assert found | {"fedmed.configs"} == listed


def test_the_flower_app_is_declared_and_no_deprecated_flower_transport_is_imported():
    import ast

    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedmed.flower.app:server_app",
                                 "clientapp": "fedmed.flower.app:client_app"}
    assert "config-overrides" in app["config"]
    imported = set()
    for path in (REPO / "fedmed").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
    assert any(m.startswith("flwr.serverapp") for m in imported)  # the scan sees Flower imports at all
    assert not [m for m in imported if m.startswith("flwr.compat") or "grpc_bidi" in m]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@needs(PNEUMONIA)
def test_a_built_wheel_runs_the_smoke_federation_from_another_folder(tmp_path):
    wheels, source = tmp_path / "wheels", tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():  # built from a copy: setuptools writes build/ beside the sources
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    site = tmp_path / "site"
    (wheel,) = wheels.glob("fedmed-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert (site / "fedmed" / "configs" / "fit.yaml").is_file() and (site / "fedmed" / "py.typed").is_file()
    before = _files(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()  # nothing leaked from this process (mlflow sets MLFLOW_TRACKING_URI)
           if k not in ("MLFLOW_TRACKING_URI", "FEDMED_OUTPUT_DIR", "FEDMED_CONFIG_DIR")}
    env.update(PYTHONPATH=str(site), FEDMED_DATA_DIR=str(DATA_DIR))  # the data the suite reads, set or not
    where = subprocess.run([sys.executable, "-c", "import fedmed; print(fedmed.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where  # the wheel's copy, not the source checkout
    proc = subprocess.run([sys.executable, "-m", "fedmed.cli", "fit", "experiment=smoke", "privacy.audit=none",
                           "explain.every_n_rounds=0", "logger.log_model=false"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "mlflow.db").is_file() and (work / "mlruns").is_dir() and (work / "checkpoints").is_dir()
    assert list((work / "manifests" / "pneumoniamnist").glob("*/hospital_a.json"))
    assert _files(site) == before  # nothing written into the installed package
