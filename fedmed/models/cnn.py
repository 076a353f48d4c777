"""Compact CNN: conv blocks (three by default: 32/64/64) with max-pooling and a dense head. 2D or 3D."""

from __future__ import annotations

from collections import OrderedDict

import torch
from monai.networks.layers import Conv, Dropout, Norm, Pool
from torch import nn

NORMS = ("batch", "group")
#: from this input side up, the ``auto`` settings stride the stem and add a fourth, wider block
LARGE_INPUT = 96


class CompactCNN(nn.Module):
    """Three conv blocks (conv3 -> BN -> ReLU -> maxpool), then a dense head.

    The network returns logits; :meth:`fedmed.models.classifier.Classifier.predict_proba`
    gives the softmax output. An adaptive pool before the head makes it work on any input
    size >= 8 (28x28 maps to 3x3 without resampling).

    Args:
        in_channels: image channels (1 for grey, 3 for RGB).
        num_classes: number of output classes.
        spatial_dims: 2 for images, 3 for volumes.
        channels: widths of the conv blocks, one block per entry. ``"auto"`` gives three
            (32/64/64) below 96 px and four (32/64/128/256) from 96 px up: at 128 px three
            blocks end on 8x8 maps that see about a quarter of the image (the docs' Results page
            compares both on brain MRI).
        hidden: width of the dense hidden layer.
        dropout: dropout before the last layer.
        stem_stride: stride of the first convolution. ``"auto"`` uses 2 when ``image_size`` >= 96:
            at 128 px a stride-1 first block spends most of the step on full-resolution maps and
            sees only a 22 px neighbourhood (``benchmarks/pipeline_bench.py`` measures the step).
        image_size: input side length, used by ``stem_stride="auto"``.
        norm: ``"batch"`` (BatchNorm) or ``"group"`` (GroupNorm with ``norm_groups`` groups).
            GroupNorm normalises each image on its own, so it has no batch or running statistics
            for sites with different label mixes to disagree on (Hsieh et al., ICML 2020).
        norm_groups: groups of the GroupNorm layers (capped at the channel count).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        spatial_dims: int = 2,
        channels: tuple[int, ...] | str = (32, 64, 64),
        hidden: int = 128,
        dropout: float = 0.3,
        stem_stride: int | str = 1,
        image_size: int | None = None,
        norm: str = "batch",
        norm_groups: int = 8,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        large = image_size is not None and image_size >= LARGE_INPUT
        if stem_stride == "auto":
            stem_stride = 2 if large else 1
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1, 2 or 'auto', got {stem_stride!r}")
        if channels == "auto":
            channels = (32, 64, 128, 256) if large else (32, 64, 64)
        if isinstance(channels, str) or len(channels) == 0:
            raise ValueError(f"channels must be 'auto' or a list of conv block widths, got {channels!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        conv = Conv[Conv.CONV, spatial_dims]
        pool = Pool[Pool.MAX, spatial_dims]
        blocks, c_in = [], in_channels
        for i, c_out in enumerate(channels, start=1):
            block = nn.Sequential()
            stride = stem_stride if i == 1 else 1
            block.add_module("conv", conv(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False))
            block.add_module("norm", Norm[Norm.BATCH, spatial_dims](c_out) if norm == "batch"
                             else nn.GroupNorm(min(norm_groups, c_out), c_out))
            block.add_module("act", nn.ReLU())  # not in-place: CAM hooks read this output
            block.add_module("pool", pool(2))
            blocks.append((f"block{i}", block))
            c_in = c_out
        self.features = nn.Sequential(OrderedDict(blocks))
        #: layer(s) whose activations the Grad-CAM family uses: the last block's rectified maps
        #: (non-negative, as CAMs assume; the raw conv output gives all-zero maps for some classes)
        self.target_layers = (f"features.block{len(channels)}.act",)
        grid = (3,) * spatial_dims
        self.head = nn.Sequential(
            Pool[Pool.ADAPTIVEAVG, spatial_dims](grid),  # (B,channels[-1],3,3[,3])
            nn.Flatten(),
            nn.Linear(c_in * 3**spatial_dims, hidden),
            nn.ReLU(inplace=True),
            Dropout[Dropout.DROPOUT, 1](dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,C,H,W[,D]) -> (B,num_classes)
        return self.head(self.features(x))
