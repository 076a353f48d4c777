"""fedmed as a Flower App. In this process: GridSite over a Grid whose every message crosses Flower's
serialization and is answered by a freshly built site (as each ClientApp process is), bit-equal to the
in-process federation with secure aggregation and with SCAFFOLD + top-k; nodes naming unknown or taken
sites, or with another site's key, are refused and told why; site errors come back by kind. On loopback:
Flower's own SuperLink, two SuperNodes started by hand and ``flwr run`` train the same global model as
``fedmed fit`` in one process."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from mlflow import MlflowClient

from fedmed.errors import FedmedError
from fedmed.federated import FederationSettings, InProcessSite, Orchestrator, SiteClient, TrainingSettings
from fedmed.federated.channel import UpdateChannel
from fedmed.federated.compression import UpdateEncoder
from fedmed.federated.strategies.base import Strategy
from fedmed.flower import grid as fgrid
from fedmed.flower import node as fnode
from fedmed.flower import protocol, runtime
from fedmed.privacy.dp import PrivacyBudgetExhausted
from tests.conftest import DATA_DIR, PNEUMONIA, needs
from tests.helpers import strategy as make_strategy
from tests.test_deployment import final_weights, free_port, same_record, supernode_key
from tests.test_orchestrator import factory, synthetic_site
from tests.test_records import over_the_wire

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr of this environment


@pytest.fixture
def serverapp(monkeypatch):
    """What Flower sets in a ServerApp process: its run, task and node (messages take them)."""
    for attr, value in (("_run_id", 7), ("_task_id", 8), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class LoopbackGrid(Grid):
    """A Grid over sites in this process. Every request and reply crosses Flower's serialization, and each
    message is answered by a site built afresh and given what its node kept, as a ClientApp process is."""

    def __init__(self, nodes: dict[int, Callable[[], SiteClient]]):
        self.nodes, self.states = nodes, {nid: RecordDict() for nid in nodes}
        self.keys: dict[int, bytes] = {}  # node -> the public key its SuperNode authenticated with (PEM)
        self.replies: dict[str, Message] = {}
        self.sent: list[tuple[int, str]] = []
        self.refused: dict[int, str] = {}  # node -> what the server told it
        self.terms: dict[int, dict[str, str]] = {}  # node -> the terms its site declares in its hello
        self.lock = threading.Lock()  # one site at a time: they share this process's RNG

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=nid, public_key=self.keys.get(nid, b"")) for nid in self.nodes]

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what the SuperLink does on receipt
            with self.lock:
                self.replies[msg.metadata.message_id] = self._answer(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _answer(self, msg: Message) -> Message:
        nid, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        self.sent.append((nid, kind))
        msg.content = over_the_wire(msg.content)
        if kind == protocol.REFUSED:
            self.refused[nid] = str(msg.content.config_records["refused"]["reason"])
            return Message(RecordDict(), reply_to=msg)
        try:
            client = self.nodes[nid]()
            fnode.restore_state(client, self.states[nid])
            content = (fnode.hello_reply(client, self.terms.get(nid)) if kind == protocol.HELLO
                       else fnode.answer(client, kind, msg.content))
            fnode.keep_state(client, self.states[nid])
        except Exception as exc:  # noqa: BLE001 - the site's error reply
            return protocol.error_reply(msg, exc)
        return Message(over_the_wire(content), reply_to=msg)


def site_factory(k: int, n: int, strategy: Strategy, codec: str | None, signer=None, roster=None
                 ) -> Callable[[], SiteClient]:
    def make() -> SiteClient:
        encoder = UpdateEncoder(codec, fraction=0.3) if codec else None
        return SiteClient(f"s{k}", synthetic_site(k, n, 0.3 + 0.4 * k), factory,
                          TrainingSettings(batch_size=16, trainer={"accelerator": "cpu"}, seed=5), site_index=k,
                          part=strategy.site_part(), channel=UpdateChannel(f"s{k}", encoder, signer, roster))
    return make


def _signer():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from fedmed.privacy.identity import Signer

    key = ed25519.Ed25519PrivateKey.generate()
    return Signer(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))


@pytest.mark.parametrize(("name", "secure", "codec"), [("fedavg", True, None), ("scaffold", False, "topk")])
def test_grid_sites_train_what_in_process_sites_train(serverapp, name, secure, codec):
    """Two rounds: the second needs what each site kept from the first (its SCAFFOLD control variate, its
    top-k residual; under secure aggregation the masked update it must unmask), which here lives only in its
    node's state. The secure sites sign their masking keys and check each other's against a roster."""
    settings = FederationSettings(rounds=2, select="last", secure_aggregation=secure)
    torch.manual_seed(0)
    initial = factory().net.state_dict()
    signers = {f"s{k}": _signer() for k in range(2)} if secure else {}
    roster = {name: s.public_der for name, s in signers.items()} if secure else None
    results = []
    for remote in (False, True):
        strategy = make_strategy(name)
        makers = [site_factory(k, n, strategy, codec, signers.get(f"s{k}"), roster) for k, n in enumerate((40, 90))]
        if remote:
            grid = LoopbackGrid({10 + k: make for k, make in enumerate(makers)})
            sites = fgrid.accept(grid, ["s0", "s1"], timeout=30, hello={})
        else:
            sites = [InProcessSite(make()) for make in makers]
        results.append(Orchestrator(sites, strategy, settings).run(initial))
    want, got = results
    assert [h.sites for h in got.history] == [h.sites for h in want.history] == [["s0", "s1"]] * 2
    for k in want.final_weights:
        assert torch.equal(got.final_weights[k], want.final_weights[k]), k
    assert got.history[-1].bytes_up == want.history[-1].bytes_up


def test_nodes_naming_unknown_or_taken_sites_are_refused_and_never_sent_weights(serverapp, caplog):
    s = make_strategy("fedavg")
    stranger = site_factory(1, 20, s, None)
    grid = LoopbackGrid({1: site_factory(0, 20, s, None), 2: lambda: SiteClient("s9", stranger().data, factory),
                         3: site_factory(0, 20, s, None), 4: site_factory(1, 20, s, None)})
    sites = fgrid.accept(grid, ["s0", "s1"], timeout=30, hello={})
    assert [(x.name, x.node_id) for x in sites] == [("s0", 1), ("s1", 4)]
    assert "node 2 says it is site 's9': not one of ['s0', 's1']; refused" in caplog.text
    assert "node 3 says it is site 's0': already connected; refused" in caplog.text
    Orchestrator(sites, s, FederationSettings(rounds=1)).run(factory().net.state_dict())
    told = {kind for nid, kind in grid.sent if nid in (2, 3)}
    assert told == {protocol.HELLO, protocol.REFUSED}  # told why, never weights
    assert grid.refused == {2: "site s9: not one of ['s0', 's1']", 3: "site s0: already connected"}


def test_with_registered_keys_only_the_key_of_the_site_is_admitted_and_others_are_told_why(serverapp, tmp_path,
                                                                                           caplog):
    from cryptography.hazmat.primitives import serialization

    def pem(public: Path) -> bytes:  # what the SuperLink keeps for a registered key
        key = serialization.load_ssh_public_key(public.read_bytes())
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    keys = {s: supernode_key(tmp_path, s)[1] for s in ("s0", "s1", "stranger")}
    s = make_strategy("fedavg")
    grid = LoopbackGrid({1: site_factory(0, 20, s, None), 2: site_factory(0, 20, s, None),
                         3: site_factory(1, 20, s, None), 4: site_factory(1, 20, s, None),
                         5: site_factory(0, 20, s, None)})
    grid.keys = {1: pem(keys["stranger"]), 2: pem(keys["s1"]), 3: b"", 4: pem(keys["s1"]), 5: pem(keys["s0"])}
    sites = fgrid.accept(grid, ["s0", "s1"], timeout=30, hello={},
                      keys={"s0": keys["s0"].read_bytes(), "s1": keys["s1"].read_bytes()})
    assert [(x.name, x.node_id) for x in sites] == [("s0", 5), ("s1", 4)]
    assert grid.refused == {
        1: "site s0: its SuperNode's key is not the one configured for s0 (federation.auth.supernode_keys)",
        2: "site s0: its SuperNode's key is the one of site s1",
        3: "site s1: its SuperNode did not authenticate with a key (the SuperLink must run with "
           "--enable-supernode-auth)"}
    assert {kind for nid, kind in grid.sent if nid in (1, 2, 3)} == {protocol.HELLO, protocol.REFUSED}  # never weights


def test_a_node_site_checks_the_strategy_opens_its_run_at_hello_and_hears_refusals_and_the_end(tmp_path):
    from fedmed.tracking import Tracker

    client = site_factory(0, 20, make_strategy("fedavg"), None)()
    store = lambda: Tracker(f"sqlite:///{tmp_path / 'm.db'}", "fedmed", str(tmp_path / "mlruns"))  # noqa: E731
    node = fnode.NodeSite(client, "fedprox", store, {"manifest": "m.json"}, {"dataset": "d"})
    with pytest.raises(FedmedError, match="the server runs strategy=fedavg, this site is configured with "
                                          "strategy=fedprox"):
        node.handle(protocol.HELLO, protocol.hello_request({"strategy": "fedavg", "run_id": ""}))
    assert not node.run.active  # no run opened for a federation it does not take part in
    node = fnode.NodeSite(client, "fedavg", store, {"manifest": "m.json"}, {"dataset": "d"})
    reply = node.handle(protocol.HELLO, protocol.hello_request({"strategy": "fedavg", "run_id": "fed1"}))
    assert reply.config_records["hello"]["site"] == "s0" and node.run.active
    again = node.handle(protocol.HELLO, protocol.hello_request({"strategy": "fedavg", "run_id": "fed1"}))
    assert again.config_records["hello"]["site"] == "s0"  # a server resumed with the same federation
    with pytest.raises(PermissionError, match="takes part in federation fed1"):  # another federation
        node.handle(protocol.HELLO, protocol.hello_request({"strategy": "fedavg", "run_id": "fed2"}))
    node.handle(protocol.REFUSED, RecordDict({"refused": ConfigRecord({"reason": "site s0: already connected"})}))
    node.handle(protocol.FINISH, RecordDict({"finish": ConfigRecord({"status": "FAILED"})}))
    assert (node.refused, node.finished, node.messages) == ("site s0: already connected", "FAILED", 5)


def test_site_errors_come_back_by_kind(serverapp):
    class Broke(ValueError):
        pass

    def spent() -> SiteClient:
        raise PrivacyBudgetExhausted("epsilon would pass 8")

    def broke() -> SiteClient:
        raise Broke("no data")

    grid = LoopbackGrid({1: spent, 2: broke})
    with pytest.raises(PrivacyBudgetExhausted, match="at site a: epsilon would pass 8"):
        fgrid.GridSite(grid, 1, "a").public_key(1)
    with pytest.raises(protocol.RemoteSiteError, match="Broke at site b: no data") as info:
        fgrid.GridSite(grid, 2, "b").fit({}, 1, 1)
    assert info.value.kind == "Broke"
    escaped = protocol.reply_error("c", Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "<class 'KeyError'>:<'site'>"))
    assert isinstance(escaped, protocol.RemoteSiteError) and escaped.kind == "KeyError"
    gone = protocol.reply_error("d", Error(ErrorCode.NODE_UNAVAILABLE, "node went offline"))
    assert isinstance(gone, protocol.RemoteSiteError) and gone.kind == "ConnectionError"


# -- the real runtime on loopback --------------------------------------------------------------


def runtime_env(home: Path) -> dict[str, str]:
    return {**os.environ, "FEDMED_DATA_DIR": str(DATA_DIR), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def start(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """A Flower process in its own process group (it starts helpers: the group ends with it)."""
    with log.open("w") as out:
        return subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], env=env, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def flwr(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    out = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout[out.stdout.index("{"):])


def wait_for_run(run_id: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (run,) = flwr(["list", "fedmed-test", "--run-id", run_id], env, cwd)["runs"]
        if run["status"].startswith("finished"):
            return run["status"]
        time.sleep(10)  # each look starts the flwr CLI (seconds of CPU)
    pytest.fail(f"run {run_id} did not finish in {timeout:g}s")


@needs(PNEUMONIA)
def test_a_flower_app_federation_equals_in_process(tmp_path, monkeypatch):
    """Flower's own commands, no fedmed verb behind them: flower-superlink, two flower-supernode started by hand
    and flwr run. Each message builds the site afresh in its ClientApp process (about a minute on 2 cores)."""
    monkeypatch.setenv("FEDMED_DATA_DIR", str(DATA_DIR))
    home, app = tmp_path / "flwr", tmp_path / "app"
    home.mkdir()
    app.mkdir()
    runtime.write_app(app)  # the App as fedmed serve submits it
    port = free_port()
    (home / "config.toml").write_text(f'[superlink.fedmed-test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    base = ["experiment=smoke", f"paths.manifests={tmp_path / 'manifests'}",
            f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"logger.artifact_location={tmp_path / 'mlruns'}", "explain.every_n_rounds=0", "logger.log_model=false",
            "privacy.audit=none", "federation.select=last", "federation.finetune_epochs=1",
            f"data.cache_dir={tmp_path / 'cache'}"]
    env = runtime_env(home)
    logs = {n: tmp_path / f"{n}.log" for n in ("superlink", "hospital_a", "hospital_b")}
    commands = {"superlink": ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                              "--disable-runtime-dependency-installation"]}
    for site in ("hospital_a", "hospital_b"):
        commands[site] = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1",
                          "--port", str(free_port()), "--node-config", f"site='{site}'"]
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, cmd in commands.items():
            procs[name] = start(cmd, env, tmp_path, logs[name])
            if name == "superlink":
                time.sleep(5)
        t0 = time.monotonic()
        overrides = shlex.join([*base, f"federation.checkpoint_dir={tmp_path / 'ckpt_app'}"])
        started = flwr(["run", str(app), "fedmed-test", "--run-config", f"config-overrides={json.dumps(overrides)}"],
                       env, tmp_path)
        status = wait_for_run(started["run-id"], env, tmp_path)
        seconds = time.monotonic() - t0
        if status != "finished:completed":
            shown = subprocess.run([str(BIN / "flwr"), "log", started["run-id"], "fedmed-test", "--show"], env=env,
                                   cwd=tmp_path, capture_output=True, text=True, timeout=60)
            pytest.fail(f"{status}:\n{shown.stdout[-4000:]}\n{logs['hospital_a'].read_text()[-3000:]}")
    finally:
        for p in procs.values():
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    print(f"Flower App federation: {seconds:.0f}s from flwr run to finished")

    from fedmed.config import compose
    from fedmed.tasks import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ClientApp processes (OMP_NUM_THREADS=1)
    try:
        fit.run(compose("fit", [*base, f"federation.checkpoint_dir={tmp_path / 'ckpt_local'}"]))
    finally:
        torch.set_num_threads(threads)
    want, got = final_weights(tmp_path / "ckpt_local"), final_weights(tmp_path / "ckpt_app")
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedmed")
    runs = client.search_runs(exp.experiment_id, "tags.transport = 'flower'")
    (server,) = [r for r in runs if r.data.tags.get("role") != "site"]
    assert server.info.status == "FINISHED"
    sites = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == server.info.run_id]
    assert sorted(r.data.tags["site"] for r in sites) == ["hospital_a", "hospital_b"]
    assert all(r.info.status == "FINISHED" for r in sites)
    assert all("personalized_val_acc" in r.data.metrics for r in sites)  # fine-tuned at each site, over Flower
    (local,) = client.search_runs(exp.experiment_id, "tags.transport = 'in-process'")
    assert same_record([local, server])  # the same tags (privacy, compression...) and params as fedmed fit


FEDERATION = {"data.name": "pneumoniamnist", "privacy.dp": "DP-SGD epsilon=8, delta=1e-05", "strategy": "fedavg"}


def test_a_site_under_other_terms_is_refused_naming_the_first_differing_key(serverapp, caplog):
    s = make_strategy("fedavg")
    grid = LoopbackGrid({1: site_factory(0, 20, s, None), 2: site_factory(0, 20, s, None),
                         3: site_factory(0, 20, s, None), 4: site_factory(1, 20, s, None)})
    grid.terms = {1: {**FEDERATION, "data.name": "breastmnist"}, 2: {**FEDERATION, "privacy.dp": "off"},
                  3: dict(FEDERATION), 4: dict(FEDERATION)}
    sites = fgrid.accept(grid, ["s0", "s1"], timeout=30, hello={}, terms=FEDERATION)
    assert [(x.name, x.node_id) for x in sites] == [("s0", 3), ("s1", 4)]
    assert grid.refused[1] == "site s0: its data.name is 'breastmnist', the federation's is 'pneumoniamnist'"
    assert grid.refused[2].startswith("site s0: its privacy.dp is 'off', the federation's is 'DP-SGD epsilon=8")
    assert not [kind for nid, kind in grid.sent if nid in (1, 2) and kind not in (protocol.HELLO, protocol.REFUSED)]


def test_a_site_must_train_on_no_more_images_than_it_declared(serverapp):
    s = make_strategy("fedavg")
    grid = LoopbackGrid({1: site_factory(0, 20, s, None)})
    (site,) = fgrid.accept(grid, ["s0"], timeout=30, hello={})
    weights = factory().net.state_dict()
    assert site.fit(weights, 1, 1).num_samples == site.info["num_train"]
    site.info["num_train"] = 5  # as if it had said 5 in its hello: its update claims more and is refused
    with pytest.raises(protocol.RemoteSiteError, match="num_samples=.*declared 5 training images"):
        site.fit(weights, 1, 1)
    for bad in (0, True, "20"):
        def liar(bad=bad) -> SiteClient:
            client = site_factory(0, 20, s, None)()
            client.initialize = lambda: {"num_train": bad, "num_val": 5}  # what its hello says
            return client

        grid2 = LoopbackGrid({1: liar})
        with pytest.raises(FedmedError, match="never connected"):
            fgrid.accept(grid2, ["s0"], timeout=1, hello={})
        assert "its hello says num_train" in grid2.refused[1]


def test_a_refused_node_is_asked_again_and_the_real_site_can_join(serverapp, monkeypatch):
    """Flower ties a node's id to its key: the hospital that first started its site with a wrong site= comes
    back on the same node id, and is admitted."""
    monkeypatch.setattr(fgrid, "RETRY", 0.3)
    s = make_strategy("fedavg")
    real, said = site_factory(0, 20, s, None), {"name": "s9"}

    def first_wrong_then_right() -> SiteClient:
        client = real()
        client.name = said["name"]
        return client

    grid = LoopbackGrid({1: first_wrong_then_right})
    original = grid._answer

    def answer(msg):
        reply = original(msg)
        if msg.metadata.message_type == protocol.REFUSED:
            said["name"] = "s0"  # the operator restarts the site with site=s0, same key
        return reply

    grid._answer = answer
    (site,) = fgrid.accept(grid, ["s0"], timeout=30, hello={})
    assert site.node_id == 1 and [k for _, k in grid.sent].count(protocol.HELLO) == 2
