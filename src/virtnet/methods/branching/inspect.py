"""Pictures of a learned tree and of the task affinity, drawn from a saved tree (``structure()``, as in
every checkpoint's sidecar), never from a live model. matplotlib is imported when a figure is drawn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_tree(
    structure: Mapping[str, Any], path: str | Path, names: Sequence[str] | None = None, title: str = ""
) -> Path:
    """Draw the tree (layers bottom to top, one box per branch, a line to the branch below it, the branch
    tasks at the top) to ``path`` (png, pdf, svg)."""
    plt = _pyplot()
    tree = [[list(b) for b in layer] for layer in structure["tree"]]
    layer_names = list(structure["layer_names"])
    names = list(names) if names is not None else list(structure["branch_tasks"])
    n_tasks = len(names)
    # a branch's horizontal place: the mean place of its branch tasks, ordered as the top layer groups them
    order: list[int] = []
    for b in tree[-1]:
        order.extend(b)
    xpos = {t: i for i, t in enumerate(order)}
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * n_tasks + 2), max(4, 0.32 * len(tree) + 2)))
    centre = [[sum(xpos[t] for t in b) / len(b) for b in layer] for layer in tree]
    for l, layer in enumerate(tree):
        for b, members in enumerate(layer):
            x = centre[l][b]
            if l > 0:
                parent = next(k for k, pb in enumerate(tree[l - 1]) if set(members) <= set(pb))
                ax.plot([centre[l - 1][parent], x], [l - 1, l], color="0.5", lw=1)
            ax.plot([x], [l], "s", color="C0" if len(layer) == 1 else "C1", ms=6)
    top = len(tree)
    for t in range(n_tasks):
        b = next(k for k, pb in enumerate(tree[-1]) if t in pb)
        ax.plot([centre[-1][b], xpos[t]], [top - 1, top], color="0.7", lw=0.8)
        ax.text(xpos[t], top + 0.1, names[t], rotation=60, ha="left", va="bottom", fontsize=8)
    ax.set_yticks(range(len(tree)))
    ax.set_yticklabels(layer_names)
    ax.set_xticks([])
    ax.set_ylim(-0.5, top + 2.5)
    ax.set_xlabel(title or "learned tree (orange: junction layers)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_affinity(
    affinity: Sequence[Sequence[float]], path: str | Path, names: Sequence[str] | None = None, title: str = ""
) -> Path:
    """The task affinity matrix (eq. 6) as a heat map."""
    plt = _pyplot()
    import numpy as np

    a = np.asarray(affinity, dtype=float)
    n = a.shape[0]
    names = list(names) if names is not None else [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * n + 2), max(3.5, 0.45 * n + 1.5)))
    im = ax.imshow(a, vmin=min(0.5, float(a.min())), vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n))
    ax.set_xticklabels(names, rotation=70, fontsize=8)
    ax.set_yticks(range(n))
    ax.set_yticklabels(names, fontsize=8)
    fig.colorbar(im, ax=ax, label="P(concurrently easy or difficult)")
    ax.set_title(title or "task affinity")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


__all__ = ["draw_tree", "plot_affinity"]
