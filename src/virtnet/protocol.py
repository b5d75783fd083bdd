"""The model protocol: what every method's model is, declared once.

Generic code (the API, cost reports, the budget planner, export, evaluation) talks to a model only
through :class:`MultiTaskModel`; it never probes a model with ``hasattr`` or branches on a layer's class.
A method names its model class (``Method.Model``) and registration checks that the class implements
every member of the protocol, so a model that does not is refused when its method is registered, not
deep inside a forward.

Members:

* ``tasks`` and ``spec(task)``: the tasks and their :class:`TaskSpec` (input shape, outputs, input
  normalisation);
* ``forward(x, task, route=None)``: logits of ``task``; ``route`` (a :class:`virtnet.nn.Route`) selects a
  level's sub-network where the model has levels;
* ``levels(task)`` and ``route(task, level)``: the levels a task offers now and the route that runs one;
* ``task_network(task, level)``: the (task, level)'s network as a module called ``net(x, route)``, sharing
  (not copying) this model's modules: what export cuts from;
* ``parameter_usage(task, level)``: for every stored value the (task, level) reads, a boolean mask of the
  elements it reads, by the model's state-dict name (parameters only): exact memory accounting, shared
  values counted once across tasks by taking the union of masks;
* ``structure()``: a JSON-serialisable description of what the model's build options alone do not say
  (tasks added so far, units in use, a widened topology ...); ``Method.build(specs, backbone, structure)``
  rebuilds exactly that model, so a checkpoint loads with no replay of training phases.

The task and level are always arguments, never state set on the model beforehand.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from virtnet.errors import CheckpointError, DataError, TaskError


@dataclass(frozen=True)
class TaskSpec:
    """What a network needs to know of a task: its name, input shape, number of outputs and the input
    normalisation it was trained with.

    ``mean`` and ``std`` are per-channel statistics of the training images scaled to [0, 1] (empty: not
    recorded); a batch of raw images ``u`` (uint8) is fed as ``(u / 255 - mean) / std``.
    """

    name: str
    in_channels: int
    input_size: int
    num_outputs: int
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        for key in ("in_channels", "input_size", "num_outputs"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DataError(f"task '{self.name}': {key} must be a positive integer, got {v!r}")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v and len(v) != self.in_channels:
                raise DataError(
                    f"task '{self.name}': {key} has {len(v)} values for {self.in_channels} input channels"
                )
            if any(not math.isfinite(x) for x in v):
                raise DataError(f"task '{self.name}': {key} must be finite, got {list(v)}")
        if any(s <= 0 for s in self.std):
            raise DataError(f"task '{self.name}': std must be positive, got {list(self.std)}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in_channels": self.in_channels,
            "input_size": self.input_size,
            "num_outputs": self.num_outputs,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskSpec:
        return cls(
            str(d["name"]),
            d["in_channels"],
            d["input_size"],
            d["num_outputs"],
            tuple(d.get("mean", ())),
            tuple(d.get("std", ())),
        )


def check_input_shape(spec: TaskSpec, x: torch.Tensor, noun: str = "task") -> None:
    """Raise DataError when ``x`` is not a ``(B, C, S, S)`` batch of ``spec``'s input shape."""
    expected = spec.input_shape
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise DataError(
            f"{noun} '{spec.name}': expected input of shape "
            f"(B, {spec.in_channels}, {spec.input_size}, {spec.input_size}), got {tuple(x.shape)}"
        )


class MultiTaskModel(abc.ABC):
    """Mixin declaring the protocol every method's model implements (see the module docstring).

    A model is an ``nn.Module`` that also derives from this class; the abstract members must be
    implemented, the others have defaults.
    """

    # ---- tasks -------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def tasks(self) -> list[str]:
        """The model's tasks, in order."""

    @abc.abstractmethod
    def spec(self, task: str) -> TaskSpec:
        """Task ``task``'s spec (TaskError for an unknown task)."""

    def specs_list(self) -> list[TaskSpec]:
        return [self.spec(t) for t in self.tasks]

    def check_task(self, task: str) -> str:
        if task not in self.tasks:
            raise TaskError(f"unknown task '{task}': the model has {list(self.tasks)}")
        return task

    def check_input(self, x: torch.Tensor, task: str) -> None:
        """Raise DataError when ``x`` is not a batch of the task's input shape."""
        check_input_shape(self.spec(task), x)

    # ---- computing ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, x: torch.Tensor, task: str, route: Any = None) -> torch.Tensor:
        """Logits ``(B, outputs)`` of ``task`` on ``x`` along ``route`` (None: the task's default)."""

    def levels(self, task: str) -> list[int]:
        """The levels (1 = smallest) the task offers now; one level by default."""
        self.check_task(task)
        return [1]

    def route(self, task: str, level: int | None = None) -> Any:
        """The route that runs (task, level) (None: the model needs none)."""
        self.check_task(task)
        return None

    @abc.abstractmethod
    def task_network(self, task: str, level: int | None = None) -> nn.Module:
        """(task, level)'s network, called ``net(x, route(task, level))``, sharing this model's modules."""

    @abc.abstractmethod
    def parameter_usage(self, task: str, level: int | None = None) -> dict[str, torch.Tensor]:
        """For every parameter that (task, level) reads: a bool mask of the elements it reads, keyed by
        the parameter's name in ``self.named_parameters()`` (level None: the task's largest)."""

    # ---- describing --------------------------------------------------------------------------------
    def structure(self) -> dict[str, Any]:
        """What a rebuild needs beyond the build options (JSON-serialisable; empty when nothing)."""
        return {}

    def apply_structure(self, structure: Mapping[str, Any]) -> None:
        """Make this freshly built model the one ``structure`` describes (what :meth:`structure` returned
        when it was saved). The default accepts only the structure the model already has; models whose
        structure changes during training override it. CheckpointError when the structure cannot be
        applied."""
        check_structure(structure, self.structure())


def check_structure(saved: Mapping[str, Any], built: Mapping[str, Any]) -> None:
    """CheckpointError naming the keys where a saved structure differs from the built model's."""
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"structure: expected a mapping, got {type(saved).__name__}")
    keys = sorted(str(k) for k in set(built) | set(saved) if built.get(k) != saved.get(k))
    if keys:
        shown = "; ".join(f"{k}: saved {saved.get(k)!r}, built {built.get(k)!r}" for k in keys)
        if len(shown) > 300:
            shown = shown[:300] + "..."
        raise CheckpointError(f"structure: the saved structure does not match the model's ({shown})")


def usage_count(masks: Mapping[str, torch.Tensor]) -> int:
    """Number of elements selected by ``masks``."""
    return int(sum(int(m.sum()) for m in masks.values()))


def union_usage(usages: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The union of several usage maps (a value used by two selections is counted once)."""
    out: dict[str, torch.Tensor] = {}
    for u in usages:
        for k, m in u.items():
            out[k] = m.clone() if k not in out else (out[k] | m)
    return out


__all__ = ["MultiTaskModel", "TaskSpec", "check_input_shape", "check_structure", "union_usage", "usage_count"]
