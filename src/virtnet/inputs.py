"""Validation of what users hand to the public entry points (``api.predict``, ``api.train``).

Inputs of :func:`virtnet.api.predict` (:func:`prepare_inputs`), the documented rule:

* a ``torch.Tensor`` or a numpy array (converted with ``torch.from_numpy``); anything else is refused;
* shape ``(B, C, H, W)`` with ``C``, ``H``, ``W`` the task's ``in_channels`` and ``input_size``, ``B >= 1``;
* dtype:

  - ``float32``: already normalised inputs, used as they are (the behaviour before this rule);
  - ``float64``: cast to ``float32``, otherwise as ``float32``;
  - ``uint8``: raw pixels, scaled by ``1/255`` then normalised with the task's ``mean``/``std`` recorded
    in the model (:class:`virtnet.protocol.TaskSpec`); when the model records none, only scaled;
  - every other dtype (``float16``, ``bfloat16``, integer types other than ``uint8``, ``bool``, complex)
    is refused: cast it yourself to say what it means;

* on the model's device (no silent copies between devices);
* finite: NaN and infinite values are refused unless ``allow_nonfinite=True``.

Every problem is one line ``<what>: <problem>`` as a :class:`virtnet.errors.DataError`.

Labels of a user task set given to :func:`virtnet.api.train` (:func:`check_taskset`): multiclass labels
an integer tensor with values in ``0 .. num_outputs - 1``; multilabel targets floating or bool 0/1 values
of shape ``(N, num_outputs)``; the task and the first offending value are named.
"""

from __future__ import annotations

from typing import Any

import torch

from virtnet.errors import DataError

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def as_tensor(x: Any, what: str = "x") -> torch.Tensor:
    """``x`` as a tensor: tensors as they are, numpy arrays converted (no copy); else a DataError."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None  # type: ignore[assignment]
    if np is not None and isinstance(x, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(x))
        except TypeError:
            raise DataError(f"{what}: numpy dtype {x.dtype} has no torch equivalent") from None
    raise DataError(f"{what}: expected a torch.Tensor or a numpy array, got {type(x).__name__}")


def prepare_inputs(
    x: Any,
    spec: Any,
    device: torch.device | str | None = None,
    allow_nonfinite: bool = False,
    what: str = "x",
) -> torch.Tensor:
    """Check ``x`` against the task ``spec`` (a TaskSpec: ``name``, ``in_channels``, ``input_size``,
    ``mean``, ``std``) and return the float32 normalised batch the model takes (see the module rule)."""
    x = as_tensor(x, what)
    task = getattr(spec, "name", "?")
    expected = (int(spec.in_channels), int(spec.input_size), int(spec.input_size))
    if x.dim() != 4:
        hint = " (add a batch dimension: x[None])" if x.dim() == 3 else ""
        raise DataError(
            f"{what}: task '{task}' takes a (B, {', '.join(map(str, expected))}) batch, "
            f"got shape {tuple(x.shape)}{hint}"
        )
    if tuple(x.shape[1:]) != expected:
        c, h, w = x.shape[1:]
        problem = (
            f"{c} channels, the task has {expected[0]}"
            if c != expected[0]
            else f"{h}x{w} inputs, the task takes {expected[1]}x{expected[2]}"
        )
        raise DataError(f"{what}: task '{task}': {problem} (shape {tuple(x.shape)})")
    if x.shape[0] == 0:
        raise DataError(f"{what}: empty batch (shape {tuple(x.shape)}): give at least one input")
    if device is not None and x.device != torch.device(device):
        raise DataError(f"{what}: on {x.device}, the model is on {torch.device(device)} (move it with .to())")
    if x.dtype == torch.float32:
        out = x
    elif x.dtype == torch.float64:
        out = x.to(torch.float32)
    elif x.dtype == torch.uint8:
        out = x.to(torch.float32) / 255.0
        mean, std = tuple(getattr(spec, "mean", ()) or ()), tuple(getattr(spec, "std", ()) or ())
        if mean and std:
            m = torch.tensor(mean, dtype=torch.float32, device=out.device).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=torch.float32, device=out.device).view(1, -1, 1, 1)
            out = (out - m) / s
    else:
        raise DataError(
            f"{what}: dtype {x.dtype} is not accepted (float32: normalised inputs; float64: cast to "
            "float32; uint8: raw pixels, scaled by 1/255 and normalised with the task's mean and std)"
        )
    if not allow_nonfinite and not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise DataError(
            f"{what}: {bad} NaN or infinite values (pass allow_nonfinite=True to predict on them anyway)"
        )
    return out


def check_labels(task: Any, split: str, labels: Any, kind: str, num_outputs: int) -> None:
    """One split's labels of a task: dtype and range (see the module rule); DataError naming the task,
    the split and the first offending value otherwise."""
    where = f"task '{getattr(task, 'name', task)}' ({split} split)"
    if not isinstance(labels, torch.Tensor):
        raise DataError(f"{where}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.numel() == 0:
        return
    if kind == "multilabel":
        if labels.dim() != 2 or labels.shape[1] != num_outputs:
            raise DataError(
                f"{where}: multilabel targets must have shape (N, {num_outputs}), got {tuple(labels.shape)}"
            )
        if not (labels.dtype.is_floating_point or labels.dtype == torch.bool):
            raise DataError(f"{where}: multilabel targets must be float or bool 0/1, got {labels.dtype}")
        values = labels.float()
        bad = ~((values == 0) | (values == 1))
        if bool(bad.any()):
            v = values[bad][0].item()
            raise DataError(f"{where}: multilabel targets must be 0 or 1, found {v!r}")
        return
    if labels.dtype not in _INT_DTYPES:
        raise DataError(f"{where}: class labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1:
        raise DataError(f"{where}: class labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_outputs:
        v = lo if lo < 0 else hi
        span = f"0..{num_outputs - 1}"
        raise DataError(f"{where}: label {v} is out of range for {num_outputs} classes ({span})")


def check_taskset(taskset: Any) -> None:
    """Every split's labels of every task of a user task set (see :func:`check_labels`)."""
    for task in taskset:
        kind = getattr(task, "kind", "multiclass")
        n = int(task.num_outputs)
        for split in ("train", "val", "test"):
            data = getattr(task, split, None)
            if data is None:
                continue
            check_labels(task, split, data.labels, kind, n)


__all__ = ["as_tensor", "check_labels", "check_taskset", "prepare_inputs"]
