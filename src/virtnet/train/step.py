"""The step module, and the loop's helpers around it: optimizers, freezing, DDP wrapping, phase records.

:class:`StepModule` holds (model, method) as one ``nn.Module`` whose ``forward(batches, phase)`` returns the
method's losses of one step: one forward per step, however many (task, level) passes the method makes, so
``DistributedDataParallel`` wraps exactly this module and sees each parameter used at most once per step.
The loop trains through it in one process too (one code path). Hooks that change structure
(``on_phase_start``/``on_phase_end``, ``after_step``, ``on_step_end``) receive the unwrapped model.

Rules for data-parallel training (README, "Multi-process and multi-machine training"):

* **Frozen for the phase**: every parameter that no optimizer of the phase holds gets ``requires_grad``
  False for the phase (restored before ``on_phase_end``), so DDP neither waits for its gradient nor
  all-reduces it, and the set of parameters a step uses is the optimizers' set.
* **find_unused_parameters** is True only where that set changes between steps: the loader samples one
  task per step (``round_robin``/``proportional``) in a phase of several tasks, or the method says so
  (:meth:`Method.varying_parameters`).
* **BatchNorm**: each rank normalises with its own batch's statistics (``broadcast_buffers=False``); the
  floating-point buffers are averaged over the ranks at the end of every epoch and before every checkpoint
  (:meth:`Runtime.average_buffers`). SyncBatchNorm is not used (it does not run on the CPU).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from virtnet.data.core import Batch
from virtnet.methods.base import OptimizerSpec, Phase
from virtnet.train.config import TrainConfig
from virtnet.train.optim import make_optimizer

DEFAULT_OPTIMIZER = "main"


class StepModule(nn.Module):
    """``forward(batches, phase)`` = ``method.training_step(model, batches, phase)``.

    ``model`` is a registered submodule (its parameters are this module's, under ``model.``); ``method``
    a plain attribute."""

    def __init__(self, model: nn.Module, method: Any) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batches: dict[str, Batch], phase: Phase) -> dict[str, torch.Tensor]:
        return self.method.training_step(self.model, batches, phase)


def to_device(batches: dict[str, Batch], device: torch.device) -> dict[str, Batch]:
    """The batches on ``device`` (unchanged on the CPU)."""
    if device.type == "cpu":
        return batches
    return {
        t: Batch(b.task, b.x.to(device), b.y.to(device), None if b.mask is None else b.mask.to(device))
        for t, b in batches.items()
    }


# ---- optimizers ----------------------------------------------------------------------------------------
class PhaseOptimizer:
    """One optimizer of a phase: its spec, the torch optimizer and the schedule's settings."""

    def __init__(self, spec: OptimizerSpec, cfg: TrainConfig, phase: Phase) -> None:
        self.spec = spec
        self.base_lr = float(spec.lr if spec.lr is not None else phase.info.get("lr", cfg.lr))
        sched = cfg  # a phase may override the schedule (e.g. PackNet's re-training at a constant rate)
        if "schedule" in phase.info:
            sched = cfg.model_copy(update={"schedule": phase.info["schedule"], "warmup_epochs": 0.0})
        if spec.schedule is not None:
            sched = sched.model_copy(update={"schedule": spec.schedule})
        self.sched = sched
        own = cfg.model_copy(update={**spec.options, **({"optimizer": spec.kind} if spec.kind else {})})
        self.opt = make_optimizer(spec.param_groups, own)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]


def build_optimizers(
    method: Any, model: nn.Module, phase: Phase, cfg: TrainConfig
) -> dict[str, PhaseOptimizer]:
    """The phase's optimizers by name (``phase.info["optimizers"]`` keeps only the names it lists)."""
    specs = method.optimizers(model, phase)
    keep = phase.info.get("optimizers")
    if keep is not None:
        specs = [s for s in specs if s.name in keep]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"phase {phase.name}: optimizer names {names} are not unique")
    out = {s.name: PhaseOptimizer(s, cfg, phase) for s in specs}
    seen: set[int] = set()
    for name, po in out.items():
        for p in po.params:
            if id(p) in seen:
                raise ValueError(f"phase {phase.name}: a parameter is in two optimizers (again in '{name}')")
            seen.add(id(p))
    if not out:
        raise ValueError("no trainable parameters in this phase")
    return out


def carry_state(
    old: dict[str, PhaseOptimizer],
    new: dict[str, PhaseOptimizer],
    model: nn.Module,
    state_from: dict[str, str],
    old_names: dict[int, str],
) -> None:
    """Copy optimizer state from ``old`` into ``new`` by parameter name: a parameter keeps its state; one
    named in ``state_from`` (``{new name: old name}``) gets a copy of the old parameter's state.
    ``old_names``: ``{id(parameter): name}`` as it was before the change."""
    by_name: dict[str, dict[str, Any]] = {}
    for po in old.values():
        for p in po.params:
            st = po.opt.state.get(p)
            if st and id(p) in old_names:
                by_name[old_names[id(p)]] = st
    names = {id(p): n for n, p in model.named_parameters()}
    for po in new.values():
        for p in po.params:
            n = names.get(id(p))
            src = by_name.get(state_from.get(n, n)) if n is not None else None
            if src is None:
                continue
            po.opt.state[p] = {
                k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in src.items()
            }


def freeze_unheld(model: nn.Module, optimizers: dict[str, PhaseOptimizer]) -> list[nn.Parameter]:
    """Set ``requires_grad`` False on every trainable parameter no optimizer holds; returns them (to
    restore with :func:`unfreeze`)."""
    held = {id(p) for po in optimizers.values() for p in po.params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def unfreeze(params: list[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(True)


def find_unused(method: Any, phase: Phase, sampling: str) -> bool:
    """The find_unused_parameters rule (see the module docstring)."""
    one_task_per_step = sampling in ("round_robin", "proportional") and len(phase.tasks) > 1
    return one_task_per_step or bool(method.varying_parameters(phase))


def wrap(step: StepModule, runtime: Any, unused: bool) -> nn.Module:
    """``step`` itself in one process; ``DistributedDataParallel(step)`` when a process group is in use."""
    if not runtime.distributed:
        return step
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    with warnings.catch_warnings():  # broadcast_buffers=False is deprecated but its replacement syncs at init
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(step, device_ids=ids, broadcast_buffers=False, find_unused_parameters=unused)


# ---- checkpoint records ------------------------------------------------------------------------------------
def phase_to_dict(phase: Phase) -> dict[str, Any]:
    return {"name": phase.name, "tasks": list(phase.tasks), "index": phase.index, "info": phase.info}


def phase_from_dict(d: dict[str, Any]) -> Phase:
    return Phase(d["name"], list(d["tasks"]), int(d["index"]), dict(d.get("info", {})))


def optimizers_state(optimizers: dict[str, PhaseOptimizer]) -> Any:
    """What ``save_checkpoint(optimizer=...)`` takes: the one optimizer "main" as it is (the checkpoint
    format of a single optimizer), else every optimizer's state under its name (see :class:`_Named`)."""
    if list(optimizers) == [DEFAULT_OPTIMIZER]:
        return optimizers[DEFAULT_OPTIMIZER].opt
    return _Named({n: po.opt for n, po in optimizers.items()})


class _Named:
    """Several optimizers seen as one ``state_dict()``: state keys ``<name>/<index>`` (tensors saved as
    ``optim/<name>/<index>/<key>``) and every param group tagged with its optimizer's ``name``."""

    def __init__(self, opts: dict[str, torch.optim.Optimizer]) -> None:
        self.opts = opts

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        groups: list[dict[str, Any]] = []
        for name, opt in self.opts.items():
            sd = opt.state_dict()
            state.update({f"{name}/{pid}": st for pid, st in sd["state"].items()})
            groups += [{**g, "optimizer": name} for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}


def restore_optimizers(
    optimizers: dict[str, PhaseOptimizer], tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Load :func:`optimizers_state`'s checkpointed state back (the inverse of both formats)."""
    from virtnet.errors import CheckpointError
    from virtnet.train.checkpoint import optimizer_from_flat

    named = any("optimizer" in g for g in meta.get("param_groups", []))
    if not named:
        if list(optimizers) != [DEFAULT_OPTIMIZER]:
            raise CheckpointError(
                f"optimizer state was saved for one optimizer, the phase has {list(optimizers)}"
            )
        optimizer_from_flat(optimizers[DEFAULT_OPTIMIZER].opt, tensors, meta)
        return
    saved = list(dict.fromkeys(g["optimizer"] for g in meta["param_groups"]))
    if saved != list(optimizers):
        raise CheckpointError(
            f"optimizer state was saved for optimizers {saved}, the phase has {list(optimizers)}"
        )
    for name, po in optimizers.items():
        pre = f"optim/{name}/"
        sub_t = {"optim/" + k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)}
        sub_state = {
            k.split("/", 1)[1]: v for k, v in meta.get("state", {}).items() if k.split("/", 1)[0] == name
        }
        groups = [
            {k: v for k, v in g.items() if k != "optimizer"}
            for g in meta["param_groups"]
            if g["optimizer"] == name
        ]
        optimizer_from_flat(po.opt, sub_t, {"param_groups": groups, "state": sub_state})


__all__ = [
    "DEFAULT_OPTIMIZER",
    "PhaseOptimizer",
    "StepModule",
    "build_optimizers",
    "carry_state",
    "find_unused",
    "freeze_unheld",
    "optimizers_state",
    "phase_from_dict",
    "phase_to_dict",
    "restore_optimizers",
    "to_device",
    "unfreeze",
    "wrap",
]
