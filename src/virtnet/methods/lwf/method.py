"""Learning without Forgetting (Li & Hoiem, ECCV 2016) and its distillation loss.

LwF learns tasks one after another without the old tasks' data. Before learning task k it keeps a frozen
copy of the network (the *teacher*); while learning task k on task k's images it minimises

    L = CE(new head on x, y) + lambda_o * sum_{old j} L_D(head_j(x), teacher_j(x)),

where L_D is Hinton's temperature-scaled cross-entropy (T = 2 in LwF): the old tasks' responses to the
new task's images are kept while the shared trunk learns the new task. LwF first warms up the new head
alone (shared and old parameters frozen), then trains everything jointly.

Deep Virtual Networks (Sec. 3.3) reuse the same loss per (task, level); LwF is its nh = 1 case. The
loss and the teacher copy live in :mod:`virtnet.methods.common.distill`.

Choices where the paper leaves room (see docs/methods/lwf.md):
* the teacher's outputs are computed on the fly on each (augmented) batch rather than recorded once
  before training, which is the same objective with augmentation;
* an old task whose input shape differs from the new task's sees the new images resized (bilinear) and
  with channels converted (grey repeated to 3 channels, RGB averaged to grey);
* the stems of old tasks (task-specific input layers that only see resized new images) keep their
  batch-norm running statistics (eval mode);
* ``task_bn``: the shared trunk's batch norms keep running statistics per task (``stats``, the default),
  or per-task statistics and affine parameters (``private``), or one set that follows the newest task's
  data (``shared``, LwF's networks had no batch norm). With per-task batch norm the old tasks' forwards
  during distillation normalise with the statistics their task recorded, exactly as the frozen teacher
  does, so the function distilled is the function evaluated; a new task's batch norms start as the
  previous task's.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.data.core import Batch
from virtnet.methods.base import Phase, register, task_loss
from virtnet.methods.common.distill import (
    as_input_of,
    copy_task_bn,
    distillation_loss,
    frozen_copy,
    install_task_bn,
    set_bn_eval,
    set_task_bn_eval,
    statistics_kept,
    task_norms,
)
from virtnet.methods.common.sequential import SequentialConfig, SequentialMethod


class LwFConfig(SequentialConfig):
    temperature: float = Field(default=2.0, ge=1.0)  # distillation temperature T
    distill_weight: float = Field(default=1.0, ge=0.0)  # lambda_o
    warmup_epochs: int = Field(default=0, ge=0)  # epochs training only the new head before joint training
    warmup_lr: float | None = Field(default=None, gt=0)  # lr of the warm-up (default: train.lr)
    joint_lr: float | None = Field(default=None, gt=0)  # lr of a later joint phase (None: train.lr / 10)
    task_bn: Literal["shared", "stats", "private"] = "stats"  # batch norm of the shared layers per task
    old_bn: Literal["recorded", "batch"] = "recorded"  # old tasks' forwards: recorded or batch statistics


#: a later task's joint phase runs at train.lr times this when ``joint_lr`` is None (issue 15: at train.lr
#: the recorded-statistics paths diverged; 1/10 was the best of 1, 0.4 and 0.1 on permuted MNIST)
JOINT_LR_SCALE = 0.1


@register
class LwF(SequentialMethod):
    """Learning without Forgetting on a shared trunk with a stem and head per task."""

    name = "lwf"
    Config = LwFConfig

    def __init__(self, config: LwFConfig | None = None) -> None:
        super().__init__(config)
        self._teacher: nn.Module | None = None  # frozen copy made at the start of each later phase

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        model = super().build(specs, backbone)
        if self.config.task_bn != "shared":
            install_task_bn(model, private_affine=self.config.task_bn == "private")
        return model

    def create(
        self, specs: list[TaskSpec], backbone: Any, structure: dict[str, Any] | None = None
    ) -> nn.Module:
        if structure is not None and self.config.task_bn != "shared" and not structure.get("task_keyed"):
            # a checkpoint saved before batch norm per task existed (issue 15): one set of statistics
            self.config = self.config.model_copy(update={"task_bn": "shared"})
        return super().create(specs, backbone, structure)

    def phases(self, tasks: list[str]) -> list[Phase]:
        out: list[Phase] = []
        for i, t in enumerate(tasks):
            warm = i > 0 and self.config.warmup_epochs > 0
            if warm:
                info: dict[str, Any] = {
                    "learned": tasks[:i],
                    "warmup": True,
                    "epochs": self.config.warmup_epochs,
                    "first": True,
                }
                if self.config.warmup_lr is not None:
                    info["lr"] = self.config.warmup_lr
                out.append(Phase(f"warmup-{t}", [t], len(out), info))
            joint: dict[str, Any] = {"learned": tasks[:i], "first": not warm}
            if i > 0 and self.config.joint_lr is not None:
                joint["lr"] = self.config.joint_lr
            out.append(Phase(f"task-{t}", [t], len(out), joint))
        return out

    def varying_parameters(self, phase: Phase) -> bool:
        return True  # its optimizer holds every head, and the heads of tasks not learned yet get no gradient

    def on_phase_start(self, model: nn.Module, phase: Phase) -> None:
        self._teacher = None
        learned = phase.info["learned"]
        if learned and phase.info.get("first") and self.config.task_bn != "shared":
            copy_task_bn(model, learned[-1], phase.tasks[0])  # the new task's batch norms start as the last's
        if learned and not phase.info.get("warmup"):
            self._teacher = frozen_copy(model)

    def param_groups(self, model: nn.Module, phase: Phase) -> list[dict[str, Any]]:
        task = phase.tasks[0]
        if phase.info.get("warmup"):
            return [{"params": list(model.heads[task].parameters())}]
        group: dict[str, Any] = {"params": [p for p in model.parameters() if p.requires_grad]}
        if phase.info["learned"] and self.config.joint_lr is None:
            group["lr_scale"] = JOINT_LR_SCALE  # LwF fine-tunes jointly at a lower rate
        return [group]

    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        ((task, b),) = batches.items()
        learned = phase.info["learned"]
        if learned:
            # old tasks' statistics stay; during warm-up the whole shared network is frozen (with batch
            # norm per task the new task's own statistics still follow its data: they are not shared)
            for t in learned:
                if model.stem(t) is not model.stem(task):
                    set_bn_eval(model.stem(t))
            if self.config.task_bn != "shared" and self.config.old_bn == "recorded":
                set_task_bn_eval(model, learned)
            elif self.config.task_bn == "shared" and phase.info.get("warmup"):
                set_bn_eval(model.trunk)
                set_bn_eval(model.stem(task))
        loss = task_loss(model(b.x, task), b)
        out = {f"loss/{task}": loss.detach()}
        if self._teacher is not None:
            kd_total = torch.zeros((), dtype=loss.dtype)
            # old_bn batch: the old tasks' forwards update copies of their statistics (recorded ones kept)
            kept = self.config.task_bn != "shared" and self.config.old_bn == "batch"
            norms = [bn for t in learned for bn in task_norms(model, t)] if kept else []
            with statistics_kept(norms):
                for old in learned:
                    x = as_input_of(b.x, model.spec(old))
                    with torch.no_grad():
                        target = self._teacher(x, old)
                    kd = distillation_loss(model(x, old), target, self.config.temperature)
                    out[f"distill/{old}"] = kd.detach()
                    kd_total = kd_total + kd
            loss = loss + self.config.distill_weight * kd_total
        out["loss"] = loss
        return out
