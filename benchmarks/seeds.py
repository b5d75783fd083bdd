"""Claims over several seeds (issue 15): one benchmark's results files, one per seed, as one file.

Every numeric claim found in all the files becomes one claim whose per-seed values, mean and (sample)
standard deviation are rows of the new file. Issue 15's rule: a claim is met when its mean meets the target
and no seed misses the target by more than one standard deviation. ``measured`` encodes the rule so that
``met == measured op target`` still holds on the stored numbers:

* ``>=`` / ``>``: measured = min(mean, worst seed + sd);
* ``<=`` / ``<``: measured = max(mean, worst seed - sd);
* ``==``: measured = the mean, met only when every seed equals the target.

A claim with a sentence as target is met when it is met at every seed (measured: "k of n seeds").

One seed's results may be spread over several files of the same benchmark and seed (a baseline run apart
from the rest): ``a.json+b.json`` reads them as one file, rows joined (a row whose (method, scenario,
task, level, stage) an earlier file already has must equal it) and claims joined (a claim in two of them
must have the same measured value).

Run:  python benchmarks/seeds.py --name dvn_s1_seeds docs/results/dvn_s1.json docs/results/dvn_s1_seed1.json
      docs/results/dvn_s1_seed2.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, claim, parser, text_claim, write_results  # noqa: E402


def read(path: str) -> dict[str, Any]:
    """One results file, with its seed and claims checked."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{p}: cannot read a results file: {e}") from None
    for key in ("seed", "claims", "benchmark"):
        if key not in doc:
            raise SystemExit(f"{p}: no '{key}' (not a results file with claims)")
    return doc


def row_key(r: dict[str, Any]) -> tuple:
    return (r.get("method"), r.get("scenario"), r.get("task"), r.get("level"), r.get("stage"))


def join(paths: list[str], docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several results files of one benchmark and one seed as one: rows and claims joined. A row key or a
    claim id found in two files must carry the same accuracy / measured value there."""
    first = docs[0]
    for p, d in zip(paths[1:], docs[1:], strict=True):
        if d["benchmark"] != first["benchmark"] or d["seed"] != first["seed"]:
            raise SystemExit(
                f"{p}: benchmark {d['benchmark']!r} seed {d['seed']} cannot join {paths[0]} "
                f"(benchmark {first['benchmark']!r} seed {first['seed']})"
            )
    rows: dict[tuple, dict[str, Any]] = {}  # only rows with an accuracy: all that combine() reads
    claims: dict[str, dict[str, Any]] = {}
    for p, d in zip(paths, docs, strict=True):
        for r in d["rows"]:
            if not isinstance(r.get("accuracy"), (int, float)):
                continue
            k = row_key(r)
            if k in rows and rows[k]["accuracy"] != r["accuracy"]:
                raise SystemExit(
                    f"{p}: row {k} has accuracy {r['accuracy']}, another file of seed {d['seed']} "
                    f"{rows[k]['accuracy']}"
                )
            rows.setdefault(k, r)
        for c in d["claims"]:
            if c["id"] in claims and claims[c["id"]]["measured"] != c["measured"]:
                raise SystemExit(
                    f"{p}: claim {c['id']!r} measured {c['measured']}, another file of seed {d['seed']} "
                    f"{claims[c['id']]['measured']}"
                )
            claims.setdefault(c["id"], c)
    return {
        **first,
        "command": " ; ".join(str(d.get("command")) for d in docs),
        "rows": list(rows.values()),
        "claims": list(claims.values()),
    }


def read_seed(arg: str) -> dict[str, Any]:
    """One seed's results: a file, or several joined by ``+`` (:func:`join`)."""
    paths = arg.split("+")
    docs = [read(p) for p in paths]
    return docs[0] if len(docs) == 1 else join(paths, docs)


def accuracy_rows(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, scenario, task, level, stage) found with an accuracy in every file: the mean accuracy
    (``accuracy``), its sample standard deviation and the per-seed values; costs from the first file."""

    tables = [{row_key(r): r for r in d["rows"] if isinstance(r.get("accuracy"), (int, float))} for d in docs]
    out = []
    for k, first in tables[0].items():
        if not all(k in t for t in tables[1:]):
            continue
        values = [t[k]["accuracy"] for t in tables]
        row = {
            x: first[x]
            for x in ("method", "scenario", "task", "level", "stage", "params", "flops")
            if x in first
        }
        row["accuracy"] = round(statistics.fmean(values), 2)
        row["accuracy_sd"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
        row["accuracy_per_seed"] = values
        out.append(row)
    return out


def combine(docs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows (:func:`accuracy_rows`) and the combined claims (each with its ``per_seed`` values)."""
    seeds = [d["seed"] for d in docs]
    by_id = [{c["id"]: c for c in d["claims"]} for d in docs]
    ids = [i for i in by_id[0] if all(i in b for b in by_id[1:])]
    claims: list[dict[str, Any]] = []
    for cid in ids:
        cs = [b[cid] for b in by_id]
        target = cs[0]["target"]
        values = [c["measured"] for c in cs]
        if isinstance(target, dict):
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
                c = claim(
                    cid,
                    cs[0]["statement"] + " [a seed has no measurement]",
                    target["op"],
                    target["value"],
                    None,
                )
                claims.append({**c, "per_seed": values})
                continue
            mean = statistics.fmean(values)
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            op = target["op"]
            if op in (">=", ">"):
                measured = min(mean, min(values) + sd)
            elif op in ("<=", "<"):
                measured = max(mean, max(values) - sd)
            else:
                measured = mean if all(v == target["value"] for v in values) else None
            statement = (
                f"{cs[0]['statement']} — over seeds {seeds}: mean {mean:.4g} ± {sd:.4g} (per seed "
                f"{', '.join(f'{v:.4g}' for v in values)}); measured = the mean bounded by the worst seed "
                "moved one sd towards the target (met: the mean meets it and no seed misses it by more "
                "than one sd)"
            )
            c = claim(cid, statement, op, target["value"], measured)
            claims.append({**c, "mean": round(mean, 6), "sd": round(sd, 6), "per_seed": values})
        else:
            n_met = sum(bool(c["met"]) for c in cs)
            c = text_claim(
                cid,
                f"{cs[0]['statement']} — at every seed of {seeds}",
                target,
                f"{n_met} of {len(cs)} seeds",
                n_met == len(cs),
            )
            claims.append({**c, "per_seed": values})
    return accuracy_rows(docs), claims


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "files",
        nargs="+",
        help="results .json files of one benchmark, one per seed (several files of one seed joined by +)",
    )
    p.add_argument("--name", required=True, help="name of the combined file (docs/results/<name>)")
    args = p.parse_args()
    docs = [read_seed(f) for f in args.files]
    names = {d["benchmark"] for d in docs}
    if len(names) != 1:
        raise SystemExit(f"the files are of different benchmarks: {sorted(names)}")
    seeds = [d["seed"] for d in docs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"two files have the same seed: {seeds}")
    rows, claims = combine(docs)
    write_results(
        args.name,
        rows,
        seeds[0],
        args.out or str(RESULTS / args.name),
        extra={
            "seeds": seeds,
            "sources": [
                {
                    "file": "+".join(Path(x).name for x in f.split("+")),
                    "seed": d["seed"],
                    "command": d.get("command"),
                }
                for f, d in zip(args.files, docs, strict=True)
            ],
        },
        claims=claims,
    )
    met = sum(c["met"] for c in claims)
    print(f"{args.name}: {met} of {len(claims)} claims met over seeds {seeds}")


if __name__ == "__main__":
    main()
