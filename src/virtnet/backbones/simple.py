"""SimpleConvNet, the Mini-ImageNet backbone of Deep Elastic Networks (Kim et al., 2019, Sec. 4.1):
"four 3x3 convolutional layers (32 filters) and three fully connected layers (128 dimensions for hidden
units)", taken from Routing Networks (Rosenbaum et al., 2018).

Layout (channels x ``width``)::

    stem (per task):  conv3x3(32, stride by input size) - BN - ReLU
    trunk (shared):   maxpool - [conv3x3(32) - BN - ReLU - maxpool] x 3 - flatten
                      - FC1(128) - ReLU - FC2(128) - ReLU           -> (B, 128)
    head (per task):  FC3(num_outputs)

Each convolution is followed by a 2x2 max-pool, as in the four-block network of the few-shot literature
the paper cites; its FLOPs confirm it (84x84 inputs: 6.1M + 16.3M + 4.1M + 0.9M multiply-adds for the
convolutions, 27.46M with the FC layers, against the paper's 27.4M "FLOPs"). A pool is applied only while
the spatial size is at least 2, so small feature sizes work (84 -> 42 -> 21 -> 10 -> 5;
28 -> 14 -> 7 -> 3 -> 1; 8 -> 4 -> 2 -> 1 -> 1).

The flatten is channel-major, so FC1's input features are not one-to-one with conv4's channels:
:meth:`SimpleConvNet.set_units` gives unit ``u`` the features ``[offset_u * HW, (offset_u + size_u) * HW)``
where ``HW`` is the final spatial area.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.backbones.base import Backbone, Partitions, scale_width
from virtnet.backbones.vgg import ConvBNReLU
from virtnet.errors import ConfigError
from virtnet.nn import Linear, Route, RouteSequential, UnitPartition

if TYPE_CHECKING:
    from virtnet.backbones.registry import BackboneConfig


class SimpleConvNet(Backbone):
    """SimpleConvNet trunk: convolutions 2-4 and FC1-FC2 (see the module docstring).

    Args:
        width: multiplier of the convolutions' channels and of the default hidden widths.
        input_size: the spatial side the trunk expects from stems (84: Mini-ImageNet as in DENs).
        hidden: widths of FC1 and FC2 (None: ``128 x width`` each, the paper's 128).
        dropout: dropout probability after FC1 and FC2.
        channels: the convolutions' channels before ``width`` (the paper's 32).
    """

    default_depth = None

    def __init__(
        self,
        width: float = 1.0,
        input_size: int = 84,
        hidden: Sequence[int] | None = None,
        dropout: float = 0.0,
        channels: int = 32,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ConfigError(f"width: must be > 0, got {width}")
        hidden = [scale_width(128, width)] * 2 if hidden is None else [int(h) for h in hidden]
        if len(hidden) != 2 or any(h < 1 for h in hidden):
            raise ConfigError(f"hidden: SimpleConvNet needs two positive FC widths (FC1, FC2), got {hidden}")
        c = scale_width(channels, width)
        self.in_channels = c
        self.input_size = input_size
        self.hidden = tuple(hidden)
        self.dropout = dropout
        layers: list[nn.Module] = []
        size = input_size
        for i in range(4):  # the pool after each of the four convolutions; the first conv is the stem
            if i > 0:
                layers.append(ConvBNReLU(c, c))
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.blocks = RouteSequential(*layers)
        self.output_size = size
        self.conv_channels = c
        self.fc1 = Linear(c * size * size, hidden[0])
        self.fc2 = Linear(hidden[0], hidden[1])
        self.feature_channels = hidden[1]

    @classmethod
    def from_config(cls, cfg: BackboneConfig, feature_size: int) -> SimpleConvNet:
        return cls(width=cfg.width, input_size=feature_size, hidden=cfg.hidden, dropout=cfg.dropout)

    def make_stem(self, in_channels: int, input_size: int) -> nn.Module:
        """Convolution 1: conv3x3 (stride by size) + BN + ReLU (its max-pool opens the trunk)."""
        return super().make_stem(in_channels, input_size)

    def set_units(self, num_units: int, ratios: list[float] | None = None) -> Partitions:
        """As :meth:`Backbone.set_units`, but FC1's input partition is conv4's channel partition times
        the final spatial area ``HW`` (channel-major flatten: unit ``u`` owns features
        ``[offset_u * HW, (offset_u + size_u) * HW)``)."""
        parts = super().set_units(num_units, ratios)
        area = self.output_size * self.output_size
        conv_part = UnitPartition.split(self.conv_channels, num_units, ratios)
        self.fc1.set_partitions(UnitPartition([s * area for s in conv_part.sizes]), self.fc1.out_partition)
        return parts

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        x = self.blocks(x, route)  # (B, C, s, s)
        x = x.flatten(1)  # (B, C * s * s), channel-major
        x = F.relu(self.fc1(x, route))  # (B, H1)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        x = F.relu(self.fc2(x, route))  # (B, H2)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return x

    def extra_repr(self) -> str:
        return f"channels={self.conv_channels}, hidden={list(self.hidden)}, input_size={self.input_size}"


__all__ = ["SimpleConvNet"]
