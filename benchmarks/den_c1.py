"""Benchmark: DEN scenario C1 at small scale (issue 11): single-task compression of KMNIST-10k (8,000 /
2,000, docs/data.md) with rho in {0.1, 1}, beside the backbone trained alone, the full estimator and rand
sel (the estimator with random structures matched to DEN's mean FLOPs: the paper's Table 5 "rand sel").
NestedNet and grouped PackNet need several tasks (one level per task) and are left out by default.
Rows, claims and plots as in den_m1.py (shared: ``den_m1.run_scenario``).

Run:  python benchmarks/den_c1.py [--epochs 6] [--stages 3]   (about 40 minutes on 2 cores)
Smoke: python benchmarks/den_c1.py --smoke --out /tmp/den_c1/den_c1   (under a minute; not a result)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parser  # noqa: E402
from den_m1 import add_args, run_scenario  # noqa: E402


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    add_args(p, epochs=6)
    p.set_defaults(baselines="individual")
    args = p.parse_args()
    data = {
        "root": args.data_root,
        "sampling": "all",
        "val_fraction": 0,  # nothing is chosen from data here: every method trains on the whole train set
        "tasks": [{"name": "kmnist10k", "dataset": "kmnist10k"}],
    }
    run_scenario("den_c1", "C1", data, args, {"tasks": "KMNIST-10k (single task)"})


if __name__ == "__main__":
    main()
