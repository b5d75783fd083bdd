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
from virtnet.methods.common.distill import (
    as_input_of,
    distillation_loss,
    frozen_copy,
    statistics_kept,
    task_norms,
)
from virtnet.methods.common.unit_method import (
    FrozenBlocks,
    LevelsConfig,
    UnitMethod,
    freeze_blocks,
    restore_blocks,
)
from virtnet.methods.common.units import check_order, rule_orders
from virtnet.methods.common.virtual import VirtualNet, level_key


class DVNConfig(LevelsConfig):
    """``method:`` options of ``dvn``."""

    orders: dict[str, list[int]] | None = None  # explicit unit order per task (default: the eq. 3 rule)
    mode: Literal["joint", "sequential"] = "joint"
    temperature: float = Field(default=2.0, ge=1.0)  # sequential: distillation temperature
    distill_weight: float = Field(default=1.0, ge=0.0)  # sequential: weight of the distillation terms
    # sequential: the old tasks' levels that existed before the new task normalise with the statistics they
    # recorded (as the frozen teacher does), or with the new data's batch statistics (updating theirs)
    # ("batch_keep": batch statistics in training, the recorded ones kept for inference)
    old_bn: Literal["recorded", "batch", "batch_keep"] = "batch"
    # sequential: the teacher's old levels normalise the new data with the statistics they recorded
    # ("recorded", the old network as it is evaluated) or with the new batch's statistics ("batch", the
    # same normalisation as the student's with old_bn batch / batch_keep: identical outputs at the start)
    teacher_bn: Literal["recorded", "batch"] = "recorded"
    later_lr_scale: float = Field(default=1.0, gt=0.0, le=1.0)  # sequential: later tasks train at lr x this
    # sequential: epochs training a new task, and distilling the levels its unit adds to the old tasks,
    # with the old levels' weight blocks frozen (exactly: restored after every step) before eq. 6 trains
    # every unit, as LwF warms up its new head (0: none, the paper)
    warmup_epochs: int = Field(default=0, ge=0)


@register
class DVN(UnitMethod):
    """Deep virtual networks: k x nh outputs from one network (joint or sequential learning)."""

    name = "dvn"
    Config = DVNConfig

    def __init__(self, config: DVNConfig | None = None) -> None:
        super().__init__(config)
        self._teacher: nn.Module | None = None  # sequential: the network before the current task
        self._frozen: FrozenBlocks = []  # warm-up: the old levels' blocks, kept exactly

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
        out: list[Phase] = []
        for i, t in enumerate(tasks):
            if i > 0 and self.config.warmup_epochs > 0:
                info = {"learned": tasks[:i], "warmup": True, "epochs": self.config.warmup_epochs}
                out.append(Phase(f"warmup-{t}", [t], len(out), info))
            out.append(Phase(f"task-{t}", [t], len(out), {"learned": tasks[:i]}))
        return out

    def varying_parameters(self, phase: Phase) -> bool:
        # sequential: the optimizer holds every head, and the heads of tasks not learned yet (and, in a
        # warm-up, the old levels' heads) get no gradient
        return self.config.mode == "sequential"

    def on_phase_start(self, model: nn.Module, phase: Phase) -> None:
        self._teacher = None
        self._frozen = []
        if self.config.mode != "sequential":
            return
        learned = phase.info["learned"]
        if learned:
            self._teacher = frozen_copy(model)  # before the new unit joins: the old network
            self._teacher.active_units.fill_(len(learned))
            if self.config.teacher_bn == "batch":  # the old levels normalise each batch with its statistics
                for old in learned:
                    for bn in self._old_norms(self._teacher, old):
                        bn.train()  # a teacher's buffers are never read in train mode
        model.active_units.fill_(len(learned) + 1)  # the new task's unit joins the network
        if learned and phase.info.get("warmup"):
            # what the old tasks' levels read of the trunk and their stems (the old units' blocks) stays
            # exactly as it is; their heads and batch norms are not run in a warm-up
            routes = [model.route(old, lv) for old in learned for lv in self._teacher.levels_of(old)]
            self._frozen = freeze_blocks([model.trunk, *(model.stem(t) for t in learned)], routes)

    def after_step(self, model: nn.Module, phase: Phase) -> None:
        """Warm-up: put the old levels' blocks back (momentum and weight decay must not move them)."""
        restore_blocks(self._frozen)

    def _old_norms(self, model: VirtualNet, old: str) -> list[nn.Module]:
        """The private batch norms (trunk and stem) of old task ``old``'s levels the teacher has."""
        assert self._teacher is not None
        keys = [level_key(old, lv) for lv in self._teacher.levels_of(old)]
        return [bn for part in (model.trunk, model.stem(old)) for k in keys for bn in task_norms(part, k)]

    def param_groups(self, model: nn.Module, phase: Phase) -> list[dict[str, Any]]:
        groups = super().param_groups(model, phase)
        if self.config.mode == "sequential" and phase.info["learned"] and self.config.later_lr_scale != 1.0:
            for g in groups:
                g["lr_scale"] = g.get("lr_scale", 1.0) * self.config.later_lr_scale
        return groups

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
        adds is matched to the old network's largest level. With ``old_bn: batch`` every configuration's
        batch norms normalise with batch statistics and update their running statistics on the new data;
        with ``old_bn: recorded`` the old levels keep the statistics they recorded on their own task (the
        function distilled is then the function evaluated), and the level the new unit adds, which has
        recorded nothing, follows the new data; ``old_bn: batch_keep`` normalises with batch statistics
        and puts the old levels' recorded statistics back after the step. ``teacher_bn: batch`` makes the
        teacher normalise the new batch with its own statistics too.
        """
        assert self._teacher is not None
        teacher = self._teacher
        ((_, b),) = batches.items()
        total = torch.zeros(())
        c = self.config
        warmup = bool(phase.info.get("warmup"))  # the old levels are frozen: only the added ones learn
        for old in phase.info["learned"]:
            x = as_input_of(b.x, model.spec(old))
            old_levels = teacher.levels_of(old)
            norms = self._old_norms(model, old) if c.old_bn != "batch" else []
            if c.old_bn == "recorded":
                for bn in norms:
                    bn.eval()
            with torch.no_grad():
                targets = {lv: teacher(x, old, teacher.route(old, lv)) for lv in old_levels}
            with statistics_kept(norms if c.old_bn == "batch_keep" else []):
                for lv in model.levels_of(old):
                    if warmup and lv in old_levels:
                        continue  # frozen and equal to the teacher's: the term is constant
                    target = targets[min(lv, old_levels[-1])]
                    kd = distillation_loss(model(x, old, model.route(old, lv)), target, c.temperature)
                    out[f"distill/{old}@{lv}"] = kd.detach()
                    total = total + self._level_weight(lv) * kd
        return total
