"""DenseNet variant built from MONAI's DenseNet, with a stem that suits 28x28 inputs."""

from __future__ import annotations

from monai.networks.layers import Conv
from monai.networks.nets import DenseNet
from torch import nn


class SmallInputDenseNet(DenseNet):
    """MONAI DenseNet whose stem keeps resolution on small images.

    MONAI's DenseNet121 stem (7x7 conv stride 2 + max-pool) and three transitions shrink a
    28x28 image to 0x0. With ``small_input=True`` the stem is a 3x3 stride-1 conv with no
    pooling, and the default three dense blocks (two transitions) take 28 -> 14 -> 7.
    With ``small_input=False`` it is MONAI's standard stem, for 128 px and up.

    Args:
        in_channels: image channels.
        num_classes: number of output classes.
        spatial_dims: 2 or 3.
        init_features: stem width.
        growth_rate: features added per dense layer.
        block_config: dense layers per block.
        small_input: replace the stem as above; ``"auto"`` does so when ``image_size`` < 64
            (at 64 px the small stem keeps full resolution, which is much slower on CPU).
        image_size: input side length, used by ``small_input="auto"``.
        dropout: dropout inside dense layers.
    """

    #: the final rectified feature maps (MONAI's class_layers.relu), as CAMs assume
    target_layers = ("class_layers.relu",)

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        spatial_dims: int = 2,
        init_features: int = 32,
        growth_rate: int = 16,
        block_config: tuple[int, ...] = (4, 8, 6),
        small_input: bool | str = "auto",
        image_size: int | None = None,
        dropout: float = 0.0,
    ):
        if small_input == "auto":
            small_input = image_size is None or image_size < 64
        elif not isinstance(small_input, bool):
            raise ValueError(f"small_input must be true, false or 'auto', got {small_input!r}")
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=num_classes,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=tuple(block_config),
            dropout_prob=dropout,
        )
        self.class_layers.relu = nn.ReLU()  # not in-place: CAM hooks read this output
        if small_input:
            conv = Conv[Conv.CONV, spatial_dims]
            self.features.conv0 = conv(in_channels, init_features, kernel_size=3, stride=1, padding=1, bias=False)
            self.features.pool0 = nn.Identity()
