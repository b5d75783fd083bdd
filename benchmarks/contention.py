"""Benchmark: `virtnet demo` and a training step, alone and beside one busy single-threaded process.

Both run with virtnet's default thread rule (virtnet.threads: one thread per usable core that is not busy;
nothing here sets threads or VIRTNET_THREADS). Each measurement runs in a fresh process. The busy process
is a Python loop (`while True: pass`) started by this script a moment before the measurement and stopped
after it. The training step is the demo's model and data: the time per step is the difference between
two short runs of `api.train` (epochs 1, N1 and N2 steps, no evaluation or checkpoints; after one
discarded warm-up run) divided by N2 - N1, so set-up cancels out. Target (issue 14): under contention
each at most 2x its idle time.

Run:  python benchmarks/contention.py [--repeats 3] [--steps 20 60]      (about 3 minutes on 2 cores)
      python benchmarks/contention.py --smoke                                (a few seconds: checks it runs)
Run it on an otherwise idle machine: the "idle" condition must be idle.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, claim, parser, write_results  # noqa: E402

BUSY = "while True:\n    pass\n"

STEP_WORKER = r"""
import json, sys, time
from virtnet import api
from virtnet.cli import demo_config_path, load_run_config
from virtnet.threads import apply_default, applied

out, steps = sys.argv[1], [int(s) for s in sys.argv[2:]]
choice = apply_default(None)
times = []
for n in [steps[0], *steps]:  # the first run warms up (data cache, allocator): discarded
    sets = [f"train.epochs=1", f"train.max_steps_per_epoch={n}", "train.eval_every=0",
            "train.checkpoint_every=0", "train.progress=false"]
    cfg = load_run_config(demo_config_path(), sets, None, f"{out}/steps{n}")
    t0 = time.perf_counter()
    run = api.train(cfg, log=lambda s: None)
    times.append(time.perf_counter() - t0)
params = sum(p.numel() for p in run.model.parameters())
print(json.dumps({"seconds": times[1:], "steps": steps, "threads": choice.threads, "busy": choice.busy,
                  "params": params}))
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTNET_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Busy:
    """One busy single-threaded process while inside (``active=False``: none)."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Busy:
        if self.active:
            self.proc = subprocess.Popen([sys.executable, "-c", BUSY])
            time.sleep(1.0)  # let it take its core (and show in the load the rule samples)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def time_demo(work: Path, demo_args: list[str], busy: bool) -> float:
    with Busy(busy):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "virtnet", "demo", "--output-dir", str(work), *demo_args],
            check=True,
            env=_env(),
            stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - t0


def time_steps(work: Path, steps: tuple[int, int], busy: bool) -> dict:
    with Busy(busy):
        p = subprocess.run(
            [sys.executable, "-c", STEP_WORKER, str(work), *map(str, steps)],
            check=True,
            env=_env(),
            capture_output=True,
            text=True,
        )
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["ms_per_step"] = 1000 * (r["seconds"][1] - r["seconds"][0]) / (steps[1] - steps[0])
    return r


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="measurements per (what, condition); median")
    p.add_argument("--steps", type=int, nargs=2, default=(20, 60), metavar=("N1", "N2"))
    p.add_argument("--smoke", action="store_true", help="minimal settings: check that the script runs")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the busy process on the way out
    demo_args: list[str] = []
    steps = tuple(args.steps)
    repeats = args.repeats
    if args.smoke:
        demo_args = ["--set", "train.epochs=1", "--set", "cost.repeats=1", "--set", "cost.batch_sizes=[1]"]
        steps, repeats = (1, 3), 1
    work = Path(args.work_dir or ROOT / "runs" / "bench" / "contention")
    work.mkdir(parents=True, exist_ok=True)

    demo: dict[str, list[float]] = {"idle": [], "busy": []}
    step: dict[str, list[dict]] = {"idle": [], "busy": []}
    for i in range(repeats):  # alternate the conditions, so slow drifts hit both
        for cond in ("idle", "busy"):
            demo[cond].append(time_demo(work / f"demo_{cond}_{i}", demo_args, cond == "busy"))
            step[cond].append(time_steps(work / f"step_{cond}_{i}", steps, cond == "busy"))
            last = step[cond][-1]
            line = f"round {i} {cond}: demo {demo[cond][-1]:.1f}s, step {last['ms_per_step']:.1f} ms"
            print(f"{line} ({last['threads']} threads)", flush=True)

    params = step["idle"][0]["params"]
    rows = []
    med = {}
    for what in ("demo", "train_step"):
        for cond in ("idle", "busy"):
            if what == "demo":
                values = demo[cond]
                unit = "seconds"
                extra = {}
            else:
                values = [r["ms_per_step"] for r in step[cond]]
                unit = "ms_per_step"
                extra = {
                    "threads_chosen": [r["threads"] for r in step[cond]],
                    "busy_seen": [r["busy"] for r in step[cond]],
                }
            med[(what, cond)] = statistics.median(values)
            rows.append(
                {
                    "method": "virtnet demo" if what == "demo" else "train step (demo model)",
                    "scenario": "idle" if cond == "idle" else "one busy single-threaded process",
                    "task": "all",
                    "level": "full",
                    "accuracy": None,
                    "params": params,
                    "flops": None,  # not measured here: see the demo's own report
                    unit: med[(what, cond)],
                    f"{unit}_all": values,
                    **extra,
                }
            )
    ratios = {w: med[(w, "busy")] / med[(w, "idle")] for w in ("demo", "train_step")}
    for r in rows:
        if r["scenario"] != "idle":
            r["ratio_to_idle"] = ratios["demo" if r["method"] == "virtnet demo" else "train_step"]
    claims = [
        claim(
            "contention.demo",
            "`virtnet demo` beside one busy single-threaded process takes at most 2x its idle time "
            "(measured: ratio of the median wall times, default thread rule)",
            "<=",
            2.0,
            ratios["demo"],
        ),
        claim(
            "contention.train_step",
            "a training step of the demo's model beside one busy single-threaded process takes at most 2x "
            "its idle time (measured: ratio of the median per-step times, default thread rule)",
            "<=",
            2.0,
            ratios["train_step"],
        ),
    ]
    name = "contention_smoke" if args.smoke else "contention"
    out = args.out or (str(work / name) if args.smoke else None)
    stem = write_results(
        "contention",
        rows,
        args.seed,
        out=out,
        extra={"repeats": repeats, "steps": list(steps), "smoke": args.smoke, "ratios": ratios},
        claims=claims,
    )
    print(f"demo x{ratios['demo']:.2f}, step x{ratios['train_step']:.2f} under contention -> {stem}.json")


if __name__ == "__main__":
    main()
