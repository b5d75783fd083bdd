"""PackNet as a virtnet method: tasks added one at a time by training, pruning and re-training.

Mallya & Lazebnik, "PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning", CVPR 2018.

Algorithm (Sec. 3), for tasks 1..N in order::

    task t claims every free weight (owner 0 -> t); free weights start from zero ("come back from zero")
    train task t: only weights owned by t (and t's head / stem) move; earlier tasks' weights stay fixed
    prune: in every conv / FC layer, free the ratio_t smallest-magnitude weights owned by t (set them to 0)
    re-train task t for a few epochs at a small rate on the weights it kept
    (biases: trained with task 1, frozen afterwards, optionally one copy per task; batch norm: one copy per
    task by default from scratch, frozen after task 1 with a pre-trained first task, as in the paper)
    inference for task t: weights owned by tasks 1..t, the others masked to zero; task t's head

Phases (one training loop, :class:`virtnet.train.Trainer`): per task ``task-<t>`` (train.epochs at
train.lr), then, when the task is pruned and ``retrain_epochs > 0``, ``task-<t>-retrain`` (retrain_epochs
at retrain_lr, constant by default; ``prune_steps`` of them for incremental pruning). Pruning runs in
``on_phase_end`` of the phase before each re-training, so the per-phase checkpoint ``phase-<k>`` of a
train phase holds the pruned, not yet re-trained network. The ownership map and every per-task tensor
live in the model's state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.backbones.registry import build_multitask
from virtnet.data.core import Batch
from virtnet.methods.base import Level, Method, Phase, register
from virtnet.methods.packnet.config import PackNetConfig
from virtnet.methods.packnet.model import PackNetModel, wrap


def incremental_fractions(ratio: float, steps: int) -> list[float]:
    """Fractions of the *remaining* weights to prune at each of ``steps`` rounds so that the pruned part
    of the original weights grows linearly to ``ratio``: round ``j`` of ``s`` prunes
    ``(ratio / s) / (1 - ratio (j - 1) / s)`` of what the task still owns.

    ``incremental_fractions(0.75, 1) == [0.75]``; an empty list when ``ratio`` is 0.
    """
    if ratio <= 0:
        return []
    return [(ratio / steps) / (1.0 - ratio * (j - 1) / steps) for j in range(1, steps + 1)]


def _packnet(model: nn.Module) -> PackNetModel:
    if not isinstance(model, PackNetModel):
        raise TypeError(f"the packnet method needs a PackNetModel, got {type(model).__name__}")
    return model


@register
class PackNet(Method):
    """PackNet (iterative pruning and re-training, an ownership map per weight, a head per task)."""

    name = "packnet"
    Config = PackNetConfig
    Model = PackNetModel
    sequential = True
    config: PackNetConfig

    #: PackNet over a module you bring (see :func:`virtnet.methods.packnet.model.wrap`)
    wrap = staticmethod(wrap)

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        """A :class:`PackNetModel` over a MultiTaskNet of ``backbone`` (stem per task unless shared)."""
        self.config.ratios_for(len(specs))  # a bad ratio count fails now, not after training task 1
        shared = self.config.shared_stem
        if shared is None:
            shared = len({(s.in_channels, s.input_size) for s in specs}) == 1
        net = build_multitask(backbone, specs, shared_stem=shared)
        if self.config.init_from:
            from virtnet.methods.common.loading import load_matching

            load_matching(net, self.config.init_from)
        return PackNetModel.from_multitask(
            net,
            task_specific_bn=self.config.bn_per_task(),
            task_specific_bias=self.config.task_specific_bias,
        )

    # ---- phases -------------------------------------------------------------------------------------
    def phases(self, tasks: list[str]) -> list[Phase]:
        cfg = self.config
        ratios = cfg.ratios_for(len(tasks))
        out: list[Phase] = []
        for k, task in enumerate(tasks):
            fractions = incremental_fractions(ratios[k], cfg.prune_steps)
            retrain = cfg.retrain_epochs > 0 and bool(fractions)
            info: dict[str, Any] = {
                "learned": tasks[:k],
                "packnet": {
                    "task": task,
                    "stage": "train",
                    "ratio": ratios[k],
                    "prune_after": fractions[:1] if retrain else fractions,
                },
            }
            out.append(Phase(f"task-{task}", [task], len(out), info))
            if not retrain:
                continue
            for j in range(len(fractions)):
                suffix = "" if len(fractions) == 1 else str(j + 1)
                info = {
                    "learned": tasks[:k],
                    "epochs": cfg.retrain_epochs,
                    "lr": cfg.retrain_lr,
                    "schedule": cfg.retrain_schedule,
                    "packnet": {
                        "task": task,
                        "stage": "retrain",
                        "ratio": ratios[k],
                        "step": j + 1,
                        "prune_after": fractions[j + 1 : j + 2],
                    },
                }
                out.append(Phase(f"task-{task}-retrain{suffix}", [task], len(out), info))
        return out

    @staticmethod
    def _task(phase: Phase) -> str:
        return phase.info["packnet"]["task"] if "packnet" in phase.info else phase.tasks[0]

    def on_phase_start(self, model: nn.Module, phase: Phase) -> None:
        m = _packnet(model)
        if phase.info.get("packnet", {}).get("stage", "train") == "train":
            m.begin_task(self._task(phase))
        m.invalidate()

    def on_phase_end(self, model: nn.Module, phase: Phase) -> None:
        m = _packnet(model)
        for fraction in phase.info.get("packnet", {}).get("prune_after", []):
            m.prune(self._task(phase), fraction)

    def param_groups(self, model: nn.Module, phase: Phase) -> list[dict[str, Any]]:
        return [{"params": _packnet(model).trainable_parameters(self._task(phase))}]

    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        _packnet(model).prepare_step(self._task(phase))
        return super().training_step(model, batches, phase)

    def after_step(self, model: nn.Module, phase: Phase) -> None:
        _packnet(model).restore_frozen(self._task(phase))

    # ---- inference ----------------------------------------------------------------------------------
    def levels(self, model: nn.Module, task: str) -> list[Level]:
        """One level per task (PackNet has no budgets); TaskError for a task not in the model or not
        added yet."""
        _packnet(model).check_task(task)
        return [Level(1, "full")]

    def export(self, model: nn.Module, task: str, level: int | None = None) -> nn.Module:
        """Task ``task`` as a dense standalone network with zeros (see :meth:`PackNetModel.export`)."""
        self.level(model, task, level)
        return _packnet(model).export(task)

    def shared_prefixes(self) -> tuple[str, ...]:
        return ("trunk.",)

    def summary(self, model: nn.Module, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Storage in bytes (shared weights once, packed ownership map, per-task tensors) and how many
        prunable weights each task owns; ``virtnet eval`` prints it under its table."""
        m = _packnet(model)
        s = m.storage()
        counts = m.ownership.counts()
        return {
            "storage_bytes": s["total"],
            "storage": {k: s[k] for k in ("base_weights", "shared_other", "ownership_packed")}
            | {"tasks": s["tasks"]},
            "ownership_bits_per_weight": s["ownership_bits"],
            "owned_weights": {m.task_names[k - 1] if k else "free": c for k, c in counts.items()},
        }


__all__ = ["PackNet", "incremental_fractions"]
