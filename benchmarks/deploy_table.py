"""Benchmark: deployed networks (issue 13) — Table-2-style rows of exported DVN levels, PackNet, fused
adapters, DEN structures and deployables, and branching task paths, in eager PyTorch and onnxruntime,
beside plain networks of the same shape; the multi-task runtime's level switch and resident memory.

Models: built through the public API on synthetic 32x32x3 tasks (one training step per phase, so that
sequential methods have added their tasks and PackNet has pruned): **the weights are essentially random**
— latency does not depend on the weights' values, and no accuracy is reported. Backbone WRN-16-4
(``--depth``, ``--widen``); DVN with 4 units (levels 1..4 = 1/4..4/4 of every layer's channels, level 1
about 1/16 of the FLOPs), PackNet (its last task's export: dense, masked), series adapters (the last
domain's export: adapters fused into the kernels), DEN (default 3 levels per block: two structures
exported as sliced networks — every block at its middle level, and every block full — and the deployable
of each budget level: selector, budgeted decoding and the grouped estimator, timed alone), branching (a
thin-32 VGG-16 widened every step on 3 tasks with alpha 10, so that it branches; each task's path).

Timing, per network, at batch 1 and 64 with ``--threads`` fixed in both runtimes: eager PyTorch
(:func:`virtnet.cost.measure_interleaved`, NCHW and channels_last, the faster used) and onnxruntime (the
network written by ``virtnet export --format onnx``'s exporter, a CPU session); median of ``--repeats``
calls after warm-up, in ``--rounds`` interleaved rounds (each round times an export and its plain network
call by call, in turn). Latencies are medians over rounds; the export-vs-plain ratios are *paired*: the
median over rounds of the per-round median, over turns, of plain time / export time (both called in the
same turn), which cancels the machine's drift (two identical networks timed one after the other come out
up to 1.3x apart here; called in turn, within about 1 %). onnxruntime's latencies are each session alone
with its default spin-waiting; its ratios come from sessions without spin-waiting called in turn (with
it, a session's threads spin after each run and slow the next session's run about 3x).
Plain network of the same shape: DVN level l is the backbone built directly at width l/4; PackNet's and
the adapters' exports have the backbone's shape, so their plain network is the backbone itself; a DEN
structure's is the backbone with each block's inner layers rebuilt at the structure's inner width; a
branching path's is the thin baseline's task network (a branch keeps its layer's width).

Claims: every export runs at >= 0.95 x the speed of its plain network (eager and onnxruntime, worst row
and batch size); in onnxruntime DVN level 1 is >= 12 x faster than the full network at batch 64; the
runtime (a 2-task DVN) switches a task's level in < 10 ms without reloading (median switch between
prepared levels; the cut of an unprepared level from the packed model is recorded beside it); resident
memory measured after each plan of a sweep of budgets is within 1.2 x the planner's estimate (worst plan).

Run (idle machine):  python benchmarks/deploy_table.py --threads 2
Smoke (tiny):        python benchmarks/deploy_table.py --quick --out /tmp/deploy_smoke
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import claim, parser, write_results  # noqa: E402

from virtnet import api  # noqa: E402
from virtnet.backbones.registry import BackboneConfig, build_multitask  # noqa: E402
from virtnet.backbones.wrn import PreActBlock  # noqa: E402
from virtnet.cost import bytes_on_disk, count_flops, count_parameters, measure_interleaved  # noqa: E402
from virtnet.export.bench import ort_interleaved, ort_latency, plot_speedup  # noqa: E402
from virtnet.export.onnx import describe_deployed, export_onnx, ort_session  # noqa: E402
from virtnet.export.runtime import Runtime  # noqa: E402
from virtnet.nn import BatchNorm2d, Conv2d  # noqa: E402


def build_run(
    method: str, options: dict, model: dict, size: int, tasks: int, work: Path, seed: int, steps: int = 1
):
    """A model of ``method`` on ``tasks`` synthetic tasks, ``steps`` steps per phase (random-like weights)."""
    data = {
        "val_fraction": 0,  # train on every training image (no default val split)
        "tasks": [
            {
                "name": f"t{i + 1}",
                "dataset": "synthetic",
                "options": {
                    "num_classes": 10,
                    "size": size,
                    "channels": 3,
                    "num_train": max(16, 8 * steps),
                    "num_test": 8,
                    "seed": i,
                },
            }
            for i in range(tasks)
        ],
    }
    cfg = {
        "seed": seed,
        "output_dir": str(work / method),
        "data": data,
        "model": model,
        "method": {"name": method, **options},
        "train": {
            "epochs": 1,
            "batch_size": 8,
            "max_steps_per_epoch": steps,
            "eval_every": 0,
            "checkpoint_every": 0,
        },
        "cost": {"measure_latency": False},
    }
    run = api.train(cfg, log=lambda s: None)
    return run.method, run.model.eval()


def time_pair(entries, spec, args, work: Path) -> dict:
    """Latencies of the networks in ``entries`` ({name: net}) and their paired ratios.

    Per round and batch size, the networks are called in turn, call by call
    (:func:`virtnet.cost.measure_interleaved`; onnxruntime: :func:`virtnet.export.bench.ort_interleaved`),
    so that each sees the same machine state: eager PyTorch in both memory formats (the faster, by median
    over rounds, is reported); onnxruntime latencies are each session alone (onnxruntime's default
    spin-waiting), its ratios from sessions without spin-waiting called in turn. Latencies are medians
    over rounds of the per-round medians; ``("ratio", a, b, batch, kind)`` is the median over rounds of
    the per-round median of time_a / time_b over turns — what the claims read."""
    paths = {
        name: export_onnx(net, spec, work / f"{name}.onnx", describe_deployed(spec, 0), what=name)
        for name, net in entries.items()
    }
    sessions = {name: ort_session(path, args.threads) for name, path in paths.items()}
    quiet = {name: ort_session(path, args.threads, spinning=False) for name, path in paths.items()}
    samples: dict[tuple, list[float]] = {}
    contended = False
    names = list(entries)
    for _ in range(args.rounds):
        for b in (1, 64):
            reps = args.repeats_b1 if b == 1 else args.repeats
            for fmt in ("nchw", "channels_last"):
                r = measure_interleaved(
                    entries, spec.input_shape, b, args.threads, fmt, warmup=args.warmup, repeats=reps
                )
                contended = contended or r["contended"]
                for n in names:
                    samples.setdefault((n, b, fmt), []).append(r["median_ms"][n])
                for (x, y), v in r["ratio"].items():
                    samples.setdefault(("ratio", x, y, b, fmt), []).append(v)
            for n in names:  # alone, with onnxruntime's default spin-waiting
                ms = ort_latency(sessions[n], spec.input_shape, b, args.warmup, reps)["median_ms"]
                samples.setdefault((n, b, "ort"), []).append(ms)
            if len(names) > 1:  # in turn, without spin-waiting (see ort_interleaved)
                r = ort_interleaved(quiet, spec.input_shape, b, args.warmup, reps)
                for (x, y), v in r["ratio"].items():
                    samples.setdefault(("ratio", x, y, b, "ort"), []).append(v)
    out: dict = {"contended": contended}
    for key, xs in samples.items():
        out[key] = statistics.median(xs)
    for b in (1, 64):
        for name in names:
            fmt = min(("nchw", "channels_last"), key=lambda f, n=name: out[(n, b, f)])
            out[(name, b, "eager")] = out[(name, b, fmt)]
            out[(name, b, "format")] = fmt
        if len(names) == 2:  # the ratio in the format the plain network (the reference) runs faster in
            fmt = out[(names[1], b, "format")]
            for x, y in ((names[0], names[1]), (names[1], names[0])):
                out[("ratio", x, y, b, "eager")] = out[("ratio", x, y, b, fmt)]
    return out


def pair_row(label, task, level, level_name, net, plain, spec, args, work, scenario) -> dict:
    """One Table-2 row: ``net`` (an export) timed beside ``plain`` (a plain network of its shape)."""
    assert count_parameters(plain) == count_parameters(net), f"{label}: the plain network's shape differs"
    t = time_pair({"export": net, "plain": plain}, spec, args, work / f"{label}_{task}_{level}")
    row = {
        "method": label,
        "scenario": scenario,
        "task": task,
        "level": level,
        "level_name": level_name,
        "accuracy": None,
        "params": count_parameters(net),
        "flops": count_flops(net, spec.input_shape),
        "bytes": bytes_on_disk(net),
        "contended": t["contended"],
    }
    for b in (1, 64):
        row[f"latency_ms_b{b}"] = t[("export", b, "eager")]
        row[f"format_b{b}"] = t[("export", b, "format")]
        row[f"ort_ms_b{b}"] = t[("export", b, "ort")]
        row[f"plain_ms_b{b}"] = t[("plain", b, "eager")]
        row[f"plain_ort_ms_b{b}"] = t[("plain", b, "ort")]
        # paired: the median over rounds of (plain time / export time) within the round
        row[f"over_plain_eager_b{b}"] = t[("ratio", "plain", "export", b, "eager")]
        row[f"over_plain_ort_b{b}"] = t[("ratio", "plain", "export", b, "ort")]
    print(
        f"{label} {task}@{level}: eager b1 {row['latency_ms_b1']:.3f} ms "
        f"(plain {row['plain_ms_b1']:.3f}), b64 {row['latency_ms_b64']:.2f} ms "
        f"(plain {row['plain_ms_b64']:.2f}); ort b1 {row['ort_ms_b1']:.3f} "
        f"(plain {row['plain_ort_ms_b1']:.3f}), b64 {row['ort_ms_b64']:.2f} ms "
        f"(plain {row['plain_ort_ms_b64']:.2f})",
        flush=True,
    )
    return row


def add_speedups(rows: list[dict]) -> list[dict]:
    """Speed-ups and FLOPs ratios against the last row (the full network)."""
    top = rows[-1]
    for r in rows:
        r["flops_ratio"] = r["flops"] / top["flops"]
        for b in (1, 64):
            for key, plain_key, name in (
                ("latency_ms", "plain_ms", "eager"),
                ("ort_ms", "plain_ort_ms", "ort"),
            ):
                r[f"speedup_{name}_b{b}"] = top[f"{key}_b{b}"] / r[f"{key}_b{b}"]
                r[f"plain_speedup_{name}_b{b}"] = top[f"{plain_key}_b{b}"] / r[f"{plain_key}_b{b}"]
    return rows


def rows_for(label, method, model, task, plains, args, work, scenario) -> list[dict]:
    spec = model.spec(task)
    rows = [
        pair_row(
            label,
            task,
            lv.index,
            lv.name,
            method.export(model, task, lv.index),
            plains(lv.index),
            spec,
            args,
            work,
            scenario,
        )
        for lv in method.levels(model, task)
    ]
    return add_speedups(rows)


def den_plain(cfg: BackboneConfig, spec, widths: list[int]) -> torch.nn.Module:
    """A plain WRN of a DEN structure's shape: the backbone built directly, each block's inner layers
    rebuilt with the structure's inner width (the backbone's own layer classes; no block skipped here)."""
    net = build_multitask(cfg, [spec]).task_network(spec.name).eval()
    blocks = [m for m in net.modules() if isinstance(m, PreActBlock)]
    assert len(blocks) == len(widths), "den: the plain network has another number of blocks"
    for block, w in zip(blocks, widths, strict=True):
        block.conv1 = Conv2d(block.conv1.in_channels, w, 3, stride=block.conv1.stride, padding=1, bias=False)
        block.bn2 = BatchNorm2d(w)
        block.conv2 = Conv2d(w, block.conv2.out_channels, 3, stride=1, padding=1, bias=False)
    return net.eval()


def den_rows(method, model, cfg, args, work, scenario) -> list[dict]:
    """DEN: two structures exported as standalone sliced networks (every block at its middle level, every
    block full) beside plain WRNs of their shapes; then the deployable of each budget level (selector,
    budgeted decoding, grouped estimator) timed alone — it has no plain twin, and no claim reads it."""
    task = model.tasks[-1]
    spec = model.spec(task)
    blocks = model.blocks()
    rows = []
    for name, z in (
        ("middle level per block", [len(b.widths) // 2 for b in blocks]),
        ("full estimator", model.full_structure()),
    ):
        widths = [b.widths[level] for b, level in zip(blocks, z, strict=True)]
        net = method.export_structure(model, task, z).eval()
        rows.append(
            pair_row(
                "den (structure)",
                task,
                None,
                f"{name}: z={z}",
                net,
                den_plain(cfg, spec, widths),
                spec,
                args,
                work,
                scenario,
            )
        )
    add_speedups(rows)
    for lv in method.levels(model, task):
        net = method.export(model, task, lv.index).eval()
        t = time_pair({"deployable": net}, spec, args, work / f"den_deployable_{lv.index}")
        row = {
            "method": "den (deployable)",
            "scenario": scenario,
            "task": task,
            "level": lv.index,
            "level_name": lv.name,
            "accuracy": None,
            "params": count_parameters(net),
            "flops": None,
            "bytes": bytes_on_disk(net),
            "contended": t["contended"],
        }
        for b in (1, 64):
            row[f"latency_ms_b{b}"] = t[("deployable", b, "eager")]
            row[f"format_b{b}"] = t[("deployable", b, "format")]
            row[f"ort_ms_b{b}"] = t[("deployable", b, "ort")]
        print(f"den deployable {task}@{lv.index}: eager b64 {row['latency_ms_b64']:.2f} ms", flush=True)
        rows.append(row)
    return rows


def branching_rows(args, work, scenario) -> tuple[list[dict], str]:
    """Branching: a VGG-16 thin-32 widened into a tree (3 synthetic tasks, a widening every step, alpha 10
    so that every round branches); each task's path exported beside the thin baseline's task network (the
    same shapes: a branch keeps its layer's width)."""
    size = args.size
    opts = {
        "depth": 16 if not args.quick else 11,
        "omega": 32 if not args.quick else 4,
        "round_steps": 1,
        "alpha": 10.0,
    }
    vgg = {"name": "vgg", "depth": opts["depth"]}
    method, model = build_run("branching", opts, vgg, size, 3, work / "tree", args.seed, steps=20)
    thin_method, thin = build_run(
        "branching", {**opts, "max_rounds": 0}, vgg, size, 3, work / "thin", args.seed
    )
    rows = []
    for task in model.tasks:
        lv = method.levels(model, task)[-1]
        rows.append(
            pair_row(
                "branching (path)",
                task,
                lv.index,
                lv.name,
                method.export(model, task, lv.index),
                thin_method.export(thin, task, lv.index),
                model.spec(task),
                args,
                work,
                scenario,
            )
        )
    return rows, model.describe_tree(list(model.tasks))


def runtime_figures(method, model, switches: int) -> dict:
    """Level switches between prepared levels, cold cuts, and resident memory over a sweep of budgets."""
    rt = Runtime(method, model)
    tasks = list(model.tasks)
    top = rt.planner.cost({t: max(model.levels(t)) for t in tasks})
    smallest = rt.planner.cost({t: min(model.levels(t)) for t in tasks})
    plans = []
    for frac in (1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1):
        value = max(int(top * frac), smallest)
        t0 = time.perf_counter()
        p = rt.plan(f"params={value}", tasks)
        plans.append(
            {
                "budget": p.budget,
                "levels": p.levels,
                "estimate_params": p.params,
                "estimate_bytes": p.bytes,
                "measured_params": p.measured["params"],
                "measured_bytes": p.measured["bytes"],
                "bytes_over_estimate": p.measured["bytes_over_estimate"],
                "params_over_estimate": p.measured["params_over_estimate"],
                "store_bytes": p.measured["store_bytes"],
                "plan_ms": (time.perf_counter() - t0) * 1e3,
            }
        )
    task = tasks[0]
    rt.prepare(task)
    levels = model.levels(task)
    times = [rt.switch(task, levels[i % len(levels)]) for i in range(switches)]
    cold = []
    for lv in levels:
        rt.switch(task, levels[-1] if lv != levels[-1] else levels[0])
        rt.release(task, lv)
        cold.append(rt.switch(task, lv))
    return {
        "plans": plans,
        "switch_ms_median": statistics.median(times),
        "switch_ms_max": max(times),
        "cold_switch_ms_median": statistics.median(cold),
        "worst_bytes_over_estimate": max(p["bytes_over_estimate"] for p in plans),
        "worst_params_over_estimate": max(p["params_over_estimate"] for p in plans),
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--widen", type=int, default=4)
    p.add_argument("--size", type=int, default=32, help="input size (32x32x3)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement at batch 64")
    p.add_argument("--repeats-b1", type=int, default=100, help="timed calls per measurement at batch 1")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over rounds)")
    p.add_argument("--switches", type=int, default=200, help="level switches timed in the runtime")
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke settings (WRN-10-1 at 16x16, few repeats)"
    )
    args = p.parse_args()
    if args.quick:
        args.depth, args.widen, args.size = 10, 1, 16
        args.repeats, args.repeats_b1, args.warmup, args.rounds, args.switches = 2, 2, 1, 1, 20
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone = {"name": "wrn", "depth": args.depth, "widen_factor": args.widen}
    scenario = f"wrn-{args.depth}-{args.widen} {args.size}x{args.size}x3"
    cfg = BackboneConfig(**backbone, feature_size=args.size)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="deploy-") as tmp:
        work = Path(tmp)
        dvn_method, dvn_model = build_run("dvn", {"num_units": 4}, backbone, args.size, 2, work, args.seed)
        spec = dvn_model.spec("t1")

        def dvn_plain(level: int):
            net = build_multitask(cfg.model_copy(update={"width": level / 4}), [spec]).task_network("t1")
            return net.eval()

        rows += rows_for("dvn", dvn_method, dvn_model, "t1", dvn_plain, args, work, scenario)
        for name, options, label in (("packnet", {}, "packnet"), ("adapters", {}, "adapters (fused)")):
            method, model = build_run(name, options, backbone, args.size, 2, work, args.seed)
            task = model.tasks[-1]
            plain = build_multitask(cfg, [model.spec(task)]).task_network(task).eval()
            rows += rows_for(label, method, model, task, lambda _lv, _p=plain: _p, args, work, scenario)
        den_method, den_model = build_run("den", {}, backbone, args.size, 2, work, args.seed)
        rows += den_rows(den_method, den_model, cfg, args, work, scenario)
        tree_rows, tree = branching_rows(args, work, f"vgg thin {args.size}x{args.size}x3")
        rows += tree_rows
        rt = runtime_figures(dvn_method, dvn_model, args.switches)
    dvn_l1 = next(r for r in rows if r["method"] == "dvn" and r["level"] == 1)
    paired = [r for r in rows if "over_plain_eager_b1" in r]
    worst_eager = min(min(r["over_plain_eager_b1"], r["over_plain_eager_b64"]) for r in paired)
    worst_ort = min(min(r["over_plain_ort_b1"], r["over_plain_ort_b64"]) for r in paired)
    claims = [
        claim(
            "deploy.export_vs_plain.eager",
            "every export (DVN levels, PackNet, fused adapters, DEN structures, branching task paths) "
            "runs at >= 0.95 x the speed of the plain network of its shape in eager PyTorch: worst, over "
            "rows and batch 1, 64, of the median over interleaved rounds of plain time / export time",
            ">=",
            0.95,
            worst_eager,
        ),
        claim(
            "deploy.export_vs_plain.onnxruntime",
            "the same in onnxruntime: worst plain time / export time over rows and batch 1, 64",
            ">=",
            0.95,
            worst_ort,
        ),
        claim(
            "deploy.dvn_level1_speedup.onnxruntime_b64",
            f"onnxruntime: DVN level 1 ({dvn_l1['flops_ratio']:.4f} of the full network's FLOPs) is >= 12 x "
            "faster than the full network at batch 64 (full time / level-1 time)",
            ">=",
            12,
            dvn_l1["speedup_ort_b64"],
        ),
        claim(
            "deploy.runtime_switch_ms",
            "the runtime switches a task's level in < 10 ms without reloading (median ms of switches between "
            "prepared levels; an unprepared level's cut from the packed model: "
            f"{rt['cold_switch_ms_median']:.1f} ms)",
            "<",
            10,
            rt["switch_ms_median"],
        ),
        claim(
            "deploy.resident_over_estimate",
            "resident memory measured (bytes of the distinct tensors the runtime holds) is within 1.2 x the "
            "planner's estimate: worst plan of a sweep of budgets on a 2-task DVN",
            "<=",
            1.2,
            rt["worst_bytes_over_estimate"],
        ),
    ]
    stem = write_results(
        "deploy_table",
        rows,
        args.seed,
        args.out,
        extra={
            "scenario": scenario,
            "weights": "random-like (one training step per phase): latency does not depend on the weights",
            "threads": args.threads,
            "repeats": args.repeats,
            "repeats_b1": args.repeats_b1,
            "rounds": args.rounds,
            "runtime": rt,
            "branching_tree": tree,
            "contended": any(r["contended"] for r in rows),
        },
        claims=claims,
    )
    plot_speedup(
        [r for r in rows if r["method"] == "dvn"], f"{stem}_speedup.png", 64, "DVN levels: speed-up (b64)"
    )
    for c in claims:
        print(f"{'met' if c['met'] else 'MISSED'}: {c['id']} measured {c['measured']}")
    print(f"results: {stem}.json, {stem}.md, {stem}_speedup.png")


if __name__ == "__main__":
    main()
