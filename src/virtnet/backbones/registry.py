"""The backbone registry and the ``model:`` section of a run config.

Example::

    cfg = validate(BackboneConfig, {"name": "wrn", "depth": 16, "widen_factor": 4})
    model = build_multitask(cfg, [TaskSpec("cifar100", 3, 32, 100), TaskSpec("stl10", 3, 96, 10)])

A name is looked up in a read-only mapping of backbone classes; each class builds itself from the config
(:meth:`Backbone.from_config`) and says which depths it accepts (:meth:`Backbone.depth_problem`).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal

from pydantic import Field, PositiveInt, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from virtnet.backbones.base import Backbone, MultiTaskNet, TaskSpec, init_weights
from virtnet.backbones.resnet import ResNet
from virtnet.backbones.resnet26 import ResNet26
from virtnet.backbones.simple import SimpleConvNet
from virtnet.backbones.vgg import VGG
from virtnet.backbones.wrn import WideResNet
from virtnet.errors import ConfigError
from virtnet.schema import Strict

BackboneName = Literal["resnet", "wrn", "vgg", "simpleconvnet", "resnet26"]

_BACKBONES: MappingProxyType[str, type[Backbone]] = MappingProxyType(
    {
        "resnet": ResNet,
        "wrn": WideResNet,
        "vgg": VGG,
        "simpleconvnet": SimpleConvNet,
        "resnet26": ResNet26,
    }
)

MIN_FEATURE_SIZE = 8
"""The smallest feature size :func:`default_feature_size` chooses."""


def backbone_names() -> list[str]:
    """Names of the registered backbones."""
    return list(_BACKBONES)


def get_backbone_class(name: str) -> type[Backbone]:
    """The backbone class registered as ``name``; ConfigError when there is none."""
    try:
        return _BACKBONES[name]
    except KeyError:
        raise ConfigError(f"name: unknown backbone '{name}' (known: {', '.join(_BACKBONES)})") from None


def _depth_problem(name: str, depth: int, layout: str) -> str | None:
    if name == "simpleconvnet":
        return f"simpleconvnet has a fixed layout (4 convs, 3 FC layers); leave depth unset, got {depth}"
    return _BACKBONES[name].depth_problem(depth, layout)


def _hidden_problem(name: str, hidden: list[int]) -> str | None:
    if name not in ("simpleconvnet", "vgg"):
        return f"only simpleconvnet and vgg have hidden FC layers, got {hidden} for {name}"
    if name == "simpleconvnet" and len(hidden) != 2:
        return f"simpleconvnet has two hidden FC layers (FC1, FC2), got {len(hidden)} widths {hidden}"
    return None


class BackboneConfig(Strict):
    """``model:``: which backbone to build and its shape.

    Fields are checked in order; ``depth`` and ``hidden`` are checked against ``name`` and ``layout``.
    """

    name: BackboneName = "resnet"  # registered backbone (see backbone_names())
    layout: Literal["cifar", "imagenet"] = "cifar"  # ResNet only: CIFAR (6n+2) or ImageNet (10/18/34/42)
    depth: int | None = None  # None: resnet 20 (imagenet 18), wrn 16, vgg 11, resnet26 26
    width: float = Field(default=1.0, gt=0)  # multiplier of every channel count
    widen_factor: int = Field(default=4, ge=1)  # WRN's k
    feature_size: int | None = Field(default=None, ge=1)  # trunk input side; None: from the tasks
    dropout: float = Field(default=0.0, ge=0, lt=1)  # between block convs / after hidden FC layers
    hidden: list[PositiveInt] | None = None  # FC widths: simpleconvnet [FC1, FC2], vgg any (default 512w)
    init: Literal["kaiming", "xavier"] = "kaiming"  # weight initialisation (DVN uses xavier)

    @field_validator("layout")
    @classmethod
    def _layout(cls, v: str, info: ValidationInfo) -> str:
        name = info.data.get("name")
        if v == "imagenet" and name is not None and name != "resnet":
            raise PydanticCustomError(
                "layout", "only resnet has an imagenet layout, got it for {name}", {"name": name}
            )
        return v

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: int | None, info: ValidationInfo) -> int | None:
        name, layout = info.data.get("name"), info.data.get("layout", "cifar")
        if v is not None and name is not None:
            problem = _depth_problem(name, v, layout)
            if problem:
                raise PydanticCustomError("depth", problem)
        return v

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        name = info.data.get("name")
        if v is not None and name is not None:
            problem = _hidden_problem(name, v)
            if problem:
                raise PydanticCustomError("hidden", problem)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BackboneConfig:
        # the field validators see the fields before them; this re-checks after an assignment
        problems = [
            (
                "layout",
                None
                if self.layout == "cifar" or self.name == "resnet"
                else f"only resnet has an imagenet layout, got it for {self.name}",
            ),
            ("depth", None if self.depth is None else _depth_problem(self.name, self.depth, self.layout)),
            ("hidden", None if self.hidden is None else _hidden_problem(self.name, self.hidden)),
        ]
        for key, problem in problems:
            if problem:
                ctx = {"key": key, "problem": problem}
                raise PydanticCustomError("inconsistent", "{key}: {problem}", ctx)
        return self


def default_feature_size(specs: list[TaskSpec]) -> int:
    """The trunk input size chosen for ``specs``: the smallest task input size, but at least 8."""
    if not specs:
        raise ConfigError("tasks: a multi-task network needs at least one task")
    return max(MIN_FEATURE_SIZE, min(s.input_size for s in specs))


def build_backbone(cfg: BackboneConfig, feature_size: int) -> Backbone:
    """Build the trunk named by ``cfg`` for stems producing ``feature_size`` x ``feature_size`` maps.

    Weights keep torch's default initialisation; :func:`build_multitask` applies ``cfg.init``.
    """
    if isinstance(feature_size, bool) or not isinstance(feature_size, int) or feature_size < 1:
        raise ConfigError(f"feature_size: must be a positive integer, got {feature_size!r}")
    return get_backbone_class(cfg.name).from_config(cfg, feature_size)


def build_multitask(cfg: BackboneConfig, specs: list[TaskSpec], shared_stem: bool = False) -> MultiTaskNet:
    """A :class:`MultiTaskNet` (stem per task, shared trunk, head per task), initialised by ``cfg.init``.

    The trunk's feature size is ``cfg.feature_size``, or :func:`default_feature_size` of the tasks.
    Construction is deterministic given torch's seed.
    """
    feature_size = cfg.feature_size if cfg.feature_size is not None else default_feature_size(specs)
    if not specs:
        raise ConfigError("tasks: a multi-task network needs at least one task")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks: task names must be unique, got {names}")
    model = MultiTaskNet(build_backbone(cfg, feature_size), list(specs), shared_stem=shared_stem)
    init_weights(model, cfg.init)
    return model


__all__ = [
    "BackboneConfig",
    "BackboneName",
    "MIN_FEATURE_SIZE",
    "backbone_names",
    "build_backbone",
    "build_multitask",
    "default_feature_size",
    "get_backbone_class",
]
