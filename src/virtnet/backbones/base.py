"""The trunk / stem / head split shared by every backbone.

A multi-task network is ``stem[task] -> trunk -> head[task]``:

* the **stem** (task-specific input layer, DVN Sec. 4.2) maps a task's images, whatever their channels and
  size, to ``trunk.in_channels`` feature maps of the trunk's ``input_size`` by choosing the convolution's
  stride (inputs smaller than the trunk's size are first upsampled bilinearly; a size that no stride
  reaches exactly is finished by adaptive average pooling);
* the **trunk** (a :class:`Backbone`) is shared and returns pooled features ``(B, feature_channels)``;
* the **head** is a linear classifier per task.

Every module takes ``forward(x, route=None)`` (see :mod:`virtnet.nn.units`): a route selects the active
units of layers that are split into units and is ignored by layers that are not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.errors import BudgetError, ConfigError, DataError, TaskError
from virtnet.nn import BatchNorm1d, BatchNorm2d, Conv2d, Linear, Route, Routed, UnitPartition, call
from virtnet.protocol import MultiTaskModel, TaskSpec, check_input_shape

if TYPE_CHECKING:
    from virtnet.backbones.registry import BackboneConfig

Partitions = tuple[UnitPartition, UnitPartition]
"""The unit partitions of a trunk's input channels and of its output features."""




def stem_stride(input_size: int, target_size: int) -> int:
    """Stride that maps ``input_size`` to ``target_size`` (1 when the input is not larger)."""
    return max(1, input_size // target_size)


def scale_width(channels: int, width: float) -> int:
    """``channels`` scaled by the width multiplier: ``int(round(channels * width))``, at least 1."""
    return max(1, int(round(channels * width)))


class Stem(nn.Module, Routed):
    """Task-specific input layer: convolution (stride chosen by size), batch norm, ReLU.

    Maps ``(B, in_channels, input_size, input_size)`` to ``(B, out_channels, target_size, target_size)``.
    The total stride is ``S = input_size // target_size`` (inputs smaller than ``target_size`` are first
    upsampled bilinearly to it, then ``S = 1``). With ``max_pool`` (the ImageNet-style stem: 7x7
    convolution, BN, ReLU, 3x3 max-pool) and ``S >= 4`` the max-pool takes stride 2 and the convolution
    ``S // 2``; for ``S < 4`` the convolution takes the whole stride ``S`` and the max-pool is left out. A
    size that no stride reaches exactly is finished by adaptive average pooling.

    Args:
        in_channels: the task's image channels.
        input_size: the task's image side.
        out_channels: the channels the trunk expects.
        target_size: the spatial side the trunk expects.
        kernel: the convolution's kernel size (padding ``kernel // 2``).
        norm: follow the convolution by batch norm.
        relu: follow it by a ReLU.
        max_pool: ImageNet-style 3x3 stride-2 max-pool after the ReLU (when the input is large enough).
    """

    #: (convolution, the batch norm that directly follows it), when the stem has a batch norm
    CONV_NORM_PAIRS = (("conv", "bn"),)

    def __init__(
        self,
        in_channels: int,
        input_size: int,
        out_channels: int,
        target_size: int,
        kernel: int = 3,
        norm: bool = True,
        relu: bool = True,
        max_pool: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.input_size = input_size
        self.out_channels = out_channels
        self.target_size = target_size
        self.upsample = input_size < target_size
        size = target_size if self.upsample else input_size
        total = stem_stride(size, target_size)
        pool_stride = 2 if max_pool and total >= 4 else 1
        stride = max(1, total // pool_stride)
        self.conv = Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = BatchNorm2d(out_channels) if norm else None
        self.relu = relu
        self.max_pool = nn.MaxPool2d(3, stride=2, padding=1) if pool_stride == 2 else None
        out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
        if self.max_pool is not None:
            out_size = (out_size - 1) // 2 + 1
        self.pool = out_size != target_size

    def set_out_partition(self, partition: UnitPartition | None) -> None:
        """Split the stem's output channels into the trunk's input units (its input is never split)."""
        self.conv.set_partitions(None, partition)
        if self.bn is not None:
            self.bn.set_partition(partition)

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        if self.upsample:
            size = (self.target_size, self.target_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = self.conv(x, route)  # (B, C, S', S')
        if self.bn is not None:
            x = self.bn(x, route)
        if self.relu:
            x = F.relu(x)
        if self.max_pool is not None:
            x = self.max_pool(x)
        if self.pool:
            x = F.adaptive_avg_pool2d(x, self.target_size)  # (B, C, S, S)
        return x


class Backbone(nn.Module, Routed):
    """A shared trunk: ``(B, in_channels, input_size, input_size) -> (B, feature_channels)``.

    Subclasses set ``in_channels``, ``feature_channels`` and ``input_size`` and implement ``forward``.
    They may override :meth:`make_stem` (e.g. the ImageNet-style 7x7 stem) and :meth:`set_units` (when a
    layer's channels do not map one to one to the previous layer's, as after a flatten). The backbones of
    this package keep their blocks, in order, in ``self.blocks`` (a ``RouteSequential``); ``forward`` runs
    them and then pools (and, for VGG and SimpleConvNet, runs the hidden FC layers).

    Registered backbones (:mod:`virtnet.backbones.registry`) also implement :meth:`from_config` and,
    when their depth is a choice, :meth:`depth_problem`.
    """

    in_channels: int
    feature_channels: int
    input_size: int
    default_depth: ClassVar[int | None] = None

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def depth_problem(cls, depth: int, layout: str = "cifar") -> str | None:
        """Why ``depth`` is not a depth of this backbone (None when it is)."""
        return None

    @classmethod
    def from_config(cls, cfg: BackboneConfig, feature_size: int) -> Backbone:  # pragma: no cover
        """Build from a :class:`~virtnet.backbones.registry.BackboneConfig` for ``feature_size`` inputs."""
        raise NotImplementedError

    def make_stem(self, in_channels: int, input_size: int) -> nn.Module:
        """A task-specific input layer producing what this trunk expects."""
        return Stem(in_channels, input_size, self.in_channels, self.input_size)

    def sliceable_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """Every layer of the trunk whose channels can be split into units."""
        for name, m in self.named_modules():
            if isinstance(m, (Conv2d, Linear, BatchNorm1d, BatchNorm2d)):
                yield name, m

    def set_units(self, num_units: int, ratios: list[float] | None = None) -> Partitions:
        """Split the channels of every trunk layer into ``num_units`` units (equal or in ``ratios``).

        Returns the partitions of the trunk's input channels and of its output features, which the stems'
        outputs and the heads' inputs must follow. Raises ConfigError when a layer has fewer channels
        than units.
        """
        for _, m in self.sliceable_layers():
            if isinstance(m, (BatchNorm1d, BatchNorm2d)):
                m.set_partition(UnitPartition.split(m.num_features, num_units, ratios))
            elif isinstance(m, Conv2d):
                m.set_partitions(
                    UnitPartition.split(m.in_channels, num_units, ratios),
                    UnitPartition.split(m.out_channels, num_units, ratios),
                )
            elif isinstance(m, Linear):
                m.set_partitions(
                    UnitPartition.split(m.in_features, num_units, ratios),
                    UnitPartition.split(m.out_features, num_units, ratios),
                )
        return (
            UnitPartition.split(self.in_channels, num_units, ratios),
            UnitPartition.split(self.feature_channels, num_units, ratios),
        )


class TaskNet(nn.Module, Routed):
    """One task's network: stem, trunk, head. What :meth:`MultiTaskNet.task_network` returns and what
    exports are made of; parameter names start with ``stem.``, ``trunk.`` (shared) or ``head.``."""

    def __init__(self, stem: nn.Module, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        return call(self.head, call(self.trunk, call(self.stem, x, route), route), route)


class MultiTaskNet(nn.Module, MultiTaskModel):
    """A shared trunk with a stem and a linear head per task (one level per task; the model protocol's
    :class:`~virtnet.protocol.MultiTaskModel`).

    Args:
        trunk: the shared backbone.
        tasks: one :class:`TaskSpec` per task.
        shared_stem: use one stem for all tasks (requires equal input shapes) instead of one per task.
    """

    def __init__(self, trunk: Backbone, tasks: list[TaskSpec], shared_stem: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.specs = {t.name: t for t in tasks}
        self.shared_stem = shared_stem
        if shared_stem:
            shapes = {(t.in_channels, t.input_size) for t in tasks}
            if len(shapes) != 1:
                raise DataError(f"a shared stem needs tasks of one input shape, got {sorted(shapes)}")
            t0 = tasks[0]
            stem = trunk.make_stem(t0.in_channels, t0.input_size)
            self.stems = nn.ModuleDict({"shared": stem})
        else:
            self.stems = nn.ModuleDict({t.name: trunk.make_stem(t.in_channels, t.input_size) for t in tasks})
        self.heads = nn.ModuleDict({t.name: Linear(trunk.feature_channels, t.num_outputs) for t in tasks})
        #: routes name their task (``Route(task, key=task)``): set when layers keyed by task were installed
        #: (per-task batch norm, :func:`virtnet.nn.make_switchable` with the task names as keys)
        self.task_keyed = False

    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    def route(self, task: str, level: int | None = None) -> Route | None:
        """None (one plain network per task), or ``Route(task, key=task)`` when :attr:`task_keyed`."""
        self.spec(task)
        return Route(task, key=task) if self.task_keyed else None

    def structure(self) -> dict[str, Any]:
        """``{"task_keyed": True}`` when layers keyed by task were installed, else nothing."""
        return {"task_keyed": True} if self.task_keyed else {}

    def spec(self, task: str) -> TaskSpec:
        if task not in self.specs:
            raise TaskError(f"unknown task '{task}': the model has {self.tasks}")
        return self.specs[task]

    def check_input(self, x: torch.Tensor, task: str) -> None:
        """Raise DataError when ``x`` is not a batch of the task's input shape."""
        check_input_shape(self.spec(task), x)

    def stem(self, task: str) -> nn.Module:
        self.spec(task)
        return self.stems["shared" if self.shared_stem else task]

    def features(self, x: torch.Tensor, task: str, route: Route | None = None) -> torch.Tensor:
        """Pooled trunk features ``(B, feature_channels)`` of task ``task``'s inputs ``x`` (route None: the
        task's own, :meth:`route`)."""
        if route is None and self.task_keyed:
            route = Route(task, key=task)
        return self.trunk(call(self.stem(task), x, route), route)

    def forward(self, x: torch.Tensor, task: str, route: Route | None = None) -> torch.Tensor:
        """Logits ``(B, num_outputs)`` of task ``task``."""
        return call(self.heads[task], self.features(x, task, route), route)

    def set_units(self, num_units: int, ratios: list[float] | None = None) -> Partitions:
        """Split the trunk into ``num_units`` units (:meth:`Backbone.set_units`) and make every stem's
        output and every head's input follow the trunk's input and feature partitions.

        Returns the trunk's (input, feature) partitions. Raises ConfigError when a layer has fewer
        channels than units or a stem cannot follow a partition.
        """
        in_part, feat_part = self.trunk.set_units(num_units, ratios)
        for name, stem in self.stems.items():
            if not hasattr(stem, "set_out_partition"):
                raise ConfigError(f"stem '{name}' ({type(stem).__name__}) cannot be split into units")
            stem.set_out_partition(in_part)
        for head in self.heads.values():
            if isinstance(head, Linear):
                head.set_partitions(feat_part, None)
        return in_part, feat_part

    def task_network(self, task: str, level: int | None = None) -> TaskNet:
        """The task's network, sharing (not copying) this model's modules."""
        check_level(self, task, level)
        return TaskNet(self.stem(task), self.trunk, self.heads[task])

    def parameter_usage(self, task: str, level: int | None = None) -> dict[str, torch.Tensor]:
        return network_usage(self, self.task_network(task, level), self.route(task, level))


def check_level(model: MultiTaskModel, task: str, level: int | None) -> None:
    """BudgetError when ``level`` is not one of the levels ``task`` offers (None: the largest)."""
    levels = model.levels(task)
    if level is not None and level not in levels:
        raise BudgetError(f"task '{task}' has levels {levels}, not {level}")


def network_usage(model: nn.Module, network: nn.Module, route: Route | None) -> dict[str, torch.Tensor]:
    """:meth:`MultiTaskModel.parameter_usage` of a model whose (task, level) is ``network(x, route)``
    made of the model's own modules: the routed layers' usage masks (:func:`virtnet.nn.usage_by_param`)
    keyed by the model's parameter names."""
    from virtnet.nn import usage_by_param

    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for pid, (_, mask) in usage_by_param(network, route).items():
        if pid not in names:
            raise BudgetError("a task network uses a parameter that is not its model's")
        n = names[pid]
        out[n] = mask if n not in out else (out[n] | mask)
    return out


def conv_bn(in_ch: int, out_ch: int, stride: int = 1, kernel: int = 3) -> tuple[Conv2d, BatchNorm2d]:
    """A bias-free convolution and its batch norm."""
    pad = kernel // 2
    return Conv2d(in_ch, out_ch, kernel, stride=stride, padding=pad, bias=False), BatchNorm2d(out_ch)


def init_weights(module: nn.Module, scheme: str = "kaiming") -> None:
    """Initialise convolutions and linear layers (``kaiming`` normal fan-out, or ``xavier`` as in DVN)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                bound = 1.0 / math.sqrt(m.weight.shape[1])
                nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


__all__ = [
    "Backbone",
    "BatchNorm1d",
    "MultiTaskNet",
    "Partitions",
    "Stem",
    "TaskNet",
    "TaskSpec",
    "conv_bn",
    "init_weights",
    "scale_width",
    "stem_stride",
]
