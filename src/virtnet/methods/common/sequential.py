"""The base of the sequential baselines (fine-tuning, feature extraction, LwF): a shared trunk with a stem
and a head per task, tasks learned one per phase, optionally started from a checkpoint."""

from __future__ import annotations

from typing import Any

from torch import nn

from virtnet.backbones.base import MultiTaskNet, TaskSpec
from virtnet.backbones.registry import build_multitask
from virtnet.methods.base import Method, MethodConfig, Phase
from virtnet.methods.common.loading import load_matching


class SequentialConfig(MethodConfig):
    init_from: str | None = None  # checkpoint whose trunk (and matching stems/heads) start the run
    shared_stem: bool | None = None  # None: share the stem when every task has the same input shape


def same_shape(specs: list[TaskSpec]) -> bool:
    return len({(s.in_channels, s.input_size) for s in specs}) == 1


class SequentialMethod(Method):
    """Tasks one after another: phase t trains on task t's data only."""

    Config = SequentialConfig
    Model = MultiTaskNet
    sequential = True

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        shared = self.config.shared_stem
        if shared is None:
            shared = same_shape(specs)
        model = build_multitask(backbone, specs, shared_stem=shared)
        if self.config.init_from:
            load_matching(model, self.config.init_from)
        return model

    def phases(self, tasks: list[str]) -> list[Phase]:
        return [Phase(f"task-{t}", [t], i, {"learned": tasks[:i]}) for i, t in enumerate(tasks)]
