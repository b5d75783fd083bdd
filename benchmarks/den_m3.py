"""Benchmark: DEN scenario M3 at small scale (issue 11): Fashion-MNIST's coarse (4 groups) and fine (10
classes) labels of the same images as two tasks (the paper: CIFAR-100's 20 and 100), one DEN per rho in
{0.1, 1}, beside the individual backbones, NestedNet and grouped PackNet, the full estimator and rand sel.
Rows, claims and plots as in den_m1.py (shared: ``den_m1.run_scenario``).

Run:  python benchmarks/den_m3.py [--epochs 4] [--stages 3] [--train-size 20000]   (about 1 hour on 2 cores)
Smoke: python benchmarks/den_m3.py --smoke --out /tmp/den_m3/den_m3   (about a minute; not a result)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parser  # noqa: E402
from den_m1 import add_args, run_scenario  # noqa: E402


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    add_args(p, train_size=20000)
    args = p.parse_args()
    data = {
        "root": args.data_root,
        "sampling": "all",
        "val_fraction": 0,  # nothing is chosen from data here: every method trains on the whole train set
        "scenario": {"kind": "coarse_fine", "dataset": "fashion_mnist", "train_size": args.train_size},
    }
    run_scenario("den_m3", "M3", data, args, {"tasks": "Fashion-MNIST coarse (4) and fine (10) labels"})


if __name__ == "__main__":
    main()
