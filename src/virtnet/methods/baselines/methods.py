"""The baselines every benchmark compares against.

* ``individual``: one separate network per task (no parameter shared); ``width`` scales each network,
  e.g. 0.5 for "individual networks of the same size" as a half-width level.
* ``joint``: one shared trunk, a stem and a linear head per task, trained on the sum of the task losses
  with one batch of every task per step (Caruana's multi-task learning).
* ``finetune``: tasks learned one after another; learning task t updates the trunk, task t's stem and
  head; earlier heads stay as they were, so earlier tasks are forgotten (LwF paper's "fine-tuning").
  ``init_from`` starts from a trained checkpoint's trunk (fine-tuning from a checkpoint).
* ``feature_extraction``: the trunk is learned on the first task (or taken from ``init_from``) and frozen;
  each later task trains only its classifier head on the frozen features (and its own stem when its input
  shape differs from the first task's; with equal shapes the first task's stem is shared and frozen).
  Frozen parts are kept out of the optimizer and their batch norms stay in eval mode, so neither weights
  nor running statistics move.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from virtnet.backbones.base import MultiTaskNet, TaskNet, TaskSpec
from virtnet.backbones.registry import build_multitask
from virtnet.data.core import Batch
from virtnet.errors import CheckpointError, TaskError
from virtnet.methods.base import Method, MethodConfig, Phase, register, task_loss
from virtnet.nn import Route, call
from virtnet.train.checkpoint import load_checkpoint


class IndividualNets(nn.Module):
    """One :class:`MultiTaskNet` of a single task per task, under ``nets[task]``."""

    def __init__(self, nets: dict[str, MultiTaskNet]) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(nets)

    @property
    def tasks(self) -> list[str]:
        return list(self.nets.keys())

    def _net(self, task: str) -> MultiTaskNet:
        if task not in self.nets:
            raise TaskError(f"unknown task '{task}': the model has {self.tasks}")
        return self.nets[task]  # type: ignore[return-value]

    def check_input(self, x: torch.Tensor, task: str) -> None:
        self._net(task).check_input(x, task)

    def forward(self, x: torch.Tensor, task: str, route: Route | None = None) -> torch.Tensor:
        return self._net(task)(x, task, route)

    def task_network(self, task: str) -> TaskNet:
        return self._net(task).task_network(task)


class IndividualConfig(MethodConfig):
    width: float = Field(default=1.0, gt=0)  # multiplies the backbone's width for every network


@register
class Individual(Method):
    """One network per task."""

    name = "individual"
    Config = IndividualConfig

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        cfg = backbone.model_copy(update={"width": backbone.width * self.config.width})
        return IndividualNets({s.name: build_multitask(cfg, [s]) for s in specs})

    def shared_prefixes(self) -> tuple[str, ...]:
        return ()


class JointConfig(MethodConfig):
    shared_stem: bool = False  # one stem for every task (tasks must share an input shape)
    task_weights: dict[str, float] | None = None  # loss weight per task (default 1)


@register
class Joint(Method):
    """Shared trunk, a stem and a head per task, trained on the sum of the task losses."""

    name = "joint"
    Config = JointConfig

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


class SequentialConfig(MethodConfig):
    init_from: str | None = None  # checkpoint whose trunk (and matching stems/heads) start the run
    shared_stem: bool | None = None  # None: share the stem when every task has the same input shape


def _same_shape(specs: list[TaskSpec]) -> bool:
    return len({(s.in_channels, s.input_size) for s in specs}) == 1


def load_matching(model: nn.Module, path: str) -> list[str]:
    """Copy the tensors of checkpoint ``path`` whose names and shapes match ``model``'s; the trunk must
    match entirely. Returns the names copied."""
    ck = load_checkpoint(path)
    own = model.state_dict()
    trunk_keys = [k for k in own if k.startswith("trunk.")]
    for k in trunk_keys:
        if k not in ck.model_state or ck.model_state[k].shape != own[k].shape:
            raise CheckpointError(
                f"{path}: saved for a different network: its trunk has no tensor '{k}' of "
                f"shape {tuple(own[k].shape)}"
            )
    copied = [k for k, v in ck.model_state.items() if k in own and own[k].shape == v.shape]
    model.load_state_dict({**own, **{k: ck.model_state[k] for k in copied}})
    return copied


class _Sequential(Method):
    """Tasks one after another: phase t trains on task t's data only."""

    Config = SequentialConfig
    sequential = True

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        shared = self.config.shared_stem
        if shared is None:
            shared = _same_shape(specs)
        model = build_multitask(backbone, specs, shared_stem=shared)
        if self.config.init_from:
            load_matching(model, self.config.init_from)
        return model

    def phases(self, tasks: list[str]) -> list[Phase]:
        return [Phase(f"task-{t}", [t], i, {"learned": tasks[:i]}) for i, t in enumerate(tasks)]


@register
class FineTune(_Sequential):
    """Sequential fine-tuning: the trunk follows the newest task."""

    name = "finetune"

    def param_groups(self, model: nn.Module, phase: Phase) -> list[dict[str, Any]]:
        task = phase.tasks[0]
        params = list(model.trunk.parameters()) + list(model.heads[task].parameters())
        params += list(model.stem(task).parameters())  # the shared stem follows the newest task too
        return [{"params": params}]


@register
class FeatureExtraction(_Sequential):
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
