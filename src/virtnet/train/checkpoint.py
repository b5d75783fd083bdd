"""Checkpoints: a safetensors file of tensors plus a JSON sidecar, both written atomically.

A checkpoint ``<stem>`` is two files:

* ``<stem>.safetensors``: the model's state dict under ``model/<key>`` (buffers included: batch-norm
  running statistics, ownership maps, masks), and, in training checkpoints, the optimizer state under
  ``optim/<param index>/<name>`` and the torch RNG state under ``rng/torch``;
* ``<stem>.json``: ``format``/``format_version``, the run config, package versions, seed, phase, epoch,
  step, the task specs, method metadata, the optimizer's non-tensor state and the **sha256 of the tensor
  file**. Loading checks the hash: a tensor file altered after saving is refused.

Nothing is pickled. Each file is written to a temporary name in the same folder, flushed, fsynced and
renamed over the target, the tensor file first, so a crash leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from virtnet.errors import CheckpointError

FORMAT = "virtnet-checkpoint"
FORMAT_VERSION = 1


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(tensor file, JSON sidecar)`` of a checkpoint named by either file or by its stem."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


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


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().clone()


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
    for key, t in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = t
    for pid, st in meta.get("state", {}).items():
        state.setdefault(int(pid), {}).update(st)
    groups = meta["param_groups"]
    if len(groups) != len(opt.param_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, opt.param_groups, strict=True)
    ):
        raise CheckpointError("optimizer state was saved for different parameter groups")
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    rng_state: torch.Tensor | None = None,
) -> Path:
    """Write a checkpoint atomically; returns the JSON sidecar's path."""
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
    return write_pair(path, tensors, meta)


def write_pair(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` to ``<path>.safetensors`` and ``meta`` plus the tensor file's ``sha256`` and
    ``num_bytes`` to ``<path>.json``, each atomically. Returns the JSON sidecar's path. Checkpoints, PackNet
    ownership maps and packed PackNet models are such pairs."""
    tpath, jpath = checkpoint_paths(path)
    data = save({k: _contiguous(v) for k, v in tensors.items()})
    meta = {**meta, "sha256": sha256_bytes(data), "num_bytes": len(data)}
    _atomic_write(tpath, data)
    _atomic_write(jpath, (json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n").encode())
    return jpath


def read_pair_meta(path: str | Path, fmt: str, version: int, what: str) -> tuple[Path, Path, dict[str, Any]]:
    """Check a pair written by :func:`write_pair`: both files present, the JSON of format ``fmt`` and
    version ``version``, the tensor file's sha256 as recorded. Returns ``(tensor path, JSON path, meta)``;
    a one-line CheckpointError naming the file otherwise (``what`` names the kind of file)."""
    tpath, jpath = checkpoint_paths(path)
    if not jpath.is_file() or not tpath.is_file():
        raise CheckpointError(f"{jpath}: {what} not found (expected {jpath.name} and {tpath.name})")
    meta = _sidecar(jpath, fmt, version, what)
    if sha256_file(tpath) != meta.get("sha256"):
        raise CheckpointError(f"{tpath}: sha256 mismatch with {jpath.name} (altered after saving)")
    return tpath, jpath, meta


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a checkpoint (validated: format and version)."""
    _, jpath = checkpoint_paths(path)
    if not jpath.is_file():
        raise CheckpointError(
            f"{jpath}: checkpoint metadata not found (expected <name>.json beside <name>.safetensors)"
        )
    return _sidecar(jpath, FORMAT, FORMAT_VERSION, "virtnet checkpoint")


def _sidecar(jpath: Path, fmt: str, version: int, what: str) -> dict[str, Any]:
    """The JSON sidecar ``jpath``, checked: valid JSON, format ``fmt``, version ``version``."""
    try:
        meta = json.loads(jpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{jpath}: not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{jpath}: not a {what} (missing format '{fmt}')")
    if meta.get("format_version") != version:
        raise CheckpointError(
            f"{jpath}: {what} format version {meta.get('format_version')} is not supported "
            f"(this virtnet reads version {version})"
        )
    return meta


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Load a checkpoint, checking the tensor file's sha256 against the sidecar."""
    tpath, jpath = checkpoint_paths(path)
    meta = read_meta(path)
    if not tpath.is_file():
        raise CheckpointError(f"{tpath}: checkpoint tensor file not found")
    if verify:
        digest = sha256_file(tpath)
        if digest != meta.get("sha256"):
            raise CheckpointError(
                f"{tpath}: sha256 mismatch with {jpath.name} (tensor file altered after saving): "
                f"expected {str(meta.get('sha256'))[:12]}..., found {digest[:12]}..."
            )
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{tpath}: unreadable safetensors file: {e}") from None
    model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
    return Checkpoint(meta, model_state, optim, tensors.get("rng/torch"), jpath)


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
