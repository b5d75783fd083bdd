"""Standalone exports of one (task, level): ONNX (read by onnxruntime) and pt2 (``torch.export``).

Both formats hold a network that needs neither virtnet nor its training code to run, and both carry the
task's input normalisation **inside the graph**: the graph's first operation is ``(x - mean) / std`` with
the task's recorded per-channel statistics, so the input a user feeds is a ``float32`` batch
``(B, C, S, S)`` of pixels scaled to ``[0, 1]`` (``uint8 / 255``), the batch dimension free. A task
trained without recorded statistics gets the identity (mean 0, std 1). The file also carries a JSON
description (key ``virtnet``: the task's spec, level, method, source checkpoint, what the input is), in
the ONNX model's ``metadata_props`` and in the pt2 archive's ``extra/virtnet.json``.

* ONNX: :func:`export_onnx` traces the network with ``torch.export`` (a dynamic batch dimension) and
  converts the program with this torch's default (``torch.export``-based) ONNX exporter, which needs
  ``onnxscript``; the weights go in the ``.onnx`` file itself unless ``external_data`` asks for a side file
  (PITFALLS.md: that exporter writes a side file by default). ``torch.onnx.export`` rebuilds the
  exporter's operator registry on every call (about 2 s); virtnet builds it once per process and calls
  the same exporter's core with it, falling back to ``torch.onnx.export`` when a torch lacks that entry
  point. :func:`read_onnx` checks a file and opens an onnxruntime session on it.
* pt2: :func:`export_pt2` / :func:`read_pt2` through ``torch.export.save`` / ``torch.export.load``.

The network given is an already physically smaller export (:meth:`virtnet.methods.Method.export`): ONNX
keeps every weight a module holds, so slicing must happen before (PITFALLS.md).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from virtnet.errors import CheckpointError, ConfigError, DataError
from virtnet.protocol import TaskSpec

FORMAT = "virtnet-deployed"
FORMAT_VERSION = 1
METADATA_KEY = "virtnet"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_DOC = "float32 (B, C, S, S) pixels in [0, 1]; (x - mean) / std is applied inside the graph"
#: the formats ``virtnet export --format`` writes and the file suffix of each
SUFFIXES = {"safetensors": ".json", "onnx": ".onnx", "pt2": ".pt2"}
FORMATS = tuple(SUFFIXES)


class Normalised(nn.Module):
    """``network((x - mean) / std)``: a network fed raw ``[0, 1]`` pixels (the deployed form)."""

    def __init__(self, network: nn.Module, spec: TaskSpec) -> None:
        super().__init__()
        c = spec.in_channels
        mean = torch.tensor(spec.mean or (0.0,) * c, dtype=torch.float32).reshape(1, c, 1, 1)
        std = torch.tensor(spec.std or (1.0,) * c, dtype=torch.float32).reshape(1, c, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network((x - self.mean) / self.std)  # (B, C, S, S) -> (B, outputs)


def normalise(x: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """``(x - mean) / std`` with the task's statistics: what the deployed graph does first."""
    c = spec.in_channels
    if not spec.mean:
        return x
    mean = torch.tensor(spec.mean, dtype=x.dtype).reshape(1, c, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).reshape(1, c, 1, 1)
    return (x - mean) / std


def check_format(fmt: str) -> str:
    if fmt not in SUFFIXES:
        raise ConfigError(f"--format {fmt}: unsupported export format (use {', '.join(FORMATS)})")
    return fmt


def output_path(stem: str | Path, fmt: str) -> Path:
    """The file an export of format ``fmt`` writes for ``stem`` (``STEM.onnx``, ``STEM.pt2``; the
    safetensors pair is ``STEM.safetensors`` + ``STEM.json``)."""
    p = Path(stem)
    suffix = SUFFIXES[check_format(fmt)]
    if fmt != "safetensors" and p.suffix == suffix:
        return p
    return p.with_name(p.name + suffix) if p.suffix not in (".json", ".safetensors") else p


def describe_deployed(spec: TaskSpec, level: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON description a deployed file carries (see the module docstring)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": spec.to_dict(),
        "level": int(level),
        "input": INPUT_DOC,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        **dict(extra or {}),
    }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (missing torchvision ops, deprecation notes) while exporting."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch.fx.experimental")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _example(spec: TaskSpec, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, spec.in_channels, spec.input_size, spec.input_size, generator=g)


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def deployable(network: nn.Module, spec: TaskSpec) -> nn.Module:
    """The network wrapped with its normalisation, in eval mode, on the CPU, as an export traces it."""
    return Normalised(network, spec).eval().cpu()


def export_program(network: nn.Module, spec: TaskSpec, what: str = "network") -> torch.export.ExportedProgram:
    """``torch.export`` of the deployed form (normalisation first, dynamic batch); ConfigError when the
    network cannot be traced."""
    wrapped = deployable(network, spec)
    try:
        with _quiet_exporter(), torch.no_grad():
            return torch.export.export(wrapped, (_example(spec),), dynamic_shapes=_dynamic_batch())
    except Exception as e:  # noqa: BLE001 (torch.export raises many types)
        raise ConfigError(f"{what}: cannot be exported with torch.export: {_first_line(e)}") from None


@functools.lru_cache(maxsize=1)
def _registry() -> Any:
    """The default exporter's operator registry for its default opset, built once per process (what
    ``torch.onnx.export`` rebuilds on every call: about 2 s); None when this torch lacks the entry point."""
    try:
        from torch.onnx import _constants as onnx_constants
        from torch.onnx._internal.exporter import _constants, _core, _registration  # noqa: F401
    except ImportError:
        return None
    opset = onnx_constants.ONNX_DEFAULT_OPSET
    registry = _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, _constants.TORCHLIB_OPSET))
    return opset, registry


def _to_onnx(program: torch.export.ExportedProgram, x: torch.Tensor, external_data: bool) -> Any:
    """``torch.onnx.export(program, dynamo=True)`` — the default exporter — with its registry built once
    (falls back to the public call when the exporter's core entry point is not there)."""
    cached = _registry()
    if cached is not None:
        from torch.onnx._internal.exporter import _core

        opset, registry = cached
        return _core.export(
            program,
            (x,),
            registry=registry,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            optimize=True,
            verbose=False,
            opset_version=opset,
        )
    return torch.onnx.export(
        program,
        (x,),
        None,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamo=True,
        external_data=external_data,
        optimize=True,
        verbose=False,
    )


def export_onnx(
    network: nn.Module,
    spec: TaskSpec,
    path: str | Path,
    metadata: Mapping[str, Any] | None = None,
    external_data: bool = False,
    what: str = "network",
) -> Path:
    """Write ``network`` (a standalone export) with its normalisation as one ONNX file.

    Args:
        network: called ``network(x)`` on normalised inputs (e.g. :meth:`Method.export`'s result).
        spec: the task: input shape and normalisation.
        path: the ``.onnx`` file to write.
        metadata: the JSON description stored under ``virtnet`` in the model's metadata
            (:func:`describe_deployed`).
        external_data: write the weights to ``<path>.data`` beside the graph instead of into it.
        what: names the network in error messages (e.g. ``"method 'dvn' task 'a' level 1"``).

    Returns:
        The path written. ConfigError (one line) when the network cannot be exported to ONNX.
    """
    path = Path(path)
    program = export_program(network, spec, what)
    try:
        with _quiet_exporter():
            onnx_program = _to_onnx(program, _example(spec), external_data)
    except Exception as e:  # noqa: BLE001 (the exporter raises many types)
        raise ConfigError(f"{what}: cannot be exported as onnx: {_first_line(e)}") from None
    if onnx_program is None:
        raise ConfigError(f"{what}: cannot be exported as onnx: the exporter returned nothing")
    onnx_program.model.metadata_props[METADATA_KEY] = json.dumps(dict(metadata or {}), sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path), external_data=external_data)
    return path


def export_pt2(
    network: nn.Module,
    spec: TaskSpec,
    path: str | Path,
    metadata: Mapping[str, Any] | None = None,
    what: str = "network",
) -> Path:
    """Write ``network`` with its normalisation as a ``torch.export`` archive (``torch.export.save``); the
    JSON description goes in the archive's ``extra/virtnet.json``."""
    path = Path(path)
    program = export_program(network, spec, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {f"{METADATA_KEY}.json": json.dumps(dict(metadata or {}), sort_keys=True)}
    torch.export.save(program, str(path), extra_files=extra)
    return path


def _meta(text: str | None, where: str) -> dict[str, Any]:
    if not text:
        raise CheckpointError(f"{where}: no virtnet description in the file (not written by virtnet export)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: virtnet description is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a virtnet deployed network (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format version {meta.get('format_version')} is newer than this virtnet's "
            f"{FORMAT_VERSION}"
        )
    return meta


def _spec(meta: Mapping[str, Any], where: str) -> TaskSpec:
    try:
        return TaskSpec.from_dict(meta["task"])
    except (KeyError, TypeError, ValueError, DataError) as e:
        raise CheckpointError(f"{where}: task: {e}") from None


@dataclass
class Deployed:
    """A deployed network read back (:func:`read_onnx`, :func:`read_pt2`, :func:`read_deployed`).

    Call it on a ``float32`` batch of ``[0, 1]`` pixels (numpy or torch, ``(B, C, S, S)``); it returns
    the logits as a numpy array. ``session`` is the onnxruntime session (ONNX) and ``module`` the
    ``torch.export`` module (pt2 and safetensors; None for ONNX).
    """

    format: str
    spec: TaskSpec
    level: int
    meta: dict[str, Any]
    path: Path
    session: Any = None
    module: nn.Module | None = None

    def __call__(self, x: Any) -> np.ndarray:
        arr = np.ascontiguousarray(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x))
        s = self.spec
        if arr.ndim != 4 or tuple(arr.shape[1:]) != s.input_shape:
            raise DataError(
                f"task '{s.name}': expected input of shape (B, {s.in_channels}, {s.input_size}, "
                f"{s.input_size}), got {tuple(arr.shape)}"
            )
        arr = arr.astype(np.float32, copy=False)
        if self.session is not None:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: arr})[0]
        assert self.module is not None
        with torch.no_grad():
            return self.module(torch.from_numpy(arr)).numpy()


def ort_session(model: bytes | str | Path, threads: int | None = 1, spinning: bool = True) -> Any:
    """An onnxruntime CPU session (``threads`` intra-op threads, one inter-op thread, sequential).

    ``spinning=False`` stops the intra-op threads from spin-waiting after a run (onnxruntime's default
    is to spin): slower calls alone (about 1.3x at batch 1 on 2 cores), but two sessions called in turn
    no longer compete with each other's spinning threads (with spinning, each came out about 3x slower
    in turn than alone)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def read_onnx(path: str | Path, threads: int | None = 1) -> Deployed:
    """Check an ONNX file written by :func:`export_onnx` and open an onnxruntime session on it.

    CheckpointError (one line) for a missing, truncated or corrupted file, or one without virtnet's
    description."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 (protobuf / onnx raise several types)
        raise CheckpointError(f"{path}: not a valid ONNX file ({_first_line(e)})") from None
    props = {p.key: p.value for p in model.metadata_props}
    meta = _meta(props.get(METADATA_KEY), str(path))
    spec = _spec(meta, str(path))
    try:
        session = ort_session(path, threads)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({_first_line(e)})") from None
    return Deployed("onnx", spec, int(meta.get("level", 0)), meta, path, session=session)


def read_pt2(path: str | Path) -> Deployed:
    """Read a pt2 archive written by :func:`export_pt2` (``torch.export.load``; no virtnet class needed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such pt2 file")
    extra = {f"{METADATA_KEY}.json": ""}
    try:
        with _quiet_exporter():
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a valid pt2 archive ({_first_line(e)})") from None
    meta = _meta(extra[f"{METADATA_KEY}.json"], str(path))
    return Deployed(
        "pt2", _spec(meta, str(path)), int(meta.get("level", 0)), meta, path, module=program.module()
    )


__all__ = [
    "FORMATS",
    "Deployed",
    "Normalised",
    "check_format",
    "deployable",
    "describe_deployed",
    "export_onnx",
    "export_program",
    "export_pt2",
    "normalise",
    "ort_session",
    "output_path",
    "read_onnx",
    "read_pt2",
]
