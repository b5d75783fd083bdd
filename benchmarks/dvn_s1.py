"""Benchmark: DVN sequential learning (the paper's S1) at small scale.

Classes 0-4 then 5-9 of one dataset (Fashion-MNIST by default) as two tasks learned one after the other
without the first task's data. DVN (sequential mode, Sec. 3.3) adds a unit with the second task and keeps
the first task's levels by distillation (eq. 6); it is compared with LwF (its nh = 1 case), feature
extraction and fine-tuning on the same ResNet and schedule. Rows: every task's accuracy after each added
task (from the runs' per-phase checkpoints), and the final accuracy per (task, level) with costs.

Run:  python benchmarks/dvn_s1.py [--data-root ../shared/data] [--dataset fashion_mnist] [--epochs 4]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    add_training_args,
    claim,
    parser,
    run_method,
    sgd_train,
    text_claim,
    write_results,
)

from virtnet import api  # noqa: E402
from virtnet.data.config import DataConfig, build_taskset  # noqa: E402
from virtnet.errors import TrainingError  # noqa: E402
from virtnet.train import evaluate  # noqa: E402


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist")
    add_training_args(p, epochs=4)
    p.add_argument("--train-size", type=int, default=None, help="training images per task (default: all)")
    p.add_argument("--methods", default="dvn,lwf,feature_extraction,finetune")
    p.add_argument(
        "--lwf-lambdas",
        default="1",
        help="LwF's distillation weights; several: one run each on 1 - --lwf-val-fraction of the training "
        "images, the best mean val accuracy over both tasks after the sequence is reported as 'lwf'",
    )
    p.add_argument(
        "--dvn-lambdas",
        default="1",
        help="sequential DVN's distillation weights (eq. 6 uses LwF's loss); several: searched as LwF's are",
    )
    p.add_argument("--lwf-val-fraction", type=float, default=0.1, help="the searches' val split fraction")
    p.add_argument("--lwf-warmup", type=int, default=1, help="LwF epochs training the new head alone")
    p.add_argument(
        "--dvn-options",
        default="{}",
        help='extra JSON `method:` options for dvn, e.g. \'{"old_bn": "recorded"}\'',
    )
    args = p.parse_args()
    grids = {
        "lwf": [float(v) for v in args.lwf_lambdas.split(",")],
        "dvn": [float(v) for v in args.dvn_lambdas.split(",")],
    }
    torch.set_num_threads(args.threads)

    data = {
        "root": args.data_root,
        "sampling": "all",
        "val_fraction": 0,  # train on every training image (no default val split)
        "scenario": {
            "kind": "split_classes",
            "dataset": args.dataset,
            "splits": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
            "train_size": args.train_size,
        },
    }
    taskset = build_taskset(DataConfig.model_validate(data), args.seed)
    model = {"name": "resnet", "depth": args.depth, "width": args.width}
    train = sgd_train(args)
    work = Path(args.work_dir or "runs/bench/dvn_s1")
    options = {
        "dvn": {"mode": "sequential", "distill_weight": grids["dvn"][0], **json.loads(args.dvn_options)},
        "lwf": {"distill_weight": grids["lwf"][0], "warmup_epochs": args.lwf_warmup},
        "feature_extraction": {},
        "finetune": {},
    }
    rows, final, searches = [], {}, {}
    for name in args.methods.split(","):
        if name in grids and len(grids[name]) > 1:
            r, run, searches[name] = search_lambda(
                name, args, data, model, train, work, grids[name], options[name]
            )
            rows += searches[name]["rows"]
        else:
            r, run = run_method(
                name,
                "S1",
                data,
                model,
                train,
                work,
                args.seed,
                taskset=taskset,
                options=options[name],
                threads=args.threads,
            )
        for row in r:
            rows.append({**row, "stage": "final"})
        for s in api.sequence_rows(run.out_dir / "model.json", taskset):
            rows.append(
                {
                    "method": name,
                    "scenario": "S1",
                    "stage": f"after {s['after_task']}",
                    "task": s["task"],
                    "level": s["level"],
                    "accuracy": s["accuracy"],
                    "params": next(
                        x["params"] for x in r if x["task"] == s["task"] and x["level"] == s["level"]
                    )
                    if s["level"]
                    else 0,
                    "flops": next(
                        x["flops"] for x in r if x["task"] == s["task"] and x["level"] == s["level"]
                    ),
                    "after_task": s["after_task"],
                }
            )
        final[name] = {(x["task"], x["level"]): x["accuracy"] for x in r}

    t0, t1 = taskset.names
    lines = ["| method | " + f"{t0} (old task) | {t1} (new task) | total parameters |", "|---|---|---|---|"]
    for name, acc in final.items():
        cells = []
        for t in (t0, t1):
            levels = sorted(lv for (tt, lv) in acc if tt == t)
            cells.append(" / ".join(f"{acc[(t, lv)]:.2f}" for lv in levels))
        total = next(x["total_params"] for x in rows if x["method"] == name and x.get("stage") == "final")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {total:,} |")
    text = "\n".join(lines) + (
        "\n\nFinal test accuracy (%); for DVN, `a / b` is level 1 (one unit) / level 2 "
        "(both units). Accuracy after each added task: the rows with stage 'after ...'."
    )
    stem = write_results(
        "dvn_s1",
        rows,
        args.seed,
        args.out,
        extra={
            "dataset": args.dataset,
            "backbone": f"resnet{args.depth} width {args.width}",
            "epochs_per_task": args.epochs,
            "train_size_per_task": args.train_size,
            "lwf_warmup_epochs": args.lwf_warmup,
            "dvn_options": options["dvn"],
            **{
                f"{name}_search": {
                    "lambdas": grids[name],
                    "val_fraction": args.lwf_val_fraction,
                    "selection": "mean val accuracy over every (task, level) after the sequence (test "
                    f"never used); rows with method '{name}_search' hold every setting's val and test "
                    "accuracy",
                    "chosen": search["chosen"],
                    "mean_val": search["mean_val"],
                }
                for name, search in searches.items()
            },
            **{f"{name}_distill_weight": grids[name][0] for name in grids if name not in searches},
        },
        claims=claims(rows),
    )
    with open(f"{stem}.md", "a") as f:
        f.write("\n## Summary\n\n" + text + "\n")
    print(text)


def search_lambda(
    name: str,
    args: Any,
    data: dict[str, Any],
    model: dict[str, Any],
    train: dict[str, Any],
    work: Path,
    lambdas: list[float],
    options: dict[str, Any],
) -> tuple[list[dict[str, Any]], Any, dict[str, Any]]:
    """Method ``name`` (LwF or sequential DVN) once per distillation weight lambda on the tasks with a val
    split (--lwf-val-fraction of each training set, seeded by the run seed); the lambda of the highest
    mean val accuracy over every (task, level) after the sequence is chosen. Returns the chosen run's final
    rows (method ``name``), the run, and the search (rows with method '<name>_search': val and test
    accuracy per (lambda, task, level); the chosen lambda)."""
    vdata = {**data, "val_fraction": args.lwf_val_fraction}
    vts = build_taskset(DataConfig.model_validate(vdata), args.seed)
    found, runs, mean_val = [], {}, {}
    for lam in lambdas:
        try:
            r, run = run_method(
                name,
                "S1",
                vdata,
                model,
                train,
                work,
                args.seed,
                taskset=vts,
                options={**options, "distill_weight": lam},
                label=f"{name}_lambda{lam:g}",
                threads=args.threads,
            )
        except TrainingError as e:  # a diverging setting is recorded, never chosen; the search goes on
            print(f"{name}_lambda{lam:g}: diverged: {e}", flush=True)
            mean_val[lam] = None
            for t in vts.names:
                found.append(
                    {
                        "task": t,
                        "level": None,
                        "accuracy": None,
                        "method": f"{name}_search",
                        "scenario": "S1",
                        "stage": "search",
                        "distill_weight": lam,
                        "val_accuracy": None,
                        "diverged": str(e),
                    }
                )
            continue
        val = {
            (x["task"], x["level"]): x["accuracy"]
            for x in evaluate(run.method, run.model, vts, split="val", tasks=vts.names)
        }
        mean_val[lam] = statistics.fmean(val.values())
        runs[lam] = (r, run)
        for x in r:
            found.append(
                {
                    **{k: x[k] for k in ("task", "level", "accuracy", "params", "flops", "train_seconds")},
                    "method": f"{name}_search",
                    "scenario": "S1",
                    "stage": "search",
                    "distill_weight": lam,
                    "val_accuracy": val[(x["task"], x["level"])],
                }
            )
    finite = [lam for lam in lambdas if mean_val[lam] is not None]
    if not finite:
        raise SystemExit(f"dvn_s1: {name} diverged for every lambda of {lambdas}")
    best = max(finite, key=lambda lam: mean_val[lam])  # the first of equals: the grid's order
    cost = {x["task"]: x for x in runs[best][0]}  # the task's largest level (the last row of a task)
    for x in found:
        if "params" not in x:  # a diverged setting: the same network as every other lambda's
            x.update({k: cost[x["task"]][k] for k in ("level", "params", "flops")})
        x["mean_val_accuracy"] = mean_val[x["distill_weight"]]
        x["chosen"] = x["distill_weight"] == best
    r, run = runs[best]
    r = [{**x, "method": name, "distill_weight": best} for x in r]
    return r, run, {"rows": found, "chosen": best, "mean_val": {f"{k:g}": v for k, v in mean_val.items()}}


def claims(rows: list[dict], meta: dict | None = None) -> list[dict]:
    """S1 from the final rows: sequential DVN keeps the old task better than LwF (at each of its levels)
    and learns the new task at least as well as LwF (its full level)."""
    final = {(r["method"], r["task"], r["level"]): r["accuracy"] for r in rows if r.get("stage") == "final"}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    old, new = tasks[0], tasks[-1]
    dvn_levels = sorted(lv for (m, t, lv) in final if m == "dvn" and t == old)
    lwf_old, lwf_new = final.get(("lwf", old, 1)), final.get(("lwf", new, 1))
    out = []
    for lv in dvn_levels:
        d = final[("dvn", old, lv)]
        out.append(
            claim(
                f"dvn_s1.old_task_vs_lwf.level{lv}",
                f"the old task ({old}) after learning the new one: DVN's level {lv} at least as accurate as "
                "LwF (measured: DVN - LwF, test accuracy points)",
                ">=",
                0.0,
                None if lwf_old is None else d - lwf_old,
            )
        )
    top = max((lv for (m, t, lv) in final if m == "dvn" and t == new), default=None)
    d_new = final.get(("dvn", new, top))
    out.append(
        claim(
            "dvn_s1.new_task_vs_lwf",
            f"the new task ({new}): DVN's full level at least as accurate as LwF (measured: DVN - LwF, "
            "test accuracy points)",
            ">=",
            0.0,
            None if lwf_new is None or d_new is None else d_new - lwf_new,
        )
    )
    for name, title in (("lwf", "LwF"), ("dvn", "DVN")):
        found = [r for r in rows if r["method"] == f"{name}_search"]
        if not found:
            continue
        mean_val = {r["distill_weight"]: r["mean_val_accuracy"] for r in found}
        chosen = next(r["distill_weight"] for r in found if r["chosen"])
        out.append(
            text_claim(
                f"dvn_s1.{name}.chosen_on_val",
                f"{title}'s lambda chosen by the mean val accuracy over every (task, level) after the "
                f"sequence among {sorted(mean_val)} (test never used); measured: the chosen lambda",
                "the lambda of the highest mean val accuracy",
                chosen,
                mean_val[chosen] == max(v for v in mean_val.values() if v is not None),
            )
        )
    return out


if __name__ == "__main__":
    main()
