"""MLflow run layout: one parent run per federation, one nested child run per site, step = round.

All calls go through an explicit :class:`mlflow.MlflowClient` and explicit run ids, so several
site runs can be open at once (and, later, logged from other processes or machines).
Nesting uses the ``mlflow.parentRunId`` tag (never Lightning's MLFlowLogger holding the
parent's id: it ends the run it holds).
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

MAX_PARAM_LEN = 6000  # MLflow 3 allows long param values; keep well inside the limit


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


class Tracker:
    """Logs to one MLflow experiment.

    Args:
        tracking_uri: e.g. ``sqlite:///mlflow.db`` (the default: an embedded store, nothing to start).
        experiment: experiment name.
        artifact_location: where artifacts of a *new* experiment go, e.g. ``./mlruns``.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            loc = Path(artifact_location).expanduser().resolve().as_uri() if artifact_location else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=loc)
        else:
            self.experiment_id = exp.experiment_id

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

    def log_state_dict(self, run_id: str, state: Mapping[str, Any], artifact_file: str) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(dict(state), buf)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(buf.getvalue())
            self.client.log_artifact(run_id, str(path), str(Path(artifact_file).parent) or None)

    def log_model(self, run_id: str, model, input_example, name: str = "model") -> None:
        """Log a torch model in MLflow's pytorch flavour (loadable with ``mlflow.pytorch.load_model``).

        ``input_example`` (a numpy batch) gives the model its signature and lets MLflow trace it.
        """
        import mlflow.pytorch
        import torch

        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id, log_system_metrics=False):
            mlflow.pytorch.log_model(
                model, name=name, input_example=input_example, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"]
            )
        # start_run(...) as a context ends the run; the caller decides the final status
        self.client.update_run(run_id, status="RUNNING")


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
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


@contextmanager
def run_status(*runs: RunLog) -> Iterator[list[RunLog]]:
    """Own the end of MLflow runs: FINISHED when the block completes, KILLED on an interrupt, FAILED
    on any other exception (which propagates). Runs appended to the yielded list inside the block
    end first, in their order, then ``runs``."""
    children: list[RunLog] = []
    try:
        yield children
    except BaseException as exc:
        for r in [*children, *runs]:
            r.end(exit_status(exc))
        raise
    for r in [*children, *runs]:
        r.end("FINISHED")
