"""Shared plumbing of the benchmark scripts: arguments, data root, result files.

Every benchmark writes ``docs/results/<name>.json`` and ``docs/results/<name>.md`` with the exact command,
the seed and the machine, the JSON as {"command", "seed", "machine", "rows": [{"method", "scenario",
"task", "level", "accuracy", "params", "flops", ...}], "claims": [...]}.

Claims (issue 15): every results file carries ``claims``, a list of ``{"id", "statement", "target",
"measured", "met"}`` computed from the file's own rows by the benchmark's claims function, and its ``.md``
shows the same table first (after the title and the meta lines). A benchmark builds them with
:func:`claim` (numeric target: ``met`` is computed) or :func:`text_claim` (a string target, only where no
number fits) and passes them to ``write_results(..., claims=...)``, or writes them into existing files with
:func:`write_claims` (what ``benchmarks/add_claims.py`` does from the stored rows)::

    def claims(rows, meta):
        gap = ind - dvn                                        # from the rows
        return [claim("dvn_j1.all_units_gap.mnist", "DVN's all-unit level within 0.5 points of ...",
                      "<=", 0.5, gap)]

    write_results("dvn_j1", rows, seed, out, extra=meta, claims=claims(rows, meta))

``measured`` is rounded to 6 decimals (float noise of differences of percentages) before ``met`` is
computed, so ``met == measured op value`` holds on the stored numbers (what
``../shared/tools/check_results.py`` checks); a measurement that does not exist is ``None`` and never met.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--data-root",
        default=None,
        help="data folder (default: $VIRTNET_DATA_ROOT, else ../shared/data when it exists)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for training and timing")
    p.add_argument("--out", default=None, help="result stem (default docs/results/<benchmark name>)")
    p.add_argument("--work-dir", default=None, help="where runs are written (default runs/bench/<name>)")
    return p


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    seed: int,
    out: str | None = None,
    extra: dict[str, Any] | None = None,
    notes: str = "",
    claims: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``<stem>.json``, ``.csv`` and ``.md`` (stem: ``out`` or docs/results/<name>); with ``claims``,
    also the claims (see :func:`write_claims`; a benchmark that rewrites the .md afterwards calls
    write_claims itself after that)."""
    from virtnet.cost import machine_info, write_report

    stem = Path(out) if out else RESULTS / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": name,
        "command": command_line(),
        "seed": seed,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **(extra or {}),
    }
    if notes:
        meta["notes"] = notes
    write_report(rows, stem, meta)
    if claims is not None:
        write_claims(stem, claims)
    return stem


# ---- claims ----------------------------------------------------------------------------------------

OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}
#: issue 15's floors for baselines of about 0.1-0.3 M parameters (test accuracy, %), per dataset
BASELINE_FLOORS = {"mnist": 99.3, "fashion_mnist": 92.0, "kmnist10k": 97.0, "digits": 98.5}


def _number(x: Any) -> float | int | None:
    """``x`` as a finite number rounded to 6 decimals, else None (missing, NaN, not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    if isinstance(x, int):
        return x
    if not math.isfinite(x):
        return None
    r = round(float(x), 6)
    return 0.0 if r == 0 else r  # no -0.0


def claim(id: str, statement: str, op: str, value: float, measured: Any) -> dict[str, Any]:
    """One claim with a numeric target: ``met`` = ``measured op value``; False when ``measured`` is None.

    Args:
        id: unique within the file, dotted, e.g. ``dvn_j1.all_units_gap.mnist``.
        statement: what is claimed and what ``measured`` is (its unit and sign convention).
        op: one of ``<=``, ``>=``, ``<``, ``>``, ``==``.
        value: the target.
        measured: the number computed from the rows (rounded to 6 decimals), or None when not measured.
    """
    if op not in OPS:
        raise ValueError(f"claim {id!r}: op must be one of {sorted(OPS)}, got {op!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"claim {id!r}: target value must be a finite number, got {value!r}")
    m = _number(measured)
    return {
        "id": id,
        "statement": statement,
        "target": {"op": op, "value": value},
        "measured": m,
        "met": bool(m is not None and OPS[op](m, value)),
    }


def text_claim(id: str, statement: str, target: str, measured: Any, met: bool) -> dict[str, Any]:
    """A claim whose target is a sentence (only where no numeric target fits); never met when measured is
    None."""
    m = _number(measured) if isinstance(measured, (int, float)) else measured
    return {
        "id": id,
        "statement": statement,
        "target": target,
        "measured": m,
        "met": bool(met and m is not None),
    }


def floor_claims(prefix: str, accuracies: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """Issue 15's baseline floors: one claim per (method, task) whose task is one of BASELINE_FLOORS'
    datasets (``<dataset>_fine``: the same labels); ``accuracies`` maps (method, task) to test accuracy."""
    out = []
    for (method, task), acc in accuracies.items():
        dataset = task[: -len("_fine")] if task.endswith("_fine") else task
        if dataset in BASELINE_FLOORS:
            floor = BASELINE_FLOORS[dataset]
            out.append(
                claim(
                    f"{prefix}.baseline_floor.{method}.{task}",
                    f"the {method} baseline on {task} reaches issue 15's floor for {dataset} "
                    f"(test accuracy, %, >= {floor})",
                    ">=",
                    floor,
                    acc,
                )
            )
    return out


def last_quarter_gain(curve: list[float]) -> float | None:
    """Issue 15's convergence rule's measure: best of the last quarter of ``curve`` (at least one epoch)
    minus the best before it; None with fewer than two epochs."""
    if len(curve) < 2:
        return None
    q = max(1, len(curve) // 4)
    return max(curve[-q:]) - max(curve[:-q])


def eval_curves(run: Any) -> dict[tuple[str, int], list[float]]:
    """(task, level) -> accuracy after every evaluation in ``run``'s history (``eval_every`` > 0), in order
    over all phases; the loop evaluates on the val split when every task of the phase has one, else test."""
    out: dict[tuple[str, int], list[float]] = {}
    for event in run.summary["history"]:
        if event.get("event") == "eval":
            for r in event["rows"]:
                out.setdefault((r["task"], r["level"]), []).append(r["accuracy"])
    return out


def converged_claims(prefix: str, rows: list[dict[str, Any]], methods: tuple[str, ...] | None = None) -> list:
    """Issue 15's convergence rule, one claim per row of ``methods`` (all when None) that carries a
    ``last_quarter_gain``: the best test accuracy in the last quarter of the epochs is under 0.2 points above
    the best before ("< 0.2" written as "<= 0.2")."""
    out = []
    for r in rows:
        if "last_quarter_gain" not in r or (methods is not None and r["method"] not in methods):
            continue
        out.append(
            claim(
                f"{prefix}.converged.{r['method']}.{r['task']}",
                f"the {r['method']} baseline on {r['task']} has converged: its best test accuracy in "
                "the last quarter of the epochs is under 0.2 points above the best before",
                "<=",
                0.2,
                r["last_quarter_gain"],
            )
        )
    return out


CLAIMS_BEGIN = "<!-- claims: generated by benchmarks/_common.py write_claims -->"
CLAIMS_END = "<!-- /claims -->"


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v).replace("|", "\\|")


def claims_markdown(claims: list[dict[str, Any]]) -> str:
    """The claims table (between markers, so that it can be replaced)."""
    n_met = sum(c["met"] for c in claims)
    lines = [
        CLAIMS_BEGIN,
        "## Claims",
        "",
        f"{n_met} of {len(claims)} met. `measured` is computed from this file's rows.",
        "",
        "| id | statement | target | measured | met |",
        "|---|---|---|---:|---|",
    ]
    for c in claims:
        t = c["target"]
        target = f"{t['op']} {_cell(t['value'])}" if isinstance(t, dict) else _cell(t)
        lines.append(
            f"| `{c['id']}` | {_cell(c['statement'])} | {target} | {_cell(c['measured'])} | "
            f"{'**yes**' if c['met'] else 'no'} |"
        )
    lines.append(CLAIMS_END)
    return "\n".join(lines)


def insert_claims_markdown(text: str, claims: list[dict[str, Any]]) -> str:
    """``text`` (a results .md) with its claims section replaced, or inserted after the title and the
    meta lines (the ``- command: ...`` paragraph; after the title when there is none)."""
    text = re.sub(re.escape(CLAIMS_BEGIN) + r".*?" + re.escape(CLAIMS_END) + r"\n*", "", text, flags=re.S)
    lines = text.split("\n")
    at = next((i for i, line in enumerate(lines) if line.startswith("- command:")), None)
    if at is None:
        at = next((i for i, line in enumerate(lines) if line.startswith("# ")), -1)
    while at + 1 < len(lines) and lines[at + 1].strip():
        at += 1
    block = ["", *claims_markdown(claims).split("\n")]
    if at + 1 >= len(lines) or lines[at + 1].strip():
        block.append("")
    return "\n".join(lines[: at + 1] + block + lines[at + 1 :])


def write_claims(stem: str | Path, claims: list[dict[str, Any]]) -> None:
    """Put ``claims`` into ``<stem>.json`` (key ``claims``, before ``rows``; everything else unchanged) and
    its table into ``<stem>.md`` (replacing an earlier one)."""
    stem = Path(stem)
    ids = [c["id"] for c in claims]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate claim ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    jpath, mpath = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    doc = json.loads(jpath.read_text())
    out = {k: v for k, v in doc.items() if k not in ("claims", "rows")}
    out["claims"] = claims
    out["rows"] = doc["rows"]
    out.update({k: v for k, v in doc.items() if k not in out})
    jpath.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
    if mpath.is_file():
        mpath.write_text(insert_claims_markdown(mpath.read_text(), claims))


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def run_method(
    method: str,
    scenario: str,
    data: dict[str, Any],
    model: dict[str, Any],
    train: dict[str, Any],
    work: Path,
    seed: int,
    taskset: Any = None,
    options: dict[str, Any] | None = None,
    label: str | None = None,
    threads: int = 2,
    latency: bool = True,
) -> tuple[list[dict[str, Any]], Any]:
    """Train one method through the public API and return its rows (accuracy and costs per (task, level))
    and the run. Rows carry the method's label, the scenario, total physical parameters and seconds per
    epoch (median)."""
    import statistics

    from virtnet import api
    from virtnet.config import RunConfig

    cfg = RunConfig.from_dict(
        {
            "seed": seed,
            "output_dir": str(work / (label or method)),
            "data": data,
            "model": model,
            "method": {"name": method, **(options or {})},
            "train": {"eval_every": 0, "checkpoint_every": 0, "progress": False, "threads": threads, **train},
        }
    )
    t0 = time.perf_counter()
    run = api.train(cfg, taskset=taskset, log=lambda s: print(f"  [{label or method}] {s}", flush=True))
    loaded = api.load(run.out_dir / "model.json")
    cost = api.cost_rows(loaded, latency=latency, threads=threads)
    total = api.total_parameters(loaded.model)
    sec = statistics.median(run.summary["epoch_seconds"]) if run.summary["epoch_seconds"] else None
    rows = []
    for r in api.merge_rows(run.test_rows, cost):
        rows.append(
            {
                **r,
                "method": label or method,
                "scenario": scenario,
                "total_params": total,
                "seconds_per_epoch": sec,
                "train_seconds": time.perf_counter() - t0,
            }
        )
    print(
        f"{label or method}: "
        + ", ".join(f"{r['task']}@{r['level']} {r['accuracy']:.2f}%" for r in rows)
        + f"; total {total:,} parameters",
        flush=True,
    )
    return rows, run


def add_training_args(
    p: argparse.ArgumentParser,
    epochs: int,
    depth: int = 20,
    width: float = 0.5,
    batch_size: int = 128,
    lr: float = 0.1,
) -> None:
    """The backbone and schedule options every training benchmark shares."""
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--depth", type=int, default=depth)
    p.add_argument("--width", type=float, default=width)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)


def sgd_train(args: argparse.Namespace) -> dict[str, Any]:
    """The ``train:`` section of the benchmarks: SGD with Nesterov momentum 0.9 (DVN Sec. 4.2), weight
    decay 5e-4, cosine schedule."""
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": "sgd",
        "lr": args.lr,
        "nesterov": True,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "cosine",
    }


def read_mergeable(path: str | Path, setup: dict[str, Any]) -> dict[str, Any]:
    """The results JSON ``path`` for ``--merge-from``: exits unless every key of ``setup`` (what the
    results depend on besides the methods) has the same value there."""
    old = json.loads(Path(path).read_text())
    for key, value in setup.items():
        if old.get(key) != value:
            raise SystemExit(f"--merge-from {path}: '{key}' differs ({old.get(key)} vs {value})")
    return old
