"""Benchmark: the speed of adapter networks against the plain backbone (Rebuffi et al., CVPR 2018, Sec. 3.1:
fused adapters add no evaluation cost).

Networks, all ResNet-26 (--width) on 28x28 one-channel inputs with a 10-way head, one domain of a
three-domain adapter model with random adapters (speed does not depend on the values):

* ``plain``: the backbone alone (stem, trunk, head), as pretrained;
* ``parallel fused`` / ``series fused``: the domain's exported network, adapters folded into the kernels;
* ``parallel unfused (fold, cached)``: the in-library eval forward (the default), one convolution with
  ``f + diag_L(alpha)``, the folded kernel of the last domain cached (recomputed when a tensor changes);
  ``(fold, no cache)``: folded at every call; ``(branch)``: a 1x1 convolution beside each 3x3 one;
* ``series unfused (cached)``: the in-library eval forward (the series fusion, cached); ``(no cache)``:
  convolution, adapter batch norm and 1x1 convolution at every call.

Timing: eval mode, inference mode, --threads intra-op threads. Rounds alternate between the networks (each
round times every network in turn, in both memory formats, --repeats calls after --warmup); a network's
latency is the median over all its timed calls, per batch size and format; the ratio to ``plain`` is taken
per format and for each network's faster format against plain's faster format.

Run:  python benchmarks/adapters_speed.py [--width 0.25] [--threads 1] [--rounds 7]
Writes docs/results/adapters_speed.{json,md,csv}.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import Timer, parser, write_results  # noqa: E402
from torch import nn  # noqa: E402

from virtnet.backbones.base import TaskSpec  # noqa: E402
from virtnet.backbones.registry import BackboneConfig, build_multitask  # noqa: E402
from virtnet.cost import FORMATS, count_flops, count_parameters, measure_latency  # noqa: E402
from virtnet.methods import make_method  # noqa: E402
from virtnet.methods.adapters import DomainNetwork  # noqa: E402
from virtnet.nn.adapters import set_fold_cache  # noqa: E402
from virtnet.train.checkpoint import save_checkpoint  # noqa: E402

SHAPE = (1, 28, 28)
DOMAINS = ["a", "b", "c"]


def networks(width: float, work: Path) -> dict[str, nn.Module]:
    """The plain backbone and one domain's adapter networks, fused and unfused."""
    cfg = BackboneConfig(name="resnet26", width=width)
    torch.manual_seed(0)
    plain = build_multitask(cfg, [TaskSpec("a", *SHAPE[:1], SHAPE[1], 10)], shared_stem=True)
    meta = {"config": {"model": cfg.model_dump()}, "tasks": [vars(TaskSpec("a", SHAPE[0], SHAPE[1], 10))]}
    save_checkpoint(work / "universal", plain.state_dict(), meta)
    specs = [TaskSpec(d, SHAPE[0], SHAPE[1], 10) for d in DOMAINS]
    nets: dict[str, nn.Module] = {"plain": plain.task_network("a").eval()}
    variants = (
        ("parallel fused", "parallel", "fold", True),
        ("parallel unfused (fold, cached)", "parallel", "fold", True),
        ("parallel unfused (fold, no cache)", "parallel", "fold", False),
        ("parallel unfused (branch)", "parallel", "branch", False),
        ("series fused", "series", "fold", True),
        ("series unfused (cached)", "series", "fold", True),
        ("series unfused (no cache)", "series", "fold", False),
    )
    for name, kind, impl, cache in variants:
        method = make_method(
            "adapters", {"kind": kind, "parallel_impl": impl, "init_from": str(work / "universal.json")}
        )
        model = method.build(specs, cfg).eval()
        torch.manual_seed(1)  # the same random adapters in every model
        with torch.no_grad():
            for bank in model.banks():
                for d in bank.domains:
                    bank.alphas[d].normal_(0, 0.01)
        set_fold_cache(model, cache)
        nets[name] = (
            method.export(model, "a") if "fused" in name.split() else DomainNetwork(model, "a").eval()
        )
    x = torch.randn(4, *SHAPE)
    with torch.inference_mode():
        for kind in ("parallel", "series"):
            ref = nets[f"{kind} fused"](x)
            for name, net in nets.items():
                if name.startswith(kind):
                    assert torch.allclose(net(x), ref, atol=1e-5), name
    return nets


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    timer = Timer()
    work = Path(args.work_dir or "runs/bench/adapters_speed")
    work.mkdir(parents=True, exist_ok=True)
    nets = networks(args.width, work)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    times: dict[tuple[str, int, str], list[float]] = {}
    names = list(nets)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for b in batches:
            for fmt in FORMATS:
                for n in order:
                    res = measure_latency(
                        nets[n], SHAPE, b, args.threads, fmt, args.warmup, args.repeats, keep_times=True
                    )
                    times.setdefault((n, b, fmt), []).extend(res["times_ms"])
        print(f"round {r + 1}/{args.rounds} ({timer():.0f}s)", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    rows: list[dict[str, Any]] = []
    for n in names:
        row: dict[str, Any] = {
            "method": n,
            "scenario": f"resnet26 width {args.width}, 28x28",
            "task": "a",
            "level": 1,
            "accuracy": None,
            "params": count_parameters(nets[n]),
            "flops": count_flops(nets[n], SHAPE),
        }
        for b in batches:
            best = min(FORMATS, key=lambda f: med[(n, b, f)])
            plain_best = min(FORMATS, key=lambda f: med[("plain", b, f)])
            row[f"latency_ms_b{b}"] = med[(n, b, best)]
            row[f"format_b{b}"] = best
            row[f"ratio_b{b}"] = med[(n, b, best)] / med[("plain", b, plain_best)]
            for f in FORMATS:
                row[f"latency_ms_b{b}_{f}"] = med[(n, b, f)]
                row[f"ratio_b{b}_{f}"] = med[(n, b, f)] / med[("plain", b, f)]
        rows.append(row)
        print(
            f"{n}: "
            + ", ".join(
                f"b{b} {row[f'latency_ms_b{b}']:.3f} ms ({row[f'ratio_b{b}']:.3f}x)" for b in batches
            ),
            flush=True,
        )
    by = {r["method"]: r for r in rows}
    checks = {}
    for b in batches:
        for n in ("parallel fused", "series fused"):
            checks[f"{n} within 5% of plain, batch {b}"] = {
                "holds": by[n][f"ratio_b{b}"] <= 1.05,
                "ratio": by[n][f"ratio_b{b}"],
            }
        for n in [n for n in names if n.startswith("parallel unfused")]:
            checks[f"{n} at most 1.25x plain, batch {b}"] = {
                "holds": by[n][f"ratio_b{b}"] <= 1.25,
                "ratio": by[n][f"ratio_b{b}"],
            }
    for k, v in checks.items():
        print(f"target {k}: {v}", flush=True)
    stem = write_results(
        "adapters_speed",
        rows,
        args.seed,
        args.out,
        extra={
            "width": args.width,
            "threads": args.threads,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "timed_calls_per_cell": args.rounds * args.repeats,
            "targets_met": checks,
            "seconds": timer(),
        },
        notes="latency: median over all timed calls of the alternating rounds; ratio_b{B}: a network's "
        "faster format against plain's faster format; ratio_b{B}_{format}: same format. accuracy is not "
        "measured here (random adapters).",
    )
    print(f"wrote {stem}.json and {stem}.md", flush=True)


if __name__ == "__main__":
    main()
