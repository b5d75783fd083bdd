"""Safetensors + JSON pairs, written crash-safely: the storage under checkpoints, PackNet ownership maps,
packed models and exported networks.

A pair ``<stem>`` is two files, ``<stem>.safetensors`` (tensors) and ``<stem>.json`` (metadata, with the
tensor file's ``sha256`` and ``num_bytes``). This module imports only torch, safetensors,
:mod:`virtnet.errors` and :mod:`virtnet.schema`, so any layer may use it.

Writing (:func:`write_pair`)
    Each file is written to a temporary ``.<name>.<random>`` in the same folder (``mkstemp``), flushed,
    fsynced and renamed over its target, the tensor file first, then the sidecar. While a pair is written
    SIGTERM and SIGINT remove the temporary files before the signal takes its usual course (the previous
    handlers are restored afterwards); a ``kill -9`` can still leave one, which :func:`clean_stale_temp`
    removes and every reader ignores.

Keeping the previous good pair (rotation)
    With ``keep_previous=True`` (training checkpoints use it) the complete existing pair is first
    *copied* (hard-linked where possible) to ``<stem>.prev.safetensors`` / ``<stem>.prev.json`` before the
    new files are renamed in. So at every instant at least one complete, hash-valid pair exists: a crash
    between the two renames leaves ``<stem>.safetensors`` new and ``<stem>.json`` old (their hashes
    disagree), and :func:`newest_valid_pair` then falls back to ``<stem>.prev``.

Reading (:func:`read_pair_meta`, :func:`newest_valid_pair`)
    The sidecar must be UTF-8 JSON of the expected ``format`` and ``format_version`` (an int); the
    tensor file beside it must have the recorded size (``num_bytes``) and sha256, and the sidecar's content
    the hash recorded in the tensor file's header (:data:`META_HASH_KEY`). Every failure is a one-line
    :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from virtnet.errors import CheckpointError

META_HASH_KEY = "virtnet.meta_sha256"
"""Key, in the tensor file's safetensors header, of the sha256 of the sidecar's content (every key but
``sha256`` and ``num_bytes``): the two files check each other, so a hand-edited sidecar (``tasks[0]
.input_size`` changed) is refused like an altered tensor file."""

PREV_SUFFIX = ".prev"
"""Suffix of the stem of the kept previous pair: ``last`` -> ``last.prev.{safetensors,json}``."""

# temporary files being written by this process: removed by the signal handler
_LIVE_TEMPS: set[str] = set()
_LOCK = threading.Lock()


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


def previous_stem(path: str | Path) -> Path:
    """The stem of the kept previous pair of ``path``: ``RUN/checkpoints/last`` -> ``.../last.prev``."""
    tpath, _ = checkpoint_paths(path)
    stem = tpath.with_suffix("")
    return stem.with_name(stem.name + PREV_SUFFIX)


def is_temp_file(path: str | Path) -> bool:
    """Whether ``path`` looks like a temporary file of :func:`_atomic_write` (``.<name>.<random>``)."""
    name = Path(path).name
    return name.startswith(".") and (".safetensors." in name or ".json." in name)


def clean_stale_temp(folder: str | Path) -> list[Path]:
    """Remove temporary files left in ``folder`` by an interrupted write (``.<name>.safetensors.*``,
    ``.<name>.json.*``); returns the removed paths. Files being written by this process are kept."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    with _LOCK:
        live = set(_LIVE_TEMPS)
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_temp_file(p) and str(p) not in live:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _remove_live_temps() -> None:
    with _LOCK:
        live = list(_LIVE_TEMPS)
        _LIVE_TEMPS.clear()
    for t in live:
        with contextlib.suppress(OSError):
            os.unlink(t)


@contextlib.contextmanager
def temp_files_removed_on_signal() -> Iterator[None]:
    """While inside, SIGTERM and SIGINT run the previous handler; when it raises (Python's SIGINT handler
    raises KeyboardInterrupt) or is the default action (SIGTERM ends the process), the temporary files
    being written are removed first. A previous handler that returns (a loop setting a "stop after this
    step" flag) lets the write finish.
    The previous handlers are restored on exit. Outside the main thread this does nothing (Python only
    installs handlers there); the files are then removed by the ``except`` in :func:`_atomic_write`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        prev = previous.get(signum)
        if callable(prev):  # e.g. Python's SIGINT handler, or a training loop's "stop after this step"
            try:
                prev(signum, frame)
            except BaseException:
                _remove_live_temps()  # the process is unwinding: leave no temporary file
                raise
            return  # the previous handler chose to go on: so does the write
        if prev == signal.SIG_IGN:
            return
        _remove_live_temps()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)  # SIG_DFL: die of the signal as the process would have
        os.kill(os.getpid(), signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[s] = signal.getsignal(s)
            signal.signal(s, handler)
        except (ValueError, OSError):  # pragma: no cover - not the main thread / unsupported
            previous.pop(s, None)
    try:
        yield
    finally:
        for s, h in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(s, h if h is not None else signal.SIG_DFL)


def _write_temp(path: Path, data: bytes) -> str:
    """``data`` in a fsynced temporary file beside ``path``; returns the temporary file's name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with _LOCK:
        _LIVE_TEMPS.add(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def _discard(tmp: str) -> None:
    with _LOCK:
        _LIVE_TEMPS.discard(tmp)
    Path(tmp).unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    with _LOCK:
        _LIVE_TEMPS.discard(tmp)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of a sidecar's content without ``sha256`` and ``num_bytes`` (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k not in ("sha256", "num_bytes")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=_json_default)
    return sha256_bytes(text.encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().clone()


def _keep_previous(tpath: Path, jpath: Path) -> None:
    """Copy the current pair, when it is complete and valid, to ``<stem>.prev`` (hard links when the file
    system allows: the renames that follow replace the names, not the linked data)."""
    if not (tpath.is_file() and jpath.is_file()):
        return
    try:
        meta = json.loads(jpath.read_bytes().decode("utf-8"))
        if not isinstance(meta, dict) or sha256_file(tpath) != meta.get("sha256"):
            return  # the current pair is itself incomplete: keep the older .prev
    except (OSError, ValueError):
        return
    ptpath, pjpath = checkpoint_paths(previous_stem(tpath))
    for src, dst in ((tpath, ptpath), (jpath, pjpath)):
        tmp = _write_temp(dst, b"")
        try:
            os.unlink(tmp)
            try:
                os.link(src, tmp)
            except OSError:
                with open(src, "rb") as f:
                    data = f.read()
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, dst)
        finally:
            _discard(tmp)


def write_pair(
    path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep_previous: bool = False
) -> Path:
    """Write ``tensors`` to ``<path>.safetensors`` and ``meta`` plus the tensor file's ``sha256`` and
    ``num_bytes`` to ``<path>.json``, each atomically. Returns the JSON sidecar's path. Checkpoints, PackNet
    ownership maps and packed PackNet models are such pairs.

    With ``keep_previous`` the existing complete pair is kept as ``<path>.prev`` first (see the module
    docstring), so a crash at any point leaves a complete pair for :func:`newest_valid_pair`."""
    tpath, jpath = checkpoint_paths(path)
    meta = {k: v for k, v in meta.items() if k not in ("sha256", "num_bytes")}
    meta = json.loads(json.dumps(meta, default=_json_default))  # exactly what the sidecar will hold
    header = {META_HASH_KEY: meta_digest(meta)}
    data = save({k: _contiguous(v) for k, v in tensors.items()}, metadata=header)
    meta = {**meta, "sha256": sha256_bytes(data), "num_bytes": len(data)}
    text = (json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n").encode()
    with temp_files_removed_on_signal():
        tmp_t = _write_temp(tpath, data)
        try:
            tmp_j = _write_temp(jpath, text)
        except BaseException:
            _discard(tmp_t)
            raise
        try:
            if keep_previous:
                _keep_previous(tpath, jpath)
            os.replace(tmp_t, tpath)
            os.replace(tmp_j, jpath)
        finally:
            _discard(tmp_t)
            _discard(tmp_j)
        _fsync_dir(jpath.parent)
    return jpath


def read_json(jpath: Path, what: str) -> Any:
    """The JSON value in ``jpath``: a one-line CheckpointError when it is not UTF-8 JSON."""
    try:
        raw = jpath.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{jpath}: cannot read {what}: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{jpath}: not valid JSON: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{jpath}: not valid JSON: {e.msg} at line {e.lineno}") from None
    except RecursionError:
        raise CheckpointError(f"{jpath}: not valid JSON: nested too deeply") from None


def _sidecar(jpath: Path, fmt: str, version: int, what: str) -> dict[str, Any]:
    """The JSON sidecar ``jpath``, checked: valid JSON, format ``fmt``, version ``version``."""
    meta = read_json(jpath, what)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{jpath}: not a {what} (missing format '{fmt}')")
    v = meta.get("format_version")
    if isinstance(v, bool) or not isinstance(v, int):
        raise CheckpointError(
            f"{jpath}: format_version: must be an integer, got {v!r} (this virtnet reads version {version})"
        )
    if v != version:
        raise CheckpointError(
            f"{jpath}: {what} format version {v} is not supported (this virtnet reads version {version})"
        )
    return meta


def _check_tensor_file(tpath: Path, jpath: Path, meta: dict[str, Any]) -> None:
    """The tensor file is the one the sidecar describes: its size (``num_bytes``) and sha256."""
    size = tpath.stat().st_size
    nbytes = meta.get("num_bytes")
    if isinstance(nbytes, int) and not isinstance(nbytes, bool) and nbytes != size:
        raise CheckpointError(
            f"{tpath}: {size} bytes, but {jpath.name} describes a tensor file of {nbytes} bytes "
            "(altered after saving, or written incompletely)"
        )
    digest = sha256_file(tpath)
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"{tpath}: sha256 mismatch with {jpath.name} (tensor file altered after saving, or written "
            f"incompletely): expected {str(meta.get('sha256'))[:12]}..., found {digest[:12]}..."
        )
    try:
        with safe_open(str(tpath), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{tpath}: unreadable safetensors file: {_first_line(e)}") from None
    recorded = header.get(META_HASH_KEY)
    if recorded is not None and recorded != meta_digest(meta):  # files written before this check: no key
        raise CheckpointError(
            f"{jpath}: altered after saving (its content no longer matches the hash recorded in {tpath.name})"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_pair_meta(path: str | Path, fmt: str, version: int, what: str) -> tuple[Path, Path, dict[str, Any]]:
    """Check a pair written by :func:`write_pair`: both files present, the JSON of format ``fmt`` and
    version ``version``, the tensor file's sha256 as recorded. Returns ``(tensor path, JSON path, meta)``;
    a one-line CheckpointError naming the file otherwise (``what`` names the kind of file)."""
    tpath, jpath = checkpoint_paths(path)
    if not jpath.is_file() or not tpath.is_file():
        raise CheckpointError(f"{jpath}: {what} not found (expected {jpath.name} and {tpath.name})")
    meta = _sidecar(jpath, fmt, version, what)
    _check_tensor_file(tpath, jpath, meta)
    return tpath, jpath, meta


def newest_valid_pair(
    path: str | Path, fmt: str, version: int, what: str
) -> tuple[Path, Path, dict[str, Any], str | None]:
    """The newest complete, hash-valid pair of ``path``: itself, else its kept ``<path>.prev``.

    Returns ``(tensor path, JSON path, meta, notice)``; ``notice`` is None when ``path`` itself is valid,
    else one line saying why it fell back. Raises the latest pair's CheckpointError when neither is valid.
    """
    try:
        tpath, jpath, meta = read_pair_meta(path, fmt, version, what)
        return tpath, jpath, meta, None
    except CheckpointError as latest:
        prev = previous_stem(path)
        if not checkpoint_paths(prev)[1].is_file():
            raise
        try:
            tpath, jpath, meta = read_pair_meta(prev, fmt, version, what)
        except CheckpointError:
            raise latest from None
        return tpath, jpath, meta, f"{latest}; using the previous checkpoint {jpath}"


__all__ = [
    "META_HASH_KEY",
    "PREV_SUFFIX",
    "checkpoint_paths",
    "clean_stale_temp",
    "is_temp_file",
    "meta_digest",
    "newest_valid_pair",
    "previous_stem",
    "read_json",
    "read_pair_meta",
    "sha256_bytes",
    "sha256_file",
    "temp_files_removed_on_signal",
    "write_pair",
]
