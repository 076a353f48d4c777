"""Networks, and the Lightning classifier that wraps any of them.

A run's network is chosen by Hydra: ``model.net._target_`` names the class (``configs/model/*.yaml``,
e.g. ``fedmed.models.CompactCNN``) and the rest of ``model.net`` are its arguments.
"""

from fedmed.models.cnn import CompactCNN
from fedmed.models.densenet import SmallInputDenseNet
from fedmed.models.efficientnet import EfficientNetLite0

__all__ = ["CompactCNN", "EfficientNetLite0", "SmallInputDenseNet"]
