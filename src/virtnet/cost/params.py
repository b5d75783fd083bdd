"""Parameter, buffer and byte counts of an exported network.

Counting rule (the same everywhere in virtnet's reports):

* the **parameters** of an exported ``(task, level)`` network are the elements of the weights, biases and
  batch-norm affine parameters (``weight``/``bias`` of ``BatchNorm``) that the exported network holds, which
  are exactly the ones it uses: an export is physically sliced to its level. Trainable and frozen
  parameters count alike; a tensor registered under several names (tied weights) counts once;
* batch-norm **running statistics** (``running_mean``, ``running_var``, ``num_batches_tracked``) and other
  buffers (masks, unit orders) are **not** parameters: they appear in the byte counts only
  (:func:`count_buffers` gives their element count for completeness);
* parameters whose name starts with a shared prefix (``trunk.`` by default, see
  :meth:`virtnet.methods.base.Method.shared_prefixes`) are **shared**; the others (``stem.``, ``head.``)
  are **task-specific**;
* the **density** of a level is ``params(task, level) / params(task, largest level)``, a fraction in
  ``(0, 1]`` (reports and plots show it in percent);
* a multi-task model's total is its physical parameters counted once: pass the whole model (or all its
  task networks at once, which share their trunk) to :func:`count_parameters`.

Exact accounting inside a multi-task model (:func:`used_parameters`, :func:`usage_breakdown`): the
elements a ``(task, level)`` reads, from the model protocol's ``parameter_usage(task, level)`` (bool
masks by parameter name): DVN's units, PackNet's owned weights, an adapter domain's own tensors plus the
universal ones. An element is **shared** when another task reads it too (at any of its levels), else
task-specific. For a sliced export (DVN) the usage count equals the export's parameter count; for a
PackNet export (dense, with zeros) it equals the export's nonzero count; a fused export (adapters)
stores fewer values than it reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from virtnet.errors import ConfigError


def _modules(module: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    if isinstance(module, nn.Module):
        return [module]
    mods = list(module)
    for m in mods:
        if not isinstance(m, nn.Module):
            raise ConfigError(f"expected nn.Module objects, got {type(m).__name__}")
    return mods


def _alias_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's memory: two tensors with the same key are the same elements."""
    if t.numel() == 0 or t.device.type == "meta":
        return ("id", id(t))
    return (t.device.type, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def _unique(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs with tensors seen before (same object or same memory) dropped."""
    seen_ids: set[int] = set()
    seen_mem: set[tuple] = set()
    for name, t in named:
        if t is None or id(t) in seen_ids:
            continue
        seen_ids.add(id(t))
        if is_lazy(t):
            raise ConfigError(f"parameter '{name}' is lazy: run a forward pass before counting")
        key = _alias_key(t)
        if key in seen_mem:
            continue
        seen_mem.add(key)
        yield name, t


def _named_parameters(module: nn.Module | Iterable[nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    for m in _modules(module):
        yield from m.named_parameters()


def _named_buffers(module: nn.Module | Iterable[nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    for m in _modules(module):
        yield from m.named_buffers()


def count_parameters(module: nn.Module | Iterable[nn.Module]) -> int:
    """Number of parameter elements of ``module``, trainable or frozen, each tensor counted once.

    Args:
        module: a network, or several networks whose shared tensors are then counted once (e.g. all task
            networks of one multi-task model).

    Returns:
        The exact element count. Buffers (batch-norm running statistics, masks) are not included.
    """
    return sum(p.numel() for _, p in _unique(_named_parameters(module)))


def parameter_breakdown(
    module: nn.Module | Iterable[nn.Module], shared_prefixes: Sequence[str] = ("trunk.",)
) -> dict[str, int]:
    """Parameter elements split by name prefix into shared and task-specific ones.

    Args:
        module: an exported task network (names start with ``stem.``, ``trunk.`` or ``head.``).
        shared_prefixes: prefixes of the shared parameters' names (the method's ``shared_prefixes()``).

    Returns:
        ``{"shared": ..., "task_specific": ..., "total": ...}`` with ``shared + task_specific == total``.
    """
    if isinstance(shared_prefixes, str):
        shared_prefixes = (shared_prefixes,)
    prefixes = tuple(shared_prefixes)
    shared = task = 0
    for name, p in _unique(_named_parameters(module)):
        if name.startswith(prefixes):
            shared += p.numel()
        else:
            task += p.numel()
    return {"shared": shared, "task_specific": task, "total": shared + task}


def count_buffers(module: nn.Module | Iterable[nn.Module]) -> int:
    """Number of buffer elements (batch-norm running statistics, masks...), each tensor counted once.

    Buffers are not parameters; reports give them in bytes (:func:`tensor_bytes`, :func:`bytes_on_disk`).
    """
    return sum(b.numel() for _, b in _unique(_named_buffers(module)))


def density(params: int, full_params: int) -> float:
    """``params / full_params``: the parameter density of a level relative to the task's largest level."""
    if full_params <= 0:
        raise ConfigError(f"density: the largest level has {full_params} parameters")
    return params / full_params


def tensor_bytes(module: nn.Module | Iterable[nn.Module]) -> int:
    """Raw bytes of the parameters and buffers (``numel * element_size``), each tensor counted once."""
    named = list(_named_parameters(module)) + list(_named_buffers(module))
    return sum(t.numel() * t.element_size() for _, t in _unique(named))


def _savable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict made savable by safetensors.

    Exact aliases (one tensor under several names) are kept once, under the first name; tensors that share
    memory in another way, or are not contiguous, are cloned contiguous. Non-tensor extra state is dropped.
    """
    state = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    storages: dict[tuple, int] = {}
    for k, v in state.items():
        v = v.detach()
        key = _alias_key(v)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
        if v.numel():
            s = (v.device.type, v.untyped_storage().data_ptr())
            storages[s] = storages.get(s, 0) + 1
    for k, v in out.items():
        shared = v.numel() and storages[(v.device.type, v.untyped_storage().data_ptr())] > 1
        if shared or not v.is_contiguous():
            out[k] = v.contiguous().clone()
    return out


def bytes_on_disk(module: nn.Module) -> int:
    """Size in bytes of the module's state dict serialised with safetensors.

    This is ``len(safetensors.torch.save(state_dict))``: parameters and buffers (BN running statistics
    included) plus the safetensors header. A tensor registered under several names is stored once.
    """
    from safetensors.torch import save

    return len(save(_savable_state(module)))


def used_parameters(model: Any, task: str, level: int | None = None) -> int:
    """Parameter elements ``(task, level)`` reads in ``model`` (a :class:`virtnet.protocol.MultiTaskModel`),
    from its ``parameter_usage``: exact, each element once."""
    from virtnet.protocol import usage_count

    return usage_count(model.parameter_usage(task, level))


def usage_breakdown(
    model: Any, task: str, level: int | None = None, others: Mapping[str, torch.Tensor] | None = None
) -> dict[str, int]:
    """``{"shared", "task_specific", "total"}`` of the elements ``(task, level)`` reads in ``model``.

    An element is shared when another task of the model reads it at one of its levels (``others``: the
    union of the other tasks' usage, computed when not given); ``shared + task_specific == total``.
    """
    from virtnet.protocol import union_usage, usage_count

    used = model.parameter_usage(task, level)
    if others is None:
        others = union_usage(
            [model.parameter_usage(t, lv) for t in model.tasks if t != task for lv in model.levels(t)]
        )
    total = usage_count(used)
    shared = sum(int((m & others[n]).sum()) for n, m in used.items() if n in others)
    return {"shared": shared, "task_specific": total - shared, "total": total}


__all__ = [
    "bytes_on_disk",
    "count_buffers",
    "count_parameters",
    "density",
    "parameter_breakdown",
    "tensor_bytes",
    "usage_breakdown",
    "used_parameters",
]
