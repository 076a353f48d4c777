"""fedmed's own networks by name: the only classes a model from elsewhere (a checkpoint) is rebuilt from."""

from __future__ import annotations

from fedmed.errors import FedmedError
from fedmed.models.cnn import CompactCNN
from fedmed.models.densenet import SmallInputDenseNet
from fedmed.models.efficientnet import EfficientNetLite0

MODELS: tuple[type, ...] = (CompactCNN, SmallInputDenseNet, EfficientNetLite0)


def class_names(classes: tuple[type, ...]) -> dict[str, type]:
    """Every name a config may give a class by: where it is defined, and its package's export."""
    out = {}
    for cls in classes:
        out[f"{cls.__module__}.{cls.__qualname__}"] = cls
        out[f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__qualname__}"] = cls
    return out


def model_class(target: object, key: str) -> type:
    """The fedmed network ``target`` names; anything else is refused, naming ``key``, before it is imported."""
    known = class_names(MODELS)
    if not isinstance(target, str) or target not in known:
        raise FedmedError(f"{key}={target!r} is not one of fedmed's networks ({', '.join(sorted(known))}); a model "
                          "from elsewhere is rebuilt only from those")
    return known[target]
