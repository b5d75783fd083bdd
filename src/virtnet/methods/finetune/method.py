"""``finetune``: tasks learned one after another; learning task t updates the trunk, task t's stem and
head; earlier heads stay as they were, so earlier tasks are forgotten (LwF paper's "fine-tuning").
``init_from`` starts from a trained checkpoint's trunk (fine-tuning from a checkpoint)."""

from __future__ import annotations

from typing import Any

from torch import nn

from virtnet.methods.base import Phase, register
from virtnet.methods.common.sequential import SequentialMethod


@register
class FineTune(SequentialMethod):
    """Sequential fine-tuning: the trunk follows the newest task."""

    name = "finetune"

    def param_groups(self, model: nn.Module, phase: Phase) -> list[dict[str, Any]]:
        task = phase.tasks[0]
        params = list(model.trunk.parameters()) + list(model.heads[task].parameters())
        params += list(model.stem(task).parameters())  # the shared stem follows the newest task too
        return [{"params": params}]
