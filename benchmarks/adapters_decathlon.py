"""Benchmark: a small decathlon of residual adapters (Rebuffi et al., CVPR 2018, Table 1 and Fig. 4).

A universal ResNet-26 (width 0.25, 28x28 trunk input) is pretrained on the source domain (Fashion-MNIST:
the most varied of the available sets) and adapted to the other domains available in ../shared/data and to
scikit-learn's digits (MNIST, KMNIST-10k, digits; every target's training set subsampled to at most
--train-size images, stratified and seeded; full test splits). Methods, each from the same pretrained
checkpoint:

* ``finetune``: one fine-tuned network per target domain (T networks);
* ``feature_extraction``: the frozen universal network with a new head per domain;
* ``series`` / ``parallel`` adapters (all placements), ``parallel (early|mid|late|half)``, ``parallel SVD``
  (cross-domain compression, K = C/2, gamma_t fine-tuned after the SVD) and ``parallel SVD (half)`` (K =
  C T / (2 (T + 1)), which halves the adapter parameters for T target domains); the same two fine-tuned
  after the SVD at a tenth of the adaptation rate (``lr/10``), gamma_t alone or with each domain's batch
  norms and head (``+BN/head``).

``--merge-from`` copies the methods not run now from an earlier results JSON with the same set-up (source,
targets, data, schedule), e.g. to add a variant without re-training the others.

Every target-domain run trains --epochs epochs (SGD, Nesterov momentum 0.9, cosine schedule, batch 64) at
the learning rate chosen per method on a validation split by benchmarks/adapters_lr_sweep.py
(fine-tuning 0.1, parallel and series adapters 0.3); the adapters' weight decay follows the paper's size
groups (every target here has fewer than 8,000 training images: 0.002).

Reported per method and domain: test accuracy, the decathlon score against fine-tuning's errors (E_max = 2
x fine-tuning's error), parameters of the deployment of every target relative to one network, and per
method the mean. Then the transfer-learning curve on one target (--curve-domain): accuracy against the
fraction of the training subsample used, parallel adapters against fine-tuning (plot).

Run:  python benchmarks/adapters_decathlon.py [--data-root ../shared/data] [--threads 1]
Writes docs/results/adapters_decathlon.{json,md,csv} and docs/results/adapters_transfer.{json,md,csv,png}.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import Timer, claim, floor_claims, parser, read_mergeable, write_results  # noqa: E402

from virtnet import api  # noqa: E402
from virtnet.config import RunConfig  # noqa: E402
from virtnet.cost import count_flops, count_parameters  # noqa: E402
from virtnet.data.config import DataConfig, build_taskset  # noqa: E402
from virtnet.data.core import TaskSet  # noqa: E402
from virtnet.methods.adapters import decathlon_score  # noqa: E402
from virtnet.train import evaluate  # noqa: E402

ADAPTER_METHODS = {
    "series": {"kind": "series"},
    "parallel": {"kind": "parallel"},
    "parallel (early)": {"kind": "parallel", "placement": "early"},
    "parallel (mid)": {"kind": "parallel", "placement": "mid"},
    "parallel (late)": {"kind": "parallel", "placement": "late"},
    "parallel (half)": {"kind": "parallel", "placement": "half"},
    "parallel SVD": {"kind": "parallel", "compression": "svd"},
    # K/C = T / (2 (T + 1)) halves the adapter parameters for T domains: (T C K + C K) / (T C^2) = 1/2
    # (the paper's K = C/2 gives (T + 1) / (2 T): 0.67 for our T = 3, 0.55 for the decathlon's T = 10)
    "parallel SVD (half)": {"kind": "parallel", "compression": "svd", "svd_fraction": "half"},
    # the fine-tuning after the SVD at a tenth of the adaptation rate (the paper gives no rate): gamma_t
    # alone (the paper's choice), or with the domain's batch norms and head (compress_tune: domain; same
    # adapter parameters: BN and head are trainable and counted in every adapter method)
    "parallel SVD lr/10": {"kind": "parallel", "compression": "svd", "compress_lr": "tenth"},
    "parallel SVD (half) lr/10": {
        "kind": "parallel",
        "compression": "svd",
        "svd_fraction": "half",
        "compress_lr": "tenth",
    },
    "parallel SVD +BN/head lr/10": {
        "kind": "parallel",
        "compression": "svd",
        "compress_tune": "domain",
        "compress_lr": "tenth",
    },
    "parallel SVD (half) +BN/head lr/10": {
        "kind": "parallel",
        "compression": "svd",
        "svd_fraction": "half",
        "compress_tune": "domain",
        "compress_lr": "tenth",
    },
}


def train_cfg(args: Any, epochs: int, lr: float) -> dict[str, Any]:
    return {
        "epochs": epochs,
        "batch_size": args.batch_size,
        "optimizer": "sgd",
        "lr": lr,
        "momentum": 0.9,
        "weight_decay": args.weight_decay,
        "schedule": "cosine",
        "eval_every": 0,
        "checkpoint_every": 0,
        "threads": args.threads,
        "progress": False,
    }


def run(
    name: str, work: Path, data: dict, taskset: TaskSet, model: dict, method: dict, train: dict, seed: int
) -> tuple[api.Run, float]:
    t = Timer()
    cfg = {"seed": seed, "output_dir": str(work / name), "data": data, "model": model, "method": method}
    out = api.train({**cfg, "train": train}, taskset=taskset, log=lambda s: None)
    seconds = t()
    accs = ", ".join(f"{r['task']} {r['accuracy']:.2f}%" for r in out.test_rows)
    print(f"  {name}: {accs} ({seconds:.0f}s)", flush=True)
    return out, seconds


def subset(taskset: TaskSet, names: list[str]) -> TaskSet:
    return TaskSet([taskset[n] for n in names], "+".join(names))


def flops_of(method: Any, model: torch.nn.Module, task: str, shape: tuple[int, ...]) -> int:
    return count_flops(method.export(model, task), shape)


def source_args(p: Any) -> None:
    """The options shared with adapters_lr_sweep.py (data, universal network, schedule)."""
    p.set_defaults(threads=1)
    p.add_argument("--source", default="fashion_mnist")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--source-train-size", type=int, default=20000)
    p.add_argument(
        "--train-size", type=int, default=5000, help="at most this many training images per target"
    )
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--source-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=4, help="epochs of every target-domain phase")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr-source", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="of the source and the baselines")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    source_args(p)
    p.add_argument("--targets", default="mnist,kmnist10k,digits")
    p.add_argument("--lr-finetune", type=float, default=0.1, help="(docs/results/adapters_lr_sweep.md)")
    p.add_argument("--lr-adapters", type=float, default=0.3, help="parallel adapters, feature extraction")
    p.add_argument("--lr-series", type=float, default=0.3, help="series adapters")
    p.add_argument(
        "--adapter-weight-decay",
        default="by_size",
        help="weight decay of the adapters' domain parameters: by_size (the paper's groups) or a number",
    )
    p.add_argument("--methods", default="finetune,feature_extraction," + ",".join(ADAPTER_METHODS))
    p.add_argument("--curve-domain", default="kmnist10k")
    p.add_argument("--fractions", default="0.01,0.05,0.2,1.0")
    p.add_argument("--max-curve-epochs", type=int, default=100)
    p.add_argument(
        "--merge-from",
        default=None,
        help="results JSON of an earlier run with the same set-up: copy the methods not run now",
    )
    p.add_argument(
        "--reuse-source",
        action="store_true",
        help="reuse runs/.../source when it was trained with the same config (saves the pretraining)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    total = Timer()
    work = Path(args.work_dir or "runs/bench/adapters_decathlon")
    targets = args.targets.split(",")
    methods = args.methods.split(",")
    root = args.data_root

    def task(name: str, size: int | None) -> dict[str, Any]:
        t: dict[str, Any] = {"name": name, "dataset": name, "val_fraction": args.val_fraction}
        if size is not None and name != "digits":  # digits: all 1,437 training images
            t["train_size"] = size
        return t

    # ---- data ------------------------------------------------------------------------------------
    source_data = {"root": root, "tasks": [task(args.source, args.source_train_size)]}
    target_data = {"root": root, "tasks": [task(t, args.train_size) for t in targets]}
    source_set = build_taskset(DataConfig.model_validate(source_data), args.seed)
    target_set = build_taskset(DataConfig.model_validate(target_data), args.seed)
    info = {d["task"]: d for d in source_set.describe() + target_set.describe()}
    shapes = {t.name: tuple(t.input_shape) for t in list(source_set) + list(target_set)}
    # every network runs its trunk at the source's resolution (digits' 8x8 images are upsampled by the
    # stem, as the adapters' input layer does), so the baselines and the adapters see the same trunk input
    model_cfg = {"name": "resnet26", "width": args.width, "feature_size": shapes[args.source][-1]}
    print(f"data: {json.dumps(info)}", flush=True)

    # ---- the universal network ---------------------------------------------------------------------
    src_method = {"name": "joint", "shared_stem": True}
    src_train = train_cfg(args, args.source_epochs, args.lr_source)
    previous = work / "source" / "model.json"
    if args.reuse_source and previous.is_file():
        # the same config and seed give the same network: reuse it (checked against the stored config)
        loaded = api.load(previous)
        want = RunConfig.from_dict(
            {
                "seed": args.seed,
                "output_dir": str(work / "source"),
                "data": source_data,
                "model": model_cfg,
                "method": src_method,
                "train": src_train,
            }
        ).to_dict()
        if RunConfig.from_dict(loaded.meta["config"]).to_dict() != want:  # (options added since: defaults)
            raise SystemExit(f"{previous}: trained with another config; drop --reuse-source")
        print(f"reusing the universal network in {previous}", flush=True)
        src_run = SimpleNamespace(
            out_dir=previous.parent,
            model=loaded.model,
            method=loaded.method,
            test_rows=evaluate(loaded.method, loaded.model, source_set, split="test"),
        )
        src_seconds = float("nan")
    else:
        print(f"pretraining the universal network on {args.source}", flush=True)
        src_run, src_seconds = run(
            "source", work, source_data, source_set, model_cfg, src_method, src_train, args.seed
        )
    source_ckpt = str(src_run.out_dir / "model.json")
    one_network = count_parameters(src_run.model)  # stem + trunk + one head
    universal = one_network - count_parameters(src_run.model.heads[args.source])

    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}
    acc: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    scenario = f"{args.source}->" + "+".join(targets)
    rows.append(
        {
            "method": "universal (pretrained)",
            "scenario": scenario,
            "task": args.source,
            "level": 1,
            "accuracy": src_run.test_rows[0]["accuracy"],
            "params": one_network,
            "flops": count_flops(src_run.method.export(src_run.model, args.source), shapes[args.source]),
            "seconds": src_seconds,
            "epochs": args.source_epochs,
        }
    )

    def add(method: str, per_domain: dict[str, dict[str, Any]], total_params: int, secs: float) -> None:
        acc[method] = {t: per_domain[t]["accuracy"] for t in targets}
        seconds[method] = secs
        summary[method] = {"total_params": total_params, "relative_params": total_params / one_network}
        for t in targets:
            rows.append({"method": method, "scenario": scenario, "task": t, "level": 1, **per_domain[t]})

    adapter_wd = adapter_wd_of(args)
    merged = None
    if args.merge_from:
        merged = merge_methods(args.merge_from, methods, setup(args, targets, info, adapter_wd))
        for m, (per, total_params, secs, adapter_params) in merged["methods"].items():
            add(m, per, total_params, secs)
            if adapter_params is not None:
                summary[m]["adapter_params"] = adapter_params

    # ---- baselines: T fine-tuned networks, feature extraction ----------------------------------------
    for base in ("finetune", "feature_extraction"):
        if base not in methods:
            continue
        print(base, flush=True)
        per: dict[str, dict[str, Any]] = {}
        total_params, secs = 0, 0.0
        for t in targets:
            data = {"root": root, "tasks": [task(t, args.train_size)]}
            lr = args.lr_finetune if base == "finetune" else args.lr_adapters
            r, s = run(
                f"{base}-{t}",
                work,
                data,
                subset(target_set, [t]),
                model_cfg,
                {"name": base, "init_from": source_ckpt},
                train_cfg(args, args.epochs, lr),
                args.seed,
            )
            secs += s
            net = r.method.export(r.model, t)
            n = count_parameters(net)
            specific = n if base == "finetune" else count_parameters(r.model.heads[t])
            total_params += specific
            per[t] = {
                "accuracy": r.test_rows[0]["accuracy"],
                "params": n,
                "domain_params": specific,
                "flops": count_flops(net, shapes[t]),
            }
        if base == "feature_extraction":
            total_params += universal
        add(base, per, total_params, secs)

    # ---- adapters ----------------------------------------------------------------------------------
    for name, options in ADAPTER_METHODS.items():
        if name not in methods:
            continue
        print(name, flush=True)
        if options.get("svd_fraction") == "half":
            options = {**options, "svd_fraction": len(targets) / (2 * (len(targets) + 1))}
        if options.get("compress_lr") == "tenth":
            options = {**options, "compress_lr": args.lr_adapters / 10}
        r, s = run(
            re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_"),  # the run's folder
            work,
            target_data,
            target_set,
            model_cfg,
            {"name": "adapters", "init_from": source_ckpt, "weight_decay": adapter_wd, **options},
            train_cfg(args, args.epochs, args.lr_series if options["kind"] == "series" else args.lr_adapters),
            args.seed,
        )
        counts = r.model.parameter_counts()
        per = {}
        for row in r.test_rows:
            t = row["task"]
            net = r.method.export(r.model, t)
            per[t] = {
                "accuracy": row["accuracy"],
                "params": count_parameters(net),
                "domain_params": counts["per_domain"][t],
                "flops": count_flops(net, shapes[t]),
                "adapted_layers": len(r.model.adapted),
            }
        add(name, per, counts["total"], s)
        summary[name]["adapter_params"] = sum(
            b.domain_count(t) for b in r.model.banks() for t in b.domains
        ) + sum(b.shared_count() for b in r.model.banks())

    # ---- scores ------------------------------------------------------------------------------------
    baseline = {t: 100.0 - acc["finetune"][t] for t in targets} if "finetune" in acc else None
    for r in rows:
        if baseline and r["task"] in baseline:
            r["error"] = 100.0 - r["accuracy"]
            r["score"] = decathlon_score({r["task"]: r["error"]}, baseline).per_domain[r["task"]]
    for m in acc:
        mean = statistics.fmean(acc[m].values())
        score = decathlon_score({t: 100 - a for t, a in acc[m].items()}, baseline).total if baseline else None
        summary[m].update(mean_accuracy=mean, score=score, seconds=seconds[m])
        rows.append(
            {
                "method": m,
                "scenario": scenario,
                "task": "mean",
                "level": 1,
                "accuracy": mean,
                "params": summary[m]["total_params"],
                "flops": None,
                "relative_params": summary[m]["relative_params"],
                "score": score,
                "seconds": seconds[m],
            }
        )
        print(
            f"{m}: mean {mean:.2f}%, score {score if score is None else round(score)}, "
            f"{summary[m]['relative_params']:.2f}x one network",
            flush=True,
        )

    checks = targets_met(summary, acc)
    for k, v in checks.items():
        print(f"target {k}: {v}", flush=True)
    found = claims(rows, {"summary": summary})
    stem = write_results(
        "adapters_decathlon",
        rows,
        args.seed,
        args.out,
        extra={
            **setup(args, targets, info, adapter_wd),
            **({"merged_from": {**merged, "methods": sorted(merged["methods"])}} if merged else {}),
            "one_network_params": one_network,
            "summary": summary,
            "score_baseline_errors": baseline,
            "targets_met": checks,
            "seconds_total_decathlon": total(),
        },
        notes="params: the domain's deployed (fused) network; domain_params: what the domain adds to the "
        "universal network; the 'mean' rows give every target's deployment in total (params) and relative "
        "to one network (relative_params). score: decathlon score against fine-tuning's errors.",
        claims=found,
    )
    print(f"wrote {stem}.json and {stem}.md", flush=True)

    if args.curve_domain and "parallel" in methods and "finetune" in methods:
        specific = {(r["method"], r["task"]): r["domain_params"] for r in rows if "domain_params" in r}
        curve(args, work, root, source_ckpt, model_cfg, acc, specific, task)
    print(f"total {total():.0f}s", flush=True)


def adapter_wd_of(args: Any) -> str | float:
    awd = args.adapter_weight_decay
    return awd if awd == "by_size" else float(awd)


def setup(args: Any, targets: list[str], info: dict[str, Any], adapter_wd: str | float) -> dict[str, Any]:
    """What a run's results depend on besides the methods (what --merge-from compares)."""
    return {
        "source": args.source,
        "targets": targets,
        "backbone": f"resnet26 width {args.width}",
        "data": info,
        "train": {
            "source_epochs": args.source_epochs,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr_source": args.lr_source,
            "lr_finetune": args.lr_finetune,
            "lr_adapters": args.lr_adapters,
            "lr_series": args.lr_series,
            "weight_decay_baselines": args.weight_decay,
            "weight_decay_adapters": adapter_wd,
            "threads": args.threads,
        },
    }


def merge_methods(path: str, methods: list[str], want: dict[str, Any]) -> dict[str, Any]:
    """The per-domain rows and summary of the methods of ``path`` (a results JSON of this benchmark with
    the same set-up) that this run does not train. Exits when the set-ups differ."""
    old = read_mergeable(path, want)
    out: dict[str, Any] = {}
    for m, s in old["summary"].items():
        if m in methods:
            continue
        keep = ("accuracy", "params", "domain_params", "flops", "adapted_layers")
        per = {
            r["task"]: {k: r[k] for k in keep if k in r}
            for r in old["rows"]
            if r["method"] == m and r["task"] in want["targets"]
        }
        out[m] = (per, s["total_params"], s["seconds"], s.get("adapter_params"))
    return {"file": path, "command": old.get("command"), "methods": out}


def targets_met(summary: dict[str, dict[str, Any]], acc: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The issue's targets, each with the measured figures."""
    out: dict[str, Any] = {}
    s = {m: v["mean_accuracy"] for m, v in summary.items()}
    if "parallel" in s and "series" in s:
        out["parallel >= series (mean)"] = {
            "holds": s["parallel"] >= s["series"],
            "parallel": s["parallel"],
            "series": s["series"],
        }
    for svd in [m for m in ADAPTER_METHODS if m.startswith("parallel SVD")]:
        if "parallel" in s and svd in s:
            ratio = summary[svd]["adapter_params"] / summary["parallel"]["adapter_params"]
            out[f"{svd} within 0.5 points of parallel"] = {
                "holds": s[svd] >= s["parallel"] - 0.5,
                "difference": s[svd] - s["parallel"],
                "adapter_params_ratio": ratio,
            }
    if "finetune" in s:
        for m in ("parallel", "series"):
            if m in s:
                out[f"{m} within 1 point of fine-tuning, <= 2x params"] = {
                    "holds": s[m] >= s["finetune"] - 1.0 and summary[m]["relative_params"] <= 2.0,
                    "difference": s[m] - s["finetune"],
                    "relative_params": summary[m]["relative_params"],
                }
    return out


#: "about half the adapter parameters": at most this fraction of the parallel adapters'
HALF = 0.55


def claims(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The paper's claims from the 'mean' rows (mean test accuracy over the target domains, parameters of
    every target's deployment relative to one network): parallel >= series; parallel and series within 1
    point of fine-tuning with at most 2x one network's parameters; each parallel SVD variant within 0.5
    points of parallel with about half (at most HALF) its adapter parameters (the adapter counts, which
    have no row, from the file's ``summary``); the fine-tuning baselines' and the universal network's
    floors (issue 15)."""
    mean = {r["method"]: r for r in rows if r["task"] == "mean"}
    summary = (meta or {}).get("summary") or {}

    def acc(m: str) -> float | None:
        return mean[m]["accuracy"] if m in mean else None

    def diff(a: str, b: str) -> float | None:
        return None if acc(a) is None or acc(b) is None else acc(a) - acc(b)

    out = [
        claim(
            "adapters.parallel_vs_series",
            "parallel adapters are at least as accurate as series adapters on average (measured: mean test "
            "accuracy, parallel - series, points)",
            ">=",
            0.0,
            diff("parallel", "series"),
        )
    ]
    for m in ("parallel", "series"):
        out.append(
            claim(
                f"adapters.{m}_vs_finetune",
                f"{m} adapters are within 1 point of fine-tuning on average (measured: mean test accuracy, "
                f"{m} - fine-tuning, points)",
                ">=",
                -1.0,
                diff(m, "finetune"),
            )
        )
        out.append(
            claim(
                f"adapters.{m}_params",
                f"{m} adapters for every target take at most 2x one network's parameters (measured: "
                "parameters of all targets' deployment / one network)",
                "<=",
                2.0,
                mean[m].get("relative_params") if m in mean else None,
            )
        )
    base = (summary.get("parallel") or {}).get("adapter_params")
    for m in [m for m in mean if m.startswith("parallel SVD")]:
        key = re.sub(r"[^A-Za-z0-9]+", "_", m[len("parallel ") :]).strip("_").lower()
        out.append(
            claim(
                f"adapters.{key}_vs_parallel",
                f"{m} is within 0.5 points of parallel adapters on average (measured: mean test accuracy, "
                "SVD - parallel, points)",
                ">=",
                -0.5,
                diff(m, "parallel"),
            )
        )
        own = (summary.get(m) or {}).get("adapter_params")
        out.append(
            claim(
                f"adapters.{key}_adapter_params",
                f"{m} keeps about half the parallel adapters' parameters (measured: its adapter parameters / "
                f"parallel's, from the file's summary; target <= {HALF})",
                "<=",
                HALF,
                None if own is None or not base else own / base,
            )
        )
    baselines = {
        (r["method"], r["task"]): r["accuracy"]
        for r in rows
        if r["method"] in ("finetune", "universal (pretrained)") and r["task"] != "mean"
    }
    return out + floor_claims("adapters", {(m.split()[0], t): a for (m, t), a in baselines.items()})


def transfer_claims(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The transfer-learning curve (the paper's Fig. 4): parallel adapters at least as accurate as
    fine-tuning at every fraction of the training data below the whole."""
    acc = {(r["method"], r["fraction"]): r["accuracy"] for r in rows}
    out = []
    for f in sorted({fr for (_, fr) in acc if fr < 1.0}):
        a, b = acc.get(("parallel", f)), acc.get(("finetune", f))
        out.append(
            claim(
                f"adapters_transfer.parallel_vs_finetune.{100 * f:g}pct",
                f"with {100 * f:g} % of the training subsample, parallel adapters are at least as accurate "
                "as fine-tuning (measured: parallel - fine-tuning, test accuracy points)",
                ">=",
                0.0,
                None if a is None or b is None else a - b,
            )
        )
    return out


def curve(
    args: Any, work: Path, root: Any, source_ckpt: str, model_cfg: dict, acc: dict, specific: dict, task: Any
) -> None:
    """Accuracy against the fraction of the training subsample, parallel adapters and fine-tuning."""
    dom = args.curve_domain
    print(f"transfer-learning curve on {dom}", flush=True)
    rows: list[dict[str, Any]] = []
    steps_full = math.ceil(args.train_size * (1 - args.val_fraction) / args.batch_size)
    for frac in (float(f) for f in args.fractions.split(",")):
        size = max(10, int(round(frac * args.train_size)))
        for m, method, lr in (
            ("finetune", {"name": "finetune"}, args.lr_finetune),
            ("parallel", {"name": "adapters", "kind": "parallel"}, args.lr_adapters),
        ):
            if frac >= 1.0 and m in acc:  # the decathlon run itself
                accuracy, epochs, secs, params = acc[m][dom], args.epochs, None, specific[(m, dom)]
            else:
                data = {"root": root, "tasks": [{**task(dom, size), "name": dom}]}
                taskset = build_taskset(DataConfig.model_validate(data), args.seed)
                steps = math.ceil(len(taskset[dom].train) / args.batch_size)
                # about as many optimizer steps as the full run, at most max-curve-epochs epochs
                epochs = min(args.max_curve_epochs, max(args.epochs, round(args.epochs * steps_full / steps)))
                r, secs = run(
                    f"curve-{m}-{frac}",
                    work,
                    data,
                    taskset,
                    model_cfg,
                    {**method, "init_from": source_ckpt},
                    train_cfg(args, epochs, lr),
                    args.seed,
                )
                accuracy = r.test_rows[0]["accuracy"]
                model = r.model
                params = (
                    count_parameters(model)
                    if m == "finetune"
                    else model.parameter_counts()["per_domain"][dom]
                )
            rows.append(
                {
                    "method": m,
                    "scenario": f"{args.source}->{dom}",
                    "task": dom,
                    "level": 1,
                    "fraction": frac,
                    "train_images": size,
                    "accuracy": accuracy,
                    "params": params,
                    "flops": None,
                    "epochs": epochs,
                    "seconds": secs,
                }
            )
            print(f"  {m} at {frac:g}: {accuracy:.2f}%", flush=True)
    stem = write_results(
        "adapters_transfer",
        rows,
        args.seed,
        (str(Path(args.out).parent / "adapters_transfer") if args.out else None),
        extra={"domain": dom, "source": args.source, "backbone": f"resnet26 width {args.width}"},
        notes="fraction of the --train-size training subsample (stratified, seeded); params: what the domain "
        "adds (fine-tuning: a whole network); the 100% points are the decathlon runs.",
        claims=transfer_claims(rows),
    )
    plot_curve(Path(f"{stem}.json"), Path(f"{stem}.png"))
    print(f"wrote {stem}.json, .md and .png", flush=True)


def plot_curve(results: Path, png: Path) -> None:
    """Draw the transfer-learning curve from its results JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m, label in (("parallel", "parallel adapters"), ("finetune", "fine-tuning")):
        pts = sorted((r["fraction"], r["accuracy"]) for r in data["rows"] if r["method"] == m)
        ax.plot([100 * f for f, _ in pts], [a for _, a in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training data used (% of the subsample, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"transfer from {data['source']} to {data['domain']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
