"""The logged model as MLflow serves it: raw PneumoniaMNIST images in, class probabilities out,
equal to fedmed's own evaluation of the same network; and the names of class metrics."""

import math

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from fedmed.build import build_module
from fedmed.config import compose
from fedmed.data.datamodule import Pipeline
from fedmed.models.metrics import compute_metrics, make_metrics, metric_key, name_classes
from fedmed.tasks import fit
from tests.conftest import PNEUMONIA, needs


@needs(PNEUMONIA)
def test_logged_pyfunc_takes_raw_images_and_matches_fedmed_evaluation(tmp_path, isolated):
    cfg = compose("fit", [*isolated, "experiment=smoke", "federation.rounds=1", "privacy.audit=none"])
    res = fit.run(cfg)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"runs:/{res['run_id']}/model")
    names = ["normal", "pneumonia"]
    assert model.metadata.signature.outputs.input_names() == [*names, "predicted"]
    assert model.metadata.saved_input_example_info is not None

    with np.load(PNEUMONIA) as npz:
        raw, labels = npz["test_images"][:96], npz["test_labels"][:96, 0]
    assert raw.dtype == np.uint8 and raw.shape == (96, 28, 28)
    out = model.predict(raw)
    assert list(out.columns) == [*names, "predicted"] and len(out) == len(raw)
    probs = out[names].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert out["predicted"].tolist() == [names[i] for i in probs.argmax(1)]

    # fedmed's evaluation path: the run's weights on the preprocessed test split, the same images
    ckpt = torch.load(MlflowClient(store).download_artifacts(res["run_id"], "checkpoint/model.pt", str(tmp_path)),
                      weights_only=False)
    pipeline = Pipeline.from_config(cfg.data)
    test = pipeline.dataset("test", np.arange(len(raw)))
    assert test.y.tolist() == labels.tolist()
    net = build_module(cfg).net
    net.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        expected = net.eval()(test.x).softmax(-1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)

    # the same model outside MLflow's input check: channels last, and float pixels on the file's scale
    inner = model.unwrap_python_model()
    np.testing.assert_allclose(inner.predict(None, raw[..., None])[names].to_numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(inner.predict(None, raw.astype(np.float32))[names].to_numpy(), expected,
                               rtol=0, atol=1e-5)


def test_per_class_metrics_take_the_class_names():
    assert metric_key("normal+benign") == "normal_benign"
    assert metric_key("cancer-associated stroma") == "cancer-associated_stroma"
    metrics = {"acc": 0.5, "f1_class0": 0.1, "recall_class1": 0.2, "f1_class7": 0.3}
    named = name_classes(metrics, ["normal", "pneumonia"])
    assert named == {"acc": 0.5, "f1_normal": 0.1, "recall_pneumonia": 0.2, "f1_class7": 0.3}
    assert name_classes({"f1_class0": 0.1, "f1_class1": 0.2}, ["a b", "a/b"]) == {"f1_a_b_0": 0.1, "f1_a_b_1": 0.2}
    assert name_classes({"f1_class0": 0.1}, None) == {"f1_class0": 0.1}


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("case", ["all classes", "a class never labelled but predicted", "one class only"])
def test_balanced_accuracy_is_scikit_learns(case):
    from sklearn.metrics import balanced_accuracy_score, recall_score

    g = torch.Generator().manual_seed(7)
    k, n = 3, 120
    y = torch.randint(0, 2 if case != "all classes" else k, (n,), generator=g)
    if case == "one class only":
        y = torch.ones(n, dtype=torch.long)
    logits = torch.randn(n, k, generator=g) + 1.0 * torch.nn.functional.one_hot(y, k)
    if case == "a class never labelled but predicted":
        logits[:, k - 1] += 1.0
    m = make_metrics(k)
    m.update(logits.softmax(-1), y)
    scalars, _ = compute_metrics(m)
    yn, pred = y.numpy(), logits.argmax(-1).numpy()
    assert scalars["balanced_acc"] == pytest.approx(balanced_accuracy_score(yn, pred), rel=1e-6)
    recalls = recall_score(yn, pred, average=None, labels=list(range(k)), zero_division=0)
    assert [scalars[f"recall_class{i}"] for i in range(k)] == pytest.approx(recalls, rel=1e-6, abs=1e-7)
    if case == "all classes":
        assert scalars["balanced_acc"] == pytest.approx(scalars["recall"], rel=1e-6)
    assert not math.isnan(scalars["balanced_acc"])
