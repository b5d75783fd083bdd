"""``individual``: one separate network per task (no parameter shared); ``width`` scales each network,
e.g. 0.5 for "individual networks of the same size" as a half-width level."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from virtnet.backbones.base import MultiTaskNet, TaskNet, TaskSpec, network_usage
from virtnet.backbones.registry import build_multitask
from virtnet.errors import TaskError
from virtnet.methods.base import Method, MethodConfig, register
from virtnet.nn import Route
from virtnet.protocol import MultiTaskModel


class IndividualNets(nn.Module, MultiTaskModel):
    """One :class:`MultiTaskNet` of a single task per task, under ``nets[task]``."""

    def __init__(self, nets: dict[str, MultiTaskNet]) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(nets)

    @property
    def tasks(self) -> list[str]:
        return list(self.nets.keys())

    def _net(self, task: str) -> MultiTaskNet:
        if task not in self.nets:
            raise TaskError(f"unknown task '{task}': the model has {self.tasks}")
        return self.nets[task]  # type: ignore[return-value]

    def spec(self, task: str) -> TaskSpec:
        return self._net(task).spec(task)

    def forward(self, x: torch.Tensor, task: str, route: Route | None = None) -> torch.Tensor:
        return self._net(task)(x, task, route)

    def task_network(self, task: str, level: int | None = None) -> TaskNet:
        return self._net(task).task_network(task, level)

    def parameter_usage(self, task: str, level: int | None = None) -> dict[str, torch.Tensor]:
        return network_usage(self, self.task_network(task, level), self.route(task, level))


class IndividualConfig(MethodConfig):
    width: float = Field(default=1.0, gt=0)  # multiplies the backbone's width for every network


@register
class Individual(Method):
    """One network per task."""

    name = "individual"
    Config = IndividualConfig
    Model = IndividualNets

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        cfg = backbone.model_copy(update={"width": backbone.width * self.config.width})
        return IndividualNets({s.name: build_multitask(cfg, [s]) for s in specs})

    def shared_prefixes(self) -> tuple[str, ...]:
        return ()
