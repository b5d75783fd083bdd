"""Grouped PackNet ("PackNet+" in Deep Virtual Networks' Sec. 4.3): nested channel groups (units) of one
order, learned one task after another; task i uses groups 1..i and learning it trains only the
parameters that are new at its level, so earlier tasks are unchanged bit for bit."""

from __future__ import annotations

import torch
from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.data.core import Batch
from virtnet.errors import ConfigError
from virtnet.methods.base import Phase, register, task_loss
from virtnet.methods.common.unit_method import (
    FrozenBlocks,
    UnitMethod,
    UnitsConfig,
    freeze_blocks,
    restore_blocks,
)


class GroupedPackNetConfig(UnitsConfig):
    """``method:`` options of ``packnet-grouped``."""

    # num_units: the groups (default: the number of tasks); unit_ratios: their relative sizes


@register
class GroupedPackNet(UnitMethod):
    """Grouped PackNet ("PackNet+"): task i uses channel groups 1..i, learned in sequence; learning task i
    trains only the parameters new at its level, so earlier tasks are unchanged bit for bit."""

    name = "packnet-grouped"
    Config = GroupedPackNetConfig
    sequential = True

    def __init__(self, config: GroupedPackNetConfig | None = None) -> None:
        super().__init__(config)
        self._frozen: FrozenBlocks = []

    def num_units(self, specs: list[TaskSpec]) -> int:
        k = self.config.num_units or len(specs)
        if k < len(specs):
            raise ConfigError(
                f"method.num_units: {len(specs)} tasks need at least {len(specs)} groups, not {k}"
            )
        return k

    def orders(self, specs: list[TaskSpec], k: int) -> list[list[int]]:
        return [list(range(k)) for _ in specs]

    def offered(self, specs: list[TaskSpec], k: int) -> dict[str, list[int]]:
        n = len(specs)
        return {s.name: [max(1, round((i + 1) * k / n))] for i, s in enumerate(specs)}

    def phases(self, tasks: list[str]) -> list[Phase]:
        return [Phase(f"task-{t}", [t], i, {"learned": tasks[:i]}) for i, t in enumerate(tasks)]

    def on_phase_start(self, model: nn.Module, phase: Phase) -> None:
        """Freeze the weight blocks of the previous task's level (all earlier levels are inside it)."""
        self._frozen = []
        if not phase.info["learned"]:
            return
        prev = phase.info["learned"][-1]
        # what the previous task's level reads of the trunk: every weight block between its units
        self._frozen = freeze_blocks([model.trunk], [model.route(prev)])

    def varying_parameters(self, phase: Phase) -> bool:
        return True  # its optimizer holds every parameter; those outside the task's route get no gradient

    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        ((task, b),) = batches.items()
        loss = task_loss(model(b.x, task, model.route(task)), b)
        return {"loss": loss, f"loss/{task}": loss.detach()}

    def after_step(self, model: nn.Module, phase: Phase) -> None:
        """Put the frozen entries back: momentum and weight decay must not move them."""
        restore_blocks(self._frozen)
