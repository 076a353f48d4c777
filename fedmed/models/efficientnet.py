"""EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``): a mobile-sized ImageNet network, to start from
pretrained weights (``model.pretrained``, :mod:`fedmed.models.pretrained`)."""

from __future__ import annotations

import torch
from torch import nn

#: ImageNet's channel means and standard deviations, which the pretrained weights expect
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan and Le, 2019; the Lite variant: ReLU6, no squeeze-excitation) for 2D images.

    Inputs in [0, 1] are normalised with ImageNet's channel statistics inside the network (a grey image
    with their mean), so pretrained weights see what they were trained on, and a model rebuilt from a
    checkpoint needs no extra preprocessing step.

    Args:
        in_channels: 1 or 3 (pretrained weights for 1 channel sum the stem over RGB).
        num_classes: number of output classes.
        spatial_dims: 2 only.
        dropout: dropout before the classifier.
        image_size: input side length (any size from 32 px works; unused otherwise).
    """

    #: the final rectified feature maps (timm's ``bn2``, BatchNorm then ReLU6), as CAMs assume
    target_layers = ("body.bn2",)

    def __init__(self, in_channels: int = 3, num_classes: int = 2, spatial_dims: int = 2, dropout: float = 0.2,
                 image_size: int | None = None):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"EfficientNetLite0 is a 2D network; spatial_dims={spatial_dims}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        import timm  # only where this network is used

        self.body = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes,
                                      in_chans=in_channels, drop_rate=dropout)
        mean = torch.tensor(IMAGENET_MEAN if in_channels == 3 else (sum(IMAGENET_MEAN) / 3,))
        std = torch.tensor(IMAGENET_STD if in_channels == 3 else (sum(IMAGENET_STD) / 3,))
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)
