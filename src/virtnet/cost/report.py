"""Cost rows and result reports (JSON, CSV, markdown).

A result row is a flat dict, one per (method, scenario, task, level):

* required: ``method``, ``scenario``, ``task``, ``level`` (or ``budget``), ``accuracy`` (percent, 0..100,
  or None when not evaluated), ``params``, ``flops``;
* from :func:`cost_of`: ``shared_params``, ``task_params``, ``buffers``, ``bytes`` (safetensors size),
  ``tensor_bytes``, ``density`` (when the largest level's parameter count is known), and per measured
  batch size ``B``: ``latency_ms_b{B}`` (median of the faster format), ``format_b{B}`` (that format),
  ``latency_ms_b{B}_nchw`` and ``latency_ms_b{B}_channels_last``, plus ``threads``;
* anything else a caller adds (``level_name``, ``seed``, ``epochs``...).

``flops`` is per sample (batch size 1) in FlopCounterMode's unit, 2 FLOPs per multiply-add.

:func:`write_report` writes ``<stem>.json`` (``{"command", "seed", "machine", ..., "rows": [...]}``, the
schema of the benchmark results), ``<stem>.csv`` (raw numbers, one line per row) and ``<stem>.md`` (the meta
lines and a markdown table with units in the headers).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from virtnet.cost.flops import count_flops
from virtnet.cost.latency import FORMATS, latency_profile
from virtnet.cost.params import (
    bytes_on_disk,
    count_buffers,
    density,
    parameter_breakdown,
    tensor_bytes,
)
from virtnet.errors import ConfigError
from virtnet.protocol import usage_count

#: keys every row must have (plus ``level`` or ``budget``)
REQUIRED_KEYS = ("method", "scenario", "task", "accuracy", "params", "flops")
#: the usual keys, in the order reports show them
ROW_KEYS = (
    "method",
    "scenario",
    "task",
    "level",
    "budget",
    "level_name",
    "accuracy",
    "density",
    "params",
    "shared_params",
    "task_params",
    "export_params",
    "flops",
    "latency_ms_b1",
    "latency_ms_b64",
    "format_b1",
    "format_b64",
    "bytes",
    "tensor_bytes",
    "buffers",
    "threads",
)

_HEADERS = {
    "level_name": "level name",
    "accuracy": "accuracy (%)",
    "density": "density (%)",
    "params": "params",
    "shared_params": "shared params",
    "task_params": "task params",
    "export_params": "export params",
    "flops": "FLOPs (2 per MAC)",
    "bytes": "bytes on disk",
    "tensor_bytes": "tensor bytes",
    "buffers": "buffer elements",
}
_LATENCY = re.compile(r"^latency_ms_b(\d+)(?:_(\w+))?$")
_FORMAT = re.compile(r"^format_b(\d+)$")
_INT_COLUMNS = {
    "params",
    "shared_params",
    "task_params",
    "export_params",
    "flops",
    "bytes",
    "tensor_bytes",
    "buffers",
}


# ---- computing ---------------------------------------------------------------------------------------
def cost_of(
    module: nn.Module,
    input_shape: Sequence[int],
    shared_prefixes: Sequence[str] = ("trunk.",),
    latency: bool = True,
    threads: int | None = 2,
    batch_sizes: Sequence[int] = (1, 64),
    formats: Sequence[str] = FORMATS,
    warmup: int = 5,
    repeats: int = 20,
    full_params: int | None = None,
) -> dict[str, Any]:
    """Parameters, FLOPs, bytes and (optionally) latency of one exported network, as row keys.

    Args:
        module: the exported ``(task, level)`` network, called as ``module(x)``; left unchanged.
        input_shape: one input's shape without the batch, e.g. ``(3, 32, 32)``.
        shared_prefixes: parameter-name prefixes of the shared part (the method's ``shared_prefixes()``).
        latency: measure latency (every batch size in ``batch_sizes``, every format in ``formats``).
        threads: intra-op threads while timing (restored afterwards).
        batch_sizes: batch sizes to time.
        formats: memory formats to time (``"nchw"``, ``"channels_last"``).
        warmup: untimed calls before timing.
        repeats: timed calls (the median is reported).
        full_params: parameters of the task's largest level; when given, ``density`` is added.

    Returns:
        ``{"params", "shared_params", "task_params", "buffers", "flops", "bytes", "tensor_bytes"}`` plus
        ``density`` and the latency keys (``latency_ms_b{B}``, ``format_b{B}``, ``latency_ms_b{B}_{fmt}``,
        ``threads``) when asked.
    """
    breakdown = parameter_breakdown(module, shared_prefixes)
    row: dict[str, Any] = {
        "params": breakdown["total"],
        "shared_params": breakdown["shared"],
        "task_params": breakdown["task_specific"],
        "buffers": count_buffers(module),
        "flops": count_flops(module, input_shape, batch_size=1),
        "bytes": bytes_on_disk(module),
        "tensor_bytes": tensor_bytes(module),
    }
    if full_params is not None:
        row["density"] = density(row["params"], full_params)
    if latency:
        prof = latency_profile(module, input_shape, batch_sizes, formats, threads, warmup, repeats)
        for b, entry in prof["batches"].items():
            row[f"latency_ms_b{b}"] = entry["best_ms"]
            row[f"format_b{b}"] = entry["best_format"]
            for f in formats:
                if f in entry:
                    row[f"latency_ms_b{b}_{f}"] = entry[f]["median_ms"]
        row["threads"] = prof["threads"]
        # timings taken while other processes held the cores are flagged, not silently reported
        row["contended"] = prof["contended"]
        row["runqueue_wait"] = prof["runqueue_wait"]
    return row


def _usages(model: Any, task: str, levels: Sequence[int]) -> tuple[dict[int, Any], dict[str, Any]] | None:
    """The usage masks of ``task``'s levels and the union of the other tasks' (all levels), or None when
    the model does not implement ``parameter_usage`` (not a MultiTaskModel, or NotImplementedError)."""
    from virtnet.protocol import MultiTaskModel, union_usage

    if not isinstance(model, MultiTaskModel):
        return None
    try:
        mine = {lv: model.parameter_usage(task, lv) for lv in levels}
    except NotImplementedError:
        return None
    others = union_usage(
        [model.parameter_usage(t, lv) for t in model.tasks if t != task for lv in model.levels(t)]
    )
    return mine, others


def level_costs(
    method: Any,
    model: nn.Module,
    task: str,
    input_shape: Sequence[int],
    **cost_kwargs: Any,
) -> list[dict[str, Any]]:
    """Cost rows of every level of ``task``, smallest first, with ``density`` relative to the largest.

    Each level is exported with ``method.export(model, task, level)`` (one at a time) and measured with
    :func:`cost_of` (``cost_kwargs`` are passed on; ``shared_prefixes`` defaults to the method's). The rows
    have ``method``, ``task``, ``level``, ``level_name`` and the cost keys; the caller adds ``scenario`` and
    ``accuracy``.

    Exact accounting: when ``model`` implements the model protocol's ``parameter_usage``, ``params`` are
    the elements the level reads in the model (PackNet's owned weights, DVN's units, an adapter domain's own
    tensors plus the universal ones), split into ``shared_params`` (read by another task too) and
    ``task_params``; ``export_params`` keeps the exported network's parameter count (its own
    ``params`` otherwise).
    """
    cost_kwargs.setdefault("shared_prefixes", tuple(method.shared_prefixes()))
    levels = list(method.levels(model, task))
    usages = _usages(model, task, [lv.index for lv in levels])
    rows = []
    for lv in levels:
        net = method.export(model, task, lv.index)
        row = {"method": method.name, "task": task, "level": lv.index, "level_name": lv.name}
        row.update(cost_of(net, input_shape, **cost_kwargs))
        row["export_params"] = row["params"]
        if usages is not None:
            used, others = usages[0][lv.index], usages[1]
            total = usage_count(used)
            shared = sum(int((m & others[n]).sum()) for n, m in used.items() if n in others)
            row.update(params=total, shared_params=shared, task_params=total - shared)
        rows.append(row)
        del net
    if rows:
        full = rows[-1]["params"]
        for r in rows:
            r["density"] = density(r["params"], full) if full else None
    return rows


def make_row(
    method: str,
    scenario: str,
    task: str,
    level: Any,
    accuracy: float | None,
    cost: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A result row: the identifying keys, the accuracy (percent), the cost keys and any extra keys."""
    row: dict[str, Any] = {
        "method": method,
        "scenario": scenario,
        "task": task,
        "level": level,
        "accuracy": accuracy,
    }
    row.update(cost or {})
    row.update(extra)
    return row


def machine_info() -> dict[str, Any]:
    """The machine the numbers come from: platform, CPU model, cores, Python, torch, torch threads."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count()
    return {
        "platform": platform.platform(),
        "processor": cpu or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cores_available": available,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# ---- checking ----------------------------------------------------------------------------------------
def check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """Raise ConfigError unless ``rows`` is a non-empty list of rows following the results schema."""
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or not rows:
        raise ConfigError("report rows must be a non-empty list")
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ConfigError(f"report row {i} is not a dict")
        for k in REQUIRED_KEYS:
            if k not in r:
                raise ConfigError(f"report row {i} lacks '{k}'")
        if "level" not in r and "budget" not in r:
            raise ConfigError(f"report row {i} has neither 'level' nor 'budget'")
        a = r["accuracy"]
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 100):
            raise ConfigError(f"report row {i}: accuracy {a!r} is not a percentage in 0..100")
        p = r["params"]
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ConfigError(f"report row {i}: params {p!r} is not a non-negative integer")


# ---- writing -----------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    """JSON-ready value: numpy/torch scalars to Python numbers, NaN/inf to None, tuples to lists."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if hasattr(v, "item") and not isinstance(v, (int, float, str, bool)) and callable(v.item):
        try:
            v = v.item()
        except (TypeError, ValueError):
            pass
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Path):
        return str(v)
    if v is None or isinstance(v, (int, float, str, bool)):
        return v
    return str(v)


def _latency_order(k: str) -> tuple[int, int, str]:
    m = _LATENCY.match(k)
    if m:
        return (int(m.group(1)), 2 if m.group(2) else 0, m.group(2) or "")
    m = _FORMAT.match(k)
    assert m is not None
    return (int(m.group(1)), 1, "")


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every key of ``rows``: the usual ones in report order, latencies by batch size, then the rest."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    lat = sorted((k for k in seen if _LATENCY.match(k) or _FORMAT.match(k)), key=_latency_order)
    known = [k for k in ROW_KEYS if k in seen and k not in lat]
    at = known.index("flops") + 1 if "flops" in known else len(known)
    known[at:at] = lat
    return known + [k for k in seen if k not in known]


def column_header(column: str) -> str:
    """The markdown header of a row key, with its unit (e.g. ``latency_ms_b1`` -> "latency b1 (ms)")."""
    m = _LATENCY.match(column)
    if m:
        fmt = f" {m.group(2)}" if m.group(2) else ""
        return f"latency b{m.group(1)}{fmt} (ms)"
    m = _FORMAT.match(column)
    if m:
        return f"format b{m.group(1)}"
    return _HEADERS.get(column, column)


def _format(column: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if column == "accuracy" and isinstance(v, (int, float)):
        return f"{v:.2f}"
    if column == "density" and isinstance(v, (int, float)):
        return f"{100 * v:.1f}"
    if _LATENCY.match(column) and isinstance(v, (int, float)):
        return f"{v:.3f}"
    if isinstance(v, int) or (column in _INT_COLUMNS and isinstance(v, float) and v.is_integer()):
        return f"{int(v):,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (Mapping, list, tuple)):
        v = json.dumps(_plain(v))
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows``: one line per row, units in the headers, numbers formatted for reading
    (accuracy with 2 decimals, density in percent, counts with thousands separators, latency in ms)."""
    cols = list(columns) if columns is not None else _columns(rows)
    lines = [
        "| " + " | ".join(column_header(c) for c in cols) + " |",
        "|"
        + "|".join(
            "---" if c in {"method", "scenario", "task", "level_name"} or c.startswith("format") else "---:"
            for c in cols
        )
        + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_format(c, r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return v


def _machine_line(machine: Any) -> str:
    if isinstance(machine, Mapping):
        parts = [str(machine.get("processor", "")).strip()]
        if machine.get("cores") is not None:
            parts.append(f"{machine['cores']} cores")
        if machine.get("torch"):
            parts.append(f"torch {machine['torch']}")
        if machine.get("threads") is not None:
            parts.append(f"{machine['threads']} threads")
        if machine.get("platform"):
            parts.append(str(machine["platform"]))
        return ", ".join(p for p in parts if p)
    return str(machine)


def write_report(
    rows: Sequence[Mapping[str, Any]], path_stem: str | os.PathLike[str], meta: Mapping[str, Any]
) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.md``.

    Args:
        rows: result rows (see the module docstring); checked with :func:`check_rows`.
        path_stem: path without suffix, e.g. ``docs/results/dvn_cifar``; parent folders are created.
        meta: run information; must hold ``command`` (str) and ``seed`` (int or list); ``machine`` defaults
            to :func:`machine_info`. Every key goes to the JSON's top level and to the markdown's meta lines.

    Returns:
        ``{"json": path, "csv": path, "md": path}``.
    """
    check_rows(rows)
    if not isinstance(meta, Mapping):
        raise ConfigError("report meta must be a dict with 'command' and 'seed'")
    if not isinstance(meta.get("command"), str):
        raise ConfigError("report meta lacks 'command' (the command line that produced the rows)")
    seed = meta.get("seed")
    if not (isinstance(seed, (int, list, tuple)) and not isinstance(seed, bool)):
        raise ConfigError(f"report meta 'seed' must be an int or a list, got {seed!r}")
    top: dict[str, Any] = {
        "command": meta["command"],
        "seed": seed,
        "machine": meta.get("machine") or machine_info(),
    }
    for k, v in meta.items():
        if k != "rows":
            top.setdefault(k, v)
    plain_rows = [_plain(dict(r)) for r in rows]
    doc = _plain(top)
    doc["rows"] = plain_rows

    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": stem.with_name(stem.name + ".json"),
        "csv": stem.with_name(stem.name + ".csv"),
        "md": stem.with_name(stem.name + ".md"),
    }
    paths["json"].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")

    cols = _columns(plain_rows)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in plain_rows:
            w.writerow([_csv_cell(r.get(c)) for c in cols])

    meta_lines = [
        f"- command: `{doc['command']}`",
        f"- seed: {json.dumps(doc['seed'])}",
        f"- machine: {_machine_line(doc['machine'])}",
    ]
    for k, v in doc.items():
        if k not in {"command", "seed", "machine", "rows"}:
            meta_lines.append(f"- {k}: {v if isinstance(v, str) else json.dumps(v)}")
    paths["md"].write_text(
        f"# {stem.name}\n\n" + "\n".join(meta_lines) + "\n\n" + markdown_table(plain_rows, cols)
    )
    return paths


__all__ = [
    "REQUIRED_KEYS",
    "ROW_KEYS",
    "check_rows",
    "column_header",
    "cost_of",
    "level_costs",
    "machine_info",
    "make_row",
    "markdown_table",
    "write_report",
]
