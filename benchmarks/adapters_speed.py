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

Timing: eval mode, inference mode, --threads intra-op threads (1 by default: the machine is shared, and
two threads contending with other processes are slower and far noisier than one). Rounds alternate between
the networks (each round times every network in turn, in both memory formats, --repeats calls after
--warmup); a network's latency is the median over all its timed calls, per batch size and format, in
wall-clock time (as virtnet.cost.measure_latency) and in the thread's CPU time (which other processes do
not inflate); the ratio to ``plain`` is taken per format and for each network's faster format against
plain's faster format.

Run:  python benchmarks/adapters_speed.py [--width 0.25] [--threads 1] [--rounds 7]
Writes docs/results/adapters_speed.{json,md,csv}.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import Timer, claim, parser, write_results  # noqa: E402
from torch import nn  # noqa: E402

from virtnet.backbones.base import TaskSpec  # noqa: E402
from virtnet.backbones.registry import BackboneConfig, build_multitask  # noqa: E402
from virtnet.cost import FORMATS, count_flops, count_parameters  # noqa: E402
from virtnet.cost.flops import eval_mode, example_input  # noqa: E402
from virtnet.cost.latency import as_memory_format, num_threads  # noqa: E402
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


def time_calls(net: nn.Module, batch: int, fmt: str, threads: int, warmup: int, repeats: int) -> list[tuple]:
    """``repeats`` timed calls of ``net`` in memory format ``fmt``: (wall ms, thread CPU ms) each.

    As :func:`virtnet.cost.measure_latency` (eval mode, inference mode, the format applied to the 4-D
    weights and input, ``threads`` intra-op threads, the module left as it was), and also the thread's
    CPU time, which other processes on a shared machine do not inflate.
    """
    x = example_input(net, SHAPE, batch)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = []
    with num_threads(threads), eval_mode(net), as_memory_format(net, fmt), torch.inference_mode():
        for _ in range(warmup):
            net(x)
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.thread_time()
            net(x)
            out.append(((time.perf_counter() - w0) * 1e3, (time.thread_time() - c0) * 1e3))
    return out


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
    times: dict[tuple[str, int, str], list[tuple]] = {}
    names = list(nets)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for b in batches:
            for fmt in FORMATS:
                for n in order:
                    calls = time_calls(nets[n], b, fmt, args.threads, args.warmup, args.repeats)
                    times.setdefault((n, b, fmt), []).extend(calls)
        print(f"round {r + 1}/{args.rounds} ({timer():.0f}s)", flush=True)

    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
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
            for clock, med, key in (("wall", wall, "latency_ms"), ("cpu", cpu, "cpu_ms")):
                best = min(FORMATS, key=lambda f, med=med: med[(n, b, f)])
                plain_best = min(FORMATS, key=lambda f, med=med: med[("plain", b, f)])
                row[f"{key}_b{b}"] = med[(n, b, best)]
                row[f"ratio_{clock}_b{b}"] = med[(n, b, best)] / med[("plain", b, plain_best)]
                if clock == "wall":
                    row[f"format_b{b}"] = best
                for f in FORMATS:
                    row[f"{key}_b{b}_{f}"] = med[(n, b, f)]
                    row[f"ratio_{clock}_b{b}_{f}"] = med[(n, b, f)] / med[("plain", b, f)]
        rows.append(row)
        print(
            f"{n}: "
            + ", ".join(
                f"b{b} {row[f'latency_ms_b{b}']:.3f} ms ({row[f'ratio_wall_b{b}']:.3f}x wall, "
                f"{row[f'ratio_cpu_b{b}']:.3f}x cpu)"
                for b in batches
            ),
            flush=True,
        )
    by = {r["method"]: r for r in rows}
    checks = {}
    for b in batches:
        for n in names:
            if n == "plain":
                continue
            bound = 1.05 if n.endswith("fused") else 1.25
            what = "within 5% of plain" if bound == 1.05 else "at most 1.25x plain"
            checks[f"{n} {what}, batch {b}"] = {
                "holds_wall": by[n][f"ratio_wall_b{b}"] <= bound,
                "ratio_wall": by[n][f"ratio_wall_b{b}"],
                "holds_cpu": by[n][f"ratio_cpu_b{b}"] <= bound,
                "ratio_cpu": by[n][f"ratio_cpu_b{b}"],
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
        notes="latency_ms: wall-clock median over all timed calls of the alternating rounds, faster memory "
        "format; cpu_ms: the thread's CPU time (robust to other processes on a shared machine); "
        "ratio_{wall|cpu}_b{B}: a network's faster format against plain's faster format; with a format "
        "suffix: same format. accuracy is not measured here (random adapters).",
        claims=claims(rows),
    )
    print(f"wrote {stem}.json and {stem}.md", flush=True)


def claims(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Sec. 3.1's "no evaluation cost" from the rows, per network and batch size, in wall-clock and thread
    CPU time: a fused (exported) adapter network within 5 % of the plain backbone, an unfused in-library
    forward at most 1.25x (the bounds of the benchmark's ``targets_met``)."""
    out = []
    batches = sorted(int(k[len("ratio_wall_b") :]) for k in rows[0] if re.fullmatch(r"ratio_wall_b\d+", k))
    for r in rows:
        n = r["method"]
        if n == "plain":
            continue
        bound = 1.05 if n.endswith("fused") and "unfused" not in n else 1.25
        key = re.sub(r"[^A-Za-z0-9]+", "_", n).strip("_")
        for b in batches:
            for clock in ("wall", "cpu"):
                out.append(
                    claim(
                        f"adapters_speed.{key}.b{b}.{clock}",
                        f"{n} runs at most {bound}x the plain backbone's latency at batch {b} (measured: "
                        f"{'wall-clock' if clock == 'wall' else 'thread CPU'} latency ratio, faster formats)",
                        "<=",
                        bound,
                        r.get(f"ratio_{clock}_b{b}"),
                    )
                )
    return out


if __name__ == "__main__":
    main()
