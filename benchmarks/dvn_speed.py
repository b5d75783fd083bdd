"""Benchmark: does a DVN level's smaller size become real speed? (issue 3's speed targets)

A 4-unit DVN on a WRN-16-4 at 32x32x3 (one task, levels 1..4 = 1/4..4/4 of every layer's channels).
For every level it times, at batch 1 and 64, in NCHW and channels_last (the faster is used):
* the exported level (``method.export``: unused units' channels removed from every weight);
* the in-library virtual forward in eval mode (slices gathered once per (task, level) and cached);
* a plain network of the same shape built directly (the backbone at width x l/4).
Targets: the exported level 1 reaches at least 0.95 x the plain network's speed-up over its full size at
batch 64; the virtual forward is within 1.15 x the exported network. Then one joint-learning step of the
DVN (every level's loss, eq. 4) against the summed steps of plain networks of the level sizes (target
<= 1.2 x). Rounds alternate between the things compared; medians over rounds. Weights are random:
timing does not depend on them.

Run:  python benchmarks/dvn_speed.py [--threads 2] [--repeats 10] [--repeats-b1 100] [--latency-rounds 3]
      [--rounds 5]
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
from torch import nn  # noqa: E402

from virtnet.backbones.base import TaskSpec  # noqa: E402
from virtnet.backbones.registry import BackboneConfig, build_multitask  # noqa: E402
from virtnet.cost import count_flops, count_parameters, latency_profile  # noqa: E402
from virtnet.data.core import Batch  # noqa: E402
from virtnet.methods import Phase, make_method  # noqa: E402


class Virtual(nn.Module):
    """The in-library forward of one (task, level), as a module for the latency tools."""

    def __init__(self, model: nn.Module, task: str, route) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.task, self.route)


def best(profile: dict, batch: int) -> float:
    return profile["batches"][batch]["best_ms"]


def train_step_ms(step, rounds: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--widen", type=int, default=4)
    p.add_argument("--units", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement at batch 64")
    p.add_argument("--repeats-b1", type=int, default=100, help="timed calls per measurement at batch 1")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the training-step comparison")
    p.add_argument("--latency-rounds", type=int, default=3, help="interleaved rounds of latency measurement")
    p.add_argument("--train-batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    k = args.units
    cfg = BackboneConfig(name="wrn", depth=args.depth, widen_factor=args.widen, feature_size=32)
    spec = TaskSpec("t", 3, 32, 10)
    shape = (3, 32, 32)
    method = make_method("dvn", {"num_units": k})
    torch.manual_seed(args.seed)
    model = method.build([spec], cfg).eval()
    levels = method.levels(model, "t")

    nets = {}
    for lv in levels:
        exported = method.export(model, "t", lv.index)
        plain = (
            build_multitask(cfg.model_copy(update={"width": lv.index / k}), [spec]).task_network("t").eval()
        )
        assert count_parameters(plain) == count_parameters(exported), "plain and exported shapes differ"
        nets[lv.index] = {
            "dvn-exported": exported,
            "plain-direct": plain,
            "dvn-virtual": Virtual(model, "t", lv.route).eval(),
        }
    # interleaved rounds: every network is measured once per round; medians over rounds per format
    samples: dict[tuple, list[float]] = {}
    for rnd in range(args.latency_rounds):
        for lv in levels:
            for name, net in nets[lv.index].items():
                for b in (1, 64):  # batch 1 calls are sub-millisecond and cheap: time many more
                    reps = args.repeats_b1 if b == 1 else args.repeats
                    pr = latency_profile(net, shape, batch_sizes=(b,), threads=args.threads, repeats=reps)
                    for fmt in ("nchw", "channels_last"):
                        samples.setdefault((name, lv.index, b, fmt), []).append(
                            pr["batches"][b][fmt]["median_ms"]
                        )
        print(f"latency round {rnd + 1}/{args.latency_rounds} done", flush=True)
    prof = {}
    for (name, lvi, b, fmt), xs in samples.items():
        prof.setdefault((name, lvi), {"batches": {1: {}, 64: {}}})["batches"][b][fmt] = {
            "median_ms": statistics.median(xs)
        }
    for pr in prof.values():
        for b in (1, 64):
            d = pr["batches"][b]
            d["best_format"] = min(("nchw", "channels_last"), key=lambda f: d[f]["median_ms"])
            d["best_ms"] = d[d["best_format"]]["median_ms"]
    rows = []
    for lv in levels:
        exported = nets[lv.index]["dvn-exported"]
        for name in nets[lv.index]:
            pr = prof[(name, lv.index)]
            rows.append(
                {
                    "method": name,
                    "scenario": f"wrn-{args.depth}-{args.widen} 32x32x3",
                    "task": "t",
                    "level": lv.index,
                    "accuracy": None,
                    "params": count_parameters(exported),
                    "flops": count_flops(exported, shape),
                    "latency_ms_b1": best(pr, 1),
                    "format_b1": pr["batches"][1]["best_format"],
                    "latency_ms_b64": best(pr, 64),
                    "format_b64": pr["batches"][64]["best_format"],
                    "latency_ms_b64_nchw": pr["batches"][64]["nchw"]["median_ms"],
                    "latency_ms_b64_channels_last": pr["batches"][64]["channels_last"]["median_ms"],
                }
            )
            print(f"level {lv.index} {name}: b1 {best(pr, 1):.2f} ms, b64 {best(pr, 64):.1f} ms", flush=True)
    top = levels[-1].index
    speed = {}
    for name in ("dvn-exported", "plain-direct"):
        for b in (1, 64):
            for lv in levels:
                speed[(name, b, lv.index)] = best(prof[(name, top)], b) / best(prof[(name, lv.index)], b)
    for r in rows:
        if r["method"] in ("dvn-exported", "plain-direct"):
            r["speedup_b1"] = speed[(r["method"], 1, r["level"])]
            r["speedup_b64"] = speed[(r["method"], 64, r["level"])]
        else:
            r["over_exported_b1"] = best(prof[("dvn-virtual", r["level"])], 1) / best(
                prof[("dvn-exported", r["level"])], 1
            )
            r["over_exported_b64"] = best(prof[("dvn-virtual", r["level"])], 64) / best(
                prof[("dvn-exported", r["level"])], 64
            )

    # joint-learning step: all levels of one task (eq. 4) vs plain networks of the level sizes
    x = torch.randn(args.train_batch, *shape)
    y = torch.randint(0, 10, (args.train_batch,))
    batches = {"t": Batch("t", x, y)}
    phase = Phase("joint", ["t"])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    plains = [
        build_multitask(cfg.model_copy(update={"width": lv.index / k}), [spec]).train() for lv in levels
    ]
    popts = [
        torch.optim.SGD(pn.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        for pn in plains
    ]

    def dvn_step() -> None:
        loss = method.training_step(model, batches, phase)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def plain_steps() -> None:
        for pn, po in zip(plains, popts, strict=True):
            loss = F.cross_entropy(pn(x, "t"), y)
            po.zero_grad(set_to_none=True)
            loss.backward()
            po.step()

    dvn_ms, plain_ms = [], []
    for r in range(args.rounds):
        order = (dvn_step, plain_steps) if r % 2 == 0 else (plain_steps, dvn_step)
        for f in order:
            (dvn_ms if f is dvn_step else plain_ms).extend(train_step_ms(f, 1, warmup=1 if r == 0 else 0))
    step_ratio = statistics.median(dvn_ms) / statistics.median(plain_ms)

    l1 = levels[0].index
    exp_ratio = speed[("dvn-exported", 64, l1)] / speed[("plain-direct", 64, l1)]
    virt = max(r["over_exported_b64"] for r in rows if r["method"] == "dvn-virtual")
    virt_b1 = max(r["over_exported_b1"] for r in rows if r["method"] == "dvn-virtual")
    summary = {
        "exported_level1_speedup_b64": speed[("dvn-exported", 64, l1)],
        "plain_level1_speedup_b64": speed[("plain-direct", 64, l1)],
        "exported_over_plain_speedup_b64": exp_ratio,
        "target_exported_over_plain": 0.95,
        "virtual_over_exported_b64_worst": virt,
        "virtual_over_exported_b1_worst": virt_b1,
        "target_virtual_over_exported": 1.15,
        "joint_step_ms_median": statistics.median(dvn_ms),
        "plain_steps_ms_median": statistics.median(plain_ms),
        "joint_step_ratio": step_ratio,
        "target_joint_step_ratio": 1.2,
        "paper_gpu_speedup_at_6.4pct": 5.8,
    }
    stem = write_results(
        "dvn_speed",
        rows,
        args.seed,
        args.out,
        extra={
            "summary": summary,
            "units": k,
            "backbone": f"WRN-{args.depth}-{args.widen}",
            "repeats": args.repeats,
        },
        claims=claims(rows, {"summary": summary}),
    )
    md = [
        "",
        "## Summary",
        "",
        f"- exported level 1 ({levels[0].name}) speed-up over the full network at batch 64: "
        f"{summary['exported_level1_speedup_b64']:.2f}x; a plain network of that shape built directly: "
        f"{summary['plain_level1_speedup_b64']:.2f}x; ratio {exp_ratio:.3f} (target >= 0.95: "
        f"{'met' if exp_ratio >= 0.95 else 'missed'}). The paper reports 5.8x at 6.4 % density on a GPU.",
        f"- in-library virtual forward (eval, cached slices) over the exported network, worst level: "
        f"{virt:.3f}x at batch 64, {virt_b1:.3f}x at batch 1 (target <= 1.15: "
        f"{'met' if max(virt, virt_b1) <= 1.15 else 'missed'})",
        f"- joint-learning step (all {k} levels) {summary['joint_step_ms_median']:.0f} ms vs the summed "
        f"steps of plain networks of the level sizes {summary['plain_steps_ms_median']:.0f} ms: "
        f"ratio {step_ratio:.3f} "
        f"(target <= 1.2: {'met' if step_ratio <= 1.2 else 'missed'})",
    ]
    with open(f"{stem}.md", "a") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def claims(rows: list[dict], meta: dict | None = None) -> list[dict]:
    """The speed targets from the rows (the joint-learning step, which has no row, from the file's
    ``summary``, written by the same run): exported level 1's speed-up over the full network at least 0.95x
    a plain network's of that shape, and at least the paper's 5.8x; the virtual forward within 1.15x the
    exported network at every level; the joint step at most 1.2x the summed plain steps."""
    by = {(r["method"], r["level"]): r for r in rows}
    l1 = min(r["level"] for r in rows)
    exp, plain = by.get(("dvn-exported", l1), {}), by.get(("plain-direct", l1), {})
    e, pl = exp.get("speedup_b64"), plain.get("speedup_b64")
    out = [
        claim(
            "dvn_speed.exported_over_plain_speedup_b64",
            "the exported level 1 reaches at least 0.95x the speed-up over its full size that a plain "
            "network of the same shape reaches, batch 64 (measured: the ratio of the two speed-ups)",
            ">=",
            0.95,
            None if e is None or pl is None else e / pl,
        ),
        claim(
            "dvn_speed.exported_level1_speedup_b64",
            "the exported level 1 runs at least the paper's 5.8x (at 6.4 % density) faster than the full "
            "network at batch 64 (measured: latency(full) / latency(level 1), on this CPU; the paper's GPU)",
            ">=",
            5.8,
            e,
        ),
    ]
    for b in (64, 1):
        vals = [r[f"over_exported_b{b}"] for r in rows if r["method"] == "dvn-virtual"]
        out.append(
            claim(
                f"dvn_speed.virtual_over_exported_b{b}",
                "the in-library virtual forward is within 1.15x the exported network at every level, "
                f"batch {b} (measured: the worst level's latency ratio)",
                "<=",
                1.15,
                max(vals) if vals else None,
            )
        )
    step = ((meta or {}).get("summary") or {}).get("joint_step_ratio")
    out.append(
        claim(
            "dvn_speed.joint_step_ratio",
            "one joint-learning step of every level (eq. 4) costs at most 1.2x the summed steps of plain "
            "networks of the level sizes (measured: ratio of the medians; from the file's summary)",
            "<=",
            1.2,
            step,
        )
    )
    return out


if __name__ == "__main__":
    main()
