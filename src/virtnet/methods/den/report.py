"""DEN's evaluation: per task accuracy with mean and max estimator FLOPs per instance, the selector's
cost beside the estimator's, the histogram of chosen structures (Fig. 6a), the mean probability of each
level per block (Fig. 6b), the baselines on the same estimator (full structure, "rand sel") and plots.

Every number is on the whole split, running statistics only, one batch at a time in eval mode.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from virtnet.data.core import TaskSet
from virtnet.data.loader import eval_batches
from virtnet.methods.den.model import ElasticNet
from virtnet.methods.den.selector import log_probs
from virtnet.train.evaluate import accuracy_counts


def flops_columns(model: ElasticNet, task: str, costs: torch.Tensor) -> dict[str, Any]:
    """The FLOPs and parameter columns of ``task``'s evaluation from ``costs``, the estimator FLOPs per
    instance ``(N,)`` of the structures chosen (:meth:`ElasticNet.structure_costs`): ``mean_flops``
    (exact: the integer sum over N) and ``max_flops`` (an int; None for an empty split),
    ``selector_flops`` (per instance, the task's selector), ``mean_flops_with_selector``,
    ``estimator_params`` and ``selector_params`` (the whole model's, as :meth:`DEN.summary`)."""
    per = [int(v) for v in costs.round().long().tolist()]
    mean = sum(per) / len(per) if per else None
    sel = model.selector_costs(task)["flops"]
    return {
        "mean_flops": mean,
        "max_flops": max(per) if per else None,
        "selector_flops": sel,
        "mean_flops_with_selector": None if mean is None else mean + sel,
        "estimator_params": model.estimator_parameters(),
        "selector_params": model.selector_parameters(),
    }


def chosen_costs(
    model: ElasticNet, task: str, level: int | None, batches: list[Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The structures ``(N, n)`` that (task, budget level)'s deployable chooses for the inputs of
    ``batches`` (the selector, then the level's budgeted decoding) and their estimator FLOPs ``(N,)``."""
    net = model.task_network(task, level)
    device = next(model.parameters()).device
    zs = [net.structures(b.x.to(device)).cpu() for b in batches]
    z = torch.cat(zs) if zs else torch.zeros(0, model.num_blocks, dtype=torch.long)
    return z, model.structure_costs(task, z)


@torch.inference_mode()
def evaluate_den(
    model: ElasticNet,
    taskset: TaskSet,
    split: str = "test",
    tasks: list[str] | None = None,
    level: int | None = None,
    chooser: Any = None,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """One row per task: ``accuracy``, ``mean_flops`` and ``max_flops`` (estimator, per instance),
    ``selector_flops``, ``mean_flops_with_selector``, ``estimator_params``, ``selector_params``,
    ``histogram`` (structure -> count, most frequent first), ``level_probability`` (n x h: mean
    probability of each level per block).

    ``chooser(x, task) -> (B, n)`` picks the structures (default: the selector at budget ``level``)."""
    model.eval()
    rows = []
    for task in tasks or taskset.names:
        net = model.task_network(task, level)
        correct = total = 0
        flops: list[torch.Tensor] = []
        hist: Counter[tuple[int, ...]] = Counter()
        prob = torch.zeros(model.num_blocks, model.num_levels)
        for b in eval_batches(taskset, task, split=split, batch_size=batch_size):
            x = b.x
            if chooser is None:
                logp = log_probs(net.selector(x))
                prob += logp.exp().sum(0)
                z = net.plan(logp)
            else:
                z = chooser(x, task)
            logits = model(x, task, model.instance_route(task, z))
            c, n = accuracy_counts(logits, b.y, b.mask)
            correct, total = correct + c, total + n
            flops.append(model.structure_costs(task, z))
            hist.update(tuple(int(v) for v in row) for row in z.tolist())
        f = torch.cat(flops)
        count = max(1, len(f))
        rows.append(
            {
                "task": task,
                "accuracy": 100.0 * correct / max(1, total),
                **flops_columns(model, task, f),
                "full_flops": model.cost_range(task)[1],
                "histogram": [["".join(map(str, k)), v] for k, v in hist.most_common()],
                "level_probability": (prob / count).tolist() if chooser is None else None,
            }
        )
    return rows


@torch.no_grad()
def calibrated(
    model: ElasticNet,
    taskset: TaskSet,
    chooser: Any,
    split: str = "train",
    batch_size: int = 128,
    seed: int = 0,
) -> ElasticNet:
    """A copy of ``model`` whose estimator batch norms are re-estimated for the structures
    ``chooser(x, task) -> (B, n)`` picks (:meth:`ElasticNet.start_calibration` ... ``end_calibration``),
    over one pass of ``split`` (not augmented; a seeded shuffle; each step one batch of every task, the
    smaller tasks cycled): what the training's calibration phase does for the selector, for another
    structure distribution (the full estimator, rand sel), so that no evaluation runs on statistics made
    for other structures."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    xs: dict[str, torch.Tensor] = {}
    for t in taskset.names:
        x = torch.cat([b.x for b in eval_batches(taskset, t, split=split, batch_size=1024)])
        xs[t] = x[torch.randperm(x.shape[0], generator=g)]
    steps = max(math.ceil(x.shape[0] / batch_size) for x in xs.values())
    saved = out.start_calibration()
    for i in range(steps):
        batch = {}
        for t, x in xs.items():
            k = (i * batch_size) % x.shape[0]
            batch[t] = x[k : k + batch_size]
        out.calibration_forward(batch, {t: chooser(x, t) for t, x in batch.items()})
    out.end_calibration(saved)
    return out.eval()


def full_chooser(model: ElasticNet) -> Any:
    """The full estimator: every instance runs the full structure."""

    def choose(x: torch.Tensor, task: str) -> torch.Tensor:
        return torch.full((x.shape[0], model.num_blocks), model.num_levels - 1, dtype=torch.long)

    return choose


def level_distribution(model: ElasticNet, task: str, target_flops: float) -> torch.Tensor:
    """A distribution over a block's levels, ``pi_l ∝ exp(beta * l)``, the same for every block, whose
    expected estimator FLOPs equal ``target_flops`` (bisection on beta): "rand sel"'s distribution."""
    table = torch.tensor(model.block_costs()["flops"], dtype=torch.float64)  # (n, h)
    base = model.base_costs(task)["flops"]
    h = model.num_levels
    lo, hi = -50.0, 50.0

    def expected(beta: float) -> float:
        pi = torch.softmax(beta * torch.arange(h, dtype=torch.float64), 0)
        return base + float((table * pi).sum())

    for _ in range(100):
        mid = (lo + hi) / 2
        if expected(mid) < target_flops:
            lo = mid
        else:
            hi = mid
    return torch.softmax(lo * torch.arange(h, dtype=torch.float64), 0).float()


def random_chooser(model: ElasticNet, targets: dict[str, float], seed: int = 0) -> Any:
    """The "rand sel" baseline: structures drawn independently per block from
    :func:`level_distribution` matched to each task's ``targets[task]`` mean FLOPs (a fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    dists = {t: level_distribution(model, t, f) for t, f in targets.items()}

    def choose(x: torch.Tensor, task: str) -> torch.Tensor:
        pi = dists[task]
        return torch.multinomial(pi.expand(x.shape[0] * model.num_blocks, -1), 1, True, generator=g).reshape(
            x.shape[0], model.num_blocks
        )

    return choose


def plot_structures(rows: list[dict[str, Any]], path: str | Path, top: int = 20) -> Path:
    """Fig. 6: per task, the histogram of the ``top`` most chosen structures and the mean probability of
    each level per block (a heat map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.8 * len(rows)), squeeze=False)
    for r, (a, b) in zip(rows, axes, strict=True):
        hist = r["histogram"][:top]
        a.bar(range(len(hist)), [v for _, v in hist])
        a.set_xticks(range(len(hist)), [k for k, _ in hist], rotation=90, fontsize=6)
        a.set_title(f"{r['task']}: chosen structures (levels per block)")
        if r.get("level_probability") is not None:
            im = b.imshow(torch.tensor(r["level_probability"]).t().numpy(), aspect="auto", origin="lower")
            b.set_xlabel("block")
            b.set_ylabel("level")
            b.set_title("mean probability of each level")
            fig.colorbar(im, ax=b)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_flops(points: list[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy against mean FLOPs per instance, one series per task (``points``: rows with ``task``,
    ``mean_flops``, ``accuracy``, ``label``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task in dict.fromkeys(p["task"] for p in points):
        ps = sorted((p for p in points if p["task"] == task), key=lambda p: p["mean_flops"])
        ax.plot([p["mean_flops"] for p in ps], [p["accuracy"] for p in ps], "o-", label=task)
        for p in ps:
            ax.annotate(str(p.get("label", "")), (p["mean_flops"], p["accuracy"]), fontsize=7)
    ax.set_xlabel("mean FLOPs per instance (estimator, 2 per MAC)")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


__all__ = [
    "chosen_costs",
    "evaluate_den",
    "flops_columns",
    "full_chooser",
    "level_distribution",
    "plot_accuracy_flops",
    "plot_structures",
    "random_chooser",
]
