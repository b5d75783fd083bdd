"""Benchmark: per-step cost of virtnet's shared training loop against a plain hand-written PyTorch loop.

Both loops train the same joint model (ResNet trunk, a stem and a head per task) on the same batches
(MNIST + Fashion-MNIST through the same ``MultiTaskLoader``, one batch of every task per step), with the
same SGD optimizer. The plain loop is forward, summed cross-entropy, zero_grad, backward, step. The
shared loop adds what it always does: the method's hooks, the learning-rate schedule, loss bookkeeping,
logging and the progress bar. Rounds alternate between the two loops; the result is the ratio of the
median per-step times. Target: at most 1.05.

Run:  python benchmarks/train_loop_overhead.py [--data-root ../shared/data] [--steps 40] [--rounds 7]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import claim, parser, write_results  # noqa: E402

from virtnet import api  # noqa: E402
from virtnet.config import RunConfig  # noqa: E402
from virtnet.cost import count_flops, count_parameters  # noqa: E402
from virtnet.data.config import DataConfig, build_taskset  # noqa: E402
from virtnet.data.loader import MultiTaskLoader  # noqa: E402
from virtnet.train import Trainer  # noqa: E402


def plain_steps(model: torch.nn.Module, loader: MultiTaskLoader, steps: int, lr: float) -> float:
    """Seconds per step of a minimal loop."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    it = loader.iterate(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        batches = next(it)
        loss = sum(F.cross_entropy(model(b.x, t), b.y) for t, b in batches.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = {
        "root": args.data_root,
        "sampling": "all",
        "val_fraction": 0,  # train on every training image (no default val split)
        "tasks": [
            {"name": "mnist", "dataset": "mnist", "test_size": 512},
            {"name": "fashion_mnist", "dataset": "fashion_mnist", "test_size": 512},
        ],
    }
    taskset = build_taskset(DataConfig.model_validate(data), args.seed)
    cfg = RunConfig.from_dict(
        {
            "seed": args.seed,
            "data": data,
            "model": {"name": "resnet", "depth": args.depth},
            "method": {"name": "joint"},
            "train": {
                "epochs": 1,
                "batch_size": args.batch_size,
                "lr": 0.05,
                "schedule": "cosine",
                "max_steps_per_epoch": args.steps,
                "eval_every": 0,
                "checkpoint_every": 0,
                "progress": True,
                "threads": args.threads,
                "deterministic": False,
            },
        }
    )
    specs = api.task_specs(taskset)
    loader = MultiTaskLoader(taskset, args.batch_size, args.seed, sampling="all", augment=True)
    plain, shared = [], []
    for r in range(args.rounds):
        # alternate which loop runs first, so warm-up and drift favour neither
        for which in ("plain", "shared") if r % 2 == 0 else ("shared", "plain"):
            method, model = api.build(cfg, specs)
            if which == "plain":
                plain.append(plain_steps(model, loader, args.steps, 0.05))
            else:
                tr = Trainer(
                    method, model, taskset, cfg.train, args.seed, None, sampling="all", log=lambda s: None
                )
                tr.fit()
                shared.append(tr.epoch_seconds[0] / args.steps)
        print(
            f"round {r}: plain {plain[-1] * 1e3:.1f} ms/step, shared loop {shared[-1] * 1e3:.1f} ms/step",
            flush=True,
        )
    mp, ms = statistics.median(plain), statistics.median(shared)
    ratio = ms / mp
    _, model = api.build(cfg, specs)
    net = model.task_network("mnist")
    rows = [
        {
            "method": "plain-loop",
            "scenario": "mnist+fashion_mnist",
            "task": "all",
            "level": "full",
            "accuracy": None,
            "params": count_parameters(model),
            "flops": count_flops(net, (1, 28, 28)),
            "ms_per_step": mp * 1e3,
            "ms_per_step_all": [x * 1e3 for x in plain],
        },
        {
            "method": "virtnet-loop",
            "scenario": "mnist+fashion_mnist",
            "task": "all",
            "level": "full",
            "accuracy": None,
            "params": count_parameters(model),
            "flops": count_flops(net, (1, 28, 28)),
            "ms_per_step": ms * 1e3,
            "ms_per_step_all": [x * 1e3 for x in shared],
            "ratio_to_plain": ratio,
        },
    ]
    stem = write_results(
        "train_loop_overhead",
        rows,
        args.seed,
        args.out,
        extra={
            "steps_per_round": args.steps,
            "rounds": args.rounds,
            "batch_size_per_task": args.batch_size,
            "ratio": ratio,
            "target": 1.05,
            "met": ratio <= 1.05,
        },
        claims=claims(rows),
    )
    print(f"median ms/step: plain {mp * 1e3:.1f}, virtnet {ms * 1e3:.1f}; ratio {ratio:.3f} (target <= 1.05)")
    print(f"wrote {stem}.json and {stem}.md")


def claims(rows: list[dict], meta: dict | None = None) -> list[dict]:
    """The shared loop's step costs at most 1.05x the plain loop's."""
    ratio = next((r.get("ratio_to_plain") for r in rows if r["method"] == "virtnet-loop"), None)
    return [
        claim(
            "train_loop_overhead.ratio",
            "a step of virtnet's training loop costs at most 1.05x a plain hand-written PyTorch step "
            "(measured: ratio of the median per-step times)",
            "<=",
            1.05,
            ratio,
        )
    ]


if __name__ == "__main__":
    main()
