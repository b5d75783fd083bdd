"""Diagnosis: why PackNet with frozen batch norm diverges on the second task of order A (issue 15).

Trains the first two tasks of order A (MNIST -> Fashion-MNIST; MNIST pruned by --ratio, re-trained) with the
benchmark's set-up (SGD, Nesterov 0.9, weight decay 5e-4, lr 0.05 cosine per task, batch 64, a stem per
task) on both backbones, and logs per step of the second task: the loss, the gradient norm of the trained
parameters, the learning rate, the largest trained (freed) trunk weight, and for every shared batch norm the
ratio of the batch's per-channel input variance to the frozen running variance and the largest absolute
output. One JSON line per logged step goes to --log; a summary per run is printed.

Run:  python benchmarks/packnet_bn_divergence.py --threads 1 --train-size 1500 --log /tmp/bn.jsonl
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import parser  # noqa: E402
from torch import nn  # noqa: E402

from virtnet import api  # noqa: E402
from virtnet.config import RunConfig  # noqa: E402
from virtnet.data.config import DataConfig, build_taskset  # noqa: E402
from virtnet.data.core import TaskSet  # noqa: E402
from virtnet.methods.packnet.method import PackNet  # noqa: E402

BACKBONES = {
    "vgg": {"name": "vgg", "depth": 11, "width": 0.5},
    "resnet": {"name": "resnet", "depth": 20, "width": 1.0},
}
TASKS = ["mnist", "fashion_mnist"]


class _Stop(Exception):
    """Raised once the second task's logged steps are done (--stop)."""


class _Probe:
    """Per-step records of the second task, collected through PackNet's step hooks."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.records: list[dict[str, Any]] = []
        self.bn_stats: dict[str, dict[str, float]] = {}
        self.hooks: list[Any] = []
        self.lr: float | None = None
        self.loss: float | None = None

    def attach(self, model: nn.Module) -> None:
        if self.hooks:
            return
        for name in model.bn_modules:
            mod = model.net.get_submodule(name)
            self.hooks.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if mod.training:  # only frozen (eval-mode) batch norms are of interest
                return
            x = inputs[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            var = x.var(dims)
            rv = mod.running_var
            ratio = var / (rv + mod.eps)
            gain = (mod.weight.detach().abs() / (rv + mod.eps).sqrt()) if mod.weight is not None else None
            self.bn_stats[name] = {
                "var_ratio_max": float(ratio.max()),
                "var_ratio_median": float(ratio.median()),
                "running_var_min": float(rv.min()),
                "dead_channels": int((rv < 1e-3).sum()),
                "gain_max": float(gain.max()) if gain is not None else float("nan"),
                "in_abs_max": float(x.abs().max()),
                "out_abs_max": float(out.detach().abs().max()),
            }

        return hook


def run(args: Any, backbone: str, task_bn: bool, taskset: TaskSet) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    probe = _Probe(args.steps)
    orig_step = PackNet.training_step
    orig_after = PackNet.after_step
    orig_opt_step = torch.optim.SGD.step

    def training_step(self: PackNet, model: nn.Module, batches: Any, phase: Any) -> Any:
        out = orig_step(self, model, batches, phase)
        probe.loss = float(out["loss"].detach())
        return out

    def after_step(self: PackNet, model: nn.Module, phase: Any) -> None:
        task = self._task(phase)
        if phase.name == f"task-{TASKS[1]}" and len(probe.records) < probe.steps:
            params = model.trainable_parameters(task)
            grads = [p.grad for p in params if p.grad is not None]
            gnorm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
            v = model.task_number(task)
            wmax = 0.0
            for n, owner in model.ownership.items():
                w = model.net.get_parameter(n).detach()
                own = owner == v
                if bool(own.any()):
                    wmax = max(wmax, float(w[own].abs().max()))
            probe.records.append(
                {
                    "backbone": backbone,
                    "task_specific_bn": task_bn,
                    "step": len(probe.records) + 1,
                    "loss": probe.loss,
                    "grad_norm": gnorm,
                    "lr": probe.lr,
                    "freed_weight_abs_max": wmax,
                    "bn": dict(probe.bn_stats),
                }
            )
        orig_after(self, model, phase)
        if args.stop and len(probe.records) >= probe.steps:
            raise _Stop

    def prepare(self: PackNet, model: nn.Module, phase: Any) -> None:
        orig_start(self, model, phase)
        if phase.name == f"task-{TASKS[1]}":
            probe.attach(model)

    def opt_step(self: torch.optim.Optimizer, *a: Any, **k: Any) -> Any:
        probe.lr = self.param_groups[0]["lr"]
        return orig_opt_step(self, *a, **k)

    orig_start = PackNet.on_phase_start
    PackNet.training_step = training_step  # type: ignore[method-assign]
    PackNet.after_step = after_step  # type: ignore[method-assign]
    PackNet.on_phase_start = prepare  # type: ignore[method-assign]
    torch.optim.SGD.step = opt_step  # type: ignore[method-assign]
    cfg = {
        "seed": args.seed,
        "output_dir": str(
            Path(args.work_dir or "runs/bench/packnet_bn_divergence") / backbone / str(task_bn)
        ),
        "data": {
            "root": args.data_root,
            "val_fraction": 0,  # train on every training image (no default val split)
            "tasks": [{"name": t, "dataset": t, "train_size": args.train_size} for t in TASKS],
        },
        "model": {**BACKBONES[backbone], "feature_size": 14},
        "method": {
            "name": "packnet",
            "shared_stem": False,
            "prune_ratios": [args.ratio],
            "retrain_epochs": args.retrain_epochs,
            "retrain_lr": args.lr * 0.1,
            **({} if task_bn is None else {"task_specific_bn": task_bn}),
        },
        "train": {
            "epochs": args.epochs,
            "batch_size": 64,
            "optimizer": "sgd",
            "lr": args.lr,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "cosine",
            "eval_every": 0,
            "checkpoint_every": 0,
            "nonfinite_loss": "warn",
            "threads": args.threads,
            "progress": False,
        },
    }
    acc: dict[str, float] = {}
    try:
        result = api.train(RunConfig.from_dict(cfg), taskset=taskset, log=lambda s: None)
        acc = {r["task"]: r["accuracy"] for r in result.test_rows}
    except _Stop:
        pass
    finally:
        PackNet.training_step = orig_step  # type: ignore[method-assign]
        PackNet.after_step = orig_after  # type: ignore[method-assign]
        PackNet.on_phase_start = orig_start  # type: ignore[method-assign]
        torch.optim.SGD.step = orig_opt_step  # type: ignore[method-assign]
        for h in probe.hooks:
            h.remove()
    return {"records": probe.records, "accuracy": acc}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--backbones", default="vgg,resnet")
    p.add_argument("--train-size", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--retrain-epochs", type=int, default=1)
    p.add_argument("--ratio", type=float, default=0.9, help="pruning ratio of the first task (MNIST)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=30, help="second-task steps logged")
    p.add_argument("--bn", default="frozen,task", help="batch-norm variants: frozen, task, default")
    p.add_argument("--stop", action="store_true", help="stop each run after the logged steps")
    p.add_argument("--log", default=None, help="JSON lines of every logged step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = DataConfig.model_validate(
        {
            "root": args.data_root,
            "val_fraction": 0,  # train on every training image (no default val split)
            "tasks": [{"name": t, "dataset": t, "train_size": args.train_size} for t in TASKS],
        }
    )
    full = build_taskset(data, args.seed)
    ts = TaskSet([full[t] for t in TASKS], "order A, first two tasks")
    log = open(args.log, "w") if args.log else None  # noqa: SIM115
    variants = {"frozen": False, "task": True, "default": None}
    for backbone in args.backbones.split(","):
        for bn in args.bn.split(","):
            res = run(args, backbone, variants[bn], ts)
            recs = res["records"]
            first_bad = next((r["step"] for r in recs if not math.isfinite(r["loss"])), None)
            print(
                f"[{backbone}, BN {bn}] accuracy {res['accuracy']}; first non-finite loss at step {first_bad}"
            )
            for r in recs[: args.steps]:
                worst = max(r["bn"].items(), key=lambda kv: kv[1]["var_ratio_max"], default=(None, {}))
                print(
                    f"  step {r['step']:3d} loss {r['loss']:.4g} grad {r['grad_norm']:.4g} lr {r['lr']:.4g} "
                    f"|w|max {r['freed_weight_abs_max']:.4g}"
                    + (
                        f" | worst BN {worst[0]}: var/running {worst[1]['var_ratio_max']:.4g} "
                        f"(median {worst[1]['var_ratio_median']:.3g}) min running_var "
                        f"{worst[1]['running_var_min']:.3g} dead {worst[1]['dead_channels']} gain "
                        f"{worst[1]['gain_max']:.4g} |out| {worst[1]['out_abs_max']:.4g}"
                        if worst[0]
                        else ""
                    ),
                    flush=True,
                )
                if log:
                    log.write(json.dumps(r) + "\n")
    if log:
        log.close()


if __name__ == "__main__":
    main()
