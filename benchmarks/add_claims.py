"""Recompute the ``claims`` of existing results files from their stored rows (no re-run).

For each ``docs/results/<name>.json`` given (default: all), the benchmark that wrote it (its ``benchmark``
key, else the file name) gives the claims function, the same one the benchmark calls when it writes its
results: ``claims(rows, meta)`` in ``benchmarks/<benchmark>.py`` (``meta``: the file's other top-level
keys), or the entry of ``FUNCTIONS`` below when one script writes several files. The claims go into the
JSON (key ``claims``, everything else unchanged) and, as a table, into the ``.md`` after the title and the
meta lines (an earlier claims table is replaced). A file whose benchmark has no claims function is
reported and left alone.

A new benchmark needs nothing here: define ``claims(rows, meta=None)`` in its script, with
``_common.claim``, and pass ``claims=claims(rows)`` to ``write_results``.

Run:  python benchmarks/add_claims.py [docs/results/NAME.json ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import RESULTS, write_claims  # noqa: E402

#: benchmark name -> (script module, function) where the script's name or function is not the default
FUNCTIONS = {
    "dvn_j1": ("dvn_joint", "claims"),
    "dvn_h1": ("dvn_joint", "claims"),
    "adapters_transfer": ("adapters_decathlon", "transfer_claims"),
    "den_m1": ("den_m1", "claims_of_rows"),
    "den_m3": ("den_m1", "claims_of_rows"),
    "den_c1": ("den_m1", "claims_of_rows"),
}

ClaimsFn = Callable[[list[dict[str, Any]], dict[str, Any]], list[dict[str, Any]]]


def claims_function(benchmark: str) -> ClaimsFn | None:
    """The claims function of ``benchmark``, or None when its script has none."""
    module, name = FUNCTIONS.get(benchmark, (benchmark, "claims"))
    if not (HERE / f"{module}.py").is_file():
        return None
    return getattr(importlib.import_module(module), name, None)


def claims_of(path: Path) -> tuple[str, list[dict[str, Any]] | None]:
    """(benchmark, claims computed from the file's rows; None when there is no claims function)."""
    doc = json.loads(path.read_text())
    benchmark = str(doc.get("benchmark") or path.stem)
    fn = claims_function(benchmark)
    if fn is None:
        return benchmark, None
    meta = {k: v for k, v in doc.items() if k not in ("rows", "claims")}
    return benchmark, fn(doc["rows"], meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", help="results JSON files (default: docs/results/*.json)")
    p.add_argument("--dry-run", action="store_true", help="print the claims, write nothing")
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.paths] or sorted(RESULTS.glob("*.json"))
    failed = 0
    for path in paths:
        try:
            benchmark, claims = claims_of(path)
        except Exception as e:  # a file the function cannot read: report it, go on with the others
            print(f"{path}: {type(e).__name__}: {e}")
            failed += 1
            continue
        if claims is None:
            print(f"{path}: no claims function for benchmark {benchmark!r}; left alone")
            continue
        if not claims:
            print(f"{path}: the claims function of {benchmark!r} found nothing to claim; left alone")
            continue
        missed = [c["id"] for c in claims if not c["met"]]
        if path.is_absolute() and path.is_relative_to(Path.cwd()):
            path = path.relative_to(Path.cwd())
        print(f"{path}: {len(claims)} claims, {len(claims) - len(missed)} met")
        for c in claims:
            if not c["met"]:
                print(f"  not met: {c['id']} (measured {c['measured']}, target {c['target']})")
        if not args.dry_run:
            write_claims(path.with_suffix(""), claims)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
