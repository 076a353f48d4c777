"""A reviewer's view: the MLflow UI shows a site run's heatmaps, checked in a real headless Chromium."""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from fedmed.config import compose
from fedmed.tasks import fit
from tests.conftest import PNEUMONIA, needs

pytestmark = needs(PNEUMONIA)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1500,1000", "--virtual-time-budget=20000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None,
                    reason="Chromium is absent (Debian package 'chromium'): the UI check needs a real browser")
def test_site_heatmaps_visible_in_mlflow_ui(tmp_path, isolated):
    fit.run(compose("fit", [*isolated, "experiment=smoke", "logger.log_model=false"]))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("fedmed")
    site = next(r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "hospital_a")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow ui did not start")
                time.sleep(1)
        # the server hands out the image itself
        png = urllib.request.urlopen(
            f"{base}/get-artifact?path=heatmaps/round_001.png&run_uuid={site.info.run_id}", timeout=30).read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        # and the run's artifact page, rendered by the browser, shows it
        page = f"{base}/#/experiments/{exp.experiment_id}/runs/{site.info.run_id}/artifacts/heatmaps/round_001.png"
        shot = tmp_path / "site_heatmaps.png"
        common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chrome'}"]
        dom = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
        assert "round_001.png" in dom and "hospital_a" in dom
        assert "get-artifact" in dom or "artifacts/heatmaps/round_001.png" in dom  # the <img> that shows it
        subprocess.run([*common, f"--screenshot={shot}", page], capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 20_000
    finally:
        server.terminate()
        server.wait(timeout=30)
