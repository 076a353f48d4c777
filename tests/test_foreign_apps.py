"""Who reaches the aggregator's port cannot run code there or at a hospital.

A real ``fedmed serve`` (a SuperLink in process isolation) with two ``fedmed fit site=...``: an App
submitted with Flower's own ``flwr run`` by someone who is not the operator never executes, neither
its ServerApp on the aggregator nor its ClientApp at a site, and the federation goes on. At a site,
a message of a run whose App is not fedmed's, or of a run other than the one it joined, gets an
error reply and nothing else (:class:`fedmed.flower.gate.SiteTasks`).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from fedmed.flower.gate import SiteTasks, app_components
from fedmed.flower.protocol import HELLO
from fedmed.flower.runtime import APP_PYPROJECT
from tests.conftest import PNEUMONIA, needs
from tests.test_deployment import common, env, fedmed, free_port, started, wait

BIN = Path(sys.executable).parent

FOREIGN_PYPROJECT = """[project]
name = "innocent-app"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "innocent.app:server_app"
clientapp = "innocent.app:client_app"
"""

FOREIGN_CODE = '''
from pathlib import Path
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

MARKER = Path({marker!r})
server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def main(grid, context):
    MARKER.with_suffix(".server").write_text(str(context.run_config))
    grid.send_and_receive([grid.create_message({{}}, "query", n, "") for n in grid.get_node_ids()], timeout=30)


@client_app.query()
def query(message, context):
    MARKER.with_suffix(".site").write_text(str(dict(context.node_config)))
    return message.create_reply(message.content)
'''


def _fab(pyproject: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", pyproject)
    return buf.getvalue()


def test_a_site_answers_only_fedmed_s_app_and_only_the_run_it_joined():
    tasks = SiteTasks.__new__(SiteTasks)  # the decision alone, without a SuperNode to take tasks from
    tasks.run_id = None
    ours, theirs = _fab(APP_PYPROJECT), _fab(FOREIGN_PYPROJECT)
    assert app_components(ours) == {"serverapp": "fedmed.flower.app:server_app",
                                     "clientapp": "fedmed.flower.app:client_app"}
    assert "not fedmed's" in tasks.refusal(7, theirs, HELLO)
    assert "not fedmed's" in tasks.refusal(7, b"not a zip", HELLO)
    assert "has not introduced itself" in tasks.refusal(7, ours, "train")
    assert tasks.refusal(7, ours, HELLO) is None
    tasks.run_id = 7  # joined run 7 at its hello
    assert tasks.refusal(7, ours, "train") is None
    assert "Flower run 7 only" in tasks.refusal(8, ours, "train")
    assert tasks.refusal(8, ours, HELLO) is None  # a resumed server's new run: the site checks its federation


@needs(PNEUMONIA)
def test_an_app_submitted_by_someone_else_never_runs_on_the_aggregator_or_at_a_site(tmp_path):
    port = free_port()
    args = [*common(tmp_path, rounds=1, epochs=1), f"federation.server=127.0.0.1:{port}",
            f"federation.checkpoint_dir={tmp_path / 'ckpt'}", f"paths.output_dir={tmp_path}",
            "federation.sites=[hospital_a,hospital_b]", "federation.connect_timeout=300"]
    logs = {n: tmp_path / f"{n}.log" for n in ["server", "hospital_a", "hospital_b"]}
    procs = {"server": fedmed(["serve", *args], logs["server"])}
    started(procs, logs)
    # someone who reaches the port submits an App of their own, with Flower's CLI
    app, home, marker = tmp_path / "innocent", tmp_path / "outsider", tmp_path / "ran"
    (app / "innocent").mkdir(parents=True)
    (app / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
    (app / "innocent" / "__init__.py").write_text("")
    (app / "innocent" / "app.py").write_text(FOREIGN_CODE.format(marker=str(marker)))
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink.target]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    outsider = {**env(), "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    out = subprocess.run([str(BIN / "flwr"), "run", str(app), "target", "--format", "json"], env=outsider, cwd=app,
                         capture_output=True, text=True, timeout=120)
    answer = json.loads(out.stdout[out.stdout.index("{"):])
    assert "run-id" in answer, out.stdout + out.stderr
    foreign = answer["run-id"]
    deadline = time.monotonic() + 60
    while f"refused the ServerApp of Flower run {foreign}" not in logs["server"].read_text():
        assert time.monotonic() < deadline, logs["server"].read_text()[-3000:]
        time.sleep(0.5)
    for s in ("hospital_a", "hospital_b"):
        procs[s] = fedmed(["fit", f"site={s}", *args], logs[s])
    wait(procs, logs)
    assert all(p.returncode == 0 for p in procs.values()), logs["server"].read_text()[-3000:]
    assert not marker.with_suffix(".server").exists() and not marker.with_suffix(".site").exists()
    said = logs["server"].read_text()
    folder = Path(said.split("its log in ", 1)[1].split()[0].rstrip(";,")).parent
    assert folder.name.startswith("fedmed-serve-") and not folder.exists()  # fedmed serve leaves nothing behind
