"""``feature_extraction``: the trunk is learned on the first task (or taken from ``init_from``) and frozen;
each later task trains only its classifier head on the frozen features (and its own stem when its input
shape differs from the first task's; with equal shapes the first task's stem is shared and frozen).
Frozen parts are kept out of the optimizer and their batch norms stay in eval mode, so neither weights
nor running statistics move."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from virtnet.data.core import Batch
from virtnet.methods.base import Phase, register
from virtnet.methods.common.sequential import SequentialMethod


@register
class FeatureExtraction(SequentialMethod):
    """A new classifier on frozen features for every task after the first."""

    name = "feature_extraction"

    def _frozen_trunk(self, phase: Phase) -> bool:
        return phase.index > 0 or bool(self.config.init_from)

    def param_groups(self, model: nn.Module, phase: Phase) -> list[dict[str, Any]]:
        task = phase.tasks[0]
        params = list(model.heads[task].parameters())
        if not self._frozen_trunk(phase):
            params += list(model.trunk.parameters()) + list(model.stem(task).parameters())
        elif not model.shared_stem:
            params += list(model.stem(task).parameters())  # a new input shape needs its own input layer
        return [{"params": params}]

    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        if self._frozen_trunk(phase):
            model.trunk.eval()  # frozen batch-norm statistics must not move either
            if model.shared_stem:
                model.stem(phase.tasks[0]).eval()
        return super().training_step(model, batches, phase)
