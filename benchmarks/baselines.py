"""Benchmark: individual baselines trained to convergence, one dataset at a time (issue 15's floors).

One network per dataset (default WRN-16-1, 0.17 M parameters), trained by virtnet's own loop on the whole
official training split: SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, a linear warm-up
over the first 15 % of the epochs then cosine to zero (a one-cycle shape), random crops of the original
size after zero padding (2 pixels; 1 for the 8x8 digits). Test accuracy is evaluated after every epoch
(reported, never used to choose anything: nothing is chosen here) so that the convergence rule can be
checked from the file itself:

    converged  <=>  the best test accuracy of the last quarter of the epochs (at least one epoch) exceeds
                    the best of the epochs before it by less than 0.2 points.

Claims: each dataset's floor (MNIST >= 99.3, Fashion-MNIST >= 92.0, KMNIST-10k >= 97.0, digits >= 98.5)
and its convergence gain <= 0.2 (reported as ``last_quarter_gain``; "< 0.2" is written as ``<= 0.2``
on numbers rounded to 6 decimals). Rows: accuracy, parameters, FLOPs, latency at batch 1 and 64,
seconds per epoch, and the accuracy after every epoch (``curve``).

Run:  python benchmarks/baselines.py [--data-root ../shared/data] \
          [--datasets mnist=5,fashion_mnist=12,kmnist10k=20,digits=30]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    converged_claims,
    eval_curves,
    floor_claims,
    last_quarter_gain,
    parser,
    write_results,
)

from virtnet import api  # noqa: E402
from virtnet.config import RunConfig  # noqa: E402
from virtnet.data.config import DataConfig, build_taskset  # noqa: E402

DEFAULT_DATASETS = "mnist=5,fashion_mnist=12,kmnist10k=20,digits=30"
#: crop padding per dataset (pixels); default 2
CROP_PADDING = {"digits": 1}


def parse_datasets(spec: str) -> list[tuple[str, int]]:
    """``name=epochs,...`` -> [(name, epochs)]; a one-line error on a malformed entry."""
    out = []
    for item in spec.split(","):
        name, sep, epochs = item.partition("=")
        if not sep or not name or not epochs.isdigit() or int(epochs) < 1:
            raise SystemExit(f"--datasets: expected name=epochs (epochs >= 1), got {item!r}")
        out.append((name.strip(), int(epochs)))
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--datasets", default=DEFAULT_DATASETS, help="name=epochs,... (one run per dataset)")
    p.add_argument("--backbone", default="wrn")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--widen-factor", type=int, default=1, help="WRN's k")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.15, help="warm-up, fraction of the epochs")
    p.add_argument("--train-size", type=int, default=None, help="subsample each training set (quick runs)")
    p.add_argument("--methods", default="individual")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(args.work_dir or "runs/bench/baselines")
    rows = []
    for dataset, epochs in parse_datasets(args.datasets):
        aug = {"crop_padding": CROP_PADDING.get(dataset, 2)}
        tasks = [{"name": dataset, "dataset": dataset, "train_size": args.train_size, "augment": aug}]
        # train on every training image (no val split: nothing is chosen from data)
        data = {"root": args.data_root, "sampling": "all", "val_fraction": 0, "tasks": tasks}
        taskset = build_taskset(DataConfig.model_validate(data), args.seed)
        model = {"name": args.backbone, "depth": args.depth, "width": args.width}
        if args.backbone == "wrn":
            model["widen_factor"] = args.widen_factor
        for method in args.methods.split(","):
            cfg = RunConfig.from_dict(
                {
                    "seed": args.seed,
                    "output_dir": str(work / f"{method}_{dataset}"),
                    "data": data,
                    "model": model,
                    "method": {"name": method},
                    "train": {
                        "epochs": epochs,
                        "batch_size": args.batch_size,
                        "optimizer": "sgd",
                        "lr": args.lr,
                        "momentum": 0.9,
                        "nesterov": True,
                        "weight_decay": 5e-4,
                        "schedule": "cosine",
                        "warmup_epochs": round(args.warmup * epochs, 3),
                        "eval_every": 1,
                        "checkpoint_every": 0,
                        "threads": args.threads,
                        "progress": False,
                    },
                }
            )
            run = api.train(cfg, taskset=taskset)
            (curve,) = eval_curves(run).values()  # one task, one level
            loaded = api.load(run.out_dir / "model.json")
            cost = api.cost_rows(loaded, threads=args.threads)
            sec = statistics.median(run.summary["epoch_seconds"])
            gain = last_quarter_gain(curve)
            for r in api.merge_rows(run.test_rows, cost):
                rows.append(
                    {
                        "method": method,
                        "scenario": dataset,
                        **r,
                        "seconds_per_epoch": sec,
                        "epochs": epochs,
                        "crop_padding": aug["crop_padding"],
                        "last_quarter_gain": None if gain is None else round(gain, 6),
                        "curve": " ".join(f"{a:.2f}" for a in curve),
                    }
                )
            print(
                f"{method} {dataset}: {run.test_rows[0]['accuracy']:.2f}% after {epochs} epochs "
                f"(curve {' '.join(f'{a:.2f}' for a in curve)}); {sec:.1f}s/epoch",
                flush=True,
            )
    stem = write_results(
        "baselines",
        rows,
        args.seed,
        args.out,
        extra={
            "backbone": f"{args.backbone}-{args.depth}"
            + (f"-{args.widen_factor}" if args.backbone == "wrn" else "")
            + f" width {args.width}",
            "schedule": f"SGD Nesterov 0.9, lr {args.lr}, wd 5e-4, batch {args.batch_size}, linear warm-up "
            f"{args.warmup:.0%} of the epochs then cosine; crop augmentation (padding per row)",
            "convergence_rule": "best test accuracy of the last quarter of the epochs minus the best "
            "before it < 0.2 points (last_quarter_gain)",
            "note_seconds": "seconds_per_epoch: median over epochs (training only)",
        },
        claims=claims(rows),
    )
    print(f"wrote {stem}.json and {stem}.md")


def claims(rows: list[dict], meta: dict | None = None) -> list[dict]:
    """Issue 15's baseline floors per (method, task), and the convergence rule per (method, task)."""
    out = floor_claims("baselines", {(r["method"], r["task"]): r["accuracy"] for r in rows})
    return out + converged_claims("baselines", rows)


if __name__ == "__main__":
    main()
