"""Self-describing exported networks: a module tree written as JSON, rebuilt without the run's config,
the method or any training code.

:func:`describe` walks an exported network (plain layers, blocks of virtnet's backbones) and records, per
module, its class (only ``torch.nn`` and ``virtnet`` classes are allowed), its plain attributes (numbers,
strings, booleans, None, and tuples / lists / dicts of them), the names and shapes of its parameters and
buffers, and its children. :func:`rebuild` makes the same tree again — each module created with
``cls.__new__`` and ``nn.Module.__init__``, its attributes restored, its tensors allocated with the
recorded shapes and dtypes — and the tensors are then loaded from the safetensors file. Nothing is
unpickled and no constructor runs, so a class whose constructor needs the training config rebuilds all
the same; an attribute that is neither plain data nor a module (a cache, a partition object) must be
absent from an exported network, and :func:`describe` refuses it by name. Children are a list of
``[name, description]`` pairs, so their order (a ``Sequential``'s computation) survives a JSON writer
that sorts keys.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from virtnet.errors import CheckpointError

ALLOWED_ROOTS = ("torch.nn.", "virtnet.")
#: what every module has (hooks, registries): made again by ``nn.Module.__init__``
_SKIP = frozenset(vars(nn.Module()))
#: attributes rebuilt empty (caches a layer fills again on use)
_EMPTY_CACHES = frozenset({"_slice_cache"})
_DTYPES = {
    str(d): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32)
    + (torch.int16, torch.int8, torch.uint8, torch.bool)
}


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON, tuples tagged so they come back as tuples; CheckpointError when not plain."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_plain(v, where) for v in value]}
    if isinstance(value, list):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _plain(v, where) for k, v in value.items()}}
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted(_plain(v, where) for v in value)}
    raise CheckpointError(f"{where}: an exported network cannot hold a {type(value).__name__}")


def _unplain(value: Any) -> Any:
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_unplain(v) for v in value["__tuple__"])
        if "__float__" in value:
            return float(value["__float__"])
        if "__dict__" in value:
            return {k: _unplain(v) for k, v in value["__dict__"].items()}
        if "__set__" in value:
            return set(_unplain(v) for v in value["__set__"])
        raise CheckpointError(f"unknown tagged value {sorted(value)}")
    return value


def _class_path(m: nn.Module) -> str:
    cls = type(m)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(module: nn.Module, where: str = "network") -> dict[str, Any]:
    """The JSON description of ``module``'s tree (see the module docstring)."""
    path = _class_path(module)
    if not path.startswith(ALLOWED_ROOTS):
        raise CheckpointError(f"{where}: class {path} is not a torch.nn or virtnet module")
    attrs: dict[str, Any] = {}
    for k, v in vars(module).items():
        if k in _SKIP:
            continue
        if k in _EMPTY_CACHES:
            attrs[k] = {"__empty__": type(v).__name__}
            continue
        attrs[k] = _plain(v, f"{where}.{k}")
    params = {
        n: {"shape": list(p.shape), "dtype": str(p.dtype), "requires_grad": p.requires_grad}
        for n, p in module._parameters.items()
        if p is not None
    }
    buffers = {
        n: None if b is None else {"shape": list(b.shape), "dtype": str(b.dtype)}
        for n, b in module._buffers.items()
    }
    return {
        "class": path,
        "training": module.training,
        "attrs": attrs,
        "parameters": params,
        "none_parameters": [n for n, p in module._parameters.items() if p is None],
        "buffers": buffers,
        "non_persistent": sorted(module._non_persistent_buffers_set),
        # a list, not a mapping: JSON writers may sort keys, and a Sequential's order is its computation
        "children": [
            [n, None if c is None else describe(c, f"{where}.{n}")] for n, c in module._modules.items()
        ],
    }


def _resolve(path: str) -> type[nn.Module]:
    if not isinstance(path, str) or not path.startswith(ALLOWED_ROOTS):
        raise CheckpointError(f"class {path!r} is not a torch.nn or virtnet module")
    mod, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        raise CheckpointError(f"class {path} does not exist in this version of torch / virtnet") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"class {path} is not an nn.Module")
    return cls


def rebuild(desc: dict[str, Any], where: str = "network") -> nn.Module:
    """The module tree :func:`describe` recorded, with uninitialised tensors of the recorded shapes."""
    try:
        cls = _resolve(desc["class"])
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k, v in desc["attrs"].items():
            if isinstance(v, dict) and "__empty__" in v:
                object.__setattr__(m, k, {})
            else:
                object.__setattr__(m, k, _unplain(v))
        for n, spec in desc["parameters"].items():
            t = torch.empty(spec["shape"], dtype=_DTYPES[spec["dtype"]])
            m._parameters[n] = nn.Parameter(t, requires_grad=bool(spec["requires_grad"]))
        for n in desc.get("none_parameters", []):
            m._parameters[n] = None
        for n, spec in desc["buffers"].items():
            m._buffers[n] = None if spec is None else torch.empty(spec["shape"], dtype=_DTYPES[spec["dtype"]])
        m._non_persistent_buffers_set = set(desc.get("non_persistent", []))
        for n, c in desc["children"]:
            m._modules[n] = None if c is None else rebuild(c, f"{where}.{n}")
        m.training = bool(desc["training"])
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: malformed network description ({type(e).__name__}: {e})") from None
    return m


__all__ = ["describe", "rebuild"]
