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
  (:meth:`Method.predict`) and export one as a standalone network (:meth:`Method.export`);
* add figures computed on the evaluation data to each (task, level)'s evaluation row
  (:meth:`Method.eval_columns`), e.g. FLOPs per instance when they depend on the input.

The training loop, the CLI and the cost reports never branch on a method's name: they ask the registry.
The current task and level are arguments, never globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from virtnet.data.core import Batch
from virtnet.errors import BudgetError, ConfigError
from virtnet.nn import Route
from virtnet.protocol import MultiTaskModel, TaskSpec


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
        info: method-specific data (e.g. the tasks learned before this phase). The loop reads these
            keys: ``epochs``, ``lr`` and ``schedule`` override the ``train:`` section's for this phase
            (e.g. a warm-up, or a re-training phase at a small constant rate: ``schedule: "constant"``);
            ``forward_only: True`` makes a *statistics phase*: the loop builds no optimizer, runs the
            step module without autograd and never calls ``backward`` (every parameter stays exactly as it
            was; what the steps change is buffers, e.g. batch-norm statistics re-estimated for the
            structures inference runs), and with several processes averages the buffers at its end.
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


# ---- for the training loop's hooks (see Method's "loop hooks" section) --------------------------------
@dataclass
class OptimizerSpec:
    """One optimizer of a phase, as :meth:`Method.optimizers` declares it.

    Attributes:
        name: the optimizer's name (its state is checkpointed under it; the default optimizer is "main").
        param_groups: as :meth:`Method.param_groups` returns them (a group may carry ``lr``,
            ``weight_decay``, ``lr_scale``).
        kind: ``sgd``, ``adam`` or ``adamw`` (None: ``train.optimizer``).
        lr: base learning rate (None: the phase's ``lr``, else ``train.lr``).
        schedule: ``constant``, ``step`` or ``cosine`` (None: the phase's, else ``train.schedule``).
        options: other ``train:`` options for this optimizer only (``momentum``, ``nesterov``,
            ``weight_decay``).
    """

    name: str
    param_groups: list[dict[str, Any]]
    kind: str | None = None
    lr: float | None = None
    schedule: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainContext:
    """What :meth:`Method.on_step_end` sees of the loop, and how it asks the loop for something.

    Attributes:
        phase, epoch, step, global_step: where training stands (``step``: the step just taken, 0-based).
        optimizers: the phase's optimizers by name (read them; do not replace them).
        rank, world_size: this process's place among the data-parallel processes.
    """

    phase: Phase
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    #: set by :meth:`rebuild_optimizer`: ``{new parameter name: old parameter name}`` (None: no request)
    rebuild_request: dict[str, str] | None = None

    def rebuild_optimizer(self, state_from: dict[str, str] | None = None) -> None:
        """Ask the loop to rebuild the phase's optimizers from :meth:`Method.optimizers` after this hook
        (the parameter set changed). Each kept parameter keeps its optimizer state (found by parameter
        name); a parameter named in ``state_from`` (``{new name: old name}``) starts from a copy of the
        old parameter's state; others start fresh. In data-parallel training every rank must ask alike."""
        self.rebuild_request = dict(state_from or {})


class Method:
    """Base class of a method. Subclasses set ``name`` and ``Config`` and implement :meth:`build`.

    The defaults describe a single-level joint method: one phase over every task, the sum of the task
    losses, every trainable parameter optimised, one level ("full") per task, export of the task's
    stem, trunk and head.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: the class of the models :meth:`build` returns; it must implement :class:`MultiTaskModel`
    Model: ClassVar[type] = object
    #: True when :meth:`export` folds several stored values into one (adapters fused into kernels), so
    #: the export stores fewer values than ``parameter_usage`` counts
    export_fuses: ClassVar[bool] = False
    #: True when a task can be added to a trained model (sequential methods)
    sequential: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    # ---- building --------------------------------------------------------------------------------
    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        """The method's model for every task of the run (``specs``) on the backbone described by
        ``backbone`` (a :class:`virtnet.backbones.registry.BackboneConfig`). Called under the run's seed."""
        raise NotImplementedError

    def create(
        self, specs: list[TaskSpec], backbone: Any, structure: dict[str, Any] | None = None
    ) -> nn.Module:
        """:meth:`build`, then the saved ``structure`` (a model's :meth:`MultiTaskModel.structure`)
        applied: the model a checkpoint was saved from, rebuilt with no replay of training phases."""
        model = self.build(specs, backbone)
        if not isinstance(model, self.Model):
            raise TypeError(
                f"method '{self.name}' built a {type(model).__name__}, not its {self.Model.__name__}"
            )
        if structure is not None:
            model.apply_structure(structure)  # type: ignore[attr-defined]
        return model

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

    # ---- loop hooks: phases one at a time, several optimizers, data-parallel training --------------
    #: False when the method's training cannot run data-parallel (the loop refuses world size > 1)
    data_parallel: ClassVar[bool] = True

    def next_phase(self, tasks: list[str], done: list[Phase], history: list[dict[str, Any]]) -> Phase | None:
        """The phase to train after ``done`` (None: training is over), decided from what training has
        shown: ``history`` holds one record per finished epoch ``{"phase", "epoch", "global_step",
        "train": {...mean losses of its last logged steps}, "eval": rows or None}``. The loop stores the
        decided phases in every checkpoint, so a resumed run replays them rather than deciding again.
        Default: the next of :meth:`phases`."""
        planned = self.phases(tasks)
        return planned[len(done)] if len(done) < len(planned) else None

    def optimizers(self, model: nn.Module, phase: Phase) -> list[OptimizerSpec]:
        """The phase's optimizers, each stepped at every step; parameters that none of them holds are
        frozen (``requires_grad`` False) for the phase. Default: one, "main", over :meth:`param_groups`
        with the ``train:`` options. A phase's ``info["optimizers"]`` (a list of names) keeps only those."""
        return [OptimizerSpec("main", self.param_groups(model, phase))]

    def on_step_end(self, model: nn.Module, phase: Phase, ctx: TrainContext) -> None:
        """Called after :meth:`after_step` with the loop's context; e.g. grow the model and call
        ``ctx.rebuild_optimizer(...)``. Receives the unwrapped model."""

    def varying_parameters(self, phase: Phase) -> bool:
        """True when some parameter the phase's optimizers hold gets no gradient in some step of ``phase``
        (the set a step uses varies, or an optimizer holds parameters no step uses): DDP then needs
        ``find_unused_parameters``. Steps that sample one task at a time are handled by the loop; a method
        that e.g. samples a level per step says so here."""
        return False

    # ---- inference ---------------------------------------------------------------------------------
    def levels(self, model: nn.Module, task: str) -> list[Level]:
        """The task's levels, smallest first (the model's levels and routes; a single one is "full")."""
        indices = model.levels(task)  # type: ignore[operator]
        if len(indices) == 1:
            return [Level(indices[0], "full", model.route(task, indices[0]))]  # type: ignore[operator]
        return [Level(i, f"level {i}", model.route(task, i)) for i in indices]  # type: ignore[operator]

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
        model.check_input(x, task)  # type: ignore[operator]
        return model(x, task, lv.route)

    def export(self, model: nn.Module, task: str, level: int | None = None) -> nn.Module:
        """A standalone network ``forward(x) -> logits`` for ``(task, level)``, sharing no tensor with
        ``model``. Parameter names start with ``stem.``, ``trunk.`` or ``head.``."""
        from virtnet.nn import compact

        lv = self.level(model, task, level)
        return compact(model.task_network(task, lv.index), lv.route)  # type: ignore[operator]

    def shared_prefixes(self) -> tuple[str, ...]:
        """Prefixes of the exported parameter names that are shared between tasks (cost accounting)."""
        return ("trunk.",)

    #: headings of the columns :meth:`eval_columns` adds (key -> heading), in the order ``virtnet eval``'s
    #: table shows them after its own; a column not listed here is in ``--json`` and the API's rows only
    eval_titles: ClassVar[dict[str, str]] = {}

    def eval_columns(self, model: nn.Module, task: str, level: int, batches: list[Batch]) -> dict[str, Any]:
        """Columns the method adds to the evaluation row of ``(task, level)``, computed on the evaluation
        data: ``batches`` are every batch of the task's split (on the CPU; move them to the model's
        device), the model is in eval mode under ``torch.inference_mode``. Called once per row by
        :func:`virtnet.train.evaluate.evaluate` (so ``virtnet eval``, the API's ``evaluate`` /
        ``evaluate_model`` and the training loop's evaluations all carry them); the keys must not be the
        row's own (``task``, ``level``, ``accuracy``, ...). E.g. DEN's mean and max FLOPs per instance
        of the structures its selector chose. Default: none (a method whose cost per instance does not
        depend on the input has nothing to add: its cost rows say it)."""
        return {}

    def summary(self, model: nn.Module, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Figures over a whole evaluation that ``virtnet eval`` prints under its table (and adds to its
        ``--json`` output as ``"summary"``), e.g. a mean accuracy or a score; ``rows``: the table's rows."""
        return {}


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' registered twice")
    model = cls.Model
    if not (isinstance(model, type) and issubclass(model, MultiTaskModel) and issubclass(model, nn.Module)):
        raise TypeError(
            f"method '{cls.name}': its Model ({getattr(model, '__name__', model)}) must be an nn.Module "
            "implementing virtnet.protocol.MultiTaskModel"
        )
    missing = sorted(getattr(model, "__abstractmethods__", ()))
    if missing:
        raise TypeError(
            f"method '{cls.name}': its Model {model.__name__} does not implement {', '.join(missing)} "
            "of virtnet.protocol.MultiTaskModel"
        )
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
    from virtnet.schema import validate

    cls = get_method_class(name)
    cfg = validate(cls.Config, options or {}, where="method")
    return cls(cfg)


__all__ = [
    "Level",
    "Method",
    "MethodConfig",
    "OptimizerSpec",
    "Phase",
    "get_method_class",
    "make_method",
    "method_names",
    "TrainContext",
    "register",
    "task_loss",
]
