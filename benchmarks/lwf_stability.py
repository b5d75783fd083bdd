"""Why LwF with a larger distillation weight forgets *more*: the step size of the distillation term.

In packnet_sequence and dvn_s1, LwF with lambda = 3 left the old tasks near chance (dvn_s1: NaN) while
lambda = 1 kept them (ResNet order A: MNIST 97.39 % vs 9.74 %). This benchmark trains MNIST then
Fashion-MNIST (ResNet-20 width 1.0, a head per task, --train-size images per task, --epochs per task, the
new head warmed up one epoch) for a few settings of lambda, the joint phase's learning rate and the old
tasks' batch norm, and records the old task's test accuracy after the new one and the distillation loss
at the start and end of the joint phase.

The hypothesis it tests: with per-task batch-norm statistics (``task_bn: stats``, the default) the old
task's forward during distillation normalises with its recorded statistics (as the frozen teacher does),
so the trunk is trained through batch norms that do not re-normalise; the distillation gradient is then
unstable above some step size, and what matters is lambda times the joint learning rate, not lambda
alone. Claims: lambda 3 at a third of the default joint rate keeps the old task as lambda 1 at the
default rate does, and lambda 1 at three times the default rate collapses as lambda 3 does.

Run:  python benchmarks/lwf_stability.py --threads 2     (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import claim, parser, sgd_train, write_results  # noqa: E402

from virtnet import api  # noqa: E402
from virtnet.cost import count_flops  # noqa: E402

NAME = "lwf_stability"
TASKS = ("mnist", "fashion_mnist")


def settings(lr: float) -> list[dict[str, Any]]:
    """The settings compared; the default joint rate is lr / 10."""
    d = lr / 10

    def one(label: str, lam: float, joint_lr: float, task_bn: str = "stats", old_bn: str = "recorded"):
        return {"label": label, "lam": lam, "joint_lr": joint_lr, "task_bn": task_bn, "old_bn": old_bn}

    return [
        one("finetune (lambda 0)", 0.0, d),
        one("default (lambda 1)", 1.0, d),
        one("lambda 3", 3.0, d),
        one("lambda 3, joint lr / 3", 3.0, d / 3),
        one("lambda 1, joint lr x 3", 1.0, d * 3),
        one("lambda 3, old tasks' batch statistics", 3.0, d, old_bn="batch"),
        one("lambda 3, one shared batch norm", 3.0, d, task_bn="shared"),
    ]


def run_config(args: Any, s: dict[str, Any], out: Path) -> dict[str, Any]:
    method: dict[str, Any] = {
        "name": "lwf",
        "shared_stem": False,
        "warmup_epochs": 1,
        "distill_weight": s["lam"],
        "joint_lr": s["joint_lr"],
        "task_bn": s["task_bn"],
    }
    if s["task_bn"] != "shared":
        method["old_bn"] = s["old_bn"]
    return {
        "seed": args.seed,
        "output_dir": str(out),
        "data": {
            "root": args.data_root,
            "val_fraction": 0,  # nothing is chosen here: every setting is reported
            "tasks": [{"name": t, "dataset": t, "train_size": args.train_size} for t in TASKS],
        },
        "model": {"name": "resnet", "depth": 20, "width": 1.0, "feature_size": 14},
        "method": method,
        "train": {
            **sgd_train(args),
            "eval_every": 0,
            "checkpoint_every": 0,
            "nonfinite_loss": "warn",  # a diverging setting is recorded, not stopped
            "threads": args.threads,
            "progress": False,
        },
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--train-size", type=int, default=3000, help="training images per task")
    p.add_argument("--epochs", type=int, default=2, help="epochs per task (after the warm-up)")
    p.add_argument("--lr", type=float, default=0.05, help="the first task's learning rate")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    work = Path(args.work_dir or f"runs/bench/{NAME}")
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for i, s in enumerate(settings(args.lr)):
        out = work / f"setting{i}"
        t0 = time.perf_counter()
        run = api.train(run_config(args, s, out), log=lambda m: None)
        seconds = time.perf_counter() - t0
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        distill = [m["distill/mnist"] for m in metrics if "distill/mnist" in m]
        nonfinite = any(m.get("event") == "nonfinite" for m in metrics)
        acc = {r["task"]: r["accuracy"] for r in run.test_rows}
        for t in TASKS:
            spec = run.model.spec(t)
            rows.append(
                {
                    "method": "lwf",
                    "scenario": "mnist->fashion_mnist",
                    "task": t,
                    "level": 1,
                    "setting": s["label"],
                    "distill_weight": s["lam"],
                    "joint_lr": s["joint_lr"],
                    "step_weight": s["lam"] * s["joint_lr"],
                    "task_bn": s["task_bn"],
                    "old_bn": s["old_bn"] if s["task_bn"] != "shared" else None,
                    "accuracy": acc[t],
                    "distill_first": distill[0] if distill else None,
                    "distill_last": distill[-1] if distill else None,
                    "nonfinite": nonfinite,
                    "params": api.total_parameters(run.model),
                    "flops": count_flops(
                        run.method.export(run.model, t), (spec.in_channels, spec.input_size, spec.input_size)
                    ),
                    "train_seconds": seconds,
                }
            )
        print(
            f"{s['label']} ({seconds:.0f}s): mnist {acc['mnist']:.2f}, "
            f"fashion_mnist {acc['fashion_mnist']:.2f}; distill {distill[0]:.3f} -> {distill[-1]:.3f}",
            flush=True,
        )
    old = {r["setting"]: r["accuracy"] for r in rows if r["task"] == "mnist"}
    claims = [
        claim(
            f"{NAME}.same_step_same_outcome",
            "lambda 3 at a third of the default joint rate keeps the old task (MNIST) within 2 points of "
            "lambda 1 at the default rate (measured: |difference|, test accuracy points)",
            "<=",
            2.0,
            abs(old["lambda 3, joint lr / 3"] - old["default (lambda 1)"]),
        ),
        claim(
            f"{NAME}.larger_step_collapses",
            "lambda 1 at three times the default joint rate keeps the old task no better than no "
            "distillation at all (measured: its MNIST accuracy minus lambda 0's, points)",
            "<=",
            0.0,
            old["lambda 1, joint lr x 3"] - old["finetune (lambda 0)"],
        ),
        claim(
            f"{NAME}.lambda3_collapses",
            "lambda 3 at the default joint rate keeps the old task no better than no distillation (measured: "
            "its MNIST accuracy minus lambda 0's, points)",
            "<=",
            0.0,
            old["lambda 3"] - old["finetune (lambda 0)"],
        ),
        claim(
            f"{NAME}.default_keeps_old_task",
            "the default (lambda 1, joint rate lr / 10) keeps the old task at least 10 points above no "
            "distillation (measured: its MNIST accuracy minus lambda 0's, points)",
            ">=",
            10.0,
            old["default (lambda 1)"] - old["finetune (lambda 0)"],
        ),
    ]
    extra = {
        "tasks": list(TASKS),
        "backbone": "resnet20 width 1.0, feature size 14, a stem and a head per task",
        "train_size_per_task": args.train_size,
        "epochs_per_task": args.epochs,
        "warmup_epochs": 1,
        "optimizer": f"SGD Nesterov 0.9, wd 5e-4, batch 64, lr {args.lr} cosine (first task); joint phase as "
        "the row's joint_lr, cosine",
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    notes = (
        "accuracy: test accuracy (%) of each task after the second; distill_first / distill_last: the old "
        "task's distillation loss (Hinton's cross-entropy at T = 2, its floor is the teacher's entropy) at "
        "the first and last logged step of the joint phase; step_weight: lambda x joint learning rate."
    )
    stem = write_results(NAME, rows, args.seed, args.out, extra=extra, notes=notes, claims=claims)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
