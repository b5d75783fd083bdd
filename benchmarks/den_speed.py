"""Benchmark: does DEN's per-instance structure choice become real speed? (issue 11's speed targets)

A DEN estimator (WRN-16-4 by default, h = 3 levels per block, 32x32x3 inputs; random weights, batch-norm
statistics moved off their defaults: timing does not depend on the weights). A reference structure
``z_ref`` (every block at the middle level) is exported as a plain sliced network; a batch of 64 random
per-instance structures is drawn from the per-block distribution whose expected FLOPs equal ``z_ref``'s
("rand sel"'s matching; of 50 draws, the one whose mean FLOPs is closest to ``z_ref``'s). Timed in
eval mode without autograd, the things compared called in turn, call by call (so that each sees the same
machine state), in ``--rounds`` rounds; latencies are medians, and the claims read the median over
rounds of the per-round median, over turns, of the two times' ratio:

* masked path (every channel computed, inner channels multiplied by the level masks);
* grouped path (block by block, instances grouped by level, sliced weights, skipped blocks not run);
* the plain sliced network of ``z_ref`` (the same FLOPs per instance as the batch's mean, within 2 %);
* batch 1: one instance's chosen structure through the model (``run``: a plain sliced block per block)
  against the same structure exported as a plain network.

Targets: grouped >= 1.8 x faster than masked at batch 64; grouped within 1.3 x of the plain network of the
same FLOPs; at batch 1 the chosen structure within 1.1 x of the plain network of its shape.

Run:  python benchmarks/den_speed.py [--backbone wrn] [--repeats 20] [--rounds 5]   (about 2 minutes)
Smoke: python benchmarks/den_speed.py --smoke --out /tmp/den_speed   (seconds; not a result)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import claim, parser, write_results  # noqa: E402

from virtnet.backbones.base import TaskSpec  # noqa: E402
from virtnet.backbones.registry import BackboneConfig  # noqa: E402
from virtnet.methods import make_method  # noqa: E402
from virtnet.methods.den.report import random_chooser  # noqa: E402


def in_turn(fns: dict, repeats: int) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Call ``fns`` ({name: fn}) in turn, call by call (turn i starts at fn i mod n), after 2 untimed
    calls each: median milliseconds per name, and the median over turns of each pair's time ratio (both
    called in the same turn: the machine's drift cancels)."""
    names = list(fns)
    for _ in range(2):
        for n in names:
            fns[n]()
    ts: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            ts[n].append(1000 * (time.perf_counter() - t0))
    ratio = {
        (a, b): statistics.median(x / y for x, y in zip(ts[a], ts[b], strict=True))
        for a in names
        for b in names
        if a != b
    }
    return {n: statistics.median(v) for n, v in ts.items()}, ratio


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="wrn", choices=["wrn", "resnet", "vgg"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--repeats-b1", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny settings (seconds), to check the script")
    args = p.parse_args()
    if args.smoke:
        args.width, args.repeats, args.repeats_b1, args.rounds, args.batch = 0.25, 2, 3, 1, 16
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bb = {
        "wrn": BackboneConfig(name="wrn", depth=16, widen_factor=4, width=args.width, feature_size=32),
        "resnet": BackboneConfig(name="resnet", depth=20, width=args.width, feature_size=32),
        "vgg": BackboneConfig(name="vgg", depth=16, width=args.width, feature_size=32),
    }[args.backbone]
    spec = TaskSpec("x", 3, 32, 10)
    method = make_method("den", {"levels": args.levels})
    model = method.build([spec], bb)
    model.train()
    with torch.no_grad():  # move the batch-norm statistics (every level seen)
        for _ in range(3):
            z = torch.randint(0, model.num_levels, (32, model.num_blocks))
            model(torch.randn(32, 3, 32, 32), "x", model.instance_route("x", z, masked=True))
    model.eval()

    z_ref = [model.num_levels // 2] * model.num_blocks
    ref_flops = model.structure_cost("x", z_ref)
    plain = method.export_structure(model, "x", z_ref)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    choose = random_chooser(model, {"x": ref_flops}, seed=args.seed)
    draws = [choose(x, "x") for _ in range(50)]  # the draw whose mean FLOPs is closest to z_ref's
    z = min(draws, key=lambda d: abs(float(model.structure_costs("x", d).mean()) - ref_flops))
    batch_flops = float(model.structure_costs("x", z).mean())
    masked_route = model.instance_route("x", z, masked=True)
    grouped_route = model.instance_route("x", z)
    x1 = x[:1]
    z1 = z[:1]
    one_route = model.instance_route("x", z1)
    plain1 = method.export_structure(model, "x", z1[0])

    with torch.no_grad():
        torch.testing.assert_close(
            model(x, "x", masked_route), model(x, "x", grouped_route), rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(model(x1, "x", one_route), plain1(x1), rtol=1e-4, atol=1e-4)
        times: dict[str, list[float]] = {
            k: [] for k in ("masked", "grouped", "plain", "b1_model", "b1_plain")
        }
        ratios: dict[str, list[float]] = {k: [] for k in ("masked/grouped", "grouped/plain", "b1")}
        for _ in range(args.rounds):
            ms64, r64 = in_turn(
                {
                    "masked": lambda: model(x, "x", masked_route),
                    "grouped": lambda: model(x, "x", grouped_route),
                    "plain": lambda: plain(x),
                },
                args.repeats,
            )
            ms1, r1 = in_turn(
                {"b1_model": lambda: model(x1, "x", one_route), "b1_plain": lambda: plain1(x1)},
                args.repeats_b1,
            )
            for k, v in {**ms64, **ms1}.items():
                times[k].append(v)
            ratios["masked/grouped"].append(r64[("masked", "grouped")])
            ratios["grouped/plain"].append(r64[("grouped", "plain")])
            ratios["b1"].append(r1[("b1_model", "b1_plain")])
    ms = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}
    full = model.cost_range("x")[1]
    common = {"scenario": "speed", "task": "x", "accuracy": None, "params": model.estimator_parameters()}
    rows = [
        {
            **common,
            "method": "den-masked",
            "level": f"random z, batch {args.batch}",
            "flops": batch_flops,
            "latency_ms": ms["masked"],
            "computed_flops": full,
        },
        {
            **common,
            "method": "den-grouped",
            "level": f"random z, batch {args.batch}",
            "flops": batch_flops,
            "latency_ms": ms["grouped"],
        },
        {
            **common,
            "method": "plain",
            "level": f"z_ref, batch {args.batch}",
            "flops": ref_flops,
            "latency_ms": ms["plain"],
            "params": sum(p.numel() for p in plain.parameters()),
        },
        {
            **common,
            "method": "den-chosen",
            "level": "z[0], batch 1",
            "flops": model.structure_cost("x", z1[0]),
            "latency_ms": ms["b1_model"],
        },
        {
            **common,
            "method": "plain",
            "level": "z[0], batch 1",
            "flops": model.structure_cost("x", z1[0]),
            "latency_ms": ms["b1_plain"],
            "params": sum(p.numel() for p in plain1.parameters()),
        },
    ]
    claims = [
        claim(
            "den_speed.grouped_over_masked",
            f"masked path time / grouped path time at batch {args.batch} with random per-instance structures",
            ">=",
            1.8,
            ratio["masked/grouped"],
        ),
        claim(
            "den_speed.grouped_over_plain",
            "grouped path time / time of a plain sliced network with the batch's mean FLOPs (within 2 %)",
            "<=",
            1.3,
            ratio["grouped/plain"],
        ),
        claim(
            "den_speed.flops_match",
            "|batch mean FLOPs / plain network FLOPs - 1| (the comparison's premise)",
            "<=",
            0.02,
            abs(batch_flops / ref_flops - 1),
        ),
        claim(
            "den_speed.b1_over_plain",
            "batch 1: the chosen structure through the model / the same structure as a plain network",
            "<=",
            1.1,
            ratio["b1"],
        ),
    ]
    extra = {
        "backbone": f"{args.backbone} width {args.width}",
        "levels": args.levels,
        "batch": args.batch,
        "threads": args.threads,
        "smoke": args.smoke,
        "times_ms": times,
        "ratios_per_round": ratios,
    }
    stem = write_results("den_speed", rows, args.seed, args.out, extra=extra, claims=claims)
    for c in claims:
        print(
            f"{c['id']}: {c['measured']} (target {c['target']['op']} {c['target']['value']}): "
            f"{'met' if c['met'] else 'NOT met'}"
        )
    print(f"wrote {stem}.json")


if __name__ == "__main__":
    main()
