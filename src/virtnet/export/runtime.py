"""A budget-aware multi-task runtime: one packed model loaded once, several tasks served at once, each at
the level a shared memory budget allows.

:class:`Runtime` holds

* the **packed model** (loaded once; every level of every task is cut from it, so nothing is read from
  disk again);
* the **serving set**: for each running task, the physically extracted network of its current level
  (:meth:`virtnet.methods.Method.export`: unused units' channels removed, adapters fused, masks applied),
  and any levels prepared ahead with :meth:`Runtime.prepare`. Tensors that two extracted networks hold
  with equal shape and equal values (a trunk two tasks share at the same selection) are stored once:
  the second network is given the first one's tensor;
* a :class:`~virtnet.export.planner.Planner` over the model's exact parameter usage.

:meth:`Runtime.plan` picks one level per running task within a total budget (params or bytes), cuts the
networks it needs, releases the levels no longer planned, and reports the resident memory it **measured**
— the bytes of the distinct tensors the serving set holds — beside the planner's estimate.
:meth:`Runtime.request` answers a (task, budget) request: when the budget or the set of running tasks
changed, it re-plans first. :meth:`Runtime.switch` changes one task's level without reloading anything: a
prepared level is a pointer swap (microseconds); an unprepared one is cut from the packed model in memory.

The packed model itself is the store the serving set is cut from; its bytes are reported separately
(``store_bytes``): on a device it could live in flash and be memory-mapped, and the serving set is what
the forward passes touch.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from virtnet.errors import TaskError
from virtnet.export.planner import Plan, Planner, TotalBudget, parse_total_budget


def _tensor_key(t: torch.Tensor) -> tuple:
    data = t.detach().contiguous().cpu().reshape(-1)
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    return (str(t.dtype), tuple(t.shape), digest)


def _rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def distinct_tensors(modules: Iterable[nn.Module]) -> dict[str, int]:
    """Elements and bytes of the distinct tensors ``modules`` hold (a tensor shared by several counted
    once, by its storage): ``{"params", "param_bytes", "buffer_bytes", "bytes"}``."""
    seen: set[tuple] = set()
    params = pbytes = bbytes = 0
    for m in modules:
        for kind, tensors in (("p", m.parameters()), ("b", m.buffers())):
            for t in tensors:
                key = (t.device.type, t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
                if key in seen:
                    continue
                seen.add(key)
                n = t.numel() * t.element_size()
                if kind == "p":
                    params += t.numel()
                    pbytes += n
                else:
                    bbytes += n
    return {"params": params, "param_bytes": pbytes, "buffer_bytes": bbytes, "bytes": pbytes + bbytes}


class Runtime:
    """Serve several tasks of one packed model under a shared budget (see the module docstring).

    Args:
        method: the model's method (its ``levels`` and ``export``).
        model: the packed multi-task model (kept in eval mode).
        accuracy: ``{(task, level): validation accuracy}`` the planner maximises (None: larger levels).
        threads: intra-op threads for the forward passes (None: leave torch's setting).
    """

    def __init__(
        self,
        method: Any,
        model: nn.Module,
        accuracy: Mapping[tuple[str, int], float] | None = None,
        threads: int | None = None,
    ) -> None:
        self.method = method
        self.model = model.eval()
        self.threads = threads
        self.accuracy = dict(accuracy) if accuracy is not None else None
        self.planner = Planner(model, self.accuracy)
        self._nets: dict[tuple[str, int], nn.Module] = {}
        self._pool: dict[tuple, torch.Tensor] = {}  # shared tensors by (dtype, shape, content)
        self.active: dict[str, int] = {}
        self.budget: TotalBudget | None = None
        self.last_plan: Plan | None = None
        self.extract_ms: dict[tuple[str, int], float] = {}

    @classmethod
    def load(
        cls,
        path: str | Path,
        accuracy: Mapping[tuple[str, int], float] | str | None = "val",
        data_root: str | None = None,
        threads: int | None = None,
        allow_test: bool = False,
    ) -> Runtime:
        """A runtime over a checkpoint, loaded once. ``accuracy``: a mapping, ``"val"`` / ``"test"`` to
        evaluate the run's split, or None (see :func:`level_accuracy` for a task without a validation
        split and ``allow_test``)."""
        from virtnet import api

        loaded = api.load(path)
        acc = accuracy
        if isinstance(accuracy, str):
            acc, _ = level_accuracy(loaded, accuracy, data_root, allow_test=allow_test)
        return cls(loaded.method, loaded.model, acc, threads)  # type: ignore[arg-type]

    # ---- what is held -------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.model.tasks)  # type: ignore[attr-defined]

    def _share(self, net: nn.Module) -> None:
        """Give ``net`` the pooled tensor wherever it holds one equal in shape and values."""
        for m in net.modules():
            for name, p in list(m._parameters.items()):
                if p is None:
                    continue
                key = _tensor_key(p)
                held = self._pool.get(key)
                if held is not None and held is not p and torch.equal(held, p):
                    m._parameters[name] = held  # type: ignore[assignment]
                else:
                    self._pool.setdefault(key, p)
            for name, b in list(m._buffers.items()):
                if b is None:
                    continue
                key = ("buffer",) + _tensor_key(b)
                held = self._pool.get(key)
                if held is not None and held is not b and torch.equal(held, b):
                    m._buffers[name] = held
                else:
                    self._pool.setdefault(key, b)

    def _prune_pool(self) -> None:
        alive = {id(t) for net in self._nets.values() for t in list(net.parameters()) + list(net.buffers())}
        self._pool = {k: t for k, t in self._pool.items() if id(t) in alive}

    def network(self, task: str, level: int) -> nn.Module:
        """The extracted network of (task, level), cut from the packed model when not held yet."""
        key = (task, level)
        if key not in self._nets:
            t0 = time.perf_counter()
            with torch.inference_mode(False), torch.no_grad():
                net = self.method.export(self.model, task, level)
            self._share(net)
            self._nets[key] = net.eval()
            self.extract_ms[key] = (time.perf_counter() - t0) * 1e3
        return self._nets[key]

    def held(self) -> list[tuple[str, int]]:
        """The (task, level) networks held now."""
        return sorted(self._nets)

    def resident(self) -> dict[str, Any]:
        """Measured memory: the distinct tensors of the held networks (``params``, ``param_bytes``,
        ``buffer_bytes``, ``bytes``), the packed model's bytes (``store_bytes``) and the process RSS."""
        out: dict[str, Any] = distinct_tensors(self._nets.values())
        out["store_bytes"] = distinct_tensors([self.model])["bytes"]
        out["networks"] = [f"{t}@{lv}" for t, lv in self.held()]
        out["rss_bytes"] = _rss_bytes()
        return out

    # ---- planning and switching ---------------------------------------------------------------------
    def plan(self, budget: str | TotalBudget, tasks: Sequence[str] | None = None, keep: bool = False) -> Plan:
        """Plan one level per task of ``tasks`` (default: the running ones, else every task) within
        ``budget``, hold exactly the networks the plan needs (unless ``keep``: the others stay prepared),
        and return the plan with ``measured`` filled: the resident memory held afterwards and its ratio
        to the planner's estimate (``bytes_over_estimate``, ``params_over_estimate``)."""
        b = parse_total_budget(budget)
        tasks = list(tasks) if tasks is not None else (list(self.active) or self.tasks)
        for t in tasks:
            if t not in self.tasks:
                raise TaskError(f"unknown task '{t}': the model has {self.tasks}")
        if b.kind == "bytes":
            for t in tasks:
                for lv in self.planner.levels(t):
                    self.planner.buffer_bytes.setdefault((t, lv), self._buffer_bytes(t, lv))
        if b.kind == "flops":
            self.planner.flops = self.planner.flops or {}
            for t in tasks:
                for lv in self.planner.levels(t):
                    if (t, lv) not in self.planner.flops:
                        self.planner.flops[(t, lv)] = self._flops(t, lv)
        plan = self.planner.plan(b, tasks)
        self.active = dict(plan.levels)
        for t, lv in plan.levels.items():
            self.network(t, lv)
        if not keep:
            for key in list(self._nets):
                if self.active.get(key[0]) != key[1]:
                    del self._nets[key]
            self._prune_pool()
        self.budget = b
        for t, lv in plan.levels.items():  # the estimate in bytes: parameters (shared once) + buffers
            self.planner.buffer_bytes.setdefault((t, lv), self._buffer_bytes(t, lv))
        plan.bytes = self.planner.cost(plan.levels, "bytes")
        res = self.resident()
        res["estimate_params"] = plan.params
        res["estimate_bytes"] = plan.bytes
        res["params_over_estimate"] = res["params"] / plan.params if plan.params else None
        res["bytes_over_estimate"] = res["bytes"] / plan.bytes if plan.bytes else None
        plan.measured = res
        self.last_plan = plan
        return plan

    def _buffer_bytes(self, task: str, level: int) -> int:
        net = self._nets.get((task, level))
        if net is None:
            with torch.inference_mode(False), torch.no_grad():
                net = self.method.export(self.model, task, level)
        return int(sum(b.numel() * b.element_size() for b in net.buffers()))

    def _flops(self, task: str, level: int) -> int:
        from virtnet.cost import count_flops

        spec = self.model.spec(task)  # type: ignore[operator]
        with torch.inference_mode(False), torch.no_grad():
            net = self._nets.get((task, level)) or self.method.export(self.model, task, level)
        return count_flops(net, spec.input_shape)

    def prepare(self, task: str, levels: Iterable[int] | None = None) -> None:
        """Cut ahead the networks of ``task``'s ``levels`` (default: all) so switching to them is a
        pointer swap; they count in :meth:`resident` while held."""
        for lv in levels if levels is not None else self.planner.levels(task):
            self.method.level(self.model, task, lv)
            self.network(task, lv)

    def release(self, task: str, level: int) -> None:
        """Drop a prepared (task, level) network that is not the task's current level."""
        if self.active.get(task) == level:
            return
        self._nets.pop((task, level), None)
        self._prune_pool()

    def switch(self, task: str, level: int, keep: bool = True) -> float:
        """Run ``task`` at ``level`` from now on, without reloading: the milliseconds the switch took (a
        pointer swap when the level is held, else its cut from the packed model). ``keep``: keep the
        previous level's network prepared."""
        if task not in self.tasks:
            raise TaskError(f"unknown task '{task}': the model has {self.tasks}")
        t0 = time.perf_counter()
        self.method.level(self.model, task, level)  # BudgetError for a level the task does not have
        self.network(task, level)
        previous = self.active.get(task)
        self.active[task] = level
        if not keep and previous is not None and previous != level:
            self._nets.pop((task, previous), None)
            self._prune_pool()
        return (time.perf_counter() - t0) * 1e3

    # ---- answering ----------------------------------------------------------------------------------
    def request(self, x: Any, task: str, budget: str | TotalBudget | None = None) -> torch.Tensor:
        """Logits of ``task`` on ``x``. With ``budget`` (a total over the running tasks), re-plan first
        when the budget or the set of running tasks (``task`` joins it) changed."""
        if task not in self.tasks:
            raise TaskError(f"unknown task '{task}': the model has {self.tasks}")
        if budget is not None:
            b = parse_total_budget(budget)
            if b != self.budget or task not in self.active:
                self.plan(b, list(dict.fromkeys([*self.active, task])))
        elif task not in self.active:
            self.switch(task, max(self.planner.levels(task)))
        return self.predict(x, task)

    def predict(self, x: Any, task: str) -> torch.Tensor:
        """Logits of ``task`` at its current level (inputs as :func:`virtnet.api.predict` takes them:
        float32 normalised, or uint8 raw pixels normalised with the task's statistics)."""
        from virtnet.cost.latency import num_threads
        from virtnet.inputs import prepare_inputs

        if task not in self.active:
            raise TaskError(f"task '{task}' is not running (running: {sorted(self.active)}); plan or switch")
        spec = self.model.spec(task)  # type: ignore[operator]
        x = prepare_inputs(x, spec)
        net = self._nets[(task, self.active[task])]
        with num_threads(self.threads), torch.inference_mode():
            return net(x)

    def remove(self, task: str) -> None:
        """Stop running ``task`` and drop its networks (re-plan to give its memory to the others)."""
        self.active.pop(task, None)
        for key in [k for k in self._nets if k[0] == task]:
            del self._nets[key]
        self._prune_pool()


def level_accuracy(
    loaded: Any, split: str = "val", data_root: str | None = None, allow_test: bool = False
) -> tuple[dict[tuple[str, int], float], str]:
    """Accuracy of every (task, level) of a loaded model on ``split``, and the split used.

    ``val`` needs a validation split in every task: a task without one is a one-line ConfigError naming
    it (:meth:`virtnet.data.core.TaskSet.choice_split`), unless ``allow_test``, which falls back to
    ``test`` (the split returned says so). ``test`` is the test split, asked for explicitly."""
    from virtnet.train.evaluate import evaluate

    taskset = loaded.taskset(data_root)
    if split == "val":
        split = taskset.choice_split([s.name for s in loaded.specs], allow_test, "plan levels")
    rows = evaluate(loaded.method, loaded.model, taskset, split=split)
    return {(r["task"], int(r["level"])): float(r["accuracy"]) for r in rows}, split


__all__ = ["Runtime", "distinct_tensors", "level_accuracy"]
