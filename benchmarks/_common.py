"""Shared plumbing of the benchmark scripts: arguments, data root, result files.

Every benchmark writes ``docs/results/<name>.json`` and ``docs/results/<name>.md`` with the exact command,
the seed and the machine, the JSON as {"command", "seed", "machine", "rows": [{"method", "scenario",
"task", "level", "accuracy", "params", "flops", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--data-root",
        default=None,
        help="data folder (default: $VIRTNET_DATA_ROOT, else ../shared/data when it exists)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for training and timing")
    p.add_argument("--out", default=None, help="result stem (default docs/results/<benchmark name>)")
    p.add_argument("--work-dir", default=None, help="where runs are written (default runs/bench/<name>)")
    return p


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    seed: int,
    out: str | None = None,
    extra: dict[str, Any] | None = None,
    notes: str = "",
) -> Path:
    from virtnet.cost import machine_info, write_report

    stem = Path(out) if out else RESULTS / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": name,
        "command": command_line(),
        "seed": seed,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **(extra or {}),
    }
    if notes:
        meta["notes"] = notes
    write_report(rows, stem, meta)
    return stem


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def run_method(
    method: str,
    scenario: str,
    data: dict[str, Any],
    model: dict[str, Any],
    train: dict[str, Any],
    work: Path,
    seed: int,
    taskset: Any = None,
    options: dict[str, Any] | None = None,
    label: str | None = None,
    threads: int = 2,
    latency: bool = True,
) -> tuple[list[dict[str, Any]], Any]:
    """Train one method through the public API and return its rows (accuracy and costs per (task, level))
    and the run. Rows carry the method's label, the scenario, total physical parameters and seconds per
    epoch (median)."""
    import statistics

    from virtnet import api
    from virtnet.config import RunConfig

    cfg = RunConfig.from_dict(
        {
            "seed": seed,
            "output_dir": str(work / (label or method)),
            "data": data,
            "model": model,
            "method": {"name": method, **(options or {})},
            "train": {"eval_every": 0, "checkpoint_every": 0, "progress": False, "threads": threads, **train},
        }
    )
    t0 = time.perf_counter()
    run = api.train(cfg, taskset=taskset, log=lambda s: print(f"  [{label or method}] {s}", flush=True))
    loaded = api.load(run.out_dir / "model.json")
    cost = api.cost_rows(loaded, latency=latency, threads=threads)
    total = api.total_parameters(loaded.model)
    sec = statistics.median(run.summary["epoch_seconds"]) if run.summary["epoch_seconds"] else None
    rows = []
    for r in api.merge_rows(run.test_rows, cost):
        rows.append(
            {
                **r,
                "method": label or method,
                "scenario": scenario,
                "total_params": total,
                "seconds_per_epoch": sec,
                "train_seconds": time.perf_counter() - t0,
            }
        )
    print(
        f"{label or method}: "
        + ", ".join(f"{r['task']}@{r['level']} {r['accuracy']:.2f}%" for r in rows)
        + f"; total {total:,} parameters",
        flush=True,
    )
    return rows, run


def add_training_args(
    p: argparse.ArgumentParser,
    epochs: int,
    depth: int = 20,
    width: float = 0.5,
    batch_size: int = 128,
    lr: float = 0.1,
) -> None:
    """The backbone and schedule options every training benchmark shares."""
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--depth", type=int, default=depth)
    p.add_argument("--width", type=float, default=width)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)


def sgd_train(args: argparse.Namespace) -> dict[str, Any]:
    """The ``train:`` section of the benchmarks: SGD with Nesterov momentum 0.9 (DVN Sec. 4.2), weight
    decay 5e-4, cosine schedule."""
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": "sgd",
        "lr": args.lr,
        "nesterov": True,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "cosine",
    }


def read_mergeable(path: str | Path, setup: dict[str, Any]) -> dict[str, Any]:
    """The results JSON ``path`` for ``--merge-from``: exits unless every key of ``setup`` (what the
    results depend on besides the methods) has the same value there."""
    old = json.loads(Path(path).read_text())
    for key, value in setup.items():
        if old.get(key) != value:
            raise SystemExit(f"--merge-from {path}: '{key}' differs ({old.get(key)} vs {value})")
    return old
