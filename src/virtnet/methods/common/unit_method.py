"""What the methods built on units share (DVN, NestedNet, grouped PackNet): the unit options, the
virtual network's construction, the every-level training step (DVN eq. 4), levels and sliced export.

A subclass says which unit order each task has (:meth:`UnitMethod.orders`) and which levels each task
offers (:meth:`UnitMethod.offered`); DVN adds sequential learning with distillation, grouped PackNet
adds its freezing of earlier groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.backbones.registry import build_multitask
from virtnet.data.core import Batch
from virtnet.errors import ConfigError
from virtnet.methods.base import Level, Method, MethodConfig, Phase, task_loss
from virtnet.methods.common.virtual import VirtualNet
from virtnet.nn import Route, usage
from virtnet.nn.compact import compact

#: entries kept fixed while a phase trains: (parameter, mask of the kept entries, their values)
FrozenBlocks = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def freeze_blocks(parts: Iterable[nn.Module], routes: Iterable[Route]) -> FrozenBlocks:
    """The entries of ``parts``' parameters that any of ``routes`` reads (the weight blocks between its
    units), with their current values, for :func:`restore_blocks`."""
    routes = list(routes)
    frozen: FrozenBlocks = []
    for part in dict.fromkeys(parts):
        params = dict(part.named_parameters())
        masks: dict[str, torch.Tensor] = {}
        for route in routes:
            for name, m in usage(part, route).items():
                masks[name] = masks[name] | m if name in masks else m.clone()
        frozen += [(params[n], m, params[n].detach().clone()) for n, m in masks.items()]
    return frozen


@torch.no_grad()
def restore_blocks(frozen: FrozenBlocks) -> None:
    """Put the frozen entries back after an optimizer step: momentum and weight decay must not move them."""
    for p, mask, saved in frozen:
        p.copy_(torch.where(mask, saved, p))


class UnitsConfig(MethodConfig):
    """The options every method on units has."""

    num_units: int | None = Field(default=None, ge=1, le=4096)  # k (default: the number of tasks)
    unit_ratios: list[float] | None = None  # relative unit sizes (default: equal)

    @model_validator(mode="after")
    def _check_units(self) -> UnitsConfig:
        if (
            self.unit_ratios is not None
            and self.num_units is not None
            and len(self.unit_ratios) != self.num_units
        ):
            raise ValueError(f"unit_ratios has {len(self.unit_ratios)} entries for {self.num_units} units")
        if self.unit_ratios is not None and any(r <= 0 for r in self.unit_ratios):
            raise ValueError("unit_ratios must be positive")
        return self


class LevelsConfig(UnitsConfig):
    """The options of the methods that train every level at once (DVN eq. 4, NestedNet)."""

    level_weights: list[float] | None = None  # loss weight per level 1..k (default: 1 each, as eq. 4)


def build_virtual(
    specs: list[TaskSpec],
    backbone: Any,
    num_units: int,
    orders: list[list[int]],
    offered: dict[str, list[int]],
    ratios: list[float] | None,
) -> VirtualNet:
    """A :class:`VirtualNet` of ``num_units`` units over a fresh multi-task network of ``backbone``."""
    base = build_multitask(backbone, specs, shared_stem=False)
    try:
        return VirtualNet(base, num_units, orders, offered, ratios)
    except ConfigError as e:
        msg = str(e)
        if "do not fit" in msg or "leave a unit" in msg:
            raise ConfigError(
                f"method.num_units: {msg} (model: {backbone.name}, width {backbone.width})"
            ) from None
        raise


class UnitMethod(Method):
    """Base of the methods whose levels are nested sets of units of one :class:`VirtualNet`."""

    Config = UnitsConfig
    Model = VirtualNet

    # ---- what a subclass decides -------------------------------------------------------------------
    def num_units(self, specs: list[TaskSpec]) -> int:
        return self.config.num_units or len(specs)

    def orders(self, specs: list[TaskSpec], k: int) -> list[list[int]]:
        """One unit order per task."""
        raise NotImplementedError

    def offered(self, specs: list[TaskSpec], k: int) -> dict[str, list[int]]:
        """The levels (1-based) each task offers."""
        return {s.name: list(range(1, k + 1)) for s in specs}

    # ---- building ----------------------------------------------------------------------------------
    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        k = self.num_units(specs)
        if self.config.unit_ratios is not None and len(self.config.unit_ratios) != k:
            raise ConfigError(f"method.unit_ratios: {len(self.config.unit_ratios)} ratios for {k} units")
        weights = self.config.level_weights if isinstance(self.config, LevelsConfig) else None
        if weights is not None and len(weights) != k:
            raise ConfigError(
                f"method.level_weights: {len(weights)} weights for {k} levels"
            )
        return build_virtual(
            specs, backbone, k, self.orders(specs, k), self.offered(specs, k), self.config.unit_ratios
        )

    # ---- training ----------------------------------------------------------------------------------
    def _level_weight(self, level: int) -> float:
        return 1.0 if self.config.level_weights is None else self.config.level_weights[level - 1]

    def level_losses(
        self, model: VirtualNet, batches: dict[str, Batch], out: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """DVN eq. 4: the weighted sum of the losses of every level of every task (logged into ``out``)."""
        total = torch.zeros(())
        for task, b in batches.items():
            for lv in model.levels_of(task):
                loss = task_loss(model(b.x, task, model.route(task, lv)), b)
                out[f"loss/{task}@{lv}"] = loss.detach()
                total = total + self._level_weight(lv) * loss
        return total

    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        out["loss"] = self.level_losses(model, batches, out)  # type: ignore[arg-type]
        return out

    # ---- inference ---------------------------------------------------------------------------------
    def levels(self, model: nn.Module, task: str) -> list[Level]:
        k = model.num_units
        levels = []
        for lv in model.levels_of(task):
            route = model.route(task, lv)
            levels.append(Level(lv, f"{len(route.units or ())}/{k} units", route))
        return levels

    def export(self, model: nn.Module, task: str, level: int | None = None) -> nn.Module:
        lv = self.level(model, task, level)
        assert lv.route is not None
        return compact(model.task_network(task, lv.index), lv.route)


__all__ = [
    "FrozenBlocks",
    "LevelsConfig",
    "UnitMethod",
    "UnitsConfig",
    "build_virtual",
    "freeze_blocks",
    "restore_blocks",
]
