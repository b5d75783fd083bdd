"""The PackNet model: any network whose shared weights carry an ownership map, and a head per task.

Mallya & Lazebnik, "PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning", CVPR 2018.

Task ``t``'s network uses the weights owned by tasks ``1..t`` (see :mod:`.ownership`). The wrapped
network is never rewritten and never masked in place: a forward for task ``t`` computes the masked weights
``w * (owner in 1..t)`` and runs the network on them with :func:`torch.func.functional_call`, so every
task's weights stay intact whatever task was evaluated last. The task is an argument of ``forward``.

* **Inference** (no autograd): the masked weights of the last task used are cached and rebuilt only when
  the task changes or a weight or the map changes in place (version counters), i.e. once per task switch.
* **Training task t**: only weights owned by ``t`` receive gradients (the gradient is multiplied by the
  float mask ``owner == t``), and :meth:`PackNetModel.restore_frozen` puts every other entry back bit for
  bit after each optimizer step (momentum and weight decay would move them). Free weights and weights of
  later tasks are zeros while task t trains, so the forward weight is the parameter itself; the plan of
  a step is made once per phase (:meth:`PackNetModel.prepare_step`).
* **Biases and batch norm** of the shared network are trained with the first task and frozen afterwards
  (batch norms in eval mode, out of the optimizer), or kept per task (``task_specific_bn`` /
  ``task_specific_bias``: tasks 2..N get their own copies, passed through ``functional_call`` too).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from virtnet.backbones.base import MultiTaskNet, TaskNet
from virtnet.errors import BudgetError, CheckpointError, ConfigError, TaskError
from virtnet.methods.packnet.ownership import OwnershipMap, buffer_name, load_ownership, save_ownership
from virtnet.nn import Route
from virtnet.protocol import MultiTaskModel, TaskSpec, check_input_shape, check_structure

PACKED_FORMAT = "virtnet-packnet-packed"  # save_packed / load_packed

_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class LayerMask:
    """One prunable weight's masks for task ``t``. Training steps use the float mask (multiplying is much
    faster than ``torch.where`` on the CPU); masking a task's weights, once per task switch, uses
    ``torch.where`` on the bool masks (NaN-safe).

    Attributes:
        used: bool, the owner is in ``1..t`` (task t's network).
        own: bool, owner == t (what training task t may move).
        own_f: ``own`` as float (the gradient mask, and the restore's multiplier).
        any_own: the task owns some weight of the layer.
        all_own: the task owns every weight of the layer.
    """

    used: torch.Tensor
    own: torch.Tensor
    own_f: torch.Tensor
    any_own: bool
    all_own: bool


@dataclass
class _StepPlan:
    """A training step of task ``v``, fixed for a phase (see :meth:`PackNetModel.prepare_step`).

    ``weights`` lists ``(names, parameter, kind, mask, constant)`` per prunable weight (``names``: the
    weight's name and its tied aliases). ``kind`` is ``own`` (the task owns the whole layer: the parameter
    itself), ``frozen`` (owns none: detached, or ``constant`` when entries outside tasks 1..v are not
    zero), or ``masked`` (the parameter with its gradient multiplied by ``mask``, the float ``owner == v``;
    or ``constant + parameter * mask`` when entries outside tasks 1..v are not zero). ``restore`` lists
    ``(parameter, mask, bool mask, saved)`` of the masked layers, ``saved`` the frozen entries' values with
    zeros at the task's. ``aux`` are the tensors passed for biases / batch norm.
    """

    v: int
    key: tuple[int, ...]
    weights: list[tuple[list[str], torch.Tensor, str, torch.Tensor, torch.Tensor | None]]
    restore: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    aux: dict[str, torch.Tensor]
    frozen_bn: list[nn.Module]


class _MaskGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a float mask (zeros for frozen entries)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return w.view_as(w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def prunable_layer_types() -> tuple[type[nn.Module], ...]:
    """The layer types whose ``weight`` PackNet prunes: convolutions and fully connected layers."""
    return _PRUNABLE


class _TaskState(nn.Module):
    """One task's own copies of shared biases / batch-norm tensors, keyed by the network's names."""

    def __init__(self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.param_names: list[str] = list(params)
        self.buffer_names: list[str] = list(buffers)
        for n, t in params.items():
            self.register_parameter(buffer_name(n), nn.Parameter(t.detach().clone()))
        for n, t in buffers.items():
            self.register_buffer(buffer_name(n), t.detach().clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{network name: tensor}`` of every copy (parameters and buffers)."""
        return {n: getattr(self, buffer_name(n)) for n in self.param_names + self.buffer_names}

    def params(self) -> list[nn.Parameter]:
        return [getattr(self, buffer_name(n)) for n in self.param_names]


class PackNetModel(nn.Module, MultiTaskModel):
    """A network packed with several tasks by iterative pruning.

    Build it with :meth:`from_multitask` (virtnet backbones) or :func:`wrap` (any module made of
    convolutions, linear and batch-norm layers, plus a head per task).

    Args:
        net: the network. With ``heads`` None it is called ``net(x, task, route)`` and returns the task's
            logits (a :class:`MultiTaskNet`); otherwise ``net(x)`` returns features and ``heads[task]``
            maps them to logits.
        tasks: the task names, in the order they are added (task ``t`` = ``tasks[t - 1]``).
        heads: one head per task, or None.
        task_prefixes: ``{task: prefixes}`` of ``net``'s parameter names that belong to one task alone
            (e.g. its stem and head in a MultiTaskNet); those are trained with their task, never pruned.
        task_specific_bn: batch-norm parameters and running statistics per task.
        task_specific_bias: biases (and other non-prunable shared parameters) per task.
        specs: the tasks' :class:`TaskSpec` (input shapes, normalisation), when known.
    """

    def __init__(
        self,
        net: nn.Module,
        tasks: list[str],
        heads: Mapping[str, nn.Module] | None = None,
        task_prefixes: Mapping[str, tuple[str, ...]] | None = None,
        task_specific_bn: bool = False,
        task_specific_bias: bool = False,
        specs: Mapping[str, TaskSpec] | None = None,
    ) -> None:
        super().__init__()
        self.specs: dict[str, TaskSpec] = dict(specs or {})
        if not tasks:
            raise ConfigError("PackNet needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"PackNet: task names must be unique, got {tasks}")
        self.net = net
        self.task_names: list[str] = list(tasks)
        self.heads = None if heads is None else nn.ModuleDict(dict(heads))
        if self.heads is not None and set(self.heads) != set(tasks):
            raise ConfigError(f"PackNet: heads for {sorted(self.heads)}, tasks {sorted(tasks)}")
        self.task_prefixes = {t: tuple(p) for t, p in (task_prefixes or {}).items()}
        self.task_specific_bn = task_specific_bn
        self.task_specific_bias = task_specific_bias

        own_prefixes = tuple(p for ps in self.task_prefixes.values() for p in ps)

        def shared(name: str) -> bool:
            return not (name + ".").startswith(own_prefixes) if own_prefixes else True

        params = dict(net.named_parameters())
        first_name = {id(t): n for n, t in reversed(list(net.named_parameters(remove_duplicate=False)))}
        #: other names of tied parameters (functional_call runs without re-tying them)
        self._aliases: dict[str, list[str]] = {}
        for n, t in net.named_parameters(remove_duplicate=False):
            if first_name[id(t)] != n:
                self._aliases.setdefault(first_name[id(t)], []).append(n)
        self.prunable: list[str] = []
        self.bn_modules: list[str] = []
        bn_tensors: list[str] = []
        for mname, m in net.named_modules():
            if not shared(mname) or mname == "":
                if mname == "" and isinstance(m, _PRUNABLE):
                    raise ConfigError("PackNet wraps a network of layers, not a single layer")
                continue
            if isinstance(m, _PRUNABLE) and isinstance(getattr(m, "weight", None), nn.Parameter):
                name = f"{mname}.weight"
                if name in params:  # a weight tied to another layer's is handled once
                    self.prunable.append(name)
            elif isinstance(m, _BN):
                self.bn_modules.append(mname)
                bn_tensors += [f"{mname}.{n}" for n, _ in m.named_parameters(recurse=False)]
        prunable = set(self.prunable)
        #: shared non-prunable parameters: biases, batch-norm affine parameters, anything else
        self.aux_params: list[str] = [n for n in params if shared(n) and n not in prunable]
        self.bn_buffers: list[str] = [
            f"{m}.{b}"
            for m in self.bn_modules
            for b in _BN_BUFFERS
            if getattr(net.get_submodule(m), b, None) is not None
        ]
        if not self.prunable:
            raise ConfigError(
                f"PackNet: {type(net).__name__} has no shared convolution or linear layer to prune"
            )
        self.ownership = OwnershipMap({n: params[n].shape for n in self.prunable}, len(tasks))
        self.register_buffer("num_added", torch.zeros((), dtype=torch.int64))

        # per-task copies (tasks 2..N; task 1 uses the network's own tensors)
        bn_set = set(bn_tensors)
        self.per_task_params: list[str] = [
            n
            for n in self.aux_params
            if (task_specific_bn and n in bn_set) or (task_specific_bias and n not in bn_set)
        ]
        self.per_task_buffers: list[str] = list(self.bn_buffers) if task_specific_bn else []
        if self.per_task_params or self.per_task_buffers:
            state = dict(net.named_parameters())
            state.update(dict(net.named_buffers()))
            self.task_state: nn.ModuleDict | None = nn.ModuleDict(
                {
                    t: _TaskState(
                        {n: state[n] for n in self.per_task_params},
                        {n: state[n] for n in self.per_task_buffers},
                    )
                    for t in tasks[1:]
                }
            )
        else:
            self.task_state = None

        self._eval_cache: tuple[tuple[Any, ...], dict[str, torch.Tensor]] | None = None
        self._mask_cache: dict[int, tuple[tuple[int, ...], dict[str, LayerMask]]] = {}
        self._plan: _StepPlan | None = None
        self.mask_builds = 0  # how many times inference masks were computed (see tests)
        self.register_load_state_dict_post_hook(lambda module, keys: module.invalidate())

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_multitask(
        cls, net: MultiTaskNet, task_specific_bn: bool = False, task_specific_bias: bool = False
    ) -> PackNetModel:
        """PackNet over a virtnet :class:`MultiTaskNet`: the trunk (and a shared stem) are packed; per-task
        stems and the heads belong to their task."""
        prefixes: dict[str, tuple[str, ...]] = {}
        for t in net.tasks:
            own = [f"heads.{t}."]
            if not net.shared_stem:
                own.append(f"stems.{t}.")
            prefixes[t] = tuple(own)
        return cls(net, net.tasks, None, prefixes, task_specific_bn, task_specific_bias, net.specs)

    # ---- tasks --------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.task_names)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def added(self) -> list[str]:
        """The tasks added so far, in order."""
        return self.task_names[: int(self.num_added)]

    def task_name(self, task: str | int) -> str:
        """The name of ``task`` (a name, or its 1-based number); TaskError when it does not exist."""
        if isinstance(task, bool) or not isinstance(task, (str, int)):
            raise TaskError(f"a task is a name or a 1-based number, got {task!r}")
        if isinstance(task, int):
            if not 1 <= task <= self.num_tasks:
                raise TaskError(
                    f"task {task} does not exist: the model has tasks 1..{self.num_tasks} {self.tasks}"
                )
            return self.task_names[task - 1]
        if task not in self.task_names:
            raise TaskError(f"unknown task '{task}': the model has {self.tasks}")
        return task

    def task_number(self, task: str | int) -> int:
        """The 1-based number of ``task`` (its owner value in the ownership map)."""
        return self.task_names.index(self.task_name(task)) + 1

    def check_task(self, task: str | int) -> str:
        """The task's name; TaskError when it does not exist or has not been added yet."""
        name = self.task_name(task)
        if self.task_number(name) > int(self.num_added):
            raise TaskError(f"task '{name}' has not been added yet (added so far: {self.added})")
        return name

    def spec(self, task: str | int) -> TaskSpec:
        name = self.task_name(task)
        if name not in self.specs:
            raise TaskError(f"task '{name}': this PackNet wraps a network without task specs (pass specs=)")
        return self.specs[name]

    def check_input(self, x: torch.Tensor, task: str | int) -> None:
        """Raise DataError when ``x`` does not fit the task (when the task's spec is known)."""
        name = self.task_name(task)
        if name in self.specs:
            check_input_shape(self.specs[name], x)

    def levels(self, task: str) -> list[int]:
        self.check_task(task)
        return [1]

    def parameter_usage(self, task: str | int, level: int | None = None) -> dict[str, torch.Tensor]:
        """Task ``t`` reads the prunable weights owned by tasks ``1..t``, its own stem and head, and the
        shared biases / batch norms (the first task's, or its own copies when kept per task)."""
        name = self.check_task(task)
        if level not in (None, 1):
            raise BudgetError(f"task '{name}' has levels [1], not {level}")
        v = self.task_number(name)
        own_prefixes = {t: tuple(ps) for t, ps in self.task_prefixes.items()}
        copies = set(self.per_task_params) if v > 1 else set()
        prunable = set(self.prunable)
        out: dict[str, torch.Tensor] = {}
        for n, p in self.net.named_parameters():
            if n in prunable:
                owner = self.ownership[n]
                out[f"net.{n}"] = (owner != 0) & (owner <= v)
                continue
            owner_task = next((t for t, ps in own_prefixes.items() if (n + ".").startswith(ps)), None)
            if owner_task is not None:
                if owner_task == name:
                    out[f"net.{n}"] = torch.ones_like(p, dtype=torch.bool)
            elif n not in copies:
                out[f"net.{n}"] = torch.ones_like(p, dtype=torch.bool)
        if v > 1 and self.task_state is not None:
            copies_of = self.task_state[name].tensors()  # type: ignore[operator]
            for n in self.per_task_params:
                out[f"task_state.{name}.{buffer_name(n)}"] = torch.ones_like(copies_of[n], dtype=torch.bool)
        if self.heads is not None:
            for n, p in self.heads[name].named_parameters():
                out[f"heads.{name}.{n}"] = torch.ones_like(p, dtype=torch.bool)
        return out

    def structure(self) -> dict[str, Any]:
        """The tasks in the order they are added, how many have been added, and the per-task copies."""
        return {
            "tasks": list(self.task_names),
            "added": int(self.num_added),
            "task_specific_bn": self.task_specific_bn,
            "task_specific_bias": self.task_specific_bias,
        }

    def apply_structure(self, structure: Mapping[str, Any]) -> None:
        saved = dict(structure)
        added = saved.pop("added", None)
        if isinstance(added, bool) or not isinstance(added, int) or not 0 <= added <= self.num_tasks:
            raise CheckpointError(
                f"structure.added: expected an integer in 0..{self.num_tasks}, got {added!r}"
            )
        own = self.structure()
        own.pop("added")
        check_structure(saved, own)
        with torch.no_grad():
            self.num_added.fill_(added)
        self.invalidate()

    # ---- masks --------------------------------------------------------------------------------------
    def _param(self, name: str) -> torch.Tensor:
        return self.net.get_parameter(name)

    def _owner_versions(self) -> tuple[int, ...]:
        return tuple(t._version for _, t in self.ownership.items())

    def _named(self, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``d`` with the tied aliases of its parameters added."""
        for n in [n for n in d if n in self._aliases]:
            for alias in self._aliases[n]:
                d[alias] = d[n]
        return d

    def invalidate(self) -> None:
        """Drop every cache (masks, inference weights, the step plan)."""
        self._eval_cache = None
        self._mask_cache.clear()
        self._plan = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # device / dtype moves invalidate the caches
        self.invalidate()
        return super()._apply(fn, recurse)

    def masks(self, task: str | int) -> dict[str, LayerMask]:
        """``{weight name: LayerMask}`` of task ``task``, cached until the ownership map changes."""
        v = self.task_number(task)
        key = self._owner_versions()
        hit = self._mask_cache.get(v)
        if hit is not None and hit[0] == key:
            return hit[1]
        out = {}
        # normal tensors even when first asked for under inference mode: training saves them for backward
        with torch.inference_mode(False), torch.no_grad():
            for name, owner in self.ownership.items():
                dtype = self._param(name).dtype
                used = (owner != 0) & (owner <= v)
                own = owner == v
                out[name] = LayerMask(
                    used=used,
                    own=own,
                    own_f=own.to(dtype),
                    any_own=bool(own.any()),
                    all_own=bool(own.all()),
                )
        self._mask_cache[v] = (key, out)
        return out

    def _aux_overrides(self, name: str, v: int, grad: bool) -> dict[str, torch.Tensor]:
        """The task's biases / batch-norm tensors to pass to ``functional_call`` (empty: the network's)."""
        out: dict[str, torch.Tensor] = {}
        if v > 1 and self.task_state is not None:
            out.update(self.task_state[name].tensors())  # type: ignore[union-attr]
        if grad and v > 1:  # the first task's shared tensors are frozen for later tasks
            for n in self.aux_params:
                if n not in out:
                    out[n] = self.net.get_parameter(n).detach()
        return out

    def task_weights(self, task: str | int) -> dict[str, torch.Tensor]:
        """The task's masked prunable weights: ``w`` where the owner is in ``1..t``, else 0 (new tensors,
        no autograd). ``torch.where``, not ``w * mask``: a non-finite weight of a later task (a diverged
        run) must not leak into earlier tasks (NaN * 0 is NaN)."""
        masks = self.masks(task)
        with torch.no_grad():
            return {n: torch.where(masks[n].used, self._param(n), 0.0) for n in self.prunable}

    def _overrides(self, name: str) -> dict[str, torch.Tensor]:
        v = self.task_number(name)
        if not torch.is_grad_enabled():
            key = (v, self._owner_versions(), tuple(self._param(n)._version for n in self.prunable))
            if self._eval_cache is not None and self._eval_cache[0] == key:
                return self._eval_cache[1]
            d = self.task_weights(name)
            d.update(self._aux_overrides(name, v, grad=False))
            d = self._named(d)
            self._eval_cache = (key, d)
            self.mask_builds += 1
            return d
        plan = self._plan
        if plan is not None and plan.v == v and plan.key == self._owner_versions():
            d = dict(plan.aux)
            for names, w, kind, mask, const in plan.weights:
                if kind == "own":
                    continue  # the network's own parameter
                if kind == "frozen":
                    t = w.detach() if const is None else const
                elif const is None:  # entries outside tasks 1..t are zeros: the weight, gradient masked
                    t = _MaskGrad.apply(w, mask)
                else:  # rare (training an earlier task again): NaN-safe and slower
                    t = torch.where(mask.bool(), w, const)
                for n in names:
                    d[n] = t
            return d
        masks = self.masks(v)  # a forward with autograd outside prepared training steps
        d = {}
        for n in self.prunable:
            w, m = self._param(n), masks[n]
            frozen = torch.where(m.used & ~m.own, w.detach(), 0.0)
            d[n] = torch.where(m.own, w, frozen)  # gradient only where owner == t
        d.update(self._aux_overrides(name, v, grad=True))
        return self._named(d)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, task: str | int, route: Route | None = None) -> torch.Tensor:
        """Logits of task ``task`` (a name or 1-based number) on ``x``: the network with the weights of
        tasks ``1..t``. Raises TaskError for a task that does not exist or was not added yet."""
        name = self.check_task(task)
        params = self._overrides(name)
        if self.heads is None:
            return functional_call(self.net, params, (x, name, route), tie_weights=False)
        return self.heads[name](functional_call(self.net, params, (x,), tie_weights=False))

    # ---- training -----------------------------------------------------------------------------------
    def begin_task(self, task: str | int) -> int:
        """Add task ``task``: it claims every free weight (owner 0 -> t) and, with task-specific batch
        norm or biases, starts its copies from the previous task's. Returns the number of weights claimed.

        No error here when nothing is free (this also runs on a fresh model before a checkpoint is loaded
        over it); :meth:`prepare_step` refuses to train a task that owns no weight.
        """
        name = self.task_name(task)
        v = self.task_number(name)
        claimed = 0
        with torch.no_grad():
            for _, owner in self.ownership.items():
                free = owner == 0
                claimed += int(free.sum())
                owner.masked_fill_(free, v)
            if v > 1 and self.task_state is not None:
                prev = self.task_names[v - 2]
                src = (
                    self.task_state[prev].tensors()
                    if v > 2
                    else {n: self.net.get_parameter(n) for n in self.per_task_params}
                    | {n: self.net.get_buffer(n) for n in self.per_task_buffers}
                )
                for n, t in self.task_state[name].tensors().items():
                    t.copy_(src[n])
            self.num_added.fill_(max(int(self.num_added), v))
        self.invalidate()
        return claimed

    def prune(self, task: str | int, ratio: float) -> dict[str, tuple[int, int]]:
        """One-shot magnitude pruning of task ``task``'s weights, layer by layer.

        In every prunable layer the ``floor(ratio * n + 0.5)`` smallest-magnitude weights among the ``n``
        owned by the task (ties: lower flat index first) are set to zero and freed (owner 0). Weights of
        other tasks are never touched.

        Returns:
            ``{weight name: (n owned before, n pruned)}``.
        """
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"pruning ratio must lie in [0, 1], got {ratio}")
        v = self.task_number(task)
        report = {}
        with torch.no_grad():
            for name, owner in self.ownership.items():
                w = self._param(name)
                idx = (owner.reshape(-1) == v).nonzero().squeeze(1)  # (n,)
                n = int(idx.numel())
                k = math.floor(ratio * n + 0.5)
                report[name] = (n, k)
                if k == 0:
                    continue
                mags = w.detach().reshape(-1)[idx].abs()
                drop = idx[torch.sort(mags, stable=True).indices[:k]]
                owner.view(-1).index_fill_(0, drop, 0)
                w.view(-1).index_fill_(0, drop, 0.0)
        self.invalidate()
        return report

    def trainable_parameters(self, task: str | int) -> list[nn.Parameter]:
        """What training task ``task`` may move: the layers where it owns weights (its entries only, see
        :meth:`restore_frozen`), its own modules (stem, head), and the shared biases / batch norm when it is
        the first task (or its own copies of them)."""
        name = self.task_name(task)
        v = self.task_number(name)
        masks = self.masks(v)
        out: list[nn.Parameter] = [self._param(n) for n in self.prunable if masks[n].any_own]  # type: ignore[misc]
        prefixes = self.task_prefixes.get(name, ())
        if prefixes:
            out += [p for n, p in self.net.named_parameters() if (n + ".").startswith(prefixes)]
        if self.heads is not None:
            out += list(self.heads[name].parameters())
        if v == 1:
            out += [self.net.get_parameter(n) for n in self.aux_params]  # type: ignore[misc]
        elif self.task_state is not None:
            out += self.task_state[name].params()
        return out

    def frozen_batchnorms(self, task: str | int) -> list[nn.Module]:
        """The shared batch norms that must stay in eval mode while training ``task``."""
        if self.task_number(task) > 1 and not self.task_specific_bn:
            return [self.net.get_submodule(m) for m in self.bn_modules]
        return []

    def prepare_step(self, task: str | int) -> None:
        """Call before each training step of ``task``: frozen batch norms to eval mode; on the first step
        of a phase (or after the map or the weights were reloaded), plan the step: which layers are masked,
        and the frozen entries' values that :meth:`restore_frozen` puts back.

        Raises:
            ConfigError: the task owns no prunable weight (nothing was left free for it).
        """
        plan = self._plan
        if plan is None or plan.v != self.task_number(task) or plan.key != self._owner_versions():
            plan = self._plan = self._make_plan(task)
        for m in plan.frozen_bn:
            if m.training:
                m.eval()

    def _make_plan(self, task: str | int) -> _StepPlan:
        name = self.task_name(task)
        v = self.task_number(name)
        masks = self.masks(v)
        if not any(m.any_own for m in masks.values()):
            counts = self.ownership.counts()
            owners = {self.task_names[i - 1]: c for i, c in counts.items() if i > 0 and c > 0}
            raise ConfigError(
                f"PackNet: no free weights remain for task '{name}': earlier tasks own all "
                f"{self.ownership.numel():,} prunable weights ({owners}); prune them (method.prune_ratios)"
            )
        weights: list[tuple[list[str], torch.Tensor, str, torch.Tensor, torch.Tensor | None]] = []
        restore: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for n in self.prunable:
                w, m = self._param(n), masks[n]
                names = [n, *self._aliases.get(n, [])]
                visible = torch.where(m.used, w.detach(), 0.0)
                clean = torch.equal(visible, w)  # nothing outside tasks 1..t to hide (and all finite)
                if m.all_own and clean:
                    weights.append((names, w, "own", m.own_f, None))
                elif not m.any_own:
                    weights.append((names, w, "frozen", m.own_f, None if clean else visible))
                else:
                    const = None if clean else torch.where(m.used & ~m.own, w.detach(), 0.0)
                    weights.append((names, w, "masked", m.own_f, const))
                    # the frozen entries' values, zeros at the task's (w * 1 and 0 + x are exact)
                    restore.append((w, m.own_f, m.own, torch.where(m.own, 0.0, w.detach())))
        aux = self._named(self._aux_overrides(name, v, grad=True))
        return _StepPlan(v, self._owner_versions(), weights, restore, aux, self.frozen_batchnorms(v))

    def restore_frozen(self, task: str | int) -> None:
        """Call after each optimizer step of ``task``: every entry of a trained layer that ``task`` does not
        own is put back to its value before the phase's first step (SGD momentum and weight decay, or
        AdamW's decoupled decay, move entries whose gradient is zero). Exact: ``w * own + saved`` keeps the
        task's entries and writes the saved values into the others; a non-finite weight (a diverged step)
        falls back to ``torch.where``."""
        plan = self._plan
        if plan is None or plan.v != self.task_number(task) or not plan.restore:
            return
        with torch.no_grad():
            ws = [r[0] for r in plan.restore]
            torch._foreach_mul_(ws, [r[1] for r in plan.restore])
            torch._foreach_add_(ws, [r[3] for r in plan.restore])
            for w, _, own, saved in plan.restore:
                if not torch.isfinite(w.sum()):
                    w.copy_(torch.where(own, w, saved))

    # ---- export and storage -------------------------------------------------------------------------
    def task_network(self, task: str | int, level: int | None = None) -> TaskNet:
        """The task's modules as a :class:`TaskNet` sharing this model's tensors (unmasked)."""
        name = self.task_name(task)
        if self.heads is None:
            return self.net.task_network(name, level)  # type: ignore[operator]
        return TaskNet(nn.Identity(), self.net, self.heads[name])

    def export(self, task: str | int) -> TaskNet:
        """Task ``task`` as a standalone dense network (``stem.``, ``trunk.``, ``head.``): weights of later
        tasks and free weights are zeros, the task's batch norm / biases are filled in. Shares no tensor
        with this model; its output equals this model's for the task."""
        name = self.check_task(task)
        v = self.task_number(name)
        shared = self.task_network(name)
        net_names = {id(t): n for n, t in self.net.named_parameters(remove_duplicate=False)}
        net_names.update({id(t): n for n, t in self.net.named_buffers(remove_duplicate=False)})
        with torch.no_grad():
            values = self.task_weights(name)
            values.update(self._aux_overrides(name, v, grad=False))
            exported = copy.deepcopy(shared)
            src = shared.state_dict(keep_vars=True)
            dst = exported.state_dict(keep_vars=True)
            for k, t in src.items():
                n = net_names.get(id(t))
                if n is not None and n in values:
                    dst[k].copy_(values[n])
        return exported.eval()

    def storage(self) -> dict[str, Any]:
        """Storage in bytes: the shared network once (float32 weights, biases, batch norm), the packed
        ownership map, and each task's own tensors (head, stem, task-specific batch norm / biases).

        Returns:
            ``{"base_weights", "shared_other", "ownership_packed", "ownership_bits", "tasks": {task: bytes},
            "total"}``.
        """
        own_prefixes = tuple(p for ps in self.task_prefixes.values() for p in ps)
        prunable = set(self.prunable)
        base = other = 0
        per_task = {t: 0 for t in self.task_names}
        for n, t in list(self.net.named_parameters()) + list(self.net.named_buffers()):
            size = t.numel() * t.element_size()
            owner = next((k for k, ps in self.task_prefixes.items() if (n + ".").startswith(ps)), None)
            if owner is not None:
                per_task[owner] += size
            elif n in prunable:
                base += size
            elif not (own_prefixes and (n + ".").startswith(own_prefixes)):
                other += size
        if self.heads is not None:
            for t, h in self.heads.items():
                per_task[t] += sum(
                    x.numel() * x.element_size() for x in list(h.parameters()) + list(h.buffers())
                )
        if self.task_state is not None:
            for t, st in self.task_state.items():
                per_task[t] += sum(x.numel() * x.element_size() for x in st.tensors().values())
        packed = self.ownership.packed_bytes()
        owned = sum(
            int((owner != 0).sum()) * self._param(n).element_size() for n, owner in self.ownership.items()
        )
        rest = other + packed + sum(per_task.values())
        return {
            "base_weights": base,
            "base_weights_owned": owned,
            "shared_other": other,
            "ownership_packed": packed,
            "ownership_bits": self.ownership.bits,
            "tasks": per_task,
            "total": base + rest,
            "total_packed": owned + rest,
        }

    # ---- the packed deployment format ----------------------------------------------------------------
    def packed_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The whole model in PackNet's storage form: each prunable weight as the values of its owned
        entries only (owner != 0, flat order; free entries are zeros that the map implies), the ownership
        map packed with ``ceil(log2(N + 1))`` bits per weight, every other tensor as it is. Its tensor bytes
        equal ``storage()["total_packed"]``.

        Returns:
            ``(tensors, meta)`` for :meth:`load_packed_state`.

        Raises:
            ConfigError: a free weight is not zero (only a model whose free weights were pruned to zero, or
                that has none, can be stored this way).
        """
        tensors: dict[str, torch.Tensor] = {"ownership": self.ownership.pack()}
        for n, owner in self.ownership.items():
            w = self._param(n).detach().reshape(-1)
            used = owner.reshape(-1) != 0
            if bool((w[~used] != 0).any()):
                raise ConfigError(f"PackNet packed storage: free weights of '{n}' are not zero")
            tensors[f"owned/{n}"] = w[used].clone()
        for k, v in self.state_dict().items():
            if not self._packed_separately(k):
                tensors[f"state/{k}"] = v.detach().clone().contiguous()
        meta = {
            "layers": self.ownership.layout(),
            "bits": self.ownership.bits,
            "tasks": self.tasks,
            "num_added": int(self.num_added),
        }
        return tensors, meta

    def _packed_separately(self, key: str) -> bool:
        """State-dict keys that the packed form does not store as they are: the prunable weights (and
        their tied aliases: stored as owned values), the ownership map (packed) and ``num_added`` (meta)."""
        if key == "num_added" or key.startswith("ownership."):
            return True
        name = key[len("net.") :] if key.startswith("net.") else None
        return name is not None and (
            name in self.ownership.names
            or any(name in self._aliases.get(n, ()) for n in self.ownership.names)
        )

    def load_packed_state(
        self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], source: str = "packed state"
    ) -> None:
        """Load :meth:`packed_state`'s output: free weights become zeros, owned ones their values.

        Raises:
            CheckpointError: (one line) it was saved for another network or is incomplete.
        """
        if [[str(n), [int(d) for d in sh]] for n, sh in meta.get("layers", [])] != self.ownership.layout():
            raise CheckpointError(
                f"{source}: saved for a different network (prunable layers or shapes differ)"
            )
        if list(meta.get("tasks", [])) != self.tasks:
            raise CheckpointError(
                f"{source}: saved for tasks {meta.get('tasks')}, the model has {self.tasks}"
            )
        if "ownership" not in tensors:
            raise CheckpointError(f"{source}: no ownership map")
        self.ownership.load_packed(tensors["ownership"], source)
        state = {k[len("state/") :]: v for k, v in tensors.items() if k.startswith("state/")}
        missing = [k for k in self.state_dict() if k not in state and not self._packed_separately(k)]
        if missing:
            raise CheckpointError(f"{source}: missing tensor '{missing[0]}'")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for n, owner in self.ownership.items():
                w = self._param(n)
                used = owner.reshape(-1) != 0
                vals = tensors.get(f"owned/{n}")
                if vals is None or vals.numel() != int(used.sum()):
                    got = "none" if vals is None else f"{vals.numel()} values"
                    raise CheckpointError(
                        f"{source}: weight '{n}' needs {int(used.sum())} owned values, got {got}"
                    )
                flat = torch.zeros_like(w).reshape(-1)
                flat[used] = vals.to(flat.dtype)
                w.copy_(flat.reshape(w.shape))
            for k, v in state.items():
                target = params[k] if k in params else self.get_buffer(k)
                if target.shape != v.shape:
                    raise CheckpointError(
                        f"{source}: '{k}' has shape {tuple(v.shape)}, the model's {tuple(target.shape)}"
                    )
                target.copy_(v)
            self.num_added.fill_(int(meta.get("num_added", 0)))
        self.invalidate()

    def save_packed(self, path: str | Path) -> Path:
        """Write :meth:`packed_state` to ``<path>.safetensors`` + ``<path>.json`` (sha256, layout);
        returns the JSON sidecar's path."""
        from virtnet.storage import write_pair

        tensors, meta = self.packed_state()
        return write_pair(path, tensors, {"format": PACKED_FORMAT, "format_version": 1, **meta})

    def load_packed(self, path: str | Path) -> None:
        """Load a file written by :meth:`save_packed`; one-line CheckpointError when it is missing, altered
        or saved for another network."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from virtnet.storage import read_pair_meta

        tpath, jpath, meta = read_pair_meta(path, PACKED_FORMAT, 1, "packed PackNet model")
        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{tpath}: unreadable: {e}") from None
        self.load_packed_state(tensors, meta, str(jpath))

    def save_ownership(self, path: str | Path) -> Path:
        """Write the packed ownership map (``<path>.safetensors`` + ``<path>.json``)."""
        return save_ownership(self.ownership, path, self.tasks)

    def load_ownership(self, path: str | Path) -> None:
        """Load a packed ownership map; CheckpointError when it was saved for another network."""
        load_ownership(self.ownership, path, self.tasks)
        self.invalidate()


def wrap(
    module: nn.Module,
    heads: Mapping[str, nn.Module | int],
    feature_dim: int | None = None,
    task_specific_bn: bool = False,
    task_specific_bias: bool = False,
    specs: Mapping[str, TaskSpec] | None = None,
) -> PackNetModel:
    """PackNet over a network you bring, unchanged: ``module(x)`` returns features and ``heads[task]`` maps
    them to the task's logits.

    Every convolution and linear layer of ``module`` is packed; its batch norms and biases are trained with
    the first task and frozen afterwards (or kept per task).

    Args:
        module: any ``nn.Module`` made of convolutions, linear and batch-norm layers (and parameter-free
            layers); it is used as is, never rewritten.
        heads: ``{task: head module}``, or ``{task: number of classes}`` for a linear head on
            ``feature_dim`` features. The dict's order is the order the tasks are added.
        feature_dim: the features ``module`` returns (needed when a head is given as a number).
        task_specific_bn: batch-norm parameters and statistics per task.
        task_specific_bias: biases per task.
        specs: ``{task: TaskSpec}`` (input shape, normalisation), so that inputs are checked and the model
            describes its tasks; optional.

    Example::

        body = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(288, 32))
        model = wrap(body, {"a": 10, "b": 5}, feature_dim=32)
        logits = model(x, "a")
    """
    built: dict[str, nn.Module] = {}
    for t, h in heads.items():
        if isinstance(h, nn.Module):
            built[t] = h
        elif isinstance(h, int) and not isinstance(h, bool) and h >= 1:
            if feature_dim is None:
                raise ConfigError(f"PackNet.wrap: head '{t}' given as {h} classes needs feature_dim")
            built[t] = nn.Linear(feature_dim, h)
        else:
            raise ConfigError(f"PackNet.wrap: head '{t}' must be a module or a class count, got {h!r}")
    return PackNetModel(module, list(built), built, None, task_specific_bn, task_specific_bias, specs)


__all__ = ["PackNetModel", "prunable_layer_types", "wrap"]
