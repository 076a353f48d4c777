"""fedmed's messages as Flower records, bit for bit.

A Flower ``Message`` carries a ``RecordDict`` of three kinds of record: ``ArrayRecord`` (arrays,
written with ``numpy.save``: every dtype and shape exactly, never a pickle), ``ConfigRecord``
(bools, 64-bit ints and floats, strings, bytes) and ``MetricRecord`` (ints and floats).
fedmed's messages map onto them:

| fedmed | records |
|---|---|
| weights (a state dict) | an ``ArrayRecord`` keyed by parameter name |
| metrics | a ``MetricRecord`` |
| site, sample counts, round, epochs | a ``ConfigRecord`` |
| anything nested: strategy instructions and extras, a compressed payload, a masked vector, site state | a *tree* |

A tree is stored under one prefix as two records: ``<prefix>.arrays`` holds its tensors, numpy
arrays and numpy scalars, ``<prefix>.values`` its plain values and its ``layout`` (JSON: which
leaf is where, dicts with str or int keys, lists, tuples, None). Tensors keep their dtype
(int64 buffers too), numpy arrays theirs (masked uint64 vectors), numpy scalars stay numpy
scalars, tuples stay tuples; floats travel as doubles and ints as int64, so nothing is rounded.
bfloat16 tensors (numpy has no such dtype) and ints beyond int64 are refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmed.federated.messages import EvalResult, FitResult

INT64 = (-(2**63), 2**63 - 1)
LAYOUT = "layout"


# -- leaves ------------------------------------------------------------------------------------
def tensor_array(t: torch.Tensor) -> Array:
    """A tensor as a Flower ``Array`` (CPU, its own dtype and shape)."""
    if t.dtype == torch.bfloat16:
        raise ValueError("a bfloat16 tensor cannot travel in a Flower record (numpy has no bfloat16)")
    return Array(t.detach().cpu().numpy())


def array_tensor(a: Array) -> torch.Tensor:
    return torch.from_numpy(_ndarray(a))


def _ndarray(a: Array) -> np.ndarray:
    out = a.numpy()
    return out if out.flags.writeable else out.copy()


def state_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as an ``ArrayRecord`` keyed by parameter name, in its order."""
    record = ArrayRecord()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{k} is a {type(v).__name__}, not a tensor")
        record[k] = tensor_array(v)
    return record


def record_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: array_tensor(a) for k, a in record.items()}


# -- trees -------------------------------------------------------------------------------------
class _Packer:
    """Walks a nested object, putting its leaves into an ``ArrayRecord`` and a dict of values."""

    def __init__(self) -> None:
        self.arrays = ArrayRecord()
        self.values: dict[str, Any] = {}

    def _array(self, a: Array) -> str:
        ref = f"a{len(self.arrays)}"
        self.arrays[ref] = a
        return ref

    def _value(self, v: bool | int | float | str | bytes) -> str:
        if isinstance(v, int) and not isinstance(v, bool) and not INT64[0] <= v <= INT64[1]:
            raise ValueError(f"the int {v} does not fit in 64 bits")
        ref = f"v{len(self.values)}"
        self.values[ref] = v
        return ref

    def node(self, obj: Any) -> list:
        if obj is None:
            return ["none"]
        if isinstance(obj, torch.Tensor):
            return ["tensor", self._array(tensor_array(obj))]
        if isinstance(obj, np.ndarray):
            return ["array", self._array(Array(obj))]
        if isinstance(obj, np.generic):  # before float: numpy's float64 is a float
            return ["npscalar", self._array(Array(np.asarray(obj)))]
        if isinstance(obj, (bool, int, float, str, bytes)):
            return ["value", self._value(obj)]
        if isinstance(obj, Mapping):
            return ["dict", [[_key(k), self.node(v)] for k, v in obj.items()]]
        if isinstance(obj, (list, tuple)):
            return ["tuple" if isinstance(obj, tuple) else "list", [self.node(v) for v in obj]]
        raise ValueError(f"a {type(obj).__name__} cannot travel in a Flower record")


def _key(k: Any) -> str | int:
    if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise ValueError(f"dict key {k!r}: only str and int keys can travel in a Flower record")
    return k


def put_tree(content: RecordDict, prefix: str, obj: Any) -> None:
    """Store ``obj`` (nested dicts, lists, tuples of tensors, arrays and plain values) under ``prefix``."""
    packer = _Packer()
    layout = packer.node(obj)
    content[f"{prefix}.arrays"] = packer.arrays
    content[f"{prefix}.values"] = ConfigRecord({**packer.values, LAYOUT: json.dumps(layout)})


def get_tree(content: RecordDict, prefix: str) -> Any:
    """The object :func:`put_tree` stored under ``prefix``; ``ValueError`` if it is missing or malformed."""
    try:
        arrays, values = content.array_records[f"{prefix}.arrays"], content.config_records[f"{prefix}.values"]
        return _unpack(json.loads(str(values[LAYOUT])), arrays, values)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed {prefix} records: {type(exc).__name__}: {exc}") from None


def has_tree(content: RecordDict, prefix: str) -> bool:
    return f"{prefix}.values" in content.config_records


def _unpack(node: list, arrays: ArrayRecord, values: ConfigRecord) -> Any:
    kind = node[0]
    if kind == "none":
        return None
    if kind == "tensor":
        return array_tensor(arrays[node[1]])
    if kind == "array":
        return _ndarray(arrays[node[1]])
    if kind == "npscalar":
        return _ndarray(arrays[node[1]])[()]
    if kind == "value":
        return values[node[1]]
    if kind == "dict":
        return {k: _unpack(v, arrays, values) for k, v in node[1]}
    if kind in ("list", "tuple"):
        items = [_unpack(v, arrays, values) for v in node[1]]
        return tuple(items) if kind == "tuple" else items
    raise ValueError(f"unknown layout node {kind!r}")


# -- requests ----------------------------------------------------------------------------------
def fit_request(weights: Mapping[str, torch.Tensor], round_idx: int, epochs: int,
                instructions: Mapping[str, Any] | None) -> RecordDict:
    content = RecordDict({"weights": state_record(weights), "round": ConfigRecord({"round": round_idx,
                                                                                  "epochs": epochs})})
    put_tree(content, "instructions", dict(instructions or {}))
    return content


def read_fit_request(content: RecordDict) -> tuple[dict[str, torch.Tensor], int, int, dict[str, Any]]:
    """(weights, round, epochs, instructions) of a fit request."""
    cfg = content.config_records["round"]
    return (record_state(content.array_records["weights"]), config_int(cfg, "round"), config_int(cfg, "epochs"),
            get_tree(content, "instructions"))


def evaluate_request(weights: Mapping[str, torch.Tensor], round_idx: int, explain: bool) -> RecordDict:
    return RecordDict({"weights": state_record(weights),
                       "round": ConfigRecord({"round": round_idx, "explain": bool(explain)})})


def read_evaluate_request(content: RecordDict) -> tuple[dict[str, torch.Tensor], int, bool]:
    """(weights, round, explain) of an evaluate request."""
    cfg = content.config_records["round"]
    return record_state(content.array_records["weights"]), config_int(cfg, "round"), bool(cfg["explain"])


def config_int(record: ConfigRecord, key: str) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} is a {type(value).__name__}, not an int")
    return value


# -- results -----------------------------------------------------------------------------------
def metric_record(metrics: Mapping[str, Any]) -> MetricRecord:
    """Metrics as a ``MetricRecord``; numpy scalars become the Python number of the same value."""
    return MetricRecord({k: v.item() if isinstance(v, np.generic) else v for k, v in metrics.items()})


def record_metrics(record: MetricRecord) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in record.items():
        if not isinstance(v, (int, float)):
            raise ValueError(f"metric {k} is a {type(v).__name__}, not a number")
        out[k] = v
    return out


def fit_result_records(result: FitResult) -> RecordDict:
    content = RecordDict({"fit": ConfigRecord({"site": result.site, "num_samples": result.num_samples,
                                               "wire_bytes": result.wire_bytes}),
                          "metrics": metric_record(result.metrics), "weights": state_record(result.weights)})
    put_tree(content, "extras", result.extras)
    put_tree(content, "payload", result.payload)
    put_tree(content, "masked", result.masked)
    return content


def records_fit_result(content: RecordDict) -> FitResult:
    """The site's :class:`FitResult`; ``ValueError`` if the records are not one."""
    try:
        cfg = content.config_records["fit"]
        return FitResult(str(cfg["site"]), record_state(content.array_records["weights"]),
                         config_int(cfg, "num_samples"), record_metrics(content.metric_records["metrics"]),
                         get_tree(content, "extras"), get_tree(content, "payload"), get_tree(content, "masked"),
                         config_int(cfg, "wire_bytes"))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a fit result: {type(exc).__name__}: {exc}") from None


def eval_result_records(result: EvalResult) -> RecordDict:
    content = RecordDict({"evaluate": ConfigRecord({"site": result.site, "num_samples": result.num_samples}),
                          "metrics": metric_record(result.metrics)})
    put_tree(content, "maps", {"confmat": result.confmat, "xai_summary": result.xai_summary})
    return content


def records_eval_result(content: RecordDict) -> EvalResult:
    """The site's :class:`EvalResult`; ``ValueError`` if the records are not one."""
    try:
        cfg, maps = content.config_records["evaluate"], get_tree(content, "maps")
        return EvalResult(str(cfg["site"]), config_int(cfg, "num_samples"),
                          record_metrics(content.metric_records["metrics"]), maps["confmat"], maps["xai_summary"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not an evaluation: {type(exc).__name__}: {exc}") from None
