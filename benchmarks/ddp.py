"""Benchmark: the step module's cost in one process, and 2 processes x 1 thread against 1 process x 2 threads.

Both parts train the joint model (ResNet trunk, a stem and a head per task) on MNIST + Fashion-MNIST, one
batch of every task per step.

1. **Step module overhead** (one process): the same model, the same pre-built batches and the same SGD
   step, once calling ``method.training_step(model, batches, phase)`` directly (the old loop's path) and once
   through ``StepModule(model, method)(batches, phase)`` (the loop's path now), on two identical models,
   interleaved step by step (the order alternating), so that a noisy machine's drift hits both alike;
   the result is the ratio of the median per-step times over every round's steps. Target: at most 2 %
   more. (An earlier version timed whole rounds of 30 steps one path after the other: round-to-round
   noise of +-10 % on a shared VM made its median ratio +6.9 % for code that differs by one
   ``nn.Module`` call.)
2. **Data parallel** (the whole loop, ``Trainer.fit``): 1 process with 2 torch threads against 2 gloo
   processes with 1 thread each (``torch.multiprocessing`` on localhost), at the same global batch
   (``--batch-size`` per task), per step (median over rounds). Quoted, no target.

Run on an idle machine (timings of processes that share cores mean nothing):

    python benchmarks/ddp.py [--data-root ../shared/data] [--steps 30] [--rounds 5] [--batch-size 128]
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _common import claim, parser, text_claim, write_results  # noqa: E402

from virtnet import api  # noqa: E402
from virtnet.config import RunConfig  # noqa: E402
from virtnet.cost import count_flops, count_parameters  # noqa: E402
from virtnet.data.config import build_taskset  # noqa: E402
from virtnet.data.loader import MultiTaskLoader  # noqa: E402
from virtnet.methods import Phase  # noqa: E402
from virtnet.train import Trainer  # noqa: E402
from virtnet.train.optim import make_optimizer  # noqa: E402
from virtnet.train.runtime import Runtime  # noqa: E402
from virtnet.train.step import StepModule  # noqa: E402

SCENARIO = "mnist+fashion_mnist"


def run_config(args, threads: int, steps: int) -> RunConfig:
    data = {
        "root": args.data_root,
        "sampling": "all",
        "val_fraction": 0,  # train on every training image (no default val split)
        "tasks": [
            {"name": "mnist", "dataset": "mnist", "test_size": 512},
            {"name": "fashion_mnist", "dataset": "fashion_mnist", "test_size": 512},
        ],
    }
    return RunConfig.from_dict(
        {
            "seed": args.seed,
            "data": data,
            "model": {"name": "resnet", "depth": args.depth},
            "method": {"name": "joint"},
            "train": {
                "epochs": 1,
                "batch_size": args.batch_size,
                "lr": 0.05,
                "max_steps_per_epoch": steps,
                "eval_every": 0,
                "checkpoint_every": 0,
                "progress": False,
                "threads": threads,
                "deterministic": False,
            },
        }
    )


# ---- 1. step module overhead ----------
def interleaved_steps(cfg: RunConfig, taskset, batches: list) -> tuple[list[float], list[float]]:
    """Seconds of every step, training_step called directly and through the step module, interleaved.

    Two identical models (same seed) train on the same batches; step i runs once on each, the order
    alternating from step to step, so a machine's slow drift (another VM, frequency changes) hits both
    paths alike. The first step of each is a warm-up and is not returned."""
    paths = []
    for through_module in (False, True):
        method, model = api.build(cfg, api.task_specs(taskset))
        phase = Phase("joint", taskset.names)
        opt = make_optimizer(method.param_groups(model, phase), cfg.train)
        model.train()
        paths.append((method, model, phase, opt, StepModule(model, method), through_module))
    times: dict[bool, list[float]] = {False: [], True: []}
    for i, b in enumerate(batches):
        for method, model, phase, opt, step, through_module in paths if i % 2 == 0 else paths[::-1]:
            t0 = time.perf_counter()
            out = step(b, phase) if through_module else method.training_step(model, b, phase)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            method.after_step(model, phase)
            if i > 0:
                times[through_module].append(time.perf_counter() - t0)
    return times[False], times[True]


# ---- 2. data parallel ----------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_seconds_per_step(cfg: RunConfig, taskset, runtime: Runtime | None) -> float:
    method, model = api.build(cfg, api.task_specs(taskset))
    tr = Trainer(method, model, taskset, cfg.train, cfg.seed, None, runtime=runtime, log=lambda s: None)
    tr.fit()
    return tr.epoch_seconds[0] / tr.state.global_step


def _worker(rank: int, port: int, args, steps: int, box: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = run_config(args, 1, steps)
        taskset = build_taskset(cfg.data, cfg.seed)
        dist.barrier()
        s = fit_seconds_per_step(cfg, taskset, Runtime.from_env())
        if rank == 0:
            Path(box).write_text(repr(s))
    finally:
        dist.destroy_process_group()


def two_processes(args, steps: int, box: Path) -> float:
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(free_port(), args, steps, str(box)), nprocs=2, join=True)
    return float(box.read_text())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128, help="global batch per task")
    args = p.parse_args()
    if args.batch_size % 2:
        p.error("--batch-size must be even (two processes share it)")
    work = Path(args.work_dir or "runs/bench/ddp")
    work.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    cfg = run_config(args, args.threads, args.steps)
    taskset = build_taskset(cfg.data, cfg.seed)
    loader = MultiTaskLoader(taskset, args.batch_size, args.seed, sampling="all", augment=True)
    it = loader.iterate(0)
    batches = [next(it) for _ in range(args.steps)]
    direct, module = [], []
    for r in range(args.rounds):
        d, m = interleaved_steps(cfg, taskset, batches)
        direct += d
        module += m
        print(
            f"round {r}: training_step {statistics.median(d) * 1e3:.1f} ms/step, "
            f"step module {statistics.median(m) * 1e3:.1f} (medians of {len(d)} interleaved steps)"
        )
    md, mm = statistics.median(direct), statistics.median(module)
    overhead = 100.0 * (mm / md - 1.0)

    one, two = [], []
    for r in range(args.rounds):
        torch.set_num_threads(2)
        one.append(fit_seconds_per_step(run_config(args, 2, args.steps), taskset, Runtime()))
        two.append(two_processes(args, args.steps, work / f"two-{r}.txt"))
        print(f"round {r}: 1 process x 2 threads {one[-1] * 1e3:.1f} ms/step, 2 x 1 {two[-1] * 1e3:.1f}")
    m1, m2 = statistics.median(one), statistics.median(two)

    _, model = api.build(cfg, api.task_specs(taskset))
    common = {
        "scenario": SCENARIO,
        "task": "all",
        "level": "full",
        "accuracy": None,
        "params": count_parameters(model),
        "flops": count_flops(model.task_network("mnist"), (1, 28, 28)),
    }
    rows = [
        {
            "method": "training_step-direct",
            **common,
            "ms_per_step": md * 1e3,
            "ms_per_step_all": [x * 1e3 for x in direct],
        },
        {
            "method": "step-module",
            **common,
            "ms_per_step": mm * 1e3,
            "ms_per_step_all": [x * 1e3 for x in module],
        },
        {
            "method": "loop-1proc-2threads",
            **common,
            "ms_per_step": m1 * 1e3,
            "ms_per_step_all": [x * 1e3 for x in one],
        },
        {
            "method": "loop-2proc-1thread",
            **common,
            "ms_per_step": m2 * 1e3,
            "ms_per_step_all": [x * 1e3 for x in two],
        },
    ]
    claims = [
        claim(
            "ddp.step_module_overhead_pct",
            "one process: per-step time through StepModule over calling method.training_step directly (same "
            "model, batches and optimizer; steps interleaved, ratio of medians), in % (positive: slower)",
            "<=",
            2.0,
            overhead,
        ),
        text_claim(
            "ddp.two_processes_vs_two_threads",
            f"whole loop, global batch {args.batch_size} per task: 2 gloo processes x 1 thread per step over "
            "1 process x 2 threads per step (ratio of medians; below 1: the processes are faster)",
            "quoted (no target)",
            m2 / m1,
            True,
        ),
    ]
    extra = {
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "batch_size_per_task": args.batch_size,
        "step_module_overhead_pct": overhead,
        "two_proc_over_one_proc": m2 / m1,
    }
    stem = write_results("ddp", rows, args.seed, args.out, extra=extra, claims=claims)
    print(f"step module overhead {overhead:+.2f} % (target <= 2 %); 2x1 / 1x2 = {m2 / m1:.3f}")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
