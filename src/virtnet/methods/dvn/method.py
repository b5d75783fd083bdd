"""Deep Virtual Networks (Kim, Ahn, Torr, Oh; "Deep Virtual Networks for Memory Efficient Inference of
Multiple Tasks", CVPR 2019), and the baselines built on the same units: NestedNet and grouped PackNet.

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

NestedNet (Kim et al., CVPR 2018): one order shared by every task; task i uses level i (or one task with
nh levels). Grouped PackNet ("PackNet+" in DVN's Sec. 4.3): the same nested channel groups, learned one
task after another, each task training only the parameters that are new at its level.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.backbones.registry import build_multitask
from virtnet.data.core import Batch
from virtnet.errors import ConfigError
from virtnet.export.compact import compact
from virtnet.methods.base import Level, Method, MethodConfig, Phase, register, task_loss
from virtnet.methods.baselines.lwf import as_input_of, distillation_loss
from virtnet.methods.dvn.model import VirtualNet
from virtnet.methods.dvn.units import check_order, rule_orders
from virtnet.nn.layers import _Sliced


class DVNConfig(MethodConfig):
    """``method:`` options of ``dvn``."""

    num_units: int | None = Field(default=None, ge=1)  # k (default: the number of tasks)
    unit_ratios: list[float] | None = None  # relative unit sizes (default: equal)
    orders: dict[str, list[int]] | None = None  # explicit unit order per task (default: the eq. 3 rule)
    mode: Literal["joint", "sequential"] = "joint"
    level_weights: list[float] | None = None  # loss weight per level 1..k (default: 1 each, as eq. 4)
    temperature: float = Field(default=2.0, ge=1.0)  # sequential: distillation temperature
    distill_weight: float = Field(default=1.0, ge=0.0)  # sequential: weight of the distillation terms

    @model_validator(mode="after")
    def _check(self) -> DVNConfig:
        if (
            self.unit_ratios is not None
            and self.num_units is not None
            and len(self.unit_ratios) != self.num_units
        ):
            raise ValueError(f"unit_ratios has {len(self.unit_ratios)} entries for {self.num_units} units")
        if self.unit_ratios is not None and any(r <= 0 for r in self.unit_ratios):
            raise ValueError("unit_ratios must be positive")
        return self


def _build_virtual(
    specs: list[TaskSpec],
    backbone: Any,
    num_units: int,
    orders: list[list[int]],
    offered: dict[str, list[int]],
    ratios: list[float] | None,
) -> VirtualNet:
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


@register
class DVN(Method):
    """Deep virtual networks: k x nh outputs from one network (joint or sequential learning)."""

    name = "dvn"
    Config = DVNConfig

    def __init__(self, config: DVNConfig | None = None) -> None:
        super().__init__(config)
        self._teacher: VirtualNet | None = None  # sequential: the network before the current task

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

    def offered(self, specs: list[TaskSpec], k: int) -> dict[str, list[int]]:
        return {s.name: list(range(1, k + 1)) for s in specs}

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        k = self.num_units(specs)
        if self.config.unit_ratios is not None and len(self.config.unit_ratios) != k:
            raise ConfigError(f"method.unit_ratios: {len(self.config.unit_ratios)} ratios for {k} units")
        if self.config.level_weights is not None and len(self.config.level_weights) != k:
            raise ConfigError(
                f"method.level_weights: {len(self.config.level_weights)} weights for {k} levels"
            )
        model = _build_virtual(
            specs, backbone, k, self.orders(specs, k), self.offered(specs, k), self.config.unit_ratios
        )
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
            teacher = copy.deepcopy(model).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self._teacher = teacher
        model.active_units.fill_(phase.index + 1)  # the new task's unit joins the network

    # ---- training ----------------------------------------------------------------------------------
    def _level_weight(self, level: int) -> float:
        return 1.0 if self.config.level_weights is None else self.config.level_weights[level - 1]

    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(())
        for task, b in batches.items():
            for lv in model.levels_of(task):  # eq. 4: every level of every task
                loss = task_loss(model(b.x, task, model.route(task, lv)), b)
                out[f"loss/{task}@{lv}"] = loss.detach()
                total = total + self._level_weight(lv) * loss
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


class NestedNetConfig(DVNConfig):
    """``method:`` options of ``nestednet``: ``multi_task`` gives task i level i of one shared order;
    ``single_task`` gives every task all levels of that one order."""

    nested: Literal["multi_task", "single_task"] = "multi_task"

    @model_validator(mode="after")
    def _no_orders(self) -> NestedNetConfig:
        if self.orders is not None:
            raise ValueError(
                "NestedNet uses one order shared by every task (0, 1, ..., k-1): orders cannot be set"
            )
        if self.mode != "joint":
            raise ValueError("NestedNet is learned jointly (mode: joint)")
        return self


@register
class NestedNet(DVN):
    """NestedNet with channel pruning: nested levels of one order shared by all tasks."""

    name = "nestednet"
    Config = NestedNetConfig

    def orders(self, specs: list[TaskSpec], k: int) -> list[list[int]]:
        return [list(range(k)) for _ in specs]

    def offered(self, specs: list[TaskSpec], k: int) -> dict[str, list[int]]:
        if self.config.nested == "single_task":
            return {s.name: list(range(1, k + 1)) for s in specs}
        if k < len(specs):
            raise ConfigError(
                f"method.num_units: NestedNet gives task i level i: {len(specs)} tasks need at "
                f"least {len(specs)} units, not {k}"
            )
        # task i of n uses level round((i + 1) * k / n): with k = n, task i uses level i
        n = len(specs)
        return {s.name: [max(1, round((i + 1) * k / n))] for i, s in enumerate(specs)}


class GroupedPackNetConfig(MethodConfig):
    """``method:`` options of ``packnet-grouped``."""

    num_units: int | None = Field(default=None, ge=1)  # groups (default: the number of tasks)
    unit_ratios: list[float] | None = None


@register
class GroupedPackNet(DVN):
    """Grouped PackNet ("PackNet+"): task i uses channel groups 1..i, learned in sequence; learning task i
    trains only the parameters new at its level, so earlier tasks are unchanged bit for bit."""

    name = "packnet-grouped"
    Config = GroupedPackNetConfig
    sequential = True

    def __init__(self, config: GroupedPackNetConfig | None = None) -> None:
        Method.__init__(self, config)
        self._teacher = None
        self._frozen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

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

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        k = self.num_units(specs)
        return _build_virtual(
            specs, backbone, k, self.orders(specs, k), self.offered(specs, k), self.config.unit_ratios
        )

    def phases(self, tasks: list[str]) -> list[Phase]:
        return [Phase(f"task-{t}", [t], i, {"learned": tasks[:i]}) for i, t in enumerate(tasks)]

    def on_phase_start(self, model: nn.Module, phase: Phase) -> None:
        """Freeze the weight blocks of the previous task's level (all earlier levels are inside it)."""
        self._frozen = []
        if not phase.info["learned"]:
            return
        prev = phase.info["learned"][-1]
        units = model.route(prev).units or ()
        for m in model.trunk.modules():
            if not isinstance(m, _Sliced):
                continue
            w: torch.Tensor = m.weight  # type: ignore[attr-defined]
            out_in = torch.zeros(w.shape[0], dtype=torch.bool)
            in_in = torch.zeros(w.shape[1], dtype=torch.bool)
            if m.out_partition is not None:
                out_in[m.out_partition.indices(units)] = True
            if m.in_partition is not None:
                in_in[m.in_partition.indices(units)] = True
            mask = (out_in[:, None] & in_in[None, :]).reshape(w.shape[:2] + (1,) * (w.dim() - 2)).expand_as(w)
            self._frozen.append((w, mask, w.detach().clone()))
            b = getattr(m, "bias", None)
            if b is not None:
                self._frozen.append((b, out_in, b.detach().clone()))

    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        ((task, b),) = batches.items()
        loss = task_loss(model(b.x, task, model.route(task)), b)
        return {"loss": loss, f"loss/{task}": loss.detach()}

    def after_step(self, model: nn.Module, phase: Phase) -> None:
        """Put the frozen entries back: momentum and weight decay must not move them (PITFALLS.md)."""
        with torch.no_grad():
            for p, mask, saved in self._frozen:
                p.copy_(torch.where(mask, saved, p))
