"""Benchmark: PackNet against LwF, fine-tuning, feature extraction and individual networks, task by task.

Sequences (each task learned once, in order, without the earlier tasks' data):

* ``A``: MNIST -> Fashion-MNIST -> KMNIST-10k -> digits (8x8, the others 28x28);
* ``B``: KMNIST-10k -> Fashion-MNIST -> MNIST;

on a small VGG (VGG-11 with batch norm, width 0.25, one hidden FC layer of 128) and a small ResNet
(ResNet-20, CIFAR layout, width 0.5). Every task has its own stem (3x3 convolution + BN mapping its images
to the trunk's 14x14 input: stride 2 for 28x28, bilinear upsampling for 8x8) and its own linear head;
stems and heads are task-specific parameters and count in the storage. Individual networks: one run per
task, --epochs epochs over that task's training images (the same number of steps per task as the
sequential methods get).

After each added task, every task learned so far is evaluated on its full test split (MNIST and
Fashion-MNIST 10,000 images, KMNIST-10k its own 2,000, digits 360), read from the run's per-phase
checkpoints like ``virtnet eval RUN/model.json --sequence``. Training sets are stratified seeded subsamples
(``--train-size`` per task, digits whole: 1,437). Storage in bytes: PackNet = what
``PackNetModel.save_packed`` stores: the float32 base weights that some task owns (free weights, pruned
from the last task to leave room for the next, are zeros that the map implies) + the packed ownership map
(ceil(log2(N+1)) bits per prunable weight) + stems, heads and batch norms (``model_bytes_dense`` also
counts the free weights); the others = their tensors' bytes; "one network" = one individual network
(stem, trunk, head).

Run:  python benchmarks/packnet_sequence.py --threads 1
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    claim,
    floor_claims,
    parser,
    read_mergeable,
    text_claim,
    write_claims,
    write_results,
)

from virtnet import api  # noqa: E402
from virtnet.config import RunConfig  # noqa: E402
from virtnet.cost import count_flops, plot_error_matrix, tensor_bytes, write_report  # noqa: E402
from virtnet.data.config import DataConfig, build_taskset  # noqa: E402
from virtnet.data.core import TaskSet  # noqa: E402
from virtnet.train import evaluate  # noqa: E402

BACKBONES = {
    "vgg": {"name": "vgg", "depth": 11, "width": 0.25},
    "resnet": {"name": "resnet", "depth": 20, "width": 0.5},
}
SHORT = {"packnet": "PackNet", "packnet_task_bn": "PackNet, task BN", "lwf": "LwF"}  # plot titles
ORDERS = {
    "A": ["mnist", "fashion_mnist", "kmnist10k", "digits"],
    "B": ["kmnist10k", "fashion_mnist", "mnist"],
}
SEQUENTIAL = ["packnet", "packnet_task_bn", "lwf", "finetune", "feature_extraction"]
LABEL = {
    "packnet": "PackNet",
    "packnet_task_bn": "PackNet, task-specific BN",
    "lwf": "LwF",
    "finetune": "fine-tuning",
    "feature_extraction": "feature extraction",
    "individual": "individual networks",
}


def task_config(name: str, train_size: int) -> dict[str, Any]:
    if name == "digits":
        return {"name": "digits", "dataset": "digits"}
    return {"name": name, "dataset": name, "train_size": train_size}


def order_ratios(args: Any) -> dict[str, list[float]]:
    """``--order-ratios A=0.9,0.75,0.75,0.5`` (repeatable): PackNet's pruning ratios of one order."""
    out: dict[str, list[float]] = {}
    for item in args.order_ratios:
        order, sep, values = item.partition("=")
        if not sep or order not in ORDERS:
            raise SystemExit(
                f"--order-ratios {item!r}: expected ORDER=r1,r2,... with ORDER in {list(ORDERS)}"
            )
        ratios = [float(v) for v in values.split(",")]
        if len(ratios) not in (len(ORDERS[order]) - 1, len(ORDERS[order])):
            raise SystemExit(f"--order-ratios {item!r}: order {order} has {len(ORDERS[order])} tasks")
        out[order] = ratios
    return out


def method_options(
    method: str, args: Any, num_tasks: int, order: str | None = None, lam: float = 1.0
) -> dict[str, Any]:
    if method in ("packnet", "packnet_task_bn"):
        return {
            "shared_stem": False,
            # the last task is pruned too when --last-ratio > 0 (room for a next task; free weights are
            # zeros that the packed storage does not store); --order-ratios replaces the whole list
            "prune_ratios": order_ratios(args).get(order or "")
            or [args.first_ratio]
            + [args.later_ratio] * (num_tasks - 2)
            + ([args.last_ratio] if args.last_ratio > 0 else []),
            "retrain_epochs": args.retrain_epochs,
            "prune_steps": args.prune_steps,
            "retrain_lr": args.lr * args.retrain_lr_factor,
            "task_specific_bn": method == "packnet_task_bn",
        }
    if method == "lwf":
        return {"shared_stem": False, "warmup_epochs": args.lwf_warmup, "distill_weight": lam}
    if method in ("finetune", "feature_extraction"):
        return {"shared_stem": False}
    return {}


def run_config(
    args: Any,
    backbone: str,
    method: str,
    tasks: list[str],
    out: Path,
    order: str | None = None,
    lam: float = 1.0,
    val_fraction: float = 0.0,
) -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": args.seed,
            "output_dir": str(out),
            "data": {
                "root": args.data_root,
                # 0: train on every training image; LwF's lambda search carves a val split
                "val_fraction": val_fraction,
                "tasks": [task_config(t, args.train_size) for t in tasks],
            },
            "model": {**BACKBONES[backbone], "feature_size": args.feature_size},
            "method": {
                "name": method.split("_task")[0],
                **method_options(method, args, len(tasks), order, lam),
            },
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "optimizer": "sgd",
                "lr": args.lr,
                "momentum": 0.9,
                "weight_decay": 5e-4,
                "schedule": "cosine",
                "eval_every": 0,
                "checkpoint_every": 0,
                # a diverging run (the paper's frozen batch norm from scratch) is recorded, not stopped:
                # its tasks show chance accuracy and metrics.jsonl a "nonfinite" record
                "nonfinite_loss": "warn",
                "threads": args.threads,
                "progress": False,
            },
        }
    )


def search_lwf(
    args: Any,
    backbone: str,
    order: str,
    tasks: list[str],
    ts: TaskSet,
    work: Path,
    lambdas: list[float],
) -> tuple[Path, float, list[dict[str, Any]]]:
    """Train LwF once per lambda on ``ts`` (tasks with val splits); return the run directory and lambda of
    the best mean val accuracy over all tasks after the sequence, and one row per (lambda, task) with its
    val and test accuracy after the last task."""
    found: list[dict[str, Any]] = []
    scores: dict[float, float] = {}
    dirs: dict[float, Path] = {}
    for lam in lambdas:
        out = work / backbone / order / f"lwf_lambda{lam:g}"
        t0 = time.perf_counter()
        cfg = run_config(
            args, backbone, "lwf", tasks, out, order, lam=lam, val_fraction=args.lwf_val_fraction
        )
        api.train(cfg, taskset=ts, log=lambda s: None)
        seconds = time.perf_counter() - t0
        loaded = api.load(out / "model.json")
        val = {r["task"]: r for r in evaluate(loaded.method, loaded.model, ts, split="val", tasks=tasks)}
        test = {r["task"]: r for r in evaluate(loaded.method, loaded.model, ts, split="test", tasks=tasks)}
        scores[lam] = statistics.fmean(val[t]["accuracy"] for t in tasks)
        dirs[lam] = out
        for t in tasks:
            found.append(
                {
                    "method": "lwf_search",
                    "scenario": order,
                    "backbone": backbone,
                    "after_task": tasks[-1],
                    "after_index": len(tasks),
                    "task": t,
                    "level": 1,
                    "distill_weight": lam,
                    "params": api.total_parameters(loaded.model),
                    "flops": flops_of(loaded, t),
                    "val_accuracy": val[t]["accuracy"],
                    "accuracy": test[t]["accuracy"],
                    "error": 100.0 - test[t]["accuracy"],
                    "train_seconds": seconds,
                }
            )
        print(
            f"[{backbone} {order}] lwf lambda {lam:g} ({seconds:.0f}s): mean val {scores[lam]:.2f}; test "
            + ", ".join(f"{t} {test[t]['accuracy']:.2f}" for t in tasks),
            flush=True,
        )
    best = max(lambdas, key=lambda lam: scores[lam])  # the first of equals: the grid's order
    for r in found:
        r["chosen"] = r["distill_weight"] == best
        r["mean_val_accuracy"] = scores[r["distill_weight"]]
    return dirs[best], best, found


def after_each_task(run_dir: Path, taskset: TaskSet) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Accuracy of every task learned so far after each added task (the last phase of each task), and the
    accuracy of each PackNet task right after pruning, before re-training (its own train phase)."""
    rows: list[dict[str, Any]] = []
    pruned: dict[str, float] = {}
    loaded = api.load(run_dir / "model.json")
    phases = loaded.method.phases(taskset.names)
    for i, task in enumerate(taskset.names):
        mine = [p.index for p in phases if p.tasks == [task]]
        last = api.load(run_dir / "checkpoints" / f"phase-{max(mine)}.json")
        acc = evaluate(last.method, last.model, taskset, split="test", tasks=taskset.names[: i + 1])
        for r in acc:
            rows.append({"after_task": task, "after_index": i + 1, "task": r["task"], **_acc(r)})
        if len(mine) > 1:  # PackNet: the train phase's checkpoint holds the pruned, not re-trained net
            first = api.load(run_dir / "checkpoints" / f"phase-{min(mine)}.json")
            pruned[task] = evaluate(first.method, first.model, taskset, split="test", tasks=[task])[0][
                "accuracy"
            ]
    return rows, pruned


def _acc(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "accuracy": r["accuracy"],
        "error": 100.0 - r["accuracy"],
        "correct": r["correct"],
        "total": r["total"],
    }


def flops_of(loaded: api.Loaded, task: str) -> int:
    spec = next(s for s in loaded.specs if s.name == task)
    net = loaded.method.export(loaded.model, task)
    return count_flops(net, (spec.in_channels, spec.input_size, spec.input_size))


def storage_of(method: str, loaded: api.Loaded, work: Path) -> dict[str, Any]:
    model = loaded.model
    if method.startswith("packnet"):
        s = model.storage()
        stem = model.save_ownership(work / "ownership").with_suffix(".safetensors")
        packed = model.save_packed(work / "packed").with_suffix(".safetensors")
        return {
            # what save_packed stores: owned weights only (free ones are zeros the map implies)
            "model_bytes": s["total_packed"],
            "model_bytes_dense": s["total"],
            "packed_file_bytes": packed.stat().st_size,
            "base_weights_owned_bytes": s["base_weights_owned"],
            "base_weights_bytes": s["base_weights"],
            "shared_other_bytes": s["shared_other"],
            "ownership_packed_bytes": s["ownership_packed"],
            "ownership_bits": s["ownership_bits"],
            "ownership_file_bytes": stem.stat().st_size,
            "task_bytes": sum(s["tasks"].values()),
            "prunable_weights": model.ownership.numel(),
            "owned_weights": {
                model.task_names[k - 1] if k else "free": c for k, c in model.ownership.counts().items()
            },
        }
    return {"model_bytes": tensor_bytes(model)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--backbones", default="vgg,resnet")
    p.add_argument("--orders", default="A,B")
    p.add_argument("--methods", default="packnet,packnet_task_bn,lwf,finetune,feature_extraction,individual")
    p.add_argument("--train-size", type=int, default=6000, help="training images per task (digits: all)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per task")
    p.add_argument("--first-ratio", type=float, default=0.5, help="PackNet pruning ratio of the first task")
    p.add_argument("--later-ratio", type=float, default=0.75, help="PackNet pruning ratio of tasks 2..N-1")
    p.add_argument(
        "--last-ratio", type=float, default=0.0, help="PackNet pruning ratio of the last task (0: unpruned)"
    )
    p.add_argument(
        "--widths", default="", help="backbone widths, e.g. 'vgg=0.5,resnet=1.0' (default: BACKBONES)"
    )
    p.add_argument(
        "--order-ratios",
        action="append",
        default=[],
        help="PackNet pruning ratios of one order, e.g. 'A=0.9,0.75,0.75,0.5' (repeatable; else the above)",
    )
    p.add_argument(
        "--prune-steps", type=int, default=1, help="PackNet prune + re-train rounds per task (incremental)"
    )
    p.add_argument("--retrain-epochs", type=int, default=1, help="PackNet re-training epochs after pruning")
    p.add_argument("--retrain-lr-factor", type=float, default=0.1, help="PackNet re-training lr / lr")
    p.add_argument("--lwf-warmup", type=int, default=1, help="LwF epochs training the new head alone")
    p.add_argument(
        "--lwf-lambdas",
        default="1",
        help="LwF's distillation weights; several: one run each on 1 - --lwf-val-fraction of the training "
        "images, the best mean val accuracy over all tasks after the sequence is reported as 'lwf'",
    )
    p.add_argument("--lwf-val-fraction", type=float, default=0.1, help="LwF's search: val split fraction")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--feature-size", type=int, default=14)
    p.add_argument(
        "--merge-from",
        default=None,
        help="results JSON of an earlier run with the same set-up: copy the rows of the methods not run now",
    )
    p.add_argument(
        "--summary-only", action="store_true", help="rewrite the .md and plots from the results JSON"
    )
    args = p.parse_args()
    if args.summary_only:
        stem = (
            Path(args.out)
            if args.out
            else Path(__file__).resolve().parents[1] / "docs/results/packnet_sequence"
        )
        doc = json.loads(stem.with_name(stem.name + ".json").read_text())
        meta = {k: v for k, v in doc.items() if k not in ("rows", "claims")}
        write_report(doc["rows"], stem, meta)  # the plain .md
        rows = [r for r in doc["rows"] if r["task"] != "(all)"]
        storage = [r for r in doc["rows"] if r["task"] == "(all)"]
        write_summary(stem, rows, storage, doc["acceptance"], doc["orders"], args)
        write_claims(stem, claims(doc["rows"]))
        return
    for item in filter(None, args.widths.split(",")):
        name, _, w = item.partition("=")
        BACKBONES[name] = {**BACKBONES[name], "width": float(w)}
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    orders = {k: ORDERS[k] for k in args.orders.split(",")}
    methods = args.methods.split(",")
    all_tasks = list(dict.fromkeys(t for o in orders.values() for t in o))
    data = DataConfig.model_validate(
        {
            "root": args.data_root,
            "val_fraction": 0,  # train on every training image (no default val split)
            "tasks": [task_config(t, args.train_size) for t in all_tasks],
        }
    )
    full = build_taskset(data, args.seed)
    lambdas = [float(v) for v in args.lwf_lambdas.split(",")]
    # LwF's lambda search: the same tasks with a val split carved from each training set (seeded by the
    # run seed), on which lambda is chosen; the chosen run's test rows are the "lwf" rows
    full_val = (
        build_taskset(data.model_copy(update={"val_fraction": args.lwf_val_fraction}), args.seed)
        if "lwf" in methods and len(lambdas) > 1
        else None
    )
    search_rows: list[dict[str, Any]] = []
    lwf_chosen: dict[str, float] = {}
    work = Path(args.work_dir or "runs/bench/packnet_sequence")
    rows: list[dict[str, Any]] = []
    storage_rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for backbone in args.backbones.split(","):
        one_network = None
        individual_acc: dict[str, float] = {}
        if "individual" in methods:
            # one run per task, --epochs epochs over that task's images alone: the same number of steps
            # per task as every sequential method (one joint run of independent networks would cycle a
            # small task such as digits many times per epoch)
            results: dict[str, dict[str, Any]] = {}
            for t in all_tasks:
                out = work / backbone / "individual" / t
                cfg = run_config(args, backbone, "individual", [t], out)
                run = api.train(cfg, taskset=TaskSet([full[t]], t), log=lambda s: None)
                loaded = api.load(out / "model.json")
                (row,) = run.test_rows
                results[t] = {
                    "row": row,
                    "net": loaded.model.nets[t],
                    "flops": flops_of(loaded, t),
                    "seconds_per_epoch": statistics.median(run.summary["epoch_seconds"]),
                }
            sizes = {t: tensor_bytes(results[t]["net"]) for t in all_tasks}
            one_network = sizes[all_tasks[0]]
            individual_acc = {t: results[t]["row"]["accuracy"] for t in all_tasks}
            print(f"[{backbone}] individual: {individual_acc}; one network {one_network:,} bytes", flush=True)
            for order, tasks in orders.items():
                total = sum(sizes[t] for t in tasks)
                for t in tasks:
                    r = results[t]["row"]
                    rows.append(
                        {
                            "method": "individual",
                            "scenario": order,
                            "backbone": backbone,
                            "after_task": t,
                            "after_index": tasks.index(t) + 1,
                            "task": t,
                            "level": 1,
                            **_acc(r),
                            "params": sum(p.numel() for p in results[t]["net"].parameters()),
                            "flops": results[t]["flops"],
                            "model_bytes": sizes[t],
                            "seconds_per_epoch": results[t]["seconds_per_epoch"],
                        }
                    )
                storage_rows.append(
                    {
                        "method": "individual",
                        "scenario": order,
                        "backbone": backbone,
                        "task": "(all)",
                        "level": 1,
                        "accuracy": None,
                        "params": sum(p.numel() for t in tasks for p in results[t]["net"].parameters()),
                        "flops": None,
                        "models": len(tasks),
                        "model_bytes": total,
                        "bytes_vs_one_network": total / one_network,
                    }
                )
        for order, tasks in orders.items():
            ts = TaskSet([full[t] for t in tasks], f"order {order}")
            for method in [m for m in methods if m in SEQUENTIAL]:
                out = work / backbone / order / method
                t0 = time.perf_counter()
                run_ts = ts
                if method == "lwf" and len(lambdas) > 1:
                    run_ts = TaskSet([full_val[t] for t in tasks], f"order {order}")
                    out, chosen, found = search_lwf(args, backbone, order, tasks, run_ts, work, lambdas)
                    search_rows += found
                    lwf_chosen[f"{backbone} {order}"] = chosen
                else:
                    api.train(
                        run_config(args, backbone, method, tasks, out, order, lam=lambdas[0]),
                        taskset=ts,
                        log=lambda s: None,
                    )
                seconds = time.perf_counter() - t0
                seq, pruned = after_each_task(out, run_ts)
                loaded = api.load(out / "model.json")
                store = storage_of(method, loaded, out)
                params = api.total_parameters(loaded.model)
                flops = {t: flops_of(loaded, t) for t in tasks}
                for r in seq:
                    row = {
                        "method": method,
                        "scenario": order,
                        "backbone": backbone,
                        **r,
                        "level": 1,
                        "params": params,
                        "flops": flops[r["task"]],
                        "model_bytes": store["model_bytes"],
                        "train_seconds": seconds,
                    }
                    if r["task"] in individual_acc:
                        row["vs_individual"] = r["accuracy"] - individual_acc[r["task"]]
                    if r["task"] == r["after_task"] and r["task"] in pruned:
                        row["accuracy_pruned_before_retrain"] = pruned[r["task"]]
                    rows.append(row)
                storage_rows.append(
                    {
                        "method": method,
                        "scenario": order,
                        "backbone": backbone,
                        "task": "(all)",
                        "level": 1,
                        "accuracy": None,
                        "params": params,
                        "flops": None,
                        "models": 1,
                        **store,
                        "bytes_vs_one_network": store["model_bytes"] / one_network if one_network else None,
                    }
                )
                final = [r for r in seq if r["after_index"] == len(tasks)]
                print(
                    f"[{backbone} {order}] {method} ({seconds:.0f}s): "
                    + ", ".join(f"{r['task']} {r['accuracy']:.2f}" for r in final),
                    flush=True,
                )
            summary[f"{backbone} {order}"] = tasks
    elapsed = time.perf_counter() - t_start
    merged = merge_rows(args, methods, rows, storage_rows) if args.merge_from else None
    for key, tasks in summary.items():  # on the merged rows: PackNet's rows may come from --merge-from
        backbone, order = key.split(" ")
        summary[key] = acceptance(rows, storage_rows, backbone, order, tasks)
    ind_acc = {(r["backbone"], r["task"]): r["accuracy"] for r in rows if r["method"] == "individual"}
    for r in rows:  # against the (possibly merged) individual networks
        if r["method"] != "individual" and (r["backbone"], r["task"]) in ind_acc:
            r["vs_individual"] = r["accuracy"] - ind_acc[(r["backbone"], r["task"])]
    rows += search_rows
    stem = write_results(
        "packnet_sequence",
        rows + storage_rows,
        args.seed,
        args.out,
        extra={
            **{k: v for k, v in shared_setup(args).items() if k != "seed"},
            "packnet": method_options("packnet", args, 4)
            | {"prune_ratios (3 tasks)": method_options("packnet", args, 3)["prune_ratios"]}
            | {
                f"prune_ratios (order {o})": method_options("packnet", args, len(t), o)["prune_ratios"]
                for o, t in orders.items()
            },
            "packnet_task_bn": "packnet with task_specific_bn: true",
            "acceptance": summary,
            **(
                {
                    "lwf_search": {
                        "lambdas": lambdas,
                        "val_fraction": args.lwf_val_fraction,
                        "selection": "mean val accuracy over all tasks after the sequence (test never "
                        "used); rows with method 'lwf_search' hold every setting's val and test "
                        "accuracy, the chosen one's full sequence is the 'lwf' rows",
                        "chosen": lwf_chosen,
                    }
                }
                if lwf_chosen
                else {"lwf_distill_weight": lambdas[0]}
            ),
            "wall_seconds": round(elapsed, 1),
            **({"merged_from": merged} if merged else {}),
        },
        notes="accuracy: % on the full test split after adding task after_index (after_task); error = 100 - "
        "accuracy. Rows with task '(all)' are storage rows (model_bytes, bytes_vs_one_network).",
    )
    write_summary(stem, rows, storage_rows, summary, orders, args)
    write_claims(stem, claims(rows + storage_rows))  # after write_summary, which rewrites the .md
    print(f"wrote {stem}.json and {stem}.md ({elapsed:.0f}s)")


def shared_setup(args: Any) -> dict[str, Any]:
    """The set-up every method of a run shares (results keys; ``seed`` is written by write_results)."""
    return {
        "orders": {k: ORDERS[k] for k in args.orders.split(",")},
        "backbones": {b: BACKBONES[b] for b in args.backbones.split(",")},
        "feature_size": args.feature_size,
        "train_size_per_task": args.train_size,
        "epochs_per_task": args.epochs,
        "lwf_warmup_epochs": args.lwf_warmup,
        "optimizer": f"SGD, Nesterov momentum 0.9, weight decay 5e-4, lr {args.lr}, cosine per task, "
        f"batch {args.batch_size}",
        "seed": args.seed,
    }


def merge_rows(
    args: Any, methods: list[str], rows: list[dict[str, Any]], storage_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Add the rows of the methods this run skipped from ``--merge-from`` (a results JSON of this
    benchmark with the same data, backbones and schedule: only PackNet's own options may differ, and they
    do not touch the other methods). Exits when the set-ups differ."""
    old = read_mergeable(args.merge_from, shared_setup(args))
    taken = sorted({r["method"] for r in old["rows"]} - set(methods))
    ind = {(r["backbone"], r["task"]): r["accuracy"] for r in rows if r["method"] == "individual"}
    for r in old["rows"]:
        if r["method"] in taken:
            if "vs_individual" in r and (r["backbone"], r["task"]) in ind:  # against this run's networks
                r = {**r, "vs_individual": r["accuracy"] - ind[(r["backbone"], r["task"])]}
            (storage_rows if r["task"] == "(all)" else rows).append(r)
    return {"file": str(args.merge_from), "command": old.get("command"), "methods": taken}


def acceptance(
    rows: list[dict[str, Any]], storage: list[dict[str, Any]], backbone: str, order: str, tasks: list[str]
) -> dict[str, Any]:
    """The issue's targets for each PackNet variant on one (backbone, order)."""
    mine = [r for r in rows if r["backbone"] == backbone and r["scenario"] == order]
    ind = {r["task"]: r["accuracy"] for r in mine if r["method"] == "individual"}
    out: dict[str, Any] = {}
    for method in ("packnet", "packnet_task_bn"):
        pn = {(r["after_task"], r["task"]): r for r in mine if r["method"] == method}
        if not pn:
            continue
        res: dict[str, Any] = {}
        changes = []
        for i, t in enumerate(tasks):
            own = pn[(t, t)]
            for later in tasks[i + 1 :]:
                changes.append(abs(pn[(later, t)]["accuracy"] - own["accuracy"]))
                changes.append(abs(pn[(later, t)]["correct"] - own["correct"]))
        res["max_change_of_prior_tasks_points"] = max(changes) if changes else 0.0
        final = {t: pn[(tasks[-1], t)]["accuracy"] for t in tasks}
        if ind:
            gaps = {t: round(final[t] - ind[t], 2) for t in tasks}
            res["minus_individual_points"] = gaps
            res["within_2_points"] = [t for t, g in gaps.items() if g >= -2.0]
            res["not_within_2_points"] = [t for t, g in gaps.items() if g < -2.0]
        st = next(
            (
                s
                for s in storage
                if s["backbone"] == backbone and s["scenario"] == order and s["method"] == method
            ),
            None,
        )
        if st is not None and st.get("bytes_vs_one_network") is not None:
            res["storage_vs_one_network"] = round(st["bytes_vs_one_network"], 4)
            res["storage_at_most_1.1"] = st["bytes_vs_one_network"] <= 1.1
        out[method] = res
    return out


def claims(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The paper's PackNet claims from the rows, per (backbone, order) and PackNet variant: the earlier
    tasks' accuracy changes by exactly 0.00 after every later task; each task's final accuracy within 2
    points of its individual network; the packed storage at most 1.1x one network. Then the individual
    baselines' floors (issue 15), per backbone."""
    out: list[dict[str, Any]] = []
    seq = [r for r in rows if r["task"] != "(all)"]
    storage = [r for r in rows if r["task"] == "(all)"]
    for backbone, order in dict.fromkeys((r["backbone"], r["scenario"]) for r in seq):
        mine = [r for r in seq if r["backbone"] == backbone and r["scenario"] == order]
        ind = {r["task"]: r["accuracy"] for r in mine if r["method"] == "individual"}
        for method in ("packnet", "packnet_task_bn"):
            pn = {(r["after_task"], r["task"]): r["accuracy"] for r in mine if r["method"] == method}
            if not pn:
                continue
            idx = {
                r["task"]: r["after_index"]
                for r in mine
                if r["method"] == method and r["task"] == r["after_task"]
            }
            tasks = sorted(idx, key=idx.get)
            key = f"packnet_sequence.{backbone}.{order}.{method}"
            name = f"{LABEL[method]}, {backbone}, order {order}"
            changes = [
                abs(pn[(later, t)] - pn[(t, t)])
                for i, t in enumerate(tasks)
                for later in tasks[i + 1 :]
                if (later, t) in pn
            ]
            out.append(
                claim(
                    f"{key}.prior_change",
                    f"{name}: every earlier task's accuracy is exactly unchanged after each later task "
                    "(measured: the largest |change|, test accuracy points)",
                    "==",
                    0.0,
                    max(changes) if changes else None,
                )
            )
            for t in tasks:
                final = pn.get((tasks[-1], t))
                out.append(
                    claim(
                        f"{key}.vs_individual.{t}",
                        f"{name}: {t} after the last task is within 2 points of its individual network "
                        "(measured: PackNet - individual, test accuracy points)",
                        ">=",
                        -2.0,
                        None if final is None or t not in ind else final - ind[t],
                    )
                )
            st = next(
                (
                    s
                    for s in storage
                    if s["backbone"] == backbone and s["scenario"] == order and s["method"] == method
                ),
                None,
            )
            out.append(
                claim(
                    f"{key}.storage",
                    f"{name}: the packed model stores at most 1.1x the bytes of one individual network "
                    "(measured: bytes / one network's bytes)",
                    "<=",
                    1.1,
                    None if st is None else st.get("bytes_vs_one_network"),
                )
            )
    for backbone, order in dict.fromkeys(
        (r["backbone"], r["scenario"]) for r in seq if r["method"] == "lwf_search"
    ):
        found = [
            r
            for r in seq
            if r["method"] == "lwf_search" and (r["backbone"], r["scenario"]) == (backbone, order)
        ]
        mean_val = {r["distill_weight"]: r["mean_val_accuracy"] for r in found}
        chosen = next(r["distill_weight"] for r in found if r["chosen"])
        best = max(mean_val.values())
        out.append(
            text_claim(
                f"packnet_sequence.{backbone}.{order}.lwf.chosen_on_val",
                f"LwF, {backbone}, order {order}: lambda chosen by the mean val accuracy over all tasks "
                f"after the sequence among {sorted(mean_val)} (test never used); measured: the chosen lambda",
                "the lambda of the highest mean val accuracy",
                chosen,
                mean_val[chosen] == best,
            )
        )
    for backbone in dict.fromkeys(r["backbone"] for r in seq):
        ind = {
            ("individual", r["task"]): r["accuracy"]
            for r in seq
            if r["backbone"] == backbone and r["method"] == "individual"
        }
        out += floor_claims(f"packnet_sequence.{backbone}", ind)
    return out


def write_summary(
    stem: Path,
    rows: list[dict[str, Any]],
    storage: list[dict[str, Any]],
    summary: dict[str, Any],
    orders: dict[str, list[str]],
    args: Any,
) -> None:
    """Prepend readable tables (Figure-2-style error matrices, final accuracies, storage) to the .md and
    draw the PackNet and LwF error matrices as PNGs next to it."""
    md = stem.with_name(stem.name + ".md")
    _, meta, table = md.read_text().split("\n\n", 2)  # write_report's layout: title, meta lines, table
    parts = [
        "# PackNet: error of every task after each added task\n\n",
        meta + "\n\nAccuracies and errors are % on the full test splits; `x one network` divides a "
        "model's storage in bytes by one individual network's (stem, trunk, head).\n",
    ]
    for key, acc in summary.items():
        backbone, order = key.split()
        tasks = orders[order]
        mine = [r for r in rows if r["backbone"] == backbone and r["scenario"] == order]
        parts.append(f"\n## {backbone}, order {order}: {' -> '.join(tasks)}\n")
        for method in [m for m in SEQUENTIAL if any(r["method"] == m for r in mine)]:
            cell = {(r["after_task"], r["task"]): r["error"] for r in mine if r["method"] == method}
            matrix = [[cell.get((a, t)) for t in tasks] for a in tasks]
            lines = [
                f"\n{LABEL[method]}: error (%) after adding each task\n",
                "| after adding | " + " | ".join(tasks) + " |",
                "|---|" + "---:|" * len(tasks),
            ]
            for a, row in zip(tasks, matrix, strict=True):
                lines.append(f"| {a} | " + " | ".join("" if v is None else f"{v:.2f}" for v in row) + " |")
            parts.append("\n".join(lines) + "\n")
            if method in ("packnet", "packnet_task_bn", "lwf"):
                png = stem.with_name(f"{stem.name}_{backbone}_{order}_{method}.png")
                plot_error_matrix(
                    matrix,
                    tasks,
                    tasks,
                    png,
                    title=f"{SHORT[method]}, {backbone} {order}: error (%)",
                    xlabel="task",
                    ylabel="after adding",
                )
                parts.append(f"\n![{method} {backbone} {order}]({png.name})\n")
        final = {
            (r["method"], r["task"]): r["accuracy"]
            for r in mine
            if r["after_index"] == len(tasks) or r["method"] == "individual"
        }
        methods = [m for m in [*SEQUENTIAL, "individual"] if any((m, t) in final for t in tasks)]
        lines = [
            "\nAccuracy (%) after the last task\n",
            "| task | " + " | ".join(LABEL[m] for m in methods) + " |",
            "|---|" + "---:|" * len(methods),
        ]
        for t in tasks:
            lines.append(
                f"| {t} | " + " | ".join(f"{final.get((m, t), float('nan')):.2f}" for m in methods) + " |"
            )
        parts.append("\n".join(lines) + "\n")
        found = [r for r in mine if r["method"] == "lwf_search"]
        if found:
            lams = list(dict.fromkeys(r["distill_weight"] for r in found))
            cell = {(r["distill_weight"], r["task"]): r for r in found}
            lines = [
                "\nLwF: lambda chosen on the val split (mean val accuracy over all tasks after the "
                "sequence); test accuracy (%) after the last task\n",
                "| lambda | mean val | " + " | ".join(tasks) + " | chosen |",
                "|---:|---:|" + "---:|" * len(tasks) + "---|",
            ]
            for lam in lams:
                r0 = cell[(lam, tasks[0])]
                lines.append(
                    f"| {lam:g} | {r0['mean_val_accuracy']:.2f} | "
                    + " | ".join(f"{cell[(lam, t)]['accuracy']:.2f}" for t in tasks)
                    + f" | {'**yes**' if r0['chosen'] else ''} |"
                )
            parts.append("\n".join(lines) + "\n")
        st = [s for s in storage if s["backbone"] == backbone and s["scenario"] == order]
        lines = ["\nStorage\n", "| method | # models | bytes | x one network |", "|---|---:|---:|---:|"]
        for s in st:
            ratio = s.get("bytes_vs_one_network")
            lines.append(
                f"| {LABEL[s['method']]} | {s['models']} | {s['model_bytes']:,} | "
                + ("" if ratio is None else f"{ratio:.3f}")
                + " |"
            )
        parts.append("\n".join(lines) + "\n")
        parts.append("\nTargets (PackNet): `" + json.dumps(acc) + "`\n")
    parts.append("\n# All rows\n\n")
    md.write_text("".join(parts) + table)


if __name__ == "__main__":
    main()
