"""Shared plumbing of the benchmark scripts: arguments, data root, result files.

Every benchmark writes ``docs/results/<name>.json`` and ``docs/results/<name>.md`` with the exact command,
the seed and the machine, the JSON as {"command", "seed", "machine", "rows": [{"method", "scenario",
"task", "level", "accuracy", "params", "flops", ...}]}.
"""

from __future__ import annotations

import argparse
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
) -> Path:
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
    return stem


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
