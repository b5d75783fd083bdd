"""The default number of torch threads: as many as the cores this process may use that are not busy.

PyTorch's own default is one intra-op thread per core. On a machine where other processes already keep
cores busy, that is the worst choice: the OpenMP threads spin waiting for each other and for cores that
are taken, and a run becomes 10-50x slower than with one thread. The rule here:

    usable = len(os.sched_getaffinity(0))            # the cores this process may run on
    busy   = cores' busy time sampled over 0.1 s       # /proc/stat, summed over those cores (0..usable)
    threads = max(1, usable - round(busy))            # one thread per idle core, at least one

``busy`` counts every process but this one (it sleeps while sampling). Where /proc/stat cannot be read it
is the 1-minute load average, capped at ``usable``. The sample is taken once, when the count is chosen:
a process that starts later is not seen.

The count is overridden by, in order: an explicit value (``train.threads``, ``cost.threads``, the CLI's
``--threads``), then the environment variable ``VIRTNET_THREADS`` (a positive integer). Both ``virtnet``
on the command line (``cli.main``) and :func:`virtnet.api.train` call :func:`apply_default`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from virtnet.errors import ConfigError

ENV = "VIRTNET_THREADS"
SAMPLE_SECONDS = 0.1

_applied: ThreadChoice | None = None


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and how it was chosen (``source``: ``explicit``, ``env`` or ``rule``)."""

    threads: int
    source: str
    usable: int
    busy: float | None = None

    def describe(self) -> str:
        if self.source == "rule":
            return f"{self.threads} threads ({self.usable} usable cores, {self.busy:.1f} busy)"
        return f"{self.threads} threads ({'explicit' if self.source == 'explicit' else ENV})"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_ids() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _read_stat() -> dict[int, tuple[int, int]]:
    """``{cpu: (busy jiffies, total jiffies)}`` from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            nums = [int(v) for v in vals[:8]]
            idle = nums[3] + (nums[4] if len(nums) > 4 else 0)  # idle + iowait
            out[int(name[3:])] = (sum(nums) - idle, sum(nums))
    return out


def busy_cores(sample_seconds: float = SAMPLE_SECONDS) -> float:
    """How many of this process's usable cores other processes keep busy (0..usable): /proc/stat sampled
    over ``sample_seconds`` (this process sleeps meanwhile), else the 1-minute load average."""
    usable = usable_cores()
    ids = _cpu_ids()
    try:
        a = _read_stat()
        own0 = time.process_time()
        time.sleep(sample_seconds)
        b = _read_stat()
        own = time.process_time() - own0
    except (OSError, ValueError, IndexError):
        try:
            return float(min(usable, os.getloadavg()[0]))
        except (AttributeError, OSError):
            return 0.0
    busy = 0.0
    for cpu, (busy1, total1) in b.items():
        if (ids is not None and cpu not in ids) or cpu not in a:
            continue
        busy0, total0 = a[cpu]
        if total1 > total0:
            busy += (busy1 - busy0) / (total1 - total0)
    busy -= own / max(sample_seconds, 1e-9)  # this process's own (tiny) share of the sample
    return float(min(usable, max(0.0, busy)))


def rule(usable: int, busy: float) -> int:
    """The documented rule: ``max(1, usable - round(busy))``, at most ``usable``."""
    return max(1, min(usable, usable - round(busy)))


def _env_threads() -> int | None:
    raw = os.environ.get(ENV)
    if raw is None or raw.strip() == "":
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{ENV}: must be a positive integer, got {raw!r}")
    return n


def choose(explicit: int | None = None, sample_seconds: float = SAMPLE_SECONDS) -> ThreadChoice:
    """The thread count: ``explicit``, else ``$VIRTNET_THREADS``, else :func:`rule` of the usable cores
    and the busy ones."""
    usable = usable_cores()
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit < 1:
            raise ConfigError(f"threads: must be a positive integer, got {explicit!r}")
        return ThreadChoice(explicit, "explicit", usable)
    env = _env_threads()
    if env is not None:
        return ThreadChoice(env, "env", usable)
    busy = busy_cores(sample_seconds)
    return ThreadChoice(rule(usable, busy), "rule", usable, busy)


def apply_default(explicit: int | None = None, once: bool = False) -> ThreadChoice:
    """Choose the thread count (:func:`choose`) and set torch's intra-op threads to it; the inter-op pool
    gets the same count where torch still allows it (before any parallel work). With ``once``, a choice
    already applied in this process (by ``virtnet`` on the command line) is kept and returned."""
    global _applied
    if once and explicit is None and _applied is not None:
        return _applied
    import torch

    c = choose(explicit)
    torch.set_num_threads(c.threads)
    try:
        torch.set_num_interop_threads(c.threads)
    except RuntimeError:  # already set, or parallel work already started: keep the current pool
        pass
    _applied = c
    return c


def applied() -> ThreadChoice | None:
    """The last choice :func:`apply_default` applied in this process (None: never called)."""
    return _applied


__all__ = ["ENV", "ThreadChoice", "applied", "apply_default", "busy_cores", "choose", "rule", "usable_cores"]
