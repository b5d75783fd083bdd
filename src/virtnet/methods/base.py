"""The small contract every method implements, and the method registry.

A method (peft-style: one folder per method, registered by name) says how to

* build its multi-task model from task specs and a backbone config (:meth:`Method.build`);
* split training into phases (:meth:`Method.phases`): joint methods train every task in one phase,
  sequential ones add one task per phase and see only that task's data;
* compute a training step's losses from one batch per task (:meth:`Method.training_step`);
* choose the parameters the optimizer may move (:meth:`Method.param_groups`) and keep frozen ones
  frozen (:meth:`Method.after_step`);
* act at phase boundaries (:meth:`Method.on_phase_start`, :meth:`Method.on_phase_end`): PackNet prunes
  there, DVN snapshots the old network for distillation;
* list the levels (budgets) a task offers (:meth:`Method.levels`), predict at one
  (:meth:`Method.predict`) and export one as a standalone network (:meth:`Method.export`).

The training loop, the CLI and the cost reports never branch on a method's name: they ask the registry.
The current task and level are arguments, never globals.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.data.core import Batch
from virtnet.errors import BudgetError, ConfigError, TaskError
from virtnet.nn import Route


class MethodConfig(BaseModel):
    """Base of every method's options (a pydantic model: unknown keys and wrong types are errors)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Level:
    """One budget a task offers: level ``index`` (1 = smallest) of that task's hierarchy.

    ``route`` is what the model's forward needs to run it (None: the dense network).
    """

    index: int
    name: str
    route: Route | None = None


@dataclass
class Phase:
    """A stretch of training over some tasks.

    Attributes:
        name: shown in logs and checkpoints.
        tasks: the tasks whose data this phase trains on (one batch of each per step, or one task per
            step depending on the loader's sampling).
        index: position of the phase in the method's list.
        info: method-specific data (e.g. the tasks learned before this phase). The loop reads three
            keys: ``epochs``, ``lr`` and ``schedule`` override the ``train:`` section's for this phase
            (e.g. a warm-up, or a re-training phase at a small constant rate: ``schedule: "constant"``).
    """

    name: str
    tasks: list[str]
    index: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def task_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy for multiclass tasks; masked binary cross-entropy for multilabel tasks."""
    if batch.y.dim() == 1:
        return F.cross_entropy(logits, batch.y)
    per = F.binary_cross_entropy_with_logits(logits, batch.y.to(logits.dtype), reduction="none")
    if batch.mask is None:
        return per.mean()
    m = batch.mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1.0)


class Method:
    """Base class of a method. Subclasses set ``name`` and ``Config`` and implement :meth:`build`.

    The defaults describe a single-level joint method: one phase over every task, the sum of the task
    losses, every trainable parameter optimised, one level ("full") per task, export of the task's
    stem, trunk and head.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: True when a task can be added to a trained model (sequential methods)
    sequential: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    # ---- building --------------------------------------------------------------------------------
    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        """The method's model for every task of the run (``specs``) on the backbone described by
        ``backbone`` (a :class:`virtnet.backbones.registry.BackboneConfig`). Called under the run's seed."""
        raise NotImplementedError

    # ---- training ----------------------------------------------------------------------------------
    def phases(self, tasks: list[str]) -> list[Phase]:
        return [Phase("joint", list(tasks), 0)]

    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        """Losses of one step: ``{"loss": total, "loss/<task>": ...}``."""
        out: dict[str, torch.Tensor] = {}
        total = None
        for task, b in batches.items():
            loss = task_loss(model(b.x, task), b)
            out[f"loss/{task}"] = loss.detach()
            total = loss if total is None else total + loss
        assert total is not None
        out["loss"] = total
        return out

    def param_groups(self, model: nn.Module, phase: Phase) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer (options in a group override the optimizer's)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def on_phase_start(self, model: nn.Module, phase: Phase) -> None:
        """Called before a phase's first step (also on resume, before the restored weights are loaded)."""

    def on_phase_end(self, model: nn.Module, phase: Phase) -> None:
        """Called after a phase's last step."""

    def after_step(self, model: nn.Module, phase: Phase) -> None:
        """Called after every optimizer step (e.g. to restore frozen weights)."""

    # ---- inference ---------------------------------------------------------------------------------
    def levels(self, model: nn.Module, task: str) -> list[Level]:
        """The task's levels, smallest first."""
        _check_task(model, task)
        return [Level(1, "full")]

    def level(self, model: nn.Module, task: str, level: int | None) -> Level:
        """The task's level ``level`` (1-based; None: the largest)."""
        levels = self.levels(model, task)
        if level is None:
            return levels[-1]
        for lv in levels:
            if lv.index == level:
                return lv
        raise BudgetError(f"task '{task}' has levels {[lv.index for lv in levels]}, not {level}")

    def predict(self, model: nn.Module, x: torch.Tensor, task: str, level: int | None = None) -> torch.Tensor:
        """Logits of task ``task`` at ``level`` (checks the input shape)."""
        lv = self.level(model, task, level)
        if hasattr(model, "check_input"):
            model.check_input(x, task)
        return model(x, task, lv.route)

    def export(self, model: nn.Module, task: str, level: int | None = None) -> nn.Module:
        """A standalone network ``forward(x) -> logits`` for ``(task, level)``, sharing no tensor with
        ``model``. Parameter names start with ``stem.``, ``trunk.`` or ``head.``."""
        self.level(model, task, level)
        return copy.deepcopy(model.task_network(task)).eval()

    def shared_prefixes(self) -> tuple[str, ...]:
        """Prefixes of the exported parameter names that are shared between tasks (cost accounting)."""
        return ("trunk.",)

    def summary(self, model: nn.Module, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Figures over a whole evaluation that ``virtnet eval`` prints under its table (and adds to its
        ``--json`` output as ``"summary"``), e.g. a mean accuracy or a score; ``rows``: the table's rows."""
        return {}


def _check_task(model: nn.Module, task: str) -> None:
    tasks = getattr(model, "tasks", None)
    if tasks is not None and task not in tasks:
        raise TaskError(f"unknown task '{task}': the model has {list(tasks)}")


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Method]:
    """The registered method class called ``name``."""
    import virtnet.methods  # noqa: F401  (registers the built-in methods)

    if name not in _REGISTRY:
        raise ConfigError(f"method.name: unknown method '{name}' (known: {sorted(_REGISTRY)})")
    return _REGISTRY[name]


def method_names() -> list[str]:
    import virtnet.methods  # noqa: F401

    return sorted(_REGISTRY)


def make_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """Instantiate method ``name`` with its options validated by the method's ``Config``."""
    from virtnet.config import validate

    cls = get_method_class(name)
    cfg = validate(cls.Config, options or {}, where="method")
    return cls(cfg)


__all__ = [
    "Level",
    "Method",
    "MethodConfig",
    "Phase",
    "get_method_class",
    "make_method",
    "method_names",
    "register",
    "task_loss",
]
