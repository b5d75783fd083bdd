"""Benchmark: the cost of a PackNet training step against a plain fine-tuning step on the same network.

A step is exactly the training loop's body: set the learning rate, ``method.training_step`` (PackNet: the
masked weights through ``functional_call``), ``zero_grad``, ``backward``, ``optimizer.step`` (SGD, Nesterov
momentum 0.9, weight decay 5e-4) and ``method.after_step`` (PackNet: restore the frozen entries). Two
stages are timed: adding the second task (weights of task 1 frozen and masked, batch norm frozen) and
training the first task. Random inputs of the MNIST shape (batch 64, 1x28x28); the cost does not depend on
the values.

Rounds alternate between the two methods (``--steps`` steps of one, then of the other, the order swapped
every round), so both see the same machine load; the per-step time of a round is its wall time over its
steps, and the reported ratio is median(PackNet) / median(fine-tuning) over ``--rounds`` rounds, measured
in one run. The same ratio is also given in process CPU time: on a machine shared with other jobs the
wall time of identical steps varies by 2x or more, the CPU time much less.

Run:  python benchmarks/packnet_speed.py --threads 1
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import claim, parser, write_results  # noqa: E402

from virtnet.backbones.base import TaskSpec  # noqa: E402
from virtnet.backbones.registry import BackboneConfig  # noqa: E402
from virtnet.cost import count_flops  # noqa: E402
from virtnet.data.core import Batch  # noqa: E402
from virtnet.methods import Phase, make_method  # noqa: E402
from virtnet.train import TrainConfig, make_optimizer, set_lr  # noqa: E402

BACKBONES = {
    "vgg": {"name": "vgg", "depth": 11, "width": 0.25},
    "resnet": {"name": "resnet", "depth": 20, "width": 0.5},
}


class Stepper:
    """One method, model, phase and optimizer; ``run(n)`` does n loop-body steps and returns seconds."""

    def __init__(self, method: Any, model: torch.nn.Module, phase: Phase, cfg: TrainConfig) -> None:
        self.method, self.model, self.phase, self.cfg = method, model, phase, cfg
        self.opt = make_optimizer(method.param_groups(model, phase), cfg)
        task = phase.tasks[0]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(cfg.batch_size, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (cfg.batch_size,), generator=g)
        self.batches = {task: Batch(task, x, y, None)}
        model.train()

    def run(self, n: int) -> tuple[float, float]:
        """``n`` steps; returns (wall seconds, process CPU seconds)."""
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            set_lr(self.opt, self.cfg.lr, 1.0)
            out = self.method.training_step(self.model, self.batches, self.phase)
            self.opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            self.opt.step()
            self.method.after_step(self.model, self.phase)
        return time.perf_counter() - t0, time.process_time() - c0


def setup(backbone: BackboneConfig, stage: str, cfg: TrainConfig) -> tuple[Stepper, Stepper]:
    specs = [TaskSpec("a", 1, 28, 10), TaskSpec("b", 1, 28, 10)]
    pn_method = make_method("packnet", {"prune_ratios": [0.5]})
    torch.manual_seed(0)
    pn = pn_method.build(specs, backbone)
    phases = pn_method.phases(["a", "b"])
    pn_method.on_phase_start(pn, phases[0])
    if stage == "task 2":  # task 1 pruned by half; task 2 claims the freed weights
        pn_method.on_phase_end(pn, phases[0])
        phase = phases[2]
        pn_method.on_phase_start(pn, phase)
    else:
        phase = phases[0]
    ft_method = make_method("finetune", {})
    torch.manual_seed(0)
    ft = ft_method.build(specs, backbone)
    ft_phase = ft_method.phases(["a", "b"])[1 if stage == "task 2" else 0]
    return Stepper(pn_method, pn, phase, cfg), Stepper(ft_method, ft, ft_phase, cfg)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--backbones", default="vgg,resnet")
    p.add_argument("--rounds", type=int, default=101)
    p.add_argument("--steps", type=int, default=2, help="steps per method per round")
    p.add_argument("--feature-size", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(batch_size=args.batch_size, lr=0.05, momentum=0.9, weight_decay=5e-4, progress=False)
    rows = []
    for bname in args.backbones.split(","):
        backbone = BackboneConfig(**BACKBONES[bname], feature_size=args.feature_size)
        for stage in ("task 2", "task 1"):
            pn, ft = setup(backbone, stage, cfg)
            pn.run(3), ft.run(3)  # warm-up
            times: dict[str, list[float]] = {"packnet": [], "finetune": []}
            cpu: dict[str, list[float]] = {"packnet": [], "finetune": []}
            for r in range(args.rounds):
                order = [("packnet", pn), ("finetune", ft)]
                for name, s in order if r % 2 == 0 else order[::-1]:
                    wall, proc = s.run(args.steps)
                    times[name].append(wall / args.steps)
                    cpu[name].append(proc / args.steps)
            med = {k: statistics.median(v) for k, v in times.items()}
            cmed = {k: statistics.median(v) for k, v in cpu.items()}
            ratio = med["packnet"] / med["finetune"]
            cratio = cmed["packnet"] / cmed["finetune"]
            task = pn.phase.tasks[0]
            for name, s in (("packnet", pn), ("finetune", ft)):
                net = s.method.export(s.model, task) if name == "packnet" else s.model.task_network(task)
                rows.append(
                    {
                        "method": name,
                        "scenario": f"training step, {stage}",
                        "backbone": bname,
                        "task": task,
                        "level": 1,
                        "accuracy": None,
                        "params": sum(p.numel() for p in s.model.parameters()),
                        "flops": count_flops(net, (1, 28, 28)),
                        "step_ms_median": 1000 * med[name],
                        "step_ms_min": 1000 * min(times[name]),
                        "step_ms_max": 1000 * max(times[name]),
                        "ratio_to_finetune": med[name] / med["finetune"],
                        "cpu_ms_median": 1000 * cmed[name],
                        "cpu_ratio_to_finetune": cmed[name] / cmed["finetune"],
                        "rounds": args.rounds,
                        "steps_per_round": args.steps,
                    }
                )
            print(
                f"{bname} {stage}: packnet {1000 * med['packnet']:.2f} ms, finetune "
                f"{1000 * med['finetune']:.2f} ms per step; ratio {ratio:.3f} (CPU time: {cratio:.3f})",
                flush=True,
            )
    stem = write_results(
        "packnet_speed",
        rows,
        args.seed,
        args.out,
        extra={
            "batch_size": args.batch_size,
            "feature_size": args.feature_size,
            "backbones": {b: BACKBONES[b] for b in args.backbones.split(",")},
            "target": "PackNet step <= 1.1 x fine-tuning step (ratio_to_finetune of the packnet rows)",
        },
        notes="step_ms_*: wall time of one loop-body step (training_step, zero_grad, backward, "
        "optimizer step, after_step), per round of steps_per_round steps; ratio_to_finetune = ratio of the "
        "medians over rounds that alternate between the two methods; cpu_*: the same with the process's "
        "CPU time (one thread: the step's own cost, without the time the shared cores ran other jobs).",
        claims=claims(rows),
    )
    print(f"wrote {stem}.json and {stem}.md")


def claims(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """PackNet's training step at most 1.1x a fine-tuning step, per backbone and stage, in wall-clock time
    (the target) and in process CPU time (robust to other jobs on the shared cores)."""
    out = []
    for r in rows:
        if r["method"] != "packnet":
            continue
        stage = r["scenario"].replace("training step, ", "").replace(" ", "")
        for clock, key in (("wall", "ratio_to_finetune"), ("cpu", "cpu_ratio_to_finetune")):
            out.append(
                claim(
                    f"packnet_speed.{r['backbone']}.{stage}.{clock}",
                    f"{r['backbone']}, {r['scenario']}: a PackNet step costs at most 1.1x a fine-tuning step "
                    f"(measured: median ratio, {'wall-clock' if clock == 'wall' else 'process CPU'} time)",
                    "<=",
                    1.1,
                    r.get(key),
                )
            )
    return out


if __name__ == "__main__":
    main()
