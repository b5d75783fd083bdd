"""Figures drawn from result rows and arrays, never from live models.

* :func:`plot_accuracy_vs_density`: accuracy (%) against parameter density (%), one line per task and
  method (DVN, Figures 5 and 6);
* :func:`plot_error_matrix`: a heat map such as PackNet's error of every task (columns) after adding task
  ``t`` (rows).

matplotlib is imported inside the functions and used through its object-oriented API on an Agg canvas, so
importing :mod:`virtnet.cost` does not import it and the process's pyplot backend is left alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from virtnet.errors import ConfigError


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def plot_accuracy_vs_density(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Accuracy (%) against parameter density (%), one line per (task, method).

    Args:
        rows: result rows with ``method``, ``task``, ``accuracy`` (percent) and ``density`` (a fraction) or,
            failing that, ``params`` (the density is then ``params`` over the largest ``params`` of the same
            method, scenario and task). Rows without an accuracy are skipped.
        path: the PNG to write (parent folders are created).
        title: the figure title.

    Returns:
        The path written.
    """
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    largest: dict[tuple[str, str, str], float] = {}
    for r in rows:
        p = _number(r.get("params"))
        if p is not None:
            key = (str(r.get("method", "")), str(r.get("scenario", "")), str(r.get("task", "")))
            largest[key] = max(largest.get(key, 0.0), p)
    for r in rows:
        acc = _number(r.get("accuracy"))
        if acc is None:
            continue
        d = _number(r.get("density"))
        if d is None:
            p = _number(r.get("params"))
            full = largest.get((str(r.get("method", "")), str(r.get("scenario", "")), str(r.get("task", ""))))
            if p is None or not full:
                continue
            d = p / full
        groups.setdefault((str(r.get("task", "")), str(r.get("method", ""))), []).append((100.0 * d, acc))
    if not groups:
        raise ConfigError("plot_accuracy_vs_density: no row has an accuracy and a density (or params)")

    several_methods = len({m for _, m in groups}) > 1
    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for (task, method), pts in sorted(groups.items()):
        pts.sort()
        label = f"{task} ({method})" if several_methods else task
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.set_xlabel("parameter density (%)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_error_matrix(
    matrix: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | os.PathLike[str],
    title: str | None = None,
    xlabel: str = "task evaluated",
    ylabel: str = "after adding task",
    value_format: str = ".1f",
) -> Path:
    """A heat map of ``matrix`` (e.g. error % of every task after adding task ``t``), values written in
    the cells; missing entries (None or NaN, e.g. tasks not yet added) are left blank.

    Args:
        matrix: a 2-D array-like, ``len(row_labels)`` by ``len(col_labels)``.
        row_labels: one label per row.
        col_labels: one label per column.
        path: the PNG to write (parent folders are created).
        title: the figure title.
        xlabel: the columns' axis label.
        ylabel: the rows' axis label.
        value_format: format of the numbers in the cells.

    Returns:
        The path written.
    """
    arr = np.asarray(matrix, dtype=object)
    if arr.ndim != 2:
        raise ConfigError(f"plot_error_matrix: the matrix must be 2-D, got shape {arr.shape}")
    data = np.array([[np.nan if v is None else float(v) for v in r] for r in arr], dtype=float)
    if data.shape != (len(row_labels), len(col_labels)):
        raise ConfigError(
            f"plot_error_matrix: matrix of shape {data.shape} for {len(row_labels)} row and "
            f"{len(col_labels)} column labels"
        )
    masked = np.ma.masked_invalid(data)
    h, w = data.shape
    fig = _figure(max(4.0, 1.0 + 0.8 * w), max(3.0, 1.0 + 0.6 * h))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(masked, cmap="Reds", aspect="auto")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(w), labels=[str(c) for c in col_labels], rotation=30, ha="right")
    ax.set_yticks(range(h), labels=[str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    finite = data[np.isfinite(data)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(h):
        for j in range(w):
            if np.isfinite(data[i, j]):
                ax.text(
                    j,
                    i,
                    format(data[i, j], value_format),
                    ha="center",
                    va="center",
                    fontsize="small",
                    color="white" if data[i, j] > mid else "black",
                )
    if title:
        ax.set_title(title)
    return _save(fig, path)


__all__ = ["plot_accuracy_vs_density", "plot_error_matrix"]
