"""``virtnet bench``: does every exported (task, level) network run as fast as its size says?

For every (task, level) of a model, its export (:meth:`virtnet.methods.Method.export`) is timed

* in eager PyTorch (:func:`virtnet.cost.latency_profile`: NCHW and channels_last, the faster used);
* in onnxruntime (the network exported with :func:`virtnet.export.onnx.export_onnx`, a CPU session with
  ``threads`` intra-op threads and one inter-op thread);
* beside a **plain network of the same shape**: the export's module tree rebuilt from its description
  (:mod:`virtnet.export.network`) with fresh, contiguous random weights (buffers copied) — what the same
  layers cost when built at that size rather than cut from a larger network — in both runtimes;

at each batch size (1 and 64 by default): the median of ``repeats`` timed calls after ``warmup`` untimed
ones, with the thread count fixed. An export and its plain network are called in turn, call by call
(:func:`virtnet.cost.measure_interleaved`; onnxruntime: :func:`ort_interleaved`, sessions without
spin-waiting), and ``over_plain_*`` is the median over turns of the per-turn ratio: both see the same
machine state, which on a small shared CPU drifts by tens of percent within seconds. The ``ort_ms``
latencies are each session alone, with onnxruntime's default spin-waiting. Each row gives the FLOPs
ratio to the task's largest level (``flops_ratio``), the measured speed-up over that level
(``speedup_eager_b64``, ``speedup_ort_b64`` ...), the plain network's speed-up, and the export's speed
over the plain network's (``over_plain_*``, plain time / export time: 1 means as fast as a network built
at that size). Latency does not depend on the weights' values, so a model with random weights gives the
same figures as a trained one.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from virtnet.errors import ConfigError


def plain_like(network: nn.Module, seed: int = 0) -> nn.Module:
    """A network of ``network``'s exact module tree and shapes with fresh contiguous random weights (its
    buffers — batch-norm statistics — copied), in eval mode."""
    from virtnet.export.network import describe, rebuild

    plain = rebuild(describe(network))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b, src in zip(plain.buffers(), network.buffers(), strict=True):
            b.copy_(src)
        for p in plain.parameters():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
            else:
                p.zero_()
    return plain.eval()


def ort_latency(
    session: Any,
    input_shape: Sequence[int],
    batch_size: int,
    warmup: int = 5,
    repeats: int = 20,
) -> dict[str, float]:
    """Median (and 10th / 90th percentile) milliseconds of ``session.run`` on one random batch."""
    from virtnet.export.onnx import INPUT_NAME, OUTPUT_NAME

    rng = np.random.default_rng(0)
    x = rng.random((batch_size, *input_shape), dtype=np.float32)
    feed = {INPUT_NAME: x}
    for _ in range(warmup):
        session.run([OUTPUT_NAME], feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run([OUTPUT_NAME], feed)
        times.append((time.perf_counter() - t0) * 1e3)
    arr = np.asarray(times)
    return {
        "median_ms": float(np.median(arr)),
        "p10_ms": float(np.percentile(arr, 10)),
        "p90_ms": float(np.percentile(arr, 90)),
    }


def ort_interleaved(
    sessions: dict[str, Any],
    input_shape: Sequence[int],
    batch_size: int,
    warmup: int = 5,
    repeats: int = 20,
) -> dict[str, Any]:
    """:func:`ort_latency` for several sessions called in turn, call by call (see
    :func:`virtnet.cost.latency.measure_interleaved`). Open the sessions with
    ``ort_session(..., spinning=False)``: a session's worker threads otherwise spin after each run and
    share the cores with the next session's run. Returns ``{"median_ms": {name: ms}, "ratio": {(a, b):
    median over turns of time_a / time_b}}``."""
    from virtnet.export.onnx import INPUT_NAME, OUTPUT_NAME

    rng = np.random.default_rng(0)
    feed = {INPUT_NAME: rng.random((batch_size, *input_shape), dtype=np.float32)}
    names = list(sessions)
    for _ in range(warmup):
        for n in names:
            sessions[n].run([OUTPUT_NAME], feed)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            sessions[n].run([OUTPUT_NAME], feed)
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": {n: float(np.median(np.asarray(t))) for n, t in times.items()},
        "ratio": {
            (a, b): float(np.median(np.asarray(times[a]) / np.asarray(times[b])))
            for a in names
            for b in names
            if a != b
        },
    }


def _onnx_session(
    network: nn.Module, spec: Any, threads: int, work: Path, name: str, spinning: bool = True
) -> Any:
    from virtnet.export.onnx import describe_deployed, export_onnx, ort_session

    path = work / f"{name}.onnx"
    if not path.exists():
        export_onnx(network, spec, path, describe_deployed(spec, 0), what=name)
    return ort_session(path, threads, spinning)


def time_network(
    network: nn.Module,
    spec: Any,
    batch_sizes: Sequence[int],
    threads: int,
    warmup: int,
    repeats: int,
    onnx: bool,
    work: Path,
    name: str,
) -> dict[str, Any]:
    """``{"eager": {b: {...best_ms, best_format, nchw, channels_last}}, "ort": {b: {median_ms...}},
    "contended": bool}`` for one network (``ort`` empty without ``onnx``)."""
    from virtnet.cost import latency_profile

    prof = latency_profile(
        network,
        spec.input_shape,
        batch_sizes=tuple(batch_sizes),
        threads=threads,
        warmup=warmup,
        repeats=repeats,
    )
    eager = {}
    for b in batch_sizes:
        e = prof["batches"][b]
        eager[b] = {
            "best_ms": e["best_ms"],
            "best_format": e["best_format"],
            **{f: e[f]["median_ms"] for f in ("nchw", "channels_last") if f in e},
        }
    ort: dict[int, Any] = {}
    if onnx:
        session = _onnx_session(network, spec, threads, work, name)
        for b in batch_sizes:
            ort[b] = ort_latency(session, spec.input_shape, b, warmup, repeats)
    return {"eager": eager, "ort": ort, "contended": bool(prof["contended"])}


def time_beside(
    network: nn.Module,
    reference: nn.Module,
    spec: Any,
    batch_sizes: Sequence[int],
    threads: int,
    warmup: int,
    repeats: int,
    onnx: bool,
    work: Path,
    name: str,
) -> dict[str, Any]:
    """:func:`time_network` for ``network`` and ``reference`` together, called in turn call by call
    (:func:`virtnet.cost.measure_interleaved`, :func:`ort_interleaved`), so that both see the same machine
    state; plus ``"over_eager"`` / ``"over_ort"``: {b: median over turns of reference time / network
    time} (eager: in the reference's faster format; onnxruntime: sessions without spinning, called in
    turn — the ``ort`` latencies are each session's alone, with onnxruntime's default spinning)."""
    from virtnet.cost import measure_interleaved

    pair = {"net": network, "ref": reference}
    images = len(tuple(spec.input_shape)) == 3
    formats = ("nchw", "channels_last") if images else ("nchw",)
    out: dict[str, Any] = {"net": {"eager": {}, "ort": {}}, "ref": {"eager": {}, "ort": {}}}
    out.update(over_eager={}, over_ort={}, contended=False)
    for b in batch_sizes:
        per = {
            f: measure_interleaved(pair, spec.input_shape, b, threads, f, warmup, repeats) for f in formats
        }
        out["contended"] = out["contended"] or any(r["contended"] for r in per.values())
        for key in pair:
            ms = {f: per[f]["median_ms"][key] for f in formats}
            best = min(formats, key=lambda f, ms=ms: ms[f])
            out[key]["eager"][b] = {"best_ms": ms[best], "best_format": best, **ms}
        out["over_eager"][b] = per[out["ref"]["eager"][b]["best_format"]]["ratio"][("ref", "net")]
    if onnx:  # latencies: each session alone (spinning, onnxruntime's default); ratio: called in turn
        names = {"net": (network, name), "ref": (reference, name + "_plain")}
        alone = {k: _onnx_session(m, spec, threads, work, n) for k, (m, n) in names.items()}
        quiet = {k: _onnx_session(m, spec, threads, work, n, spinning=False) for k, (m, n) in names.items()}
        for b in batch_sizes:
            for key in pair:
                out[key]["ort"][b] = ort_latency(alone[key], spec.input_shape, b, warmup, repeats)
            r = ort_interleaved(quiet, spec.input_shape, b, warmup, repeats)
            out["over_ort"][b] = r["ratio"][("ref", "net")]
    return out


def bench_model(
    method: Any,
    model: nn.Module,
    tasks: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    threads: int = 1,
    warmup: int = 5,
    repeats: int = 20,
    onnx: bool = True,
    plain: bool = True,
    plain_networks: Mapping[tuple[str, int], nn.Module] | None = None,
    source: str | None = None,
    label: str | None = None,
    scenario: str | None = None,
) -> dict[str, Any]:
    """Time every (task, level) export of ``model`` (see the module docstring).

    Args:
        method, model: the method and its multi-task model.
        tasks: the tasks to time (default: all).
        batch_sizes: the batch sizes (1 and 64).
        threads: intra-op threads in both runtimes (fixed for every measurement).
        warmup, repeats: untimed and timed calls per measurement.
        onnx: also time onnxruntime.
        plain: also time a plain network of the same shape (:func:`plain_like`, unless
            ``plain_networks`` gives one for a (task, level): e.g. a backbone built at that width).
        source, label, scenario: recorded in the rows (``method`` is ``label`` or ``method.name``).

    Returns:
        ``{"rows": [...], "settings": {...}}``; one row per (task, level) with ``params``, ``flops``,
        ``bytes``, ``flops_ratio``, ``latency_ms_b<B>`` (eager, faster format), ``format_b<B>``,
        ``ort_ms_b<B>``, ``speedup_eager_b<B>``, ``speedup_ort_b<B>``, the plain network's
        ``plain_*`` figures and ``over_plain_eager_b<B>`` / ``over_plain_ort_b<B>``.
    """
    from virtnet.cost import bytes_on_disk, count_flops, count_parameters

    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {threads!r}")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ConfigError(f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    for t in tasks or ():
        model.check_task(t)  # type: ignore[operator]
    tasks = list(tasks or model.tasks)  # type: ignore[attr-defined]
    name = label or method.name
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="virtnet-bench-") as tmp:
        work = Path(tmp)
        for task in tasks:
            spec = model.spec(task)  # type: ignore[operator]
            task_rows = []
            for lv in method.levels(model, task):
                net = method.export(model, task, lv.index)
                tag = f"{task}_{lv.index}"
                ref = None
                if plain:
                    ref = (plain_networks or {}).get((task, lv.index)) or plain_like(net)
                    both = time_beside(net, ref, spec, batch_sizes, threads, warmup, repeats, onnx, work, tag)
                    timing = {**both["net"], "contended": both["contended"]}
                else:
                    timing = time_network(net, spec, batch_sizes, threads, warmup, repeats, onnx, work, tag)
                row: dict[str, Any] = {
                    "method": name,
                    "scenario": scenario or "+".join(model.tasks),  # type: ignore[attr-defined]
                    "task": task,
                    "level": lv.index,
                    "level_name": lv.name,
                    "accuracy": None,
                    "params": count_parameters(net),
                    "flops": count_flops(net, spec.input_shape),
                    "bytes": bytes_on_disk(net),
                    "contended": timing["contended"],
                }
                for b in batch_sizes:
                    row[f"latency_ms_b{b}"] = timing["eager"][b]["best_ms"]
                    row[f"format_b{b}"] = timing["eager"][b]["best_format"]
                    if onnx:
                        row[f"ort_ms_b{b}"] = timing["ort"][b]["median_ms"]
                if ref is not None:
                    row["plain_params"] = count_parameters(ref)
                    for b in batch_sizes:
                        row[f"plain_ms_b{b}"] = both["ref"]["eager"][b]["best_ms"]
                        row[f"over_plain_eager_b{b}"] = both["over_eager"][b]
                        if onnx:
                            row[f"plain_ort_ms_b{b}"] = both["ref"]["ort"][b]["median_ms"]
                            row[f"over_plain_ort_b{b}"] = both["over_ort"][b]
                task_rows.append(row)
            top = task_rows[-1]
            for row in task_rows:
                row["flops_ratio"] = row["flops"] / top["flops"] if top["flops"] else None
                for b in batch_sizes:
                    row[f"speedup_eager_b{b}"] = top[f"latency_ms_b{b}"] / row[f"latency_ms_b{b}"]
                    if onnx:
                        row[f"speedup_ort_b{b}"] = top[f"ort_ms_b{b}"] / row[f"ort_ms_b{b}"]
                        row[f"ort_over_eager_b{b}"] = row[f"latency_ms_b{b}"] / row[f"ort_ms_b{b}"]
                    if plain:
                        row[f"plain_speedup_eager_b{b}"] = top[f"plain_ms_b{b}"] / row[f"plain_ms_b{b}"]
                        if onnx:
                            row[f"plain_speedup_ort_b{b}"] = (
                                top[f"plain_ort_ms_b{b}"] / row[f"plain_ort_ms_b{b}"]
                            )
            rows.extend(task_rows)
    settings = {
        "batch_sizes": list(batch_sizes),
        "threads": threads,
        "warmup": warmup,
        "repeats": repeats,
        "onnx": onnx,
        "plain": plain,
        "statistic": "median after warm-up",
        "source": source,
        "torch": torch.__version__,
    }
    if onnx:
        import onnxruntime

        settings["onnxruntime"] = onnxruntime.__version__
    return {"rows": rows, "settings": settings}


def worst(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The smallest value of ``key`` over ``rows`` (None when no row has it)."""
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return min(vals) if vals else None


def plot_speedup(
    rows: Sequence[Mapping[str, Any]], path: str | Path, batch: int = 64, title: str = ""
) -> Path:
    """Speed-up over the task's largest level against the FLOPs ratio (log-log), eager and onnxruntime,
    with the ideal line (speed-up = 1 / FLOPs ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ratios = [r["flops_ratio"] for r in rows if r.get("flops_ratio")]
    lo = min(ratios + [1.0]) * 0.8
    xs = np.geomspace(lo, 1.0, 50)
    ax.plot(xs, 1 / xs, "k--", lw=1, label="ideal (1 / FLOPs ratio)")
    for key, marker, label in (
        (f"speedup_eager_b{batch}", "o", "eager PyTorch"),
        (f"speedup_ort_b{batch}", "s", "onnxruntime"),
        (f"plain_speedup_eager_b{batch}", "x", "plain network, eager"),
        (f"plain_speedup_ort_b{batch}", "+", "plain network, onnxruntime"),
    ):
        pts = [(r["flops_ratio"], r[key]) for r in rows if r.get(key) is not None and r.get("flops_ratio")]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs ratio to the largest level")
    ax.set_ylabel(f"measured speed-up at batch {batch}")
    ax.set_title(title or f"speed-up against FLOPs ratio (batch {batch})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary_lines(rows: Sequence[Mapping[str, Any]], batch_sizes: Sequence[int]) -> list[str]:
    """A few lines summarising a bench: the worst export-over-plain speed per runtime and batch size."""
    out = []
    for b in batch_sizes:
        for rt in ("eager", "ort"):
            w = worst(rows, f"over_plain_{rt}_b{b}")
            if w is not None:
                out.append(
                    f"batch {b}, {rt}: slowest export runs at {w:.3f} x the speed of its plain network"
                )
    med = [r.get(f"ort_over_eager_b{b}") for r in rows for b in batch_sizes if r.get(f"ort_over_eager_b{b}")]
    if med:
        out.append(f"onnxruntime over eager PyTorch: median {statistics.median(med):.2f} x faster")
    if any(r.get("contended") for r in rows):
        out.append("WARNING: other processes competed for the cores while timing: figures are unreliable")
    return out


__all__ = [
    "bench_model",
    "ort_interleaved",
    "ort_latency",
    "plain_like",
    "plot_speedup",
    "summary_lines",
    "time_beside",
    "time_network",
    "worst",
]
