"""``joint``: one shared trunk, a stem and a linear head per task, trained on the sum of the task losses
with one batch of every task per step (Caruana's multi-task learning)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from virtnet.backbones.base import MultiTaskNet, TaskSpec
from virtnet.backbones.registry import build_multitask
from virtnet.data.core import Batch
from virtnet.methods.base import Method, MethodConfig, Phase, register, task_loss
from virtnet.nn import call


class JointConfig(MethodConfig):
    shared_stem: bool = False  # one stem for every task (tasks must share an input shape)
    task_weights: dict[str, float] | None = None  # loss weight per task (default 1)


@register
class Joint(Method):
    """Shared trunk, a stem and a head per task, trained on the sum of the task losses."""

    name = "joint"
    Config = JointConfig
    Model = MultiTaskNet

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        return build_multitask(backbone, specs, shared_stem=self.config.shared_stem)

    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        """One trunk forward over the concatenated batch of every task.

        The shared trunk's batch norms then normalise training batches with the statistics of the task
        mixture, which is what their running statistics (used at test time) estimate. Forwarding the tasks
        one at a time trains each on its own statistics and tests it on the mixture's (measured on MNIST +
        Fashion-MNIST: Fashion-MNIST 58.9 % instead of 86 %).
        """
        weights = self.config.task_weights or {}
        tasks = list(batches)
        if model.shared_stem:
            x = torch.cat([batches[t].x for t in tasks])
            feats = model.trunk(call(model.stem(tasks[0]), x, None), None)
        else:
            stems = [call(model.stem(t), batches[t].x, None) for t in tasks]  # (B_t, C, S, S) each
            feats = model.trunk(torch.cat(stems), None)  # (sum of B_t, F)
        out: dict[str, torch.Tensor] = {}
        total = None
        for t, f in zip(tasks, feats.split([len(batches[t]) for t in tasks]), strict=True):
            loss = task_loss(model.heads[t](f), batches[t])
            out[f"loss/{t}"] = loss.detach()
            loss = loss * weights.get(t, 1.0)
            total = loss if total is None else total + loss
        assert total is not None
        out["loss"] = total
        return out
