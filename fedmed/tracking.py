"""MLflow run layout: one parent run per federation, one nested child run per site, step = round.

All calls go through an explicit :class:`mlflow.MlflowClient` and explicit run ids, so several
site runs can be open at once (and, later, logged from other processes or machines).
Nesting uses the ``mlflow.parentRunId`` tag (never Lightning's MLFlowLogger holding the
parent's id: it ends the run it holds).

Before anything else a :class:`Tracker` checks that the SQLite store and the artifact folder can
be written (:func:`check_writable`), and it creates the store's tables and the experiment under an
OS lock on ``<store>.lock``, so that several first runs on a fresh ``mlflow.db`` do not race.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from fedmed.errors import FedmedError, stop_request

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent first runs there are not serialised
    fcntl = None  # type: ignore[assignment]

MAX_PARAM_LEN = 6000  # MLflow 3 allows long param values; keep well inside the limit
log = logging.getLogger("fedmed")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept as their JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None: another kind of store, or in memory)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    rest = tracking_uri[len(prefix):].split("?", 1)[0]
    return Path(unquote(rest)).expanduser() if rest and rest != ":memory:" else None


def local_path(location: str) -> Path | None:
    """The folder of a local artifact location (a path or ``file:`` URI); None for remote stores (s3://...)."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        return None
    return Path(location).expanduser()


def _why_not_writable(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` or the folders to be made below its nearest existing
    parent (None: they can). The check writes and removes one small probe file."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".fedmed-write-check-", dir=existing)
    except OSError as exc:
        return f"{existing} is {_reason(exc)}"
    os.close(fd)
    os.unlink(probe)
    return None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "read-only for this user (permission denied)"
    return f"not writable ({exc.strerror or exc})"


def _check_store(db: Path) -> None:
    why = _why_not_writable(db.parent)
    if why is None and db.exists():
        try:
            with open(db, "r+b"):
                pass
        except OSError as exc:
            why = f"{db} is {_reason(exc)}"
    if why:
        raise FedmedError(f"logger.tracking_uri: cannot write the MLflow store {db}: {why}; make it writable "
                          "or point logger.tracking_uri at a writable place, e.g. sqlite:///<folder>/mlflow.db")


def _check_artifacts(location: str, key: str, instead: str) -> None:
    folder = local_path(location)
    why = _why_not_writable(folder) if folder is not None else None
    if why:
        raise FedmedError(f"{key}: cannot create or write the MLflow artifact folder {folder}: {why}; "
                          f"make it writable or {instead}")


def check_writable(tracking_uri: str, artifact_location: str | None = None) -> None:
    """Refuse, before any work, a SQLite store or a local artifact folder that cannot be written.

    Raises:
        FedmedError: naming ``logger.tracking_uri`` or ``logger.artifact_location`` and the path.
    """
    db = sqlite_path(tracking_uri)
    if db is not None:
        _check_store(db)
    if artifact_location:
        _check_artifacts(artifact_location, "logger.artifact_location",
                         "set logger.artifact_location to a writable folder")


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an OS lock on ``<store>.lock`` beside a SQLite store (no-op for other stores): MLflow
    creates and migrates the tables on first use, and two processes doing so at once collide."""
    db = sqlite_path(tracking_uri)
    if db is None or fcntl is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class Tracker:
    """Logs to one MLflow experiment.

    Args:
        tracking_uri: e.g. ``sqlite:///mlflow.db`` (the default: an embedded store, nothing to start).
        experiment: experiment name.
        artifact_location: where artifacts of a *new* experiment go, e.g. ``./mlruns``.

    Raises:
        FedmedError: the store or the artifact folder cannot be written (see :func:`check_writable`).
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None):
        check_writable(tracking_uri, artifact_location)
        self.tracking_uri = tracking_uri
        with store_lock(tracking_uri):
            self.client = MlflowClient(tracking_uri=tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                loc = Path(artifact_location).expanduser().resolve().as_uri() if artifact_location else None
                # MLflow 3's UI opens an experiment on its runs (not its GenAI view) with this kind
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=loc,
                                                                   tags={EXPERIMENT_KIND: MODEL_DEVELOPMENT})
            else:
                self.experiment_id = exp.experiment_id
                stored = exp.artifact_location
                if stored and stored != _as_uri(artifact_location):
                    _check_artifacts(stored, f"logger.experiment={experiment} keeps its artifacts elsewhere",
                                     "log to a new experiment (logger.experiment=...)")

    def start_run(self, name: str, tags: Mapping[str, str] | None = None, parent_id: str | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark a FAILED/KILLED run as running again (a resumed federation continues in it)."""
        self.client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self.client.log_figure(run_id, figure, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(run_id, dict(data), artifact_file)

    def log_table(self, run_id: str, columns: Mapping[str, list], artifact_file: str) -> None:
        """A table (column -> values) that the MLflow UI shows in its artifact view and evaluation tab."""
        self.client.log_table(run_id, data=dict(columns), artifact_file=artifact_file)

    def load_json(self, run_id: str, artifact_file: str) -> Any:
        """A JSON artifact of ``run_id``, or None where the run has none (or the store does not know the run)."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return json.loads(Path(self.client.download_artifacts(run_id, artifact_file, tmp)).read_text())
            except Exception:  # noqa: BLE001 - no such run or artifact, another store
                return None

    def log_state_dict(self, run_id: str, state: Mapping[str, Any], artifact_file: str) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(dict(state), buf)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(buf.getvalue())
            self.client.log_artifact(run_id, str(path), str(Path(artifact_file).parent) or None)

    def log_checkpoint(self, run_id: str, weights: Mapping[str, Any], config: Any,
                       class_names: list[str] | None, epochs: int) -> None:
        """A model as ``checkpoint/model.pt``: what ``checkpoint=runs:/<run id>`` loads (weights, config, classes)."""
        self.log_state_dict(run_id, {"state_dict": weights, "config": config, "class_names": class_names,
                                     "run_id": run_id, "epochs": epochs}, "checkpoint/model.pt")


EXPERIMENT_KIND, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"


def _as_uri(location: str | None) -> str | None:
    folder = local_path(location) if location else None
    return folder.resolve().as_uri() if folder is not None else location


@dataclass
class RunLog:
    """One MLflow run to log to, or none (every call is then a no-op).

    Args:
        tracker: the :class:`Tracker` of the run's store.
        run_id: the run.
    """

    tracker: Tracker | None = None
    run_id: str | None = None

    @property
    def active(self) -> bool:
        return self.tracker is not None and self.run_id is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.tracker is not None and self.run_id is not None:
            self.tracker.log_metrics(self.run_id, metrics, step)

    def log_figure(self, figure, artifact_file: str) -> None:
        if self.tracker is not None and self.run_id is not None:
            self.tracker.log_figure(self.run_id, figure, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        if self.tracker is not None and self.run_id is not None:
            self.tracker.end_run(self.run_id, status)


def exit_status(exc: BaseException | None) -> str:
    """The MLflow status of a run that ended with ``exc`` (None: it finished)."""
    if exc is None:
        return "FINISHED"
    return "KILLED" if stop_request(exc) is not None else "FAILED"


@contextmanager
def run_status(*runs: RunLog) -> Iterator[list[RunLog]]:
    """Own the end of MLflow runs: FINISHED when the block completes, KILLED on an interrupt, FAILED
    on any other exception (which propagates). Runs appended to the yielded list inside the block
    end first, in their order, then ``runs``."""
    children: list[RunLog] = []
    try:
        yield children
    except BaseException as exc:
        _end_best_effort([*children, *runs], exit_status(exc))
        raise  # the block's own error, never one from ending the runs
    ending = [*children, *runs]
    for i, r in enumerate(ending):
        try:
            r.end("FINISHED")
        except BaseException:
            _end_best_effort(ending[i + 1:], "FAILED")
            raise


def _end_best_effort(runs: list[RunLog], status: str) -> None:
    """End each run as ``status``; a store that no longer takes writes costs one warning line per run."""
    for r in runs:
        try:
            r.end(status)
        except Exception as exc:  # noqa: BLE001 - the error that ended the block is the one to report
            log.warning("could not mark MLflow run %s %s: %s", r.run_id, status, _root_cause(exc))


def _root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause (MLflow wraps the database's own error twice)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
