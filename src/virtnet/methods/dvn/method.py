"""Deep Virtual Networks (Kim, Ahn, Torr, Oh; "Deep Virtual Networks for Memory Efficient Inference of
Multiple Tasks", CVPR 2019).

Sketch of the algorithm:
1. Split every layer's channels into k units (``UnitPartition``); units span all layers except the
   task-specific input layers' inputs.
2. Give every task j an order of the units (eq. 3 rule, or explicit): level l of task j is the first l
   units of its order, inter-connections included; each (task, level) has its own batch norms and head.
3. Joint learning (eq. 4): each step takes one batch of every task and sums the cross-entropy of every
   level of every task: k x nh losses. A unit then receives gradient only from the levels that contain
   it (eq. 5), which the sliced layers give for free.
4. Sequential learning (eq. 6): task k arrives with one new unit; the old tasks' levels are kept close to
   the old network's outputs on the new task's data by a temperature-scaled distillation loss (LwF).
5. Inference under a budget picks the largest level that fits; ``export`` cuts a (task, level) out as a
   physically smaller network.

The machinery shared with NestedNet and grouped PackNet (the virtual network, the eq. 4 step, levels and
export) is in :mod:`virtnet.methods.common.unit_method`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.data.core import Batch
from virtnet.errors import ConfigError
from virtnet.methods.base import Phase, register
from virtnet.methods.common.distill import as_input_of, distillation_loss, frozen_copy
from virtnet.methods.common.unit_method import LevelsConfig, UnitMethod
from virtnet.methods.common.units import check_order, rule_orders
from virtnet.methods.common.virtual import VirtualNet


class DVNConfig(LevelsConfig):
    """``method:`` options of ``dvn``."""

    orders: dict[str, list[int]] | None = None  # explicit unit order per task (default: the eq. 3 rule)
    mode: Literal["joint", "sequential"] = "joint"
    temperature: float = Field(default=2.0, ge=1.0)  # sequential: distillation temperature
    distill_weight: float = Field(default=1.0, ge=0.0)  # sequential: weight of the distillation terms


@register
class DVN(UnitMethod):
    """Deep virtual networks: k x nh outputs from one network (joint or sequential learning)."""

    name = "dvn"
    Config = DVNConfig

    def __init__(self, config: DVNConfig | None = None) -> None:
        super().__init__(config)
        self._teacher: nn.Module | None = None  # sequential: the network before the current task

    # ---- building ----------------------------------------------------------------------------------
    def num_units(self, specs: list[TaskSpec]) -> int:
        k = self.config.num_units or len(specs)
        if self.config.mode == "sequential" and k != len(specs):
            raise ConfigError(
                f"method.num_units: sequential learning adds one unit per task: {len(specs)} "
                f"tasks need {len(specs)} units, not {k}"
            )
        return k

    def orders(self, specs: list[TaskSpec], k: int) -> list[list[int]]:
        names = [s.name for s in specs]
        if self.config.orders is None:
            return rule_orders(len(specs), k)
        extra = sorted(set(self.config.orders) - set(names))
        if extra:
            raise ConfigError(f"method.orders: unknown task '{extra[0]}' (tasks: {names})")
        missing = [n for n in names if n not in self.config.orders]
        if missing:
            raise ConfigError(f"method.orders: no order for task '{missing[0]}'")
        orders = [check_order(self.config.orders[n], k, f"method.orders.{n}") for n in names]
        if self.config.mode == "sequential":
            for j, (n, o) in enumerate(zip(names, orders, strict=True)):
                for a in range(j + 1, k + 1):
                    if set(o[:a]) != set(range(a)):
                        raise ConfigError(
                            f"method.orders.{n}: in sequential learning, once {a} units exist task {n}'s "
                            f"first {a} units must be units 0..{a - 1}, got {o[:a]}"
                        )
        return orders

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        model = super().build(specs, backbone)
        if self.config.mode == "sequential":
            model.active_units.fill_(1)
        return model

    # ---- phases ------------------------------------------------------------------------------------
    def phases(self, tasks: list[str]) -> list[Phase]:
        if self.config.mode == "joint":
            return [Phase("joint", list(tasks), 0)]
        return [Phase(f"task-{t}", [t], i, {"learned": tasks[:i]}) for i, t in enumerate(tasks)]

    def on_phase_start(self, model: nn.Module, phase: Phase) -> None:
        self._teacher = None
        if self.config.mode != "sequential":
            return
        if phase.info["learned"]:
            self._teacher = frozen_copy(model)
        model.active_units.fill_(phase.index + 1)  # the new task's unit joins the network

    # ---- training ----------------------------------------------------------------------------------
    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = self.level_losses(model, batches, out)  # type: ignore[arg-type]
        if self._teacher is not None:
            total = total + self.config.distill_weight * self._distill(model, batches, phase, out)
        out["loss"] = total
        return out

    def _distill(
        self, model: VirtualNet, batches: dict[str, Batch], phase: Phase, out: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Eq. 6: every level of every old task against the old network's output on the new data.

        Level l of an old task is matched to the old network's level l; the level that the new unit
        adds is matched to the old network's largest level. Every configuration's batch norms normalise
        with batch statistics and update their running statistics on the new data, as LwF's shared trunk
        does (freezing the old configurations' statistics while their weights move made their
        activations diverge at lr 0.1).
        """
        assert self._teacher is not None
        teacher = self._teacher
        ((_, b),) = batches.items()
        total = torch.zeros(())
        for old in phase.info["learned"]:
            x = as_input_of(b.x, model.spec(old))
            old_levels = teacher.levels_of(old)
            with torch.no_grad():
                targets = {lv: teacher(x, old, teacher.route(old, lv)) for lv in old_levels}
            for lv in model.levels_of(old):
                target = targets[min(lv, old_levels[-1])]
                kd = distillation_loss(model(x, old, model.route(old, lv)), target, self.config.temperature)
                out[f"distill/{old}@{lv}"] = kd.detach()
                total = total + self._level_weight(lv) * kd
        return total
