"""Benchmark: DEN scenario M1 at small scale (issue 11): three real sets of different input sizes and
channels — the digits (8x8x1), MNIST resized to 32x32 and colorized (32x32x3: the per-task ``resize`` and
``channels`` transforms, docs/data.md) and KMNIST-10k (28x28x1) — one DEN per rho in {0.1, 1},
beside the individual backbones, NestedNet and grouped PackNet, the full estimator and "rand sel" (the
estimator with random structures, matched to DEN's mean FLOPs per task), all on the full test splits.

DEN rows: ``flops`` is the mean estimator FLOPs per instance (``max_flops``, ``selector_flops``,
``mean_flops_with_selector`` beside it), ``params`` the estimator's (``selector_params`` beside it).
Baselines are trained for as many epochs as DEN's estimator stages in total (``stages x estimator
epochs``; ``--baseline-epochs`` to change). Plots: Fig. 6 (histogram of structures, mean level
probability per block) for each rho, and accuracy against mean FLOPs.

Run:  python benchmarks/den_m1.py [--epochs 4] [--stages 3] [--train-size 8000]   (about 1.5 hours on 2
      cores: 2 DENs of 3 x (4 + 2) epochs and 3 baselines of 12 epochs on 3 tasks)
Smoke: python benchmarks/den_m1.py --smoke --out /tmp/den_m1   (under a minute; not a result)

Shared by den_m3.py and den_c1.py: :func:`run_scenario`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import RESULTS, claim, parser, run_method, write_results  # noqa: E402

from virtnet.methods.den.report import (  # noqa: E402
    calibrated,
    evaluate_den,
    full_chooser,
    plot_accuracy_flops,
    plot_structures,
    random_chooser,
)


def add_args(p: Any, epochs: int = 4, train_size: int = 8000) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help="epochs per estimator stage")
    p.add_argument("--selector-epochs", type=int, default=None, help="epochs per selector stage (epochs / 2)")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--rhos", default="0.1,1", help='comma-separated; "" trains the baselines only')
    p.add_argument("--train-size", type=int, default=train_size)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--feature-size", type=int, default=16, help="trunk input side, the same for every method")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--baselines", default="individual,nestednet,packnet-grouped")
    p.add_argument(
        "--baseline-epochs", type=int, default=None, help="the baselines' epochs (stages x epochs)"
    )
    p.add_argument(
        "--stage-schedule", default="constant", choices=["constant", "step", "cosine"], help="within a stage"
    )
    p.add_argument("--den-options", default="{}", help="more DEN options as JSON (docs/methods/den.md)")
    p.add_argument("--smoke", action="store_true", help="tiny settings (seconds), to check the script")


def den_rows(run: Any, label: str, scenario: str, chooser: Any = None) -> list[dict[str, Any]]:
    rows = []
    for r in evaluate_den(run.model, run.taskset, split="test", chooser=chooser):
        rows.append(
            {
                "method": label,
                "scenario": scenario,
                "task": r["task"],
                "level": "selector" if chooser is None else "fixed",
                "accuracy": r["accuracy"],
                "params": r["estimator_params"],
                "flops": r["mean_flops"],
                **{
                    k: r[k]
                    for k in (
                        "max_flops",
                        "full_flops",
                        "selector_flops",
                        "mean_flops_with_selector",
                        "selector_params",
                    )
                },
                "histogram_top": r["histogram"][:10],
                "level_probability": r["level_probability"],
            }
        )
    return rows


def run_scenario(name: str, scenario: str, data: dict[str, Any], args: Any, extra: dict[str, Any]) -> None:
    """Train and evaluate DEN for every rho and the baselines on ``data``; write docs/results/<name>.*"""
    if args.smoke:
        args.epochs, args.stages, args.train_size, args.depth, args.width = 1, 1, 64, 8, 0.25
        args.batch_size = 32
        for t in data.get("tasks", []):
            t["train_size"], t["test_size"] = 64, 64
        if "scenario" in data:
            data["scenario"]["train_size"] = 64
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir or f"runs/bench/{name}")
    out_stem = Path(args.out) if args.out else RESULTS / name  # plots are named after the results file
    model = {"name": "resnet", "depth": args.depth, "width": args.width, "feature_size": args.feature_size}
    sel_epochs = args.selector_epochs or max(1, args.epochs // 2)
    train = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": "sgd",
        "nesterov": True,
        "momentum": 0.9,
        "weight_decay": 5e-4,
    }
    if args.smoke:
        train["max_steps_per_epoch"] = 2
    rows: list[dict[str, Any]] = []
    rhos = [float(r) for r in args.rhos.split(",") if r]
    base_epochs = args.baseline_epochs or args.epochs * args.stages
    den_runs = {}
    for rho in rhos:
        opts = {
            "rho": rho,
            "stages": args.stages,
            "estimator_epochs": args.epochs,
            "selector_epochs": sel_epochs,
            "budget_levels": [1.0],
            "stage_schedule": args.stage_schedule,
            **json.loads(args.den_options),
        }
        _, run = run_method(
            "den",
            scenario,
            data,
            model,
            train,
            work,
            args.seed,
            options=opts,
            label=f"den-rho{rho:g}",
            threads=args.threads,
            latency=False,
        )
        den_runs[rho] = run
        rows += den_rows(run, f"den-rho{rho:g}", scenario)
        plot_structures(
            evaluate_den(run.model, run.taskset, split="test"),
            out_stem.with_name(f"{out_stem.name}_fig6_rho{rho:g}.png"),
        )
    # the baselines on the same estimator, each on a copy whose batch norms are calibrated for its own
    # structures (as training calibrates the selector's): no row runs on statistics made for others
    if rhos:
        first = den_runs[rhos[0]]
        full = SimpleNamespace(
            model=calibrated(first.model, first.taskset, full_chooser(first.model), seed=args.seed),
            taskset=first.taskset,
        )
        rows += den_rows(full, "den-full-estimator", scenario, full_chooser(full.model))
    for rho, run in den_runs.items():
        target = {r["task"]: r["flops"] for r in rows if r["method"] == f"den-rho{rho:g}"}
        rs_model = calibrated(
            run.model, run.taskset, random_chooser(run.model, target, args.seed + 1), seed=args.seed
        )
        rows += den_rows(
            SimpleNamespace(model=rs_model, taskset=run.taskset),
            f"den-rand-sel-rho{rho:g}",
            scenario,
            random_chooser(rs_model, target, args.seed),
        )
    base_train = {**train, "epochs": base_epochs, "schedule": "cosine"}
    for m in [b for b in args.baselines.split(",") if b]:
        try:
            got, _ = run_method(
                m, scenario, data, model, base_train, work, args.seed, threads=args.threads, latency=False
            )
            rows += got
        except Exception as e:  # noqa: BLE001 (a baseline that does not apply to the scenario)
            print(f"{m}: skipped ({type(e).__name__}: {str(e).splitlines()[0]})")
    plot_accuracy_flops(  # an empty plot when only the baselines ran
        [
            {"task": r["task"], "mean_flops": r["flops"], "accuracy": r["accuracy"], "label": r["method"]}
            for r in rows
            if r["method"].startswith("den-rho")
        ],
        out_stem.with_name(f"{out_stem.name}_acc_flops.png"),
    )
    meta = {
        **extra,
        "epochs_per_estimator_stage": args.epochs,
        "epochs_per_selector_stage": sel_epochs,
        "stages": args.stages,
        "stage_schedule": args.stage_schedule,
        "den_options": json.loads(args.den_options),
        "backbone": f"resnet{args.depth} width {args.width}",
        "feature_size": args.feature_size,
        "smoke": args.smoke,
        "baseline_epochs": base_epochs,
    }
    stem = write_results(name, rows, args.seed, args.out, extra=meta, claims=claims(name, rows, rhos))
    for c in json.loads(Path(f"{stem}.json").read_text())["claims"]:
        print(f"{c['id']}: {c['measured']} -> {'met' if c['met'] else 'NOT met'}")


def _mean(rows: list[dict[str, Any]], method: str, key: str, top_level: bool = False) -> float | None:
    sel = [r for r in rows if r["method"] == method]
    if top_level and sel:  # a multi-level baseline: each task's largest level
        by: dict[str, dict[str, Any]] = {}
        for r in sel:
            if r["task"] not in by or r["level"] > by[r["task"]]["level"]:
                by[r["task"]] = r
        sel = list(by.values())
    vals = [r[key] for r in sel if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def claims(name: str, rows: list[dict[str, Any]], rhos: list[float]) -> list[dict[str, Any]]:
    out = []
    ind_acc = _mean(rows, "individual", "accuracy", True)
    ind_flops = _mean(rows, "individual", "flops", True)
    full_acc = _mean(rows, "den-full-estimator", "accuracy")
    full_flops = _mean(rows, "den-full-estimator", "flops")
    for rho in rhos:
        m = f"den-rho{rho:g}"
        acc, flops = _mean(rows, m, "accuracy"), _mean(rows, m, "flops")
        if rho <= 0.1:
            out.append(
                claim(
                    f"{name}.{m}.acc_gap_individual",
                    f"mean accuracy of {m} minus the individual backbones' (points, mean over tasks)",
                    ">=",
                    -0.3,
                    None if acc is None or ind_acc is None else acc - ind_acc,
                )
            )
            out.append(
                claim(
                    f"{name}.{m}.flops_over_individual",
                    f"mean FLOPs per instance of {m} over the individual backbones' (estimator only)",
                    "<=",
                    0.8,
                    None if flops is None or not ind_flops else flops / ind_flops,
                )
            )
        else:
            out.append(
                claim(
                    f"{name}.{m}.flops_over_full",
                    f"mean FLOPs of {m} over the full estimator's",
                    "<=",
                    0.6,
                    None if flops is None or not full_flops else flops / full_flops,
                )
            )
            out.append(
                claim(
                    f"{name}.{m}.loss_vs_full",
                    f"accuracy loss of {m} against the full estimator (points, mean over tasks)",
                    "<=",
                    1.5,
                    None if acc is None or full_acc is None else full_acc - acc,
                )
            )
        rs = _mean(rows, f"den-rand-sel-rho{rho:g}", "accuracy")
        out.append(
            claim(
                f"{name}.{m}.over_rand_sel",
                f"{m} minus rand sel at its mean FLOPs (points, mean over tasks)",
                ">=",
                1.0,
                None if acc is None or rs is None else acc - rs,
            )
        )
    joint_acc = _mean(rows, "joint", "accuracy")
    if joint_acc is not None and ind_acc is not None:  # what one plainly trained shared network costs
        out.append(
            claim(
                f"{name}.joint.acc_gap_individual",
                "mean accuracy of one network trained on every task (joint, no elastic structure) minus the "
                "individual backbones' (points, mean over tasks; DEN rho 0.1's bound)",
                ">=",
                -0.3,
                joint_acc - ind_acc,
            )
        )
    return out


def claims_of_rows(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """``claims`` of a stored results file (benchmarks/add_claims.py): the rhos are read off its rows."""
    rhos = sorted({float(r["method"][len("den-rho") :]) for r in rows if r["method"].startswith("den-rho")})
    return claims(str(meta["benchmark"]), rows, rhos)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    add_args(p)
    args = p.parse_args()
    n = args.train_size
    data = {
        "root": args.data_root,
        "sampling": "all",
        "val_fraction": 0,  # nothing is chosen from data here: every method trains on the whole train set
        "tasks": [
            {"name": "digits", "dataset": "digits"},
            {
                "name": "mnist_rgb32",
                "dataset": "mnist",
                "train_size": n,
                "transforms": [
                    {"kind": "resize", "size": 32},
                    {"kind": "channels", "count": 3, "mode": "colorize", "seed": 0},
                ],
            },
            {"name": "kmnist10k", "dataset": "kmnist10k", "train_size": n},
        ],
    }
    run_scenario(
        "den_m1",
        "M1",
        data,
        args,
        {"tasks": "digits 8x8x1, MNIST resized to 32x32 and colorized (32x32x3), KMNIST-10k 28x28x1"},
    )


if __name__ == "__main__":
    main()
