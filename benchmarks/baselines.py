"""Benchmark: the individual and joint baselines on MNIST + Fashion-MNIST.

Two tasks (MNIST, Fashion-MNIST; official 60k/10k splits), one ResNet in the CIFAR layout per task
(individual) or one shared trunk with a stem and head per task (joint). Reports, per method and task:
test accuracy, parameters of the task's network, FLOPs (2 per MAC), latency at batch 1 and 64 (faster
memory format), seconds per epoch, and the physical parameters of the whole model.

Run:  python benchmarks/baselines.py [--data-root ../shared/data] [--epochs 4]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import floor_claims, parser, write_results  # noqa: E402

from virtnet import api  # noqa: E402
from virtnet.config import RunConfig  # noqa: E402
from virtnet.data.config import DataConfig, build_taskset  # noqa: E402


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-size", type=int, default=None, help="subsample each training set (quick runs)")
    p.add_argument("--methods", default="individual,joint")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    tasks = [
        {"name": "mnist", "dataset": "mnist", "train_size": args.train_size},
        {"name": "fashion_mnist", "dataset": "fashion_mnist", "train_size": args.train_size},
    ]
    # train on every training image (no default val split)
    data = {"root": args.data_root, "sampling": "all", "val_fraction": 0, "tasks": tasks}
    taskset = build_taskset(DataConfig.model_validate(data), args.seed)
    work = Path(args.work_dir or "runs/bench/baselines")
    rows = []
    for method in args.methods.split(","):
        cfg = RunConfig.from_dict(
            {
                "seed": args.seed,
                "output_dir": str(work / method),
                "data": data,
                "model": {"name": "resnet", "depth": args.depth, "width": args.width},
                "method": {"name": method},
                "train": {
                    "epochs": args.epochs,
                    "batch_size": args.batch_size,
                    "optimizer": "sgd",
                    "lr": 0.1,
                    "weight_decay": 5e-4,
                    "schedule": "cosine",
                    "eval_every": 0,
                    "checkpoint_every": 0,
                    "threads": args.threads,
                    "progress": False,
                },
            }
        )
        run = api.train(cfg, taskset=taskset)
        loaded = api.load(run.out_dir / "model.json")
        cost = api.cost_rows(loaded, threads=args.threads)
        total = api.total_parameters(loaded.model)
        sec = statistics.median(run.summary["epoch_seconds"])
        for r in api.merge_rows(run.test_rows, cost):
            rows.append(
                {
                    "method": method,
                    "scenario": "mnist+fashion_mnist",
                    **r,
                    "total_params": total,
                    "seconds_per_epoch": sec,
                    "epochs": args.epochs,
                }
            )
        print(
            f"{method}: "
            + ", ".join(f"{r['task']} {r['accuracy']:.2f}%" for r in run.test_rows)
            + f"; {total:,} parameters; {sec:.1f}s/epoch",
            flush=True,
        )
    stem = write_results(
        "baselines",
        rows,
        args.seed,
        args.out,
        extra={
            "epochs": args.epochs,
            "backbone": f"resnet{args.depth} (CIFAR layout) width {args.width}",
            "note_seconds": "seconds_per_epoch: median over epochs; one epoch = one pass over the "
            "larger training set with one batch of every task per step",
        },
        claims=claims(rows),
    )
    print(f"wrote {stem}.json and {stem}.md")


def claims(rows: list[dict], meta: dict | None = None) -> list[dict]:
    """This benchmark states no target of its own: its claims are issue 15's baseline floors, per method
    and task."""
    return floor_claims("baselines", {(r["method"], r["task"]): r["accuracy"] for r in rows})


if __name__ == "__main__":
    main()
