"""Benchmark: DVN with 4 tasks and 4 units at small scale (the paper's J2 and Table 2).

Four tasks of different input sizes: MNIST, Fashion-MNIST, KMNIST-10k (28x28) and scikit-learn's digits
(8x8), each with its own input layer mapping it to the trunk's feature size (14x14). One ResNet trunk
split into 4 units hosts 4 deep virtual networks of 4 levels: 16 outputs. Rows per (task, level):
accuracy, parameters, density, compression rate, FLOPs, latency (batch 1 and 64, faster memory format)
and the measured speed-up of the exported level over the task's full level, as in the paper's Table 2.

Run:  python benchmarks/dvn_j2.py [--data-root ../shared/data] [--epochs 6]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import add_training_args, claim, parser, run_method, sgd_train, write_results  # noqa: E402

from virtnet.data.config import DataConfig, build_taskset  # noqa: E402


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    add_training_args(p, epochs=6, width=1.0, batch_size=64)
    p.add_argument("--feature-size", type=int, default=14)
    p.add_argument("--train-size", type=int, default=5000, help="training images per task (digits has 1,437)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.train_size
    data = {
        "root": args.data_root,
        "sampling": "all",
        "val_fraction": 0,  # train on every training image (no default val split)
        "tasks": [
            {"name": "mnist", "dataset": "mnist", "train_size": n},
            {"name": "fashion_mnist", "dataset": "fashion_mnist", "train_size": n},
            {"name": "kmnist10k", "dataset": "kmnist10k", "train_size": min(n, 8000)},
            {"name": "digits", "dataset": "digits"},
        ],
    }
    taskset = build_taskset(DataConfig.model_validate(data), args.seed)
    model = {"name": "resnet", "depth": args.depth, "width": args.width, "feature_size": args.feature_size}
    train = sgd_train(args)
    work = Path(args.work_dir or "runs/bench/dvn_j2")
    rows, _ = run_method(
        "dvn",
        "J2",
        data,
        model,
        train,
        work,
        args.seed,
        taskset=taskset,
        options={"num_units": 4},
        threads=args.threads,
    )
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    for task_rows in by_task.values():
        top = max(task_rows, key=lambda r: r["level"])
        for r in task_rows:
            r["compression"] = 1.0 / r["density"]
            r["speedup_b1"] = top["latency_ms_b1"] / r["latency_ms_b1"]
            r["speedup_b64"] = top["latency_ms_b64"] / r["latency_ms_b64"]
    lines = [
        "| task | level | accuracy (%) | params | density (%) | compression | latency b64 (ms) | "
        "speed-up b64 | latency b1 (ms) | speed-up b1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['level']} | {r['accuracy']:.2f} | {r['params']:,} | "
            f"{100 * r['density']:.1f} | {r['compression']:.1f}x | {r['latency_ms_b64']:.2f} | "
            f"{r['speedup_b64']:.2f}x | {r['latency_ms_b1']:.3f} | {r['speedup_b1']:.2f}x |"
        )
    total = rows[0]["total_params"]
    text = (
        "\n".join(lines) + f"\n\n16 outputs from one network of {total:,} parameters. The paper's Table 2 "
        "(ResNet-42, Tiny-ImageNet, GPU): density 6.4 / 25.2 / 56.4 / 100 %, speed-up 5.8 / 2.8 / 1.6 / 1.0x."
    )
    stem = write_results(
        "dvn_j2",
        rows,
        args.seed,
        args.out,
        extra={
            "backbone": f"resnet{args.depth} width {args.width}, feature size {args.feature_size}",
            "epochs": args.epochs,
            "train_size_per_task": n,
        },
        claims=claims(rows),
    )
    with open(f"{stem}.md", "a") as f:
        f.write("\n## Table 2 at small scale\n\n" + text + "\n")
    print(text)


#: the paper's Table 2 (ResNet-42, 4 units): density (%) of levels 1..4
PAPER_DENSITY = {1: 6.4, 2: 25.2, 3: 56.4, 4: 100.0}


def claims(rows: list[dict], meta: dict | None = None) -> list[dict]:
    """J2 / Table 2 from the rows: the level densities are the paper's (within 0.1 points), every task's
    accuracy does not fall from one level to the next (the nested hierarchy), and the exported level 1
    is faster than the task's full level at batch 64."""
    out = []
    levels = sorted({r["level"] for r in rows})
    for lv in levels:
        if lv in PAPER_DENSITY and len(levels) == len(PAPER_DENSITY):
            worst = max(abs(100 * r["density"] - PAPER_DENSITY[lv]) for r in rows if r["level"] == lv)
            out.append(
                claim(
                    f"dvn_j2.density.level{lv}",
                    f"level {lv}'s density is the paper's Table 2 value {PAPER_DENSITY[lv]} % (measured: the "
                    "largest |density - paper| over tasks, points)",
                    "<=",
                    0.1,
                    worst,
                )
            )
    for t in dict.fromkeys(r["task"] for r in rows):
        acc = {r["level"]: r["accuracy"] for r in rows if r["task"] == t}
        lv = sorted(acc)
        steps = [acc[b] - acc[a] for a, b in zip(lv, lv[1:], strict=False)]
        out.append(
            claim(
                f"dvn_j2.levels_monotone.{t}",
                f"{t}: accuracy does not fall from one level to the next (measured: the smallest "
                "accuracy(level l+1) - accuracy(level l), points)",
                ">=",
                0.0,
                min(steps) if steps else None,
            )
        )
        first = next((r for r in rows if r["task"] == t and r["level"] == lv[0]), None)
        out.append(
            claim(
                f"dvn_j2.level1_speedup_b64.{t}",
                f"{t}: the exported level 1 runs faster than the task's full level at batch 64 (measured: "
                "latency(full) / latency(level 1); the paper: 5.8x at 6.4 % density on a GPU)",
                ">",
                1.0,
                None if first is None else first.get("speedup_b64"),
            )
        )
    return out


if __name__ == "__main__":
    main()
