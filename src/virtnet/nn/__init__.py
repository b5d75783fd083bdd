"""Reusable layers: route-aware (unit-sliced) convolution, linear and batch-norm layers; switchable
batch norm (private normalisation per configuration)."""

from virtnet.nn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Linear,
    Routed,
    RouteSequential,
    call,
)
from virtnet.nn.switchable import SwitchableBatchNorm, make_switchable
from virtnet.nn.units import Route, UnitPartition

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Linear",
    "Route",
    "RouteSequential",
    "Routed",
    "SwitchableBatchNorm",
    "UnitPartition",
    "call",
    "make_switchable",
]
