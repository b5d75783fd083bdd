"""Complexity-aware width selection (Lu et al. 2017, Sec. 3.4, eqs. 9-11).

For the ``c`` branches of the active layer and every number of new branches ``1 <= d <= c``, spectral
clustering of the branch affinity gives a grouping ``g_d``; its loss is

    L(g_d) = (d - 1) * L0 * 2 ** p  +  alpha * Ls(g_d)                                   (eq. 9)
    Ls(g_d) = (1 / d) * sum_i [1 - mean_{k in g^-1(i)} min_{l in g^-1(i)} A_b(k, l)]       (eqs. 10-11)

with ``p`` the number of pooling layers above the layer that would be copied and ``L0`` the unit cost of a
branch; the grouping of least loss is chosen (ties: the fewer branches).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def separation_cost(affinity: torch.Tensor, labels: Sequence[int]) -> float:
    """Eqs. 10-11: the mean over groups of ``1 - mean_k min_l A_b(k, l)`` (k, l in the group)."""
    a = torch.as_tensor(affinity, dtype=torch.float64)
    groups = sorted(set(int(v) for v in labels))
    total = 0.0
    for gi in groups:
        members = [k for k, v in enumerate(labels) if int(v) == gi]
        sub = a[members][:, members]
        total += 1.0 - float(sub.min(dim=1).values.mean())
    return total / len(groups)


def branching_cost(d: int, pools_above: int, unit_cost: float) -> float:
    """The complexity term of eq. 9: ``(d - 1) * L0 * 2 ** p``."""
    return (d - 1) * unit_cost * (2.0**pools_above)


def canonical(labels: Sequence[int]) -> list[int]:
    """Group labels renumbered by first appearance (0, 1, ...): equal groupings compare equal."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(v), len(seen)) for v in labels]


def spectral_groups(affinity: torch.Tensor, d: int, seed: int = 0) -> list[int]:
    """A grouping of the ``c`` branches into (at most) ``d`` groups by spectral clustering of the
    precomputed affinity (scikit-learn); trivial for ``d = 1`` and ``d = c``."""
    c = int(affinity.shape[0])
    if d <= 1:
        return [0] * c
    if d >= c:
        return list(range(c))
    from sklearn.cluster import SpectralClustering

    a = torch.as_tensor(affinity, dtype=torch.float64).clamp_min(0).numpy()
    a = (a + a.T) / 2
    sc = SpectralClustering(
        n_clusters=d, affinity="precomputed", assign_labels="cluster_qr", random_state=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "graph is not fully connected" for near-zero affinities
        labels = sc.fit_predict(a)
    return canonical(labels.tolist())


@dataclass
class Choice:
    """The outcome of one width selection: the chosen grouping and every candidate's cost terms."""

    labels: list[int]
    candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_branches(self) -> int:
        return len(set(self.labels))


def choose_branches(
    affinity: torch.Tensor, alpha: float, unit_cost: float, pools_above: int, seed: int = 0
) -> Choice:
    """Eq. 9's minimiser over ``d = 1..c`` (see the module docstring). Every candidate is recorded as
    ``{"d", "groups", "complexity", "separation", "loss"}`` (``d``: the groups spectral clustering gave)."""
    c = int(affinity.shape[0])
    best: tuple[float, int, list[int]] | None = None
    candidates: list[dict[str, Any]] = []
    tried: set[tuple[int, ...]] = set()
    for d in range(1, c + 1):
        labels = canonical(spectral_groups(affinity, d, seed))
        if tuple(labels) in tried:
            continue
        tried.add(tuple(labels))
        n = len(set(labels))
        complexity = branching_cost(n, pools_above, unit_cost)
        separation = separation_cost(affinity, labels)
        loss = complexity + alpha * separation
        candidates.append(
            {"d": n, "groups": labels, "complexity": complexity, "separation": separation, "loss": loss}
        )
        if best is None or loss < best[0] - 1e-12 or (abs(loss - best[0]) <= 1e-12 and n < best[1]):
            best = (loss, n, labels)
    assert best is not None
    return Choice(best[2], candidates)


__all__ = ["Choice", "branching_cost", "canonical", "choose_branches", "separation_cost", "spectral_groups"]
