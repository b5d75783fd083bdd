"""Reusable layers: route-aware (unit-sliced) convolution, linear and batch-norm layers; switchable
batch norm (private normalisation per configuration); the routed-layer protocol and what walks it.

The protocol (:mod:`virtnet.nn.protocol`), for generic code and for models' ``parameter_usage``:

* ``usage(module, route) -> dict[str, torch.Tensor]``: bool masks of the parameter elements
  ``module(x, route)`` reads, by dotted name relative to ``module``;
* ``usage_by_param(module, route) -> dict[int, tuple[nn.Parameter, torch.Tensor]]``: the same keyed by
  ``id(parameter)``, so a model maps them to its own names::

      def parameter_usage(self, task, level=None):
          names = {id(p): n for n, p in self.named_parameters()}
          used = usage_by_param(self.task_network(task, level), self.route(task, level))
          return {names[i]: mask for i, (p, mask) in used.items()}

* ``compact(module, route) -> nn.Module``: the physically sliced standalone copy (``copy(x)``);
* ``RoutedLayer`` (``plain``, ``usage``, ``delegates``, ``active``), ``RoutedBlock``, ``name_slots``.
"""

from virtnet.nn.compact import compact
from virtnet.nn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Linear,
    RouteSequential,
    sliced_batch_norm,
)
from virtnet.nn.protocol import (
    Routed,
    RoutedBlock,
    RoutedLayer,
    call,
    full_usage,
    name_slots,
    usage,
    usage_by_param,
    usage_count,
)
from virtnet.nn.switchable import SwitchableBatchNorm, make_switchable
from virtnet.nn.units import Route, Selection, UnitPartition

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Linear",
    "Route",
    "RouteSequential",
    "Routed",
    "RoutedBlock",
    "RoutedLayer",
    "Selection",
    "SwitchableBatchNorm",
    "UnitPartition",
    "call",
    "compact",
    "full_usage",
    "make_switchable",
    "name_slots",
    "sliced_batch_norm",
    "usage",
    "usage_by_param",
    "usage_count",
]
