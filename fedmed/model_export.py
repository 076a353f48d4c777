"""The trained network as an MLflow pyfunc model: raw images in, class probabilities out.

:class:`ImageClassifier` holds the network's Hydra config and its weights (an artifact,
``weights.pt``), the dataset's preprocessing config and the class names. Its ``predict`` takes
images as the dataset's files hold them and applies the deterministic preprocessing fedmed
evaluates with (:func:`fedmed.data.transforms.deterministic_transforms`), so that::

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")
    model.predict(images)   # images: (N, H, W) or (N, H, W, C), e.g. the uint8 arrays of a MedMNIST npz

returns a DataFrame with one probability column per class and ``predicted``, the most probable
class's name. The model carries a copy of the ``fedmed`` package (MLflow ``code_paths``), so it
loads wherever its pip requirements are installed.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from torch import nn

from fedmed.errors import FedmedError

#: the column that names the most probable class
PREDICTED = "predicted"
#: what the model needs installed besides the fedmed code it carries
REQUIREMENTS = ("torch", "monai", "hydra-core", "omegaconf", "numpy", "pandas", "mlflow")


class ImageClassifier(PythonModel):
    """A fedmed network with its preprocessing, as an MLflow pyfunc model.

    Args:
        net_config: the network's Hydra node (``model.net``, resolved), with its ``_target_``.
        transforms: the dataset's preprocessing config (``data.transforms``, resolved); its
            ``augment`` part is training-only and not used.
        class_names: class names in label order; the output's columns.
        spatial_dims: 2 for images, 3 for volumes.
        dp_compatible: the network was trained with DP-SGD, i.e. with the layers Opacus cannot
            train replaced (BatchNorm -> GroupNorm); rebuilt the same way.
    """

    def __init__(self, net_config: Mapping[str, Any], transforms: Mapping[str, Any], class_names: Sequence[str],
                 spatial_dims: int = 2, dp_compatible: bool = False):
        self.net_config = dict(net_config)
        self.transforms = dict(transforms)
        self.class_names = [str(c) for c in class_names]
        self.spatial_dims = int(spatial_dims)
        self.dp_compatible = bool(dp_compatible)
        self.net: nn.Module | None = None
        self._preprocess: Any = None

    # -- MLflow's hooks ---------------------------------------------------------------------
    def load_context(self, context) -> None:
        self.load(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Class probabilities of raw images: one column per class name, and ``predicted``.

        Args:
            model_input: (N, H, W) or (N, H, W, C) images for a 2D model, (N, D, H, W) or
                (N, D, H, W, C) volumes for a 3D one, uint8 or float on the scale of the dataset's
                files (0..255 for 8-bit images; ``data.transforms.intensity`` rescales as in
                training); or a sequence of single images of different sizes, if the
                preprocessing resizes them.
        """
        probs = self.probabilities(model_input)
        out = pd.DataFrame(probs, columns=self.class_names)
        out[PREDICTED] = [self.class_names[i] for i in probs.argmax(1)]
        return out

    # -- the same, without MLflow ---------------------------------------------------------------
    def load(self, state_dict: Mapping[str, torch.Tensor]) -> ImageClassifier:
        """Build the network from its config and load ``state_dict`` (strictly: same architecture)."""
        from fedmed.models.registry import model_class

        args = {k: v for k, v in self.net_config.items() if k != "_target_"}
        nested = [k for k, v in args.items() if isinstance(v, Mapping) or str(k).startswith("_")]
        if nested:
            raise FedmedError(f"model.net.{nested[0]}: a logged model's network takes plain arguments")
        net = model_class(self.net_config.get("_target_"), "model.net._target_")(**args)
        if self.dp_compatible:
            from opacus.validators import ModuleValidator

            net = ModuleValidator.fix(net)
        net.load_state_dict(dict(state_dict))
        self.net = net.eval()
        return self

    def preprocess(self, images: Any) -> torch.Tensor:
        """Raw images -> the model's input batch (B, C, *spatial) float32, as fedmed evaluates."""
        from fedmed.data.preprocessing import Preprocessing
        from fedmed.data.transforms import deterministic_transforms

        if self._preprocess is None:
            self._preprocess = deterministic_transforms(Preprocessing.from_config(self.transforms), self.spatial_dims)
        batch = [self._channel_first(np.asarray(x)) for x in _images(images)]
        return torch.stack([self._preprocess({"image": x})["image"] for x in batch]) if batch else torch.empty(0)

    @torch.no_grad()
    def probabilities(self, images: Any) -> np.ndarray:
        """(N, classes) softmax probabilities of raw images."""
        if self.net is None:
            raise RuntimeError("ImageClassifier has no weights: call load(state_dict) or load it with mlflow")
        x = self.preprocess(images)
        if len(x) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return torch.cat([self.net(b).softmax(-1) for b in x.split(256)]).numpy()

    def _channel_first(self, image: np.ndarray) -> np.ndarray:
        """One image as the source hands it to the preprocessing: channel-first float32 on the file's scale."""
        rank = image.ndim - self.spatial_dims  # 0: no channel axis, 1: channels last
        if rank == 0:
            return image[None].astype(np.float32)
        if rank == 1 and image.shape[-1] in (1, 3, 4):
            return np.moveaxis(image, -1, 0).astype(np.float32)
        raise ValueError(f"an image of shape {image.shape}: expected {self.spatial_dims} spatial axes, "
                         "optionally followed by 1, 3 or 4 channels")


def _images(images: Any) -> list[np.ndarray]:
    if isinstance(images, pd.DataFrame):  # a pyfunc caller may hand over a frame of images
        images = list(images.iloc[:, 0])
    if isinstance(images, np.ndarray) and images.dtype != object:
        return list(images)
    return [np.asarray(x) for x in images]


def raw_examples(source, split: str = "test", n: int = 2) -> np.ndarray:
    """The first ``n`` images of ``split`` as the dataset's files hold them: (n, H, W[, C]).

    An npz source (MedMNIST) gives its arrays; a file source, its decoded files (uint8 where the
    pixels are 8-bit), which must then share one shape (else only the first image is taken).
    """
    if hasattr(source, "images"):
        return np.asarray(source.images(split)[:n])
    loader = source.loader()
    items = source.items(split, np.arange(min(n, len(source.labels(split)))))
    images = []
    for it in items:
        x = np.asarray(loader(it)["image"] if loader is not None else it["image"])  # channel-first
        x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
        if np.all((x >= 0) & (x <= 255) & (x == np.round(x))):
            x = x.astype(np.uint8)
        images.append(x)
    if len({x.shape for x in images}) > 1:
        images = images[:1]
    return np.stack(images)


def log_pyfunc(tracking_uri: str, experiment_id: str, run_id: str, model: ImageClassifier,
               state_dict: Mapping[str, torch.Tensor], example: np.ndarray, name: str = "model",
               resizes: bool = False) -> str:
    """Log ``model`` with ``state_dict`` to ``run_id`` as an MLflow pyfunc model; returns its model URI.

    The signature comes from ``example`` (raw images) and the model's output on it; with
    ``resizes`` (the preprocessing resizes every image) its image axes take any size.
    The run is left RUNNING: the caller ends it.
    """
    from mlflow import MlflowClient, pyfunc
    from mlflow.models import infer_signature
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    import fedmed

    output = model.load(state_dict).predict(None, example)
    signature = infer_signature(example, output)
    if resizes:
        spec = signature.inputs.inputs[0]
        signature = ModelSignature(Schema([TensorSpec(spec.type, (-1,) * (1 + model.spatial_dims)
                                                      + tuple(spec.shape[1 + model.spatial_dims:]))]),
                                   signature.outputs)
    requirements = [_pinned(p) for p in REQUIREMENTS]
    net, model.net, model._preprocess = model.net, None, None  # the weights travel as an artifact, not in the pickle
    try:
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "weights.pt"
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, weights)
            mlflow.set_tracking_uri(tracking_uri)
            with (mlflow.start_run(run_id=run_id, experiment_id=experiment_id, log_system_metrics=False),
                  _quiet_mlflow()):
                info = pyfunc.log_model(
                    name=name, python_model=model, artifacts={"weights": str(weights)},
                    code_paths=[str(Path(fedmed.__file__).parent)], signature=signature, input_example=example,
                    pip_requirements=requirements, metadata={"class_names": model.class_names})
    finally:
        model.net = net
    # start_run(...) as a context ends the run; the caller decides the final status
    MlflowClient(tracking_uri=tracking_uri).update_run(run_id, status="RUNNING")
    return info.model_uri


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Leave out MLflow's notes on every pyfunc model it logs: that the model object is pickled (it
    holds the configs and class names; the weights are an artifact) and that it checks the input
    example."""
    drop = _DropMessages("Passing a Python object as `python_model`", "Validating input example")
    logger = logging.getLogger("mlflow.pyfunc")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _pinned(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{package}=={version(package).split('+')[0]}"
    except PackageNotFoundError:
        return package
