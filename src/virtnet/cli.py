"""``virtnet`` command line: ``train``, ``eval``, ``info``, ``export``, ``bench``, ``plan``, ``demo``.

Every bad input ends with one line ``virtnet: error: <what is wrong>`` on stderr and exit status 2. A
closed stdout (``virtnet eval RUN --json | head -1``) ends quietly. Torch's threads follow
:func:`virtnet.threads.apply_default` (the idle usable cores, or ``$VIRTNET_THREADS``). A checkpoint
argument may be a run folder (``RUN`` means ``RUN/model.json``, else ``RUN/checkpoints/last.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from virtnet.errors import ConfigError, DataWarning, VirtnetError

TABLE_COLUMNS = [
    ("task", "task"),
    ("level", "level"),
    ("accuracy", "accuracy (%)"),
    ("params", "params"),
    ("density", "density (%)"),
    ("flops", "FLOPs (2 per MAC)"),
    ("latency_ms_b1", "latency b1 (ms)"),
    ("latency_ms_b64", "latency b64 (ms)"),
]


def _set_override(d: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE with a dotted key, e.g. train.epochs=2")
    key, value = assignment.split("=", 1)
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = yaml.safe_load(value)


def load_run_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    data_root: str | None = None,
    output_dir: str | None = None,
) -> Any:
    from virtnet.config import RunConfig, read_config_file

    raw = read_config_file(path)
    for o in overrides:
        _set_override(raw, o)
    if data_root is not None:
        raw.setdefault("data", {})["root"] = data_root
    if output_dir is not None:
        raw["output_dir"] = output_dir
    return RunConfig.from_dict(raw, source=str(path))


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "-"
    if key == "accuracy":
        return f"{v:.2f}"
    if key == "density":
        return f"{100 * v:.1f}"
    if key.startswith("latency"):
        return f"{v:.3f}"
    if key in ("params", "flops") and isinstance(v, (int, float)):
        return f"{int(v):,}"
    return str(v)


def _fmt_number(v: Any, key: str) -> str:
    """A method's column: integers with thousands separators, floats to 0.1 (4 digits below 100)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _fmt(v, key)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4g}"


def table(
    rows: list[dict[str, Any]],
    columns: list[tuple[str, str]] = TABLE_COLUMNS,
    method_columns: dict[str, str] | None = None,
) -> str:
    """A markdown table of ``rows``: the ``columns`` some row has, then (default columns) latency at every
    batch size measured, then ``method_columns`` (a method's ``eval_titles``: key -> heading)."""
    cols = [(k, h) for k, h in columns if any(k in r for r in rows)]
    if columns is TABLE_COLUMNS:  # latency at whatever batch sizes the run's cost section measured
        known = {k for k, _ in cols}
        extra = sorted(
            {k for r in rows for k in r if re.fullmatch(r"latency_ms_b\d+", k) and k not in known},
            key=lambda k: int(k.rsplit("b", 1)[1]),
        )
        cols += [(k, f"latency b{k.rsplit('b', 1)[1]} (ms)") for k in extra]
    known = {k for k, _ in cols}
    own = [(k, h) for k, h in (method_columns or {}).items() if k not in known and any(k in r for r in rows)]
    fmts = [_fmt] * len(cols) + [_fmt_number] * len(own)
    cols += own
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f(r.get(k), k) for f, (k, _) in zip(fmts, cols, strict=True)) + " |")
    return "\n".join(lines)


def _eval_rows(
    ckpt: str,
    data_root: str | None,
    split: str,
    latency: bool | None,
    threads: int | None,
    repeats: int | None,
) -> tuple[Any, list[dict[str, Any]]]:
    from virtnet import api

    loaded = api.load(ckpt)
    taskset = loaded.taskset(data_root)
    acc = api.evaluate_model(loaded, taskset, split=split)
    cost = api.cost_rows(loaded, latency=latency, threads=threads, repeats=repeats)
    return loaded, api.merge_rows(acc, cost)


def cmd_train(args: argparse.Namespace) -> int:
    from virtnet import api

    if args.allow_changes and not args.resume:
        raise ConfigError("--allow-changes: only with --resume (it records options changed on resuming)")
    cfg = load_run_config(args.config, args.set or [], args.data_root, args.output_dir)
    from virtnet.train.runtime import Runtime

    # under torchrun (WORLD_SIZE > 1) this joins the process group; rank 0 alone prints and writes files
    runtime = Runtime.from_env(cfg.train.device)
    if cfg.train.batch_size % runtime.world_size:  # one line from rank 0, the others end quietly
        runtime.close()
        if not runtime.is_main:
            raise SystemExit(2)
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} (the global batch per task) does not divide among "
            f"{runtime.world_size} processes; use a multiple of {runtime.world_size}"
        )
    try:
        t0 = time.perf_counter()
        run = api.train(cfg, resume=args.resume, allow_changes=args.allow_changes)
        if runtime.is_main:
            ranks = f" on {runtime.world_size} processes" if runtime.world_size > 1 else ""
            print(f"trained{ranks} in {time.perf_counter() - t0:.1f}s; weights: {run.out_dir / 'model.json'}")
            print(table(run.test_rows, method_columns=run.method.eval_titles))
    finally:
        runtime.close()
    return 0


def sequence_table(rows: list[dict[str, Any]]) -> tuple[str, list[list[float | None]], list[str], list[str]]:
    """Error (%) of every task (columns) after each added phase (rows), as in PackNet's Figure 2."""
    after = list(dict.fromkeys(r["after_task"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cell = {(r["after_task"], r["task"]): r["error"] for r in rows}
    matrix = [[cell.get((a, t)) for t in tasks] for a in after]
    lines = [
        "| after adding | " + " | ".join(f"{t} error (%)" for t in tasks) + " |",
        "|" + "|".join("---" for _ in range(len(tasks) + 1)) + "|",
    ]
    for a, row in zip(after, matrix, strict=True):
        lines.append(f"| {a} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines), matrix, after, tasks


def cmd_eval_sequence(args: argparse.Namespace) -> int:
    from virtnet import api

    rows = api.sequence_rows(args.checkpoint, split=args.split, data_root=args.data_root)
    text, matrix, after, tasks = sequence_table(rows)
    if args.plot:
        from virtnet.cost import plot_error_matrix

        plot_error_matrix(
            matrix,
            after,
            tasks,
            args.plot,
            title="error (%) after adding each task",
            xlabel="task",
            ylabel="after adding",
        )
    if args.json:
        print(
            json.dumps(
                {"run": str(api.run_dir_of(args.checkpoint)), "split": args.split, "rows": rows},
                indent=2,
                default=float,
            )
        )
    else:
        print(text)
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def cmd_eval_budget(args: argparse.Namespace) -> int:
    """``eval --budget B [--task T]``: the largest level of each task that fits B, and its accuracy."""
    from virtnet import api

    loaded = api.load(args.checkpoint)
    tasks = [args.task] if args.task else [s.name for s in loaded.specs]
    chosen = {t: api.resolve_level(loaded, t, args.budget) for t in tasks}
    taskset = loaded.taskset(args.data_root)
    rows = []
    for t, lv in chosen.items():
        acc = api.evaluate(loaded.method, loaded.model, taskset, split=args.split, tasks=[t], levels=[lv])
        cost = [r for r in api.cost_rows(loaded, latency=False) if r["task"] == t and r["level"] == lv]
        rows.extend({**c, **a, "budget": args.budget} for a, c in zip(acc, cost, strict=True))
    if args.json:
        print(
            json.dumps(
                {"checkpoint": str(loaded.path), "budget": args.budget, "rows": rows}, indent=2, default=float
            )
        )
    else:
        print(f"budget {args.budget}: " + ", ".join(f"{t} -> level {lv}" for t, lv in chosen.items()))
        print(table(rows, method_columns=loaded.method.eval_titles))
    return 0


def cmd_eval_shared(args: argparse.Namespace) -> int:
    """``eval --shared-budget B``: one level per task maximising the summed accuracy within B in total."""
    from virtnet import api

    loaded = api.load(args.checkpoint)
    taskset = loaded.taskset(args.data_root)
    tasks = [args.task] if args.task else None
    out = api.shared_budget(loaded, taskset, args.shared_budget, tasks, allow_test=args.allow_test_split)
    if args.json:
        print(json.dumps(out, indent=2, default=float))
    else:
        note = " (--allow-test-split: a task has no validation split)" if out["selected_on"] == "test" else ""
        print(f"shared budget {out['budget']}: levels chosen on the {out['selected_on']} split{note}")
        for t, lv in out["levels"].items():
            print(f"  {t}: level {lv} ({out['accuracy'][t]:.2f}%)")
        print(f"total cost {out['cost']:,}; summed accuracy {out['accuracy_sum']:.2f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from virtnet import api

    loaded = api.load(args.checkpoint)
    level = api.resolve_level(loaded, args.task, args.budget if args.budget else args.level)
    fmt = getattr(args, "format", "safetensors")
    if fmt != "safetensors":
        return cmd_export_deployed(args, loaded, level)
    path = api.export_network(loaded, args.task, level, args.output)
    net = api.load_exported(path)
    from virtnet.cost import count_parameters

    print(f"exported task {args.task} level {level}: {count_parameters(net):,} parameters -> {path}")
    return 0


def cmd_export_deployed(args: argparse.Namespace, loaded: Any, level: int) -> int:
    """``export --format onnx|pt2``: a standalone graph (normalisation inside), read back to check it."""
    from virtnet import api

    path = api.export_network(
        loaded, args.task, level, args.output, format=args.format, external_data=args.external_data
    )
    dep = api.load_deployed(path)
    n = dep.meta.get("parameters")
    print(
        f"exported task {args.task} level {level} as {args.format}: {n:,} parameters -> {path} "
        f"(input: float32 pixels in [0, 1], normalised inside the graph)"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``bench``: every (task, level) export timed in eager PyTorch and onnxruntime beside a plain
    network of the same shape; JSON, markdown and a speed-up plot."""
    from virtnet import api
    from virtnet.export.bench import plot_speedup, summary_lines

    check_plot_path(args.plot)
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    loaded = api.load(args.checkpoint)
    tasks = _name_list(args.tasks)
    out = api.bench(
        loaded,
        tasks=tasks,
        batch_sizes=batch_sizes,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        onnx=not args.no_onnx,
        plain=not args.no_plain,
        label=loaded.meta.get("method"),
    )
    rows = out["rows"]
    if args.plot:
        plot_speedup(rows, args.plot, batch=max(batch_sizes))
    if args.report:
        from virtnet.cost import write_report

        meta = {"command": "virtnet " + " ".join(sys.argv[1:]), "seed": 0, **out["settings"]}
        write_report(rows, args.report, meta)
    if args.json:
        print(json.dumps({"checkpoint": str(loaded.path), **out}, indent=2, default=float))
        return 0
    cols = [("task", "task"), ("level", "level"), ("params", "params"), ("flops", "FLOPs (2 per MAC)")]
    cols.append(("flops_ratio", "FLOPs ratio"))
    for b in batch_sizes:
        for key, head in (
            ("latency_ms", "eager {} (ms)"),
            ("ort_ms", "onnxruntime {} (ms)"),
            ("speedup_eager", "speed-up eager {}"),
            ("speedup_ort", "speed-up ort {}"),
            ("over_plain_eager", "vs plain eager {}"),
            ("over_plain_ort", "vs plain ort {}"),
        ):
            cols.append((f"{key}_b{b}", head.format(f"b{b}")))
    threads = out["settings"]["threads"]
    print(f"{loaded.meta.get('method')}: {threads} thread(s), median of {args.repeats} calls after warm-up")
    shown = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    print(table(shown, cols))
    for line in summary_lines(rows, batch_sizes):
        print(line)
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """``plan``: one level per running task within a total budget, applied in the runtime, with the
    resident memory measured beside the planner's estimate."""
    from virtnet import api

    loaded = api.load(args.checkpoint)
    tasks = _name_list(args.tasks)
    accuracy: Any = None if args.split == "none" else args.split
    allow = args.allow_test_split
    out = api.plan(loaded, args.budget, tasks, accuracy=accuracy, data_root=args.data_root, allow_test=allow)
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return 0
    m = out["measured"]
    print(f"plan under {out['budget']} ({out['objective']} on the {out['selected_on'] or 'no'} split):")
    for t, lv in out["levels"].items():
        print(f"  {t}: level {lv} ({out['accuracy'][t]:.2f})")
    print(
        f"estimate: {out['params']:,} parameters (shared once), {out['bytes']:,} bytes; "
        f"measured resident: {m['params']:,} parameters, {m['bytes']:,} bytes "
        f"({m['bytes_over_estimate']:.3f} x the estimate)"
    )
    return 0


def _int_list(text: str, key: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{key} {text}: expected comma-separated positive integers, e.g. 1,64") from None
    if not vals or any(v < 1 for v in vals):
        raise ConfigError(f"{key} {text}: expected comma-separated positive integers, e.g. 1,64")
    return vals


def _name_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--tasks {text!r}: expected comma-separated task names")
    return names


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_plot_path(path: str | None, key: str = "--plot") -> None:
    """Refuse, before any work, a plot file whose format matplotlib is not asked to write here."""
    if path is None:
        return
    suffix = Path(path).suffix.lower()
    if suffix not in PLOT_FORMATS:
        raise ConfigError(
            f"{key} {path}: unsupported plot format '{suffix or '(none)'}' (use {', '.join(PLOT_FORMATS)})"
        )
    parent = Path(path).parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{key} {path}: {parent} is not a folder")


def cmd_eval(args: argparse.Namespace) -> int:
    from virtnet import api

    check_plot_path(args.plot)
    if api.is_exported(args.checkpoint):
        return print_exported(args.checkpoint, args.json)
    if args.sequence:
        return cmd_eval_sequence(args)
    if args.shared_budget:
        return cmd_eval_shared(args)
    if args.budget:
        return cmd_eval_budget(args)

    loaded, rows = _eval_rows(
        args.checkpoint,
        args.data_root,
        args.split,
        False if args.no_latency else None,
        args.threads,
        args.repeats,
    )
    total = api.total_parameters(loaded.model)
    summary = loaded.method.summary(loaded.model, rows)
    if args.plot:
        from virtnet.cost import plot_accuracy_vs_density

        plot_accuracy_vs_density([{**r, "method": loaded.meta.get("method", "")} for r in rows], args.plot)
    if args.report:
        from virtnet.cost import write_report

        scenario = "+".join(s.name for s in loaded.specs)
        report_rows = [{"method": loaded.meta.get("method", ""), "scenario": scenario, **r} for r in rows]
        meta = {
            "command": "virtnet " + " ".join(sys.argv[1:]),
            "seed": int(loaded.meta.get("seed", 0)),
            "checkpoint": str(loaded.path),
            "split": args.split,
            "total_params": total,
        }
        write_report(report_rows, args.report, meta)
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": str(loaded.path),
                    "method": loaded.meta.get("method"),
                    "split": args.split,
                    "total_params": total,
                    "rows": rows,
                    "summary": summary,
                },
                indent=2,
                default=float,
            )
        )
    else:
        print(
            f"{loaded.meta.get('method')} on {', '.join(s.name for s in loaded.specs)} "
            f"({args.split} split); total parameters {total:,}"
        )
        print(table(rows, method_columns=loaded.method.eval_titles))
        contended = [r for r in rows if r.get("contended")]
        if contended:
            waits = [r["runqueue_wait"] for r in contended if r.get("runqueue_wait") is not None]
            worst = f" (up to {max(waits):.0%} of the time waiting for a core)" if waits else ""
            print(
                f"note: latency of {len(contended)} row(s) measured while other processes held the "
                f"cores{worst}: those figures are not reliable; re-run on an idle machine"
            )
        for k, v in summary.items():
            print(f"{k}: {v}")
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def print_exported(path: str, as_json: bool) -> int:
    """``info`` / ``eval`` on an exported network: what it is (it holds no data to evaluate on)."""
    from virtnet import api

    info = api.describe_exported(path)
    if as_json:
        print(json.dumps(info, indent=2, default=float))
        return 0
    t = info["task"]
    print(f"exported network: {info['file']} ({info['format']})")
    print(
        f"task {t['name']}: input {t['in_channels']}x{t['input_size']}x{t['input_size']}, "
        f"{t['num_outputs']} outputs; level {info['level']}; method {info['method']}"
    )
    if "parameters" in info:
        print(f"parameters {info['parameters']:,}; FLOPs per image {info['flops']:,}")
    if info.get("source"):
        print(f"exported from {info['source']} (evaluate that checkpoint with `virtnet eval`)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from virtnet import api

    if api.is_exported(args.checkpoint):
        return print_exported(args.checkpoint, args.json)
    loaded = api.load(args.checkpoint)
    rows = api.cost_rows(loaded, latency=args.latency, threads=args.threads)
    info = {
        "checkpoint": str(loaded.path),
        "method": loaded.meta.get("method"),
        "tasks": [s.to_dict() for s in loaded.specs],
        "total_params": api.total_parameters(loaded.model),
        "state": loaded.meta.get("state"),
        "versions": loaded.meta.get("versions"),
        "budgets": rows,
        "summary": loaded.method.summary(loaded.model, []),  # e.g. a branched network's tree
    }
    if args.json:
        print(json.dumps(info, indent=2, default=float))
    else:
        print(f"checkpoint: {info['checkpoint']}")
        print(f"method: {info['method']}; total parameters {info['total_params']:,}")
        for s in loaded.specs:
            print(
                f"task {s.name}: input {s.in_channels}x{s.input_size}x{s.input_size}, {s.num_outputs} outputs"
            )
        print(table(rows))
        for k, v in info["summary"].items():
            text = v if isinstance(v, str) else json.dumps(v, default=float)
            print(f"{k}:\n{text}" if "\n" in text else f"{k}: {text}")
    return 0


def demo_config_path() -> Path:
    return Path(str(resources.files("virtnet") / "configs" / "demo.yaml"))


def cmd_demo(args: argparse.Namespace) -> int:
    from virtnet import api
    from virtnet.cost import plot_accuracy_vs_density

    t0 = time.perf_counter()
    out = args.output_dir or "runs/demo"
    cfg = load_run_config(demo_config_path(), args.set or [], None, out)
    print(f"virtnet demo: {cfg.method.name} on the digits split into two tasks (two budgets each) -> {out}")
    run = api.train(cfg)
    loaded = api.load(run.out_dir / "model.json")
    acc = api.evaluate_model(loaded, run.taskset)
    rows = api.merge_rows(acc, api.cost_rows(loaded, latency=True, threads=args.threads, repeats=10))
    plot = Path(out) / "accuracy_vs_density.png"
    plot_accuracy_vs_density(
        [{**r, "method": cfg.method.name} for r in rows],
        plot,
        title="virtnet demo: accuracy against parameter density",
    )
    (Path(out) / "demo.json").write_text(json.dumps({"rows": rows}, indent=2, default=float) + "\n")
    print(f"\ntotal parameters of the model: {api.total_parameters(loaded.model):,}")
    print(table(rows))
    print(f"\nplot: {plot}\ndone in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virtnet", description="Memory-efficient multi-task deep networks.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a run from a YAML/TOML config")
    t.add_argument("config")
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    t.add_argument("--data-root", help="data folder (overrides data.root)")
    t.add_argument("--output-dir", help="run folder (overrides output_dir)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (dotted)")
    t.add_argument(
        "--allow-changes",
        nargs="+",
        metavar="KEY",
        help="with --resume: accept these changed options (keys or sections) and record them in the run",
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy, parameters, FLOPs and latency per task and level")
    e.add_argument("checkpoint")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--data-root")
    e.add_argument("--json", action="store_true", help="print machine-readable JSON")
    e.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    e.add_argument("--threads", type=int, help="threads while timing (default: the run's cost.threads)")
    e.add_argument("--repeats", type=int, help="timed calls per measurement (default: cost.repeats)")
    e.add_argument("--plot", help="write an accuracy-against-density plot (PNG) here")
    e.add_argument("--report", metavar="STEM", help="write STEM.json, STEM.csv and STEM.md")
    e.add_argument(
        "--sequence",
        action="store_true",
        help="error of every task learned so far after each added task (the run's per-phase checkpoints)",
    )
    e.add_argument("--task", help="only this task (with --budget or --shared-budget)")
    e.add_argument(
        "--budget", help="largest level within a budget: params=N, density=F|P%%, flops=N, level=N"
    )
    e.add_argument(
        "--shared-budget",
        help="one level per task within one total budget: params=N or flops=N (levels chosen on val)",
    )
    e.add_argument(
        "--allow-test-split",
        action="store_true",
        help="with --shared-budget: choose on the test split when a task has no validation split",
    )
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write one (task, level) as a standalone, physically smaller network")
    x.add_argument("checkpoint")
    x.add_argument("--task", required=True)
    x.add_argument("--level", type=int, help="level index (default: the largest)")
    x.add_argument("--budget", help="largest level within a budget instead of --level")
    x.add_argument("-o", "--output", required=True, help="output stem: writes STEM.safetensors and STEM.json")
    x.add_argument(
        "--format",
        default="safetensors",
        choices=["safetensors", "onnx", "pt2"],
        help="safetensors + JSON (virtnet), onnx (STEM.onnx) or pt2 (STEM.pt2, torch.export)",
    )
    x.add_argument("--external-data", action="store_true", help="onnx: weights in a side file STEM.onnx.data")
    x.set_defaults(func=cmd_export)

    bn = sub.add_parser("bench", help="time every (task, level) export: eager PyTorch, onnxruntime, plain")
    bn.add_argument("checkpoint")
    bn.add_argument("--tasks", help="comma-separated tasks (default: all)")
    bn.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes (default 1,64)")
    bn.add_argument("--threads", type=int, default=1, help="intra-op threads in both runtimes (default 1)")
    bn.add_argument("--warmup", type=int, default=5)
    bn.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median)")
    bn.add_argument("--no-onnx", action="store_true", help="eager PyTorch only")
    bn.add_argument("--no-plain", action="store_true", help="skip the plain networks of the same shape")
    bn.add_argument("--json", action="store_true")
    bn.add_argument("--report", metavar="STEM", help="write STEM.json, STEM.csv and STEM.md")
    bn.add_argument("--plot", help="write a speed-up against FLOPs ratio plot (PNG) here")
    bn.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plan", help="one level per task within a total budget, run in the runtime")
    pl.add_argument("checkpoint")
    pl.add_argument(
        "--budget", required=True, help="total over the tasks: params=N or bytes=N (k, M, MiB ...)"
    )
    pl.add_argument("--tasks", help="comma-separated running tasks (default: all)")
    pl.add_argument(
        "--split",
        default="val",
        choices=["val", "test", "none"],
        help="accuracy maximised (val: every task needs a validation split; none: largest levels)",
    )
    pl.add_argument(
        "--allow-test-split",
        action="store_true",
        help="with --split val: choose on the test split when a task has no validation split",
    )
    pl.add_argument("--data-root")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    i = sub.add_parser("info", help="tasks, budgets, parameters and FLOPs of a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.add_argument("--latency", action="store_true", help="also measure latency")
    i.add_argument("--threads", type=int, help="threads while timing (default: the run's cost.threads)")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="train and report a small multi-task model on the bundled digits")
    d.add_argument("--output-dir")
    d.add_argument("--threads", type=int, help="threads while timing (default: the default thread rule)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.set_defaults(func=cmd_demo)
    return p


def _quiet_stdout() -> None:
    """Point stdout at /dev/null (the reader went away): later writes and the exit flush stay quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """virtnet's own warnings (:class:`DataWarning`) as one line ``virtnet: warning: ...`` on stderr."""
    if isinstance(category, type) and issubclass(category, DataWarning):
        print(f"virtnet: warning: {' '.join(str(message).split())}", file=sys.stderr)
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


_SHOW_WARNING = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from virtnet.threads import apply_default

        apply_default(None)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return rc
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except VirtnetError as e:
        print(f"virtnet: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("virtnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
