"""LwF's distillation weight (lambda_o) and warm-up chosen on a validation split, never on test (issue 15).

Trains LwF on a domain-incremental permuted-MNIST sequence (configs/permuted_mnist_lwf.yaml's three tasks:
MNIST, then two fixed pixel permutations of it, a head per task) for every lambda of --lambdas, with and
without the warm-up of the new head, and picks the setting with the best mean *validation* accuracy over
all tasks after the whole sequence (val splits: --val-fraction of each task's training subsample). Test
accuracy is reported for every setting but never used to choose. A reference run with the old behaviour
(one set of batch-norm statistics for all tasks, ``task_bn: shared``, lambda 1, joint phase at train.lr)
gives the "before" numbers.

Small by design (one thread, well under 15 minutes): --train-size images per task, --epochs per task,
ResNet-20 at width 0.5.

Run:  OMP_NUM_THREADS=1 python benchmarks/lwf_search.py --threads 1 --data-root ../shared/data
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import claim, parser, text_claim, write_results  # noqa: E402

from virtnet import api  # noqa: E402
from virtnet.train.evaluate import evaluate  # noqa: E402

NAME = "lwf_search"
SCENARIO = "permuted_mnist3"


def run_config(
    args: Any, lam: float, warmup: int, task_bn: str, joint_lr: float | None, old_bn: str = "recorded"
) -> dict[str, Any]:
    def task(name: str, seed: int | None) -> dict[str, Any]:
        t: dict[str, Any] = {
            "name": name,
            "dataset": "mnist",
            "train_size": args.train_size,
            "val_fraction": args.val_fraction,
            "subsample_group": "lwf_search",
        }
        if seed is not None:
            t["transforms"] = [{"kind": "permute_pixels", "seed": seed}]
        return t

    method: dict[str, Any] = {
        "name": "lwf",
        "temperature": 2.0,
        "distill_weight": lam,
        "warmup_epochs": warmup,
        "task_bn": task_bn,
    }
    if task_bn != "shared":
        method["old_bn"] = old_bn
    if joint_lr is not None:
        method["joint_lr"] = joint_lr
    return {
        "seed": args.seed,
        "data": {
            "root": args.data_root or "../shared/data",
            "tasks": [task("mnist", None), task("mnist_perm1", 1), task("mnist_perm2", 2)],
        },
        "model": {"name": "resnet", "depth": 20, "width": 0.5},
        "method": method,
        "train": {
            "epochs": args.epochs,
            "batch_size": 64,
            "optimizer": "sgd",
            "lr": args.lr,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "cosine",
            "threads": args.threads,
            "progress": False,
            "eval_every": 0,
        },
    }


def train_one(
    args: Any,
    label: str,
    lam: float,
    warmup: int,
    task_bn: str,
    joint_lr: float | None,
    old_bn: str = "recorded",
) -> dict:
    work = Path(args.work_dir or "runs/bench/lwf_search")
    t0 = time.perf_counter()
    cfg = run_config(args, lam, warmup, task_bn, joint_lr, old_bn)
    out = work / label
    if args.reuse and (out / "model.json").is_file():  # evaluate a finished run of the same setting again
        method, model, taskset, seconds = _reload(out, cfg)
    else:
        run = api.train(cfg, out_dir=out, log=lambda s: None)
        method, model, taskset = run.method, run.model, run.taskset
        seconds = round(time.perf_counter() - t0, 1)
    acc = {}
    for split in ("val", "test"):
        for r in evaluate(method, model, taskset, split=split, levels="top"):
            acc[(r["task"], split)] = r["accuracy"]
    flops = {r["task"]: r["flops"] for r in cost_rows(method, model)}
    return {
        "label": label,
        "distill_weight": lam,
        "warmup_epochs": warmup,
        "task_bn": task_bn,
        "old_bn": old_bn if task_bn != "shared" else None,
        "joint_lr": joint_lr if joint_lr is not None else args.lr,
        "acc": acc,
        "params": api.total_parameters(model),
        "flops": flops,
        "seconds": seconds,
        "tasks": taskset.names,
    }


def _reload(out: Path, cfg: dict[str, Any]) -> tuple[Any, Any, Any, float]:
    """A finished run's method, model (built as ``cfg`` says), task set and training seconds."""
    from virtnet.config import RunConfig
    from virtnet.data.config import build_taskset
    from virtnet.train.checkpoint import load_checkpoint, load_model_state

    saved = json.loads((out / "config.json").read_text())
    rc = RunConfig.from_dict(cfg)
    if saved["method"] != rc.to_dict()["method"] or saved["data"]["tasks"] != rc.to_dict()["data"]["tasks"]:
        raise SystemExit(f"{out}: --reuse: the run was made with other settings")
    taskset = build_taskset(rc.data, rc.seed)
    ck = load_checkpoint(out / "model.json")
    method, model = api.build(rc, [api.TaskSpec.from_dict(t) for t in ck.meta["tasks"]])
    load_model_state(model, ck.model_state, str(out))
    model.eval()
    taskset = api.normalised_as(taskset, [api.TaskSpec.from_dict(t) for t in ck.meta["tasks"]])
    seconds = sum(
        float(r.get("seconds", 0.0))
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r.get("event") == "eval"
    )
    return method, model, taskset, round(seconds, 1)


def cost_rows(method: Any, model: Any) -> list[dict[str, Any]]:
    """Parameters and FLOPs of every task's network (no timing)."""
    from virtnet.cost import count_flops

    out = []
    for t in model.tasks:
        net = method.export(model, t)
        spec = model.spec(t)
        shape = (spec.in_channels, spec.input_size, spec.input_size)
        out.append({"task": t, "flops": count_flops(net, shape)})
    return out


def mean_val(r: dict) -> float:
    return sum(r["acc"][(t, "val")] for t in r["tasks"]) / len(r["tasks"])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--lambdas", default="0,0.1,0.3,1", help="comma-separated distill weights")
    p.add_argument("--warmups", default="0,1", help="comma-separated warm-up epochs")
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05, help="the first task's learning rate")
    p.add_argument("--joint-lr", type=float, default=0.005, help="a later task's joint-phase learning rate")
    p.add_argument("--task-bn", default="stats", help="task_bn of the searched runs")
    p.add_argument(
        "--extra",
        default="",
        help="more settings, space-separated LAMBDA:WARMUP:TASK_BN:OLD_BN:JOINT_LR (chosen on val too)",
    )
    p.add_argument("--reuse", action="store_true", help="evaluate finished runs in --work-dir again")
    args = p.parse_args()
    lambdas = [float(v) for v in args.lambdas.split(",")]
    warmups = [int(v) for v in args.warmups.split(",")]
    before = train_one(args, "before_shared_bn", 1.0, 1, "shared", args.lr)  # as before issue 15
    grid = [
        train_one(args, f"lambda{lam:g}_warmup{w}", lam, w, args.task_bn, args.joint_lr)
        for w in warmups
        for lam in lambdas
    ]
    for spec in args.extra.split():
        lam, w, tbn, obn, jlr = spec.split(":")
        label = f"lambda{float(lam):g}_warmup{int(w)}_{tbn}_{obn}_jlr{float(jlr):g}"
        grid.append(train_one(args, label, float(lam), int(w), tbn, float(jlr), obn))
    best = max(grid, key=mean_val)  # chosen on validation only
    rows = []
    for r in [before, *grid]:
        for t in r["tasks"]:
            rows.append(
                {
                    "method": "lwf",
                    "scenario": SCENARIO,
                    "setting": r["label"],
                    "task": t,
                    "level": 1,
                    "accuracy": r["acc"][(t, "test")],
                    "val_accuracy": r["acc"][(t, "val")],
                    "mean_val_accuracy": round(mean_val(r), 4),
                    "distill_weight": r["distill_weight"],
                    "warmup_epochs": r["warmup_epochs"],
                    "task_bn": r["task_bn"],
                    "old_bn": r["old_bn"],
                    "joint_lr": r["joint_lr"],
                    "selected": r is best,
                    "params": r["params"],
                    "flops": r["flops"][t],
                    "seconds": r["seconds"],
                }
            )
    first = before["tasks"][0]
    same_warmup = [
        r
        for r in grid
        if (r["warmup_epochs"], r["task_bn"], r["old_bn"], r["joint_lr"])
        == (best["warmup_epochs"], best["task_bn"], best["old_bn"], best["joint_lr"])
    ]
    lam0 = next((r for r in same_warmup if r["distill_weight"] == 0), None)
    claims = [
        text_claim(
            f"{NAME}.chosen_on_val",
            "lambda and warm-up chosen by the mean validation accuracy over all tasks after the sequence "
            "(test accuracy never used); measured: the chosen setting",
            "the setting with the highest mean validation accuracy",
            best["label"],
            True,
        ),
        claim(
            f"{NAME}.first_task_above_chance",
            f"first task ({first}) test accuracy after the sequence with the chosen setting is at least "
            "20 points above chance (10 %) (%, >= 30)",
            ">=",
            30.0,
            best["acc"][(first, "test")],
        ),
        claim(
            f"{NAME}.first_task_gain_over_before",
            f"first task ({first}) test accuracy after the sequence: chosen setting minus the old behaviour "
            "(shared batch-norm statistics, lambda 1, joint phase at train.lr) (points, >= 10)",
            ">=",
            10.0,
            best["acc"][(first, "test")] - before["acc"][(first, "test")],
        ),
    ]
    if lam0 is not None and best is not lam0:
        claims.append(
            claim(
                f"{NAME}.distillation_helps_first_task",
                f"first task ({first}) test accuracy: chosen lambda minus lambda 0 with the same other "
                "settings (points, > 0)",
                ">",
                0.0,
                best["acc"][(first, "test")] - lam0["acc"][(first, "test")],
            )
        )
    total = sum(r["seconds"] for r in [before, *grid])
    notes = (
        f"Size: {args.train_size} MNIST training images per task ({args.val_fraction:g} of them as the val "
        f"split), {args.epochs} epochs per task, ResNet-20 width 0.5, batch 64, SGD momentum 0.9, "
        f"lr {args.lr:g} for the first task and {args.joint_lr:g} for later joint phases (cosine), "
        f"T = 2, {args.threads} thread(s); training {total:.0f} s in all (on a machine shared with other "
        f"jobs). Chosen on val: "
        f"{best['label']}."
    )
    extra = {
        "train_size": args.train_size,
        "val_fraction": args.val_fraction,
        "epochs": args.epochs,
        "lr": args.lr,
        "joint_lr": args.joint_lr,
        "lambdas": lambdas,
        "warmups": warmups,
        "chosen": best["label"],
        "selection": "mean val accuracy over all tasks after the sequence",
    }
    stem = write_results(NAME, rows, args.seed, args.out, extra=extra, notes=notes, claims=claims)
    print(f"chosen on val: {best['label']}; written {stem}")
    for r in [before, *grid]:
        print(
            f"{r['label']:22s} mean val {mean_val(r):6.2f}  "
            + "  ".join(f"{t} {r['acc'][(t, 'test')]:.2f}" for t in r["tasks"])
        )


if __name__ == "__main__":
    main()
