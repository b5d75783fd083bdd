"""Checkpoints: a safetensors file of tensors plus a JSON sidecar, written crash-safely.

A checkpoint ``<stem>`` is two files:

* ``<stem>.safetensors``: the model's state dict under ``model/<key>`` (buffers included: batch-norm
  running statistics, ownership maps, masks), and, in training checkpoints, the optimizer state under
  ``optim/<param index>/<name>`` and the torch RNG state under ``rng/torch``; its header records the
  sha256 of the sidecar's content;
* ``<stem>.json``: ``format``/``format_version``, the run config, package versions, seed, phase, epoch,
  step, the task specs, method metadata, the optimizer's non-tensor state and the **sha256 of the tensor
  file**. Loading checks both hashes: a tensor file or a sidecar altered after saving is refused.

Nothing is pickled. The pair machinery (atomic writes, hashes, temporary files) is
:mod:`virtnet.storage`; its names are re-exported here.

Crash safety (the rule): ``save_checkpoint(..., keep_previous=True)`` first keeps the existing complete
pair as ``<stem>.prev.{safetensors,json}`` (hard links), then renames the new tensor file and the new
sidecar in. At every instant a complete, hash-valid pair exists: either ``<stem>`` or ``<stem>.prev``.
:func:`load_checkpoint_with_fallback` returns the newest one with a one-line notice when it fell back;
:func:`clean_stale_temp` removes the temporary ``.<name>.*`` files a ``kill -9`` can leave (SIGTERM and
SIGINT remove them while writing).

The sidecar is validated by :class:`CheckpointMeta` (a pydantic schema): ``format_version`` an integer,
``tasks`` a list of task specs with exactly ``name``, ``in_channels``, ``input_size``, ``num_outputs`` and
optional ``mean``/``std``, ``config`` a mapping, ``state`` integers; other keys (``structure``,
``optimizer``, ``versions``, ...) pass through. Every problem is one line naming the file and the key.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from virtnet.errors import CheckpointError
from virtnet.schema import MAX_SEED, format_validation_error
from virtnet.storage import (  # noqa: F401 (re-exported: existing imports keep working)
    PREV_SUFFIX,
    _atomic_write,
    _check_tensor_file,
    _contiguous,
    _json_default,
    _sidecar,
    checkpoint_paths,
    clean_stale_temp,
    is_temp_file,
    newest_valid_pair,
    previous_stem,
    read_pair_meta,
    sha256_bytes,
    sha256_file,
    temp_files_removed_on_signal,
    write_pair,
)

FORMAT = "virtnet-checkpoint"
FORMAT_VERSION = 1

NonNegInt = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
PosInt = Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]


class TaskSpecMeta(BaseModel):
    """One entry of a sidecar's ``tasks``: exactly the fields of :class:`virtnet.backbones.base.TaskSpec`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[StrictStr, Field(min_length=1)]
    in_channels: PosInt
    input_size: PosInt
    num_outputs: PosInt
    mean: list[float] = Field(default_factory=list)
    std: list[float] = Field(default_factory=list)


class StateMeta(BaseModel):
    """A sidecar's ``state``: where training stood (every value a non-negative integer)."""

    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[str, NonNegInt] = Field(init=False)

    phase: NonNegInt
    epoch: NonNegInt
    step: NonNegInt
    global_step: NonNegInt = 0


class CheckpointMeta(BaseModel):
    """Schema of a checkpoint sidecar. Keys not named here (``structure``, ``optimizer``, ``versions``,
    ``task_info``, ...) pass through unchanged."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: Literal["virtnet-checkpoint"]
    format_version: StrictInt
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
    num_bytes: NonNegInt
    tensor_file: StrictStr = None  # type: ignore[assignment]
    config: dict[str, Any] = None  # type: ignore[assignment]  # absent: None; present: a mapping
    tasks: Annotated[list[TaskSpecMeta], Field(min_length=1)] = None  # type: ignore[assignment]
    state: StateMeta = None  # type: ignore[assignment]
    method: StrictStr = None  # type: ignore[assignment]
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] = None  # type: ignore[assignment]
    optimizer: dict[str, Any] = None  # type: ignore[assignment]
    versions: dict[str, Any] = None  # type: ignore[assignment]
    structure: dict[str, Any] = None  # type: ignore[assignment]


def validate_meta(meta: Any, source: str | Path) -> dict[str, Any]:
    """``meta`` checked against :class:`CheckpointMeta`; a one-line CheckpointError
    ``<file>: <key>: <problem>`` otherwise. Returns ``meta`` itself (unchanged) when valid; task names
    must be unique."""
    try:
        m = CheckpointMeta.model_validate(meta)
    except ValidationError as err:
        raise CheckpointError(f"{source}: {format_validation_error(err)}") from None
    if m.tasks is not None:
        names = [t.name for t in m.tasks]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise CheckpointError(f"{source}: tasks: task name '{dup}' appears twice")
    return meta


def versions() -> dict[str, str]:
    import virtnet

    return {"virtnet": virtnet.__version__, "torch": torch.__version__, "python": platform.python_version()}


@dataclass
class Checkpoint:
    """A loaded checkpoint: its metadata and tensors (grouped by prefix)."""

    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optim_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    rng_state: torch.Tensor | None = None
    path: Path | None = None
    notice: str | None = None  # set by load_checkpoint_with_fallback when it used the previous checkpoint


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able values."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = _contiguous(v)
            else:
                plain_state.setdefault(str(pid), {})[k] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state": plain_state}


def optimizer_from_flat(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Restore an optimizer from :func:`optimizer_to_flat`'s two halves."""
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, t in tensors.items():
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = t
        for pid, st in meta.get("state", {}).items():
            state.setdefault(int(pid), {}).update(st)
        groups = meta["param_groups"]
        same = len(groups) == len(opt.param_groups) and all(
            len(a["params"]) == len(b["params"]) for a, b in zip(groups, opt.param_groups, strict=True)
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"optimizer: malformed optimizer state ({type(e).__name__}: {e})") from None
    if not same:
        raise CheckpointError("optimizer state was saved for different parameter groups")
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    rng_state: torch.Tensor | None = None,
    keep_previous: bool = False,
) -> Path:
    """Write a checkpoint atomically; returns the JSON sidecar's path.

    ``keep_previous``: keep the existing complete checkpoint as ``<stem>.prev`` until the new one is in
    place (training's ``checkpoints/last`` should use it; see the module docstring)."""
    tpath, _ = checkpoint_paths(path)
    tensors = {f"model/{k}": _contiguous(v) for k, v in model_state.items()}
    meta = dict(meta)
    if optimizer is not None:
        ot, om = optimizer_to_flat(optimizer)
        tensors.update(ot)
        meta["optimizer"] = om
    if rng_state is not None:
        tensors["rng/torch"] = _contiguous(rng_state)
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, versions=versions(), tensor_file=tpath.name)
    return write_pair(path, tensors, meta, keep_previous=keep_previous)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint named by a run folder becomes ``RUN/model`` when ``RUN/model.json`` exists, else
    ``RUN/checkpoints/last``; any other path is returned as given (a stem or either file of a pair)."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "model", p / "checkpoints" / "last"):
            if checkpoint_paths(cand)[1].is_file():
                return cand
        raise CheckpointError(f"{p}: a folder with neither model.json nor checkpoints/last.json")
    return p


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a checkpoint, validated (format, version, :class:`CheckpointMeta`)."""
    path = resolve_checkpoint(path)
    _, jpath = checkpoint_paths(path)
    if not jpath.is_file():
        raise CheckpointError(
            f"{jpath}: checkpoint metadata not found (expected <name>.json beside <name>.safetensors)"
        )
    return validate_meta(_sidecar(jpath, FORMAT, FORMAT_VERSION, "virtnet checkpoint"), jpath)


def _read_tensors(tpath: Path, jpath: Path, meta: dict[str, Any], notice: str | None = None) -> Checkpoint:
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{tpath}: unreadable safetensors file: {first}") from None
    model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
    return Checkpoint(meta, model_state, optim, tensors.get("rng/torch"), jpath, notice)


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Load a checkpoint, checking the sidecar's schema, the tensor file's size and sha256 against the
    sidecar and the sidecar's content against the hash in the tensor file (``verify=False``: schema only).
    ``path``: a stem, either file of the pair, or a run folder (:func:`resolve_checkpoint`).
    """
    path = resolve_checkpoint(path)
    tpath, jpath = checkpoint_paths(path)
    meta = read_meta(path)  # format, version and schema first: errors name the key
    if not tpath.is_file():
        raise CheckpointError(f"{tpath}: checkpoint tensor file not found")
    if verify:
        _check_tensor_file(tpath, jpath, meta)
    return _read_tensors(tpath, jpath, meta)


def load_checkpoint_with_fallback(path: str | Path) -> Checkpoint:
    """The newest complete, valid checkpoint of ``path``: ``path`` itself, else the ``<stem>.prev`` kept
    by ``save_checkpoint(..., keep_previous=True)``.

    When it fell back, ``Checkpoint.notice`` is one line saying why (the latest is incomplete, fails its
    hash, or its sidecar is invalid) and which file was used; the caller logs it. Raises the latest
    checkpoint's CheckpointError when neither is valid (or there is no ``.prev``). Stale temporary files
    in the folder are ignored (remove them with :func:`clean_stale_temp`)."""
    what = "virtnet checkpoint"
    path = resolve_checkpoint(path)
    try:
        return load_checkpoint(path)
    except CheckpointError as latest:
        prev = previous_stem(path)
        if not checkpoint_paths(prev)[1].is_file():
            raise
        try:
            ck = load_checkpoint(prev)
        except CheckpointError:
            raise latest from None
        ck.notice = f"{latest}; fell back to the previous {what} {ck.path}"
        return ck


def load_model_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line CheckpointError on any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. '{unexpected[0]}')")
        raise CheckpointError(f"{source}: saved for a different network: {'; '.join(parts)}")
    for k, t in own.items():  # in the model's order, so the first mismatching layer is named
        v = state[k]
        if t.shape != v.shape:
            raise CheckpointError(
                f"{source}: saved for a different network: '{k}' has shape {tuple(v.shape)}, "
                f"the model expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(state, strict=True)
