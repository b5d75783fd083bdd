"""Benchmark: the learning rates of benchmarks/adapters_decathlon.py, chosen on a validation split.

The universal network is pretrained exactly as in adapters_decathlon.py (same data, seed and schedule, so
the same weights); then fine-tuning, parallel and series adapters are trained on one target domain
(--domain, default KMNIST-10k) at each learning rate of a small grid, and each method's learning rate is
the one with the best accuracy on the domain's validation split (5% of its training subsample, held out).
Test accuracy is recorded too, but not used for the choice.

Run:  python benchmarks/adapters_lr_sweep.py [--data-root ../shared/data] [--threads 1]
Writes docs/results/adapters_lr_sweep.{json,md,csv}.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import Timer, claim, parser, write_results  # noqa: E402
from adapters_decathlon import run, source_args, train_cfg  # noqa: E402

from virtnet.data.config import DataConfig, build_taskset  # noqa: E402
from virtnet.train.evaluate import evaluate  # noqa: E402

GRID = {
    "finetune": ({"name": "finetune"}, (0.02, 0.05, 0.1, 0.2)),
    "parallel": ({"name": "adapters", "kind": "parallel"}, (0.1, 0.3, 0.5, 1.0)),
    "series": ({"name": "adapters", "kind": "series"}, (0.1, 0.3, 0.5, 1.0)),
}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    source_args(p)
    p.add_argument("--domain", default="kmnist10k")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    timer = Timer()
    work = Path(args.work_dir or "runs/bench/adapters_lr_sweep")
    source_ckpt, model_cfg = pretrain(args, work)
    task = {"name": args.domain, "dataset": args.domain, "val_fraction": args.val_fraction}
    if args.domain != "digits":
        task["train_size"] = args.train_size
    data = {"root": args.data_root, "tasks": [task]}
    taskset = build_taskset(DataConfig.model_validate(data), args.seed)
    rows: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    for name, (method, lrs) in GRID.items():
        best = None
        for lr in lrs:
            r, secs = run(
                f"{name}-{lr}",
                work,
                data,
                taskset,
                model_cfg,
                {**method, "init_from": source_ckpt},
                train_cfg(args, args.epochs, lr),
                args.seed,
            )
            val = evaluate(r.method, r.model, taskset, split="val")[0]["accuracy"]
            rows.append(
                {
                    "method": name,
                    "scenario": f"{args.source}->{args.domain}",
                    "task": args.domain,
                    "level": 1,
                    "lr": lr,
                    "val_accuracy": val,
                    "accuracy": r.test_rows[0]["accuracy"],
                    "params": sum(p.numel() for p in r.model.parameters()),
                    "flops": None,
                    "seconds": secs,
                }
            )
            print(f"    val {val:.2f}%", flush=True)
            if best is None or val > best[1]:
                best = (lr, val)
        assert best is not None
        chosen[name] = best[0]
        print(f"{name}: lr {best[0]} (val {best[1]:.2f}%)", flush=True)
    stem = write_results(
        "adapters_lr_sweep",
        rows,
        args.seed,
        args.out,
        extra={"chosen_lr": chosen, "domain": args.domain, "epochs": args.epochs, "seconds": timer()},
        notes="accuracy: test (not used for the choice); val_accuracy: the held-out 5% of the training "
        "subsample, on which each method's learning rate is chosen.",
        claims=claims(rows),
    )
    print(f"wrote {stem}.json and {stem}.md ({timer():.0f}s)", flush=True)


#: the learning rates benchmarks/adapters_decathlon.py uses (its --lr-finetune, --lr-adapters, --lr-series)
DECATHLON_LR = {"finetune": 0.1, "parallel": 0.3, "series": 0.3}


def claims(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per method: the learning rate with the best validation accuracy (the first of a tie, as the sweep
    chooses) is the one adapters_decathlon.py uses."""
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        best = None
        for r in rows:
            if r["method"] == m and (best is None or r["val_accuracy"] > best["val_accuracy"]):
                best = r
        if m in DECATHLON_LR and best is not None:
            out.append(
                claim(
                    f"adapters_lr_sweep.chosen_lr.{m}",
                    f"{m}: the learning rate chosen on the validation split (never the test split) is the "
                    f"decathlon's {DECATHLON_LR[m]} (measured: the lr of the best validation accuracy)",
                    "==",
                    DECATHLON_LR[m],
                    best["lr"],
                )
            )
    return out


def pretrain(args: Any, work: Path) -> tuple[str, dict[str, Any]]:
    """The universal network, as adapters_decathlon.py trains it; returns its checkpoint and model config."""
    task = {"name": args.source, "dataset": args.source, "val_fraction": args.val_fraction}
    task["train_size"] = args.source_train_size
    data = {"root": args.data_root, "tasks": [task]}
    taskset = build_taskset(DataConfig.model_validate(data), args.seed)
    model_cfg = {
        "name": "resnet26",
        "width": args.width,
        "feature_size": taskset[args.source].input_shape[-1],
    }
    r, _ = run(
        "source",
        work,
        data,
        taskset,
        model_cfg,
        {"name": "joint", "shared_stem": True},
        train_cfg(args, args.source_epochs, args.lr_source),
        args.seed,
    )
    return str(r.out_dir / "model.json"), model_cfg


if __name__ == "__main__":
    main()
