"""fedmed's messages as Flower records: every kind crosses Flower's own serialization bit for bit."""

import math

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedmed.federated.compression import CODECS, UpdateEncoder
from fedmed.federated.messages import EvalResult, FitResult
from fedmed.flower import records


def over_the_wire(content: RecordDict) -> RecordDict:
    """What the other end reads: every object deflated to bytes, as the SuperLink stores them, and inflated."""
    blobs = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    out = inflate_object_from_contents(content.object_id, blobs)
    assert isinstance(out, RecordDict)
    return out


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
            "bn.running_mean": torch.randn(4, generator=g), "bn.running_var": torch.rand(4, generator=g),
            "bn.num_batches_tracked": torch.tensor(2**40 + 7, dtype=torch.int64),
            "head.weight": torch.randn(3, 2, generator=g).t(),  # not contiguous
            "half": torch.randn(5, generator=g).half(), "bytes": torch.arange(7, dtype=torch.uint8),
            "mask": torch.tensor([True, False]), "small": torch.tensor([-5, 3], dtype=torch.int8),
            "empty": torch.zeros(0, 3), "idx": torch.tensor([1, 2], dtype=torch.int32)}


def same(a, b) -> None:
    """Equal bit for bit: the same types, dtypes, shapes, keys in the same order, values (NaN included)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8))
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b) and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, float):
        assert math.copysign(1, a) == math.copysign(1, b) and (a == b or (math.isnan(a) and math.isnan(b)))
    else:
        assert a == b


def same_fit(a: FitResult, b: FitResult) -> None:
    for field in ("site", "weights", "num_samples", "metrics", "extras", "payload", "masked", "wire_bytes"):
        same(getattr(a, field), getattr(b, field))


def test_a_state_dict_crosses_bit_for_bit():
    want = state()
    got = records.record_state(over_the_wire(RecordDict({"w": records.state_record(want)})).array_records["w"])
    same(want, got)


def test_fit_results_of_every_kind_cross_bit_for_bit():
    w = state()
    plain = FitResult("hospital_a", w, 123, {"loss": 0.25, "nan": float("nan"), "neg0": -0.0, "steps": 2**40},
                      {"scaffold_delta_c": {k: v * 2 for k, v in w.items() if v.is_floating_point()}, "steps": 17},
                      wire_bytes=99)
    rng = np.random.default_rng(0)
    masked = FitResult("hospital_b", {}, 7, {"loss": 1.5}, masked=rng.integers(0, 2**64, 1000, dtype=np.uint64,
                                                                               endpoint=False))
    assert masked.masked.max() >= 2**63  # the full 64-bit range, not only what int64 holds
    results = [plain, masked]
    nonempty = {k: v for k, v in w.items() if v.numel()}
    for codec in CODECS:
        start = {k: v - 0.01 if v.is_floating_point() else v for k, v in nonempty.items()}
        payload = UpdateEncoder(codec, fraction=0.3).encode(nonempty, start)
        results.append(FitResult("hospital_c", {}, 5, {}, {}, payload=payload))
    for want in results:
        same_fit(want, records.records_fit_result(over_the_wire(records.fit_result_records(want))))


def test_evaluations_cross_bit_for_bit():
    full = EvalResult("hospital_a", 40, {"loss": 0.5, "auroc": float("nan")}, torch.tensor([[3, 1], [2, 9]]),
                      torch.rand(2, 7, 7))
    bare = EvalResult("hospital_b", 3, {"loss": 0.1})
    for want in (full, bare):
        got = records.records_eval_result(over_the_wire(records.eval_result_records(want)))
        for field in ("site", "num_samples", "metrics", "confmat", "xai_summary"):
            same(getattr(want, field), getattr(got, field))


def test_requests_cross_with_every_strategy_instruction():
    w = state()
    instructions = {"scaffold_c": {k: torch.zeros_like(v) for k, v in w.items()}, "sgd_lr": 0.01, "prox_mu": 0.1,
                    "local_keys": ["bn.running_mean", "bn.running_var"],
                    "secagg": {"round": 3, "peers": {"hospital_a": bytes(range(32)), "hospital_b": b"\xff" * 32},
                               "pooled_bn": True}}
    got_w, r, epochs, got_i = records.read_fit_request(over_the_wire(records.fit_request(w, 3, 2, instructions)))
    same(w, got_w)
    same(instructions, got_i)
    assert (r, epochs) == (3, 2)
    got_w, r, explain = records.read_evaluate_request(over_the_wire(records.evaluate_request(w, 4, True)))
    same(w, got_w)
    assert (r, explain) == (4, True)


def test_site_state_trees_keep_int_keys_tuples_none_and_numpy_scalars():
    want = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3)}},
                          "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "foreach": None}]},
            "dp": {"history": [(1.1, 0.01, 30), (1.1, 0.01, 30)], "noise_multiplier": 1.1, "sample_rate": 0.01},
            "scalars": [np.float32(0.1), np.int64(-3), np.uint64(2**64 - 1), np.bool_(True)],
            "xai_prev": None, "flag": False, "blob": b"\x00\x01", "big": -(2**63)}
    content = RecordDict()
    records.put_tree(content, "state", want)
    same(want, records.get_tree(over_the_wire(content), "state"))


@pytest.mark.parametrize("bad", [{"w": torch.zeros(2, dtype=torch.bfloat16)}, {"n": 2**64}, {"o": object()},
                                 {(1, 2): 3}, {"d": np.zeros(2, dtype=object)}])
def test_what_cannot_cross_is_refused(bad):
    with pytest.raises(ValueError):
        records.put_tree(RecordDict(), "x", bad)


def test_malformed_records_are_a_value_error():
    content = records.fit_result_records(FitResult("s", state(), 1, {}))
    content.config_records["extras.values"]["layout"] = '["tensor", "a99"]'
    with pytest.raises(ValueError, match="malformed extras"):
        records.records_fit_result(content)
    with pytest.raises(ValueError, match="not a fit result"):
        records.records_fit_result(RecordDict())
