"""The Deep Elastic Network model: an estimator (task-specific stems and heads around a trunk of elastic
blocks, :mod:`virtnet.methods.den.blocks`) and a selector (:mod:`virtnet.methods.den.selector`).

Structures ``z = (l_1 .. l_n)`` use 0-based levels (``0`` = the lowest, ``h - 1`` = all inner channels).
Routes (the model protocol's ``forward(x, task, route)``):

* ``route.instance`` a long ``(B, n)`` tensor: per-instance structures, fast grouped path;
  a float ``(B, n, h)`` one-hot tensor: per-instance structures, masked path (training);
* ``route.layers`` (:meth:`ElasticNet.structure_route`): one structure for the batch, sliced weights;
* ``route.key == "<task>/<k>"`` (:meth:`ElasticNet.route`) or None: budget level ``k`` (None: the top):
  the selector picks each instance's most probable structure within level ``k``'s bound, then the
  grouped path runs it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from virtnet.backbones.base import MultiTaskNet, TaskNet, network_usage
from virtnet.errors import BudgetError, ConfigError, TaskError
from virtnet.methods.den.blocks import ElasticBlock, elasticize
from virtnet.methods.den.selector import BudgetPlan, Selector, SelectorNet, log_probs
from virtnet.nn import Route, call
from virtnet.protocol import usage_count


class DENTaskNet(nn.Module):
    """One task's deployable network: selector, budgeted decoding, estimator run by the grouped path.

    Called ``net(x)`` (or ``net(x, route)``; the route is ignored): logits ``(B, outputs)``."""

    def __init__(
        self, stem: nn.Module, trunk: nn.Module, head: nn.Module, selector: SelectorNet, plan: BudgetPlan
    ) -> None:
        super().__init__()
        self.stem = stem
        self.trunk = trunk
        self.head = head
        self.selector = selector
        self.plan = plan

    def structures(self, x: torch.Tensor) -> torch.Tensor:
        """The structure ``(B, n)`` chosen for each instance."""
        return self.plan(log_probs(self.selector(x)))

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        z = self.structures(x)
        r = Route("", instance=z)
        return call(self.head, call(self.trunk, call(self.stem, x, None), r), None)


def tied_copy(trunk: nn.Module, tie_norms: bool) -> nn.Module:
    """A copy of ``trunk`` whose parameters are ``trunk``'s own tensors (tied) except, unless
    ``tie_norms``, its batch norms' scales and shifts; its batch norms' running statistics are its own."""
    new = copy.deepcopy(trunk)
    for (_, a), (_, b) in zip(trunk.named_modules(), new.named_modules(), strict=True):
        if isinstance(a, nn.modules.batchnorm._BatchNorm) and not tie_norms:
            continue
        for n, p in a.named_parameters(recurse=False):
            setattr(b, n, p)
    return new


def _fill_tied(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load pre-hook of :class:`ElasticNet`: the task trunks' tied parameters' entries, from the shared
    trunk's (what its state dict leaves out)."""
    assert isinstance(module, ElasticNet)
    for n, ref in module._tied.items():
        if prefix + n not in state and prefix + ref in state:
            state[prefix + n] = state[prefix + ref]


class ElasticNet(MultiTaskNet):
    """Estimator + selector (see the module docstring).

    Args:
        base: a freshly built :class:`MultiTaskNet` (one stem per task): its trunk, stems and heads are
            taken over and the trunk's blocks made elastic.
        levels: h, levels per block.
        fractions: inner-channel fraction per level (None: the paper's rule).
        budget_levels: the budget levels' bounds, as fractions of the way from the cheapest structure's
            cost to the full one's (1.0: no bound).
        budget_kind: what bounds them: ``"flops"`` or ``"params"`` (of the estimator).
        selector: ``(width, depth, size)`` of the selector.
        max_states: the budgeted search's state limit (see :class:`BudgetPlan`).
        task_bn: the trunk's batch norms per task: ``"shared"`` (one set for every task), ``"stats"``
            (running statistics per task, one scale and shift) or ``"private"`` (statistics, scale and
            shift per task). Not shared, every task after the first runs its own trunk module whose
            convolutions (and, with ``"stats"``, norm scales and shifts) *are* the first task's parameters
            (tied: one tensor, saved once) and whose batch norms are its own.
    """

    def __init__(
        self,
        base: MultiTaskNet,
        levels: int,
        fractions: list[float] | None,
        budget_levels: list[float],
        budget_kind: str,
        selector: tuple[int, int, int],
        max_states: int = 20000,
        task_bn: str = "shared",
    ) -> None:
        nn.Module.__init__(self)
        if task_bn not in ("shared", "stats", "private"):
            raise ConfigError(f"method.task_bn: '{task_bn}' is not one of shared, stats, private")
        if base.shared_stem:
            raise ConfigError("deep elastic networks need one stem per task")
        self.trunk = base.trunk
        self.stems = base.stems
        self.heads = base.heads
        self.specs = dict(base.specs)
        self.shared_stem = False
        self.num_levels = levels
        blocks = elasticize(self.trunk, fractions, levels)
        self.num_blocks = len(blocks)
        self.task_bn = task_bn
        # the trunk of every task after the first, its batch norms its own (see ``task_bn``)
        self.task_trunks = nn.ModuleDict()
        if task_bn != "shared":
            for t in list(self.specs)[1:]:
                self.task_trunks[t] = tied_copy(self.trunk, tie_norms=task_bn == "stats")
        self._tied = self._tied_names()
        self.register_load_state_dict_pre_hook(_fill_tied)
        width, depth, size = selector
        self.selector = Selector(list(self.specs.values()), self.num_blocks, levels, width, depth, size)
        self.budget_levels = [float(f) for f in budget_levels]
        self.budget_kind = budget_kind
        self.max_states = max_states
        # training progress within a stage (the epoch of the last step): epsilon-greedy's schedule
        self.register_buffer("den_progress", torch.zeros(()))
        self._cache: dict[Any, Any] = {}

    # ---- the trunk of each task --------------------------------------------------------------------
    def trunk_of(self, task: str) -> nn.Module:
        """The trunk task ``task`` runs (the shared one unless its batch norms are its own)."""
        return self.task_trunks[task] if task in self.task_trunks else self.trunk

    def _tied_names(self) -> dict[str, str]:
        """``{name in a task trunk: name in the shared trunk}`` of every tied parameter."""
        out: dict[str, str] = {}
        ref = {id(p): n for n, p in self.trunk.named_parameters()}
        for t, tr in self.task_trunks.items():
            for n, p in tr.named_parameters(remove_duplicate=False):
                if id(p) in ref:
                    out[f"task_trunks.{t}.{n}"] = f"trunk.{ref[id(p)]}"
        return out

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The state dict without the task trunks' tied parameters (each tensor saved once, under the
        shared trunk's name; loading ties them again)."""
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        out = super().state_dict(*args, **kwargs)
        for n in self._tied:
            out.pop(prefix + n, None)
        return out

    # ---- blocks and structures ---------------------------------------------------------------------
    def blocks(self) -> list[ElasticBlock]:
        """The elastic blocks, in order."""
        return [m for m in self.trunk.blocks if isinstance(m, ElasticBlock)]

    def full_structure(self) -> list[int]:
        return [self.num_levels - 1] * self.num_blocks

    def check_structure_value(self, z: Sequence[int] | torch.Tensor) -> list[int]:
        """``z`` as a list of levels; BudgetError for a wrong length or a level out of range."""
        zz = [int(v) for v in (z.tolist() if isinstance(z, torch.Tensor) else z)]
        if len(zz) != self.num_blocks:
            raise BudgetError(
                f"structure {zz}: has {len(zz)} levels, the estimator has {self.num_blocks} blocks"
            )
        bad = [v for v in zz if not 0 <= v < self.num_levels]
        if bad:
            raise BudgetError(f"structure {zz}: level {bad[0]} is out of range 0..{self.num_levels - 1}")
        return zz

    def check_structures(self, z: torch.Tensor) -> torch.Tensor:
        """A ``(B, n)`` long tensor of structures, checked (BudgetError naming the problem)."""
        if z.dim() != 2 or z.shape[1] != self.num_blocks:
            raise BudgetError(
                f"structures of shape {tuple(z.shape)}: expected (B, {self.num_blocks}), one level per block"
            )
        if z.numel() and (int(z.min()) < 0 or int(z.max()) >= self.num_levels):
            raise BudgetError(f"structures: a level is out of range 0..{self.num_levels - 1}")
        return z.long()

    def structure_route(self, task: str, z: Sequence[int] | torch.Tensor) -> Route:
        """The route running structure ``z`` for the whole batch (sliced weights)."""
        self.check_task(task)
        zz = self.check_structure_value(z)
        return Route(
            task, layers={b.slot: b.route_units(lv) for b, lv in zip(self.blocks(), zz, strict=True)}
        )

    def instance_route(self, task: str, z: torch.Tensor, masked: bool = False) -> Route:
        """The route running structure ``z[b]`` for instance ``b`` (grouped path, or masked)."""
        z = self.check_structures(z)
        inst = torch.nn.functional.one_hot(z, self.num_levels).float() if masked else z
        return Route(task, instance=inst)

    @staticmethod
    def check_one_task(tasks: str | Sequence[str]) -> str:
        """The one task of a batch (a name, or one name per instance); TaskError when they differ."""
        if isinstance(tasks, str):
            return tasks
        names = list(dict.fromkeys(tasks))
        if len(names) != 1:
            raise TaskError(
                f"a batch mixes tasks {names}: a batch runs one task (its stem and head); split it by task"
            )
        return names[0]

    # ---- the protocol ------------------------------------------------------------------------------
    def levels(self, task: str) -> list[int]:
        self.check_task(task)
        return list(range(1, len(self.budget_levels) + 1))

    def route(self, task: str, level: int | None = None) -> Route:
        self.check_task(task)
        levels = self.levels(task)
        if level is None:
            level = levels[-1]
        if level not in levels:
            raise BudgetError(f"task '{task}' has levels {levels}, not {level}")
        return Route(task, key=f"{task}/{level}")

    def _level_of_route(self, task: str, route: Route | None) -> int:
        if route is None or not route.key:
            return self.levels(task)[-1]
        name, _, lv = route.key.rpartition("/")
        if name != task or not lv.isdigit():
            raise TaskError(f"route key '{route.key}' is not a level of task '{task}'")
        return int(lv)

    def forward(self, x: torch.Tensor, task: str, route: Route | None = None) -> torch.Tensor:
        self.check_task(task)
        if route is not None and (route.instance is not None or route.layers):
            f = self.trunk_of(task)(call(self.stem(task), x, None), route)
            return call(self.heads[task], f, None)
        return self.task_network(task, self._level_of_route(task, route))(x)

    def task_network(self, task: str, level: int | None = None) -> DENTaskNet:  # type: ignore[override]
        """(task, level)'s deployable network, sharing this model's modules."""
        route = self.route(task, level)
        lv = self._level_of_route(task, route)
        return DENTaskNet(
            self.stem(task),
            self.trunk_of(task),
            self.heads[task],
            self.selector.net(self.spec(task)),
            self.plan(task, self.level_bound(task, lv)),
        )

    def structure_network(self, task: str) -> TaskNet:
        """The estimator of ``task`` (stem, trunk, head), called ``net(x, structure_route(task, z))``."""
        return TaskNet(self.stem(task), self.trunk_of(task), self.heads[task])

    def parameter_usage(self, task: str, level: int | None = None) -> dict[str, torch.Tensor]:
        """A budget level's deployable reads every parameter of its task's estimator and selector."""
        names = {id(p): n for n, p in self.named_parameters()}
        net = self.task_network(task, level)
        return {names[id(p)]: torch.ones(p.shape, dtype=torch.bool) for p in net.parameters()}

    def structure_usage(self, task: str, z: Sequence[int]) -> dict[str, torch.Tensor]:
        """The parameters structure ``z`` of ``task`` reads (exact masks)."""
        return network_usage(self, self.structure_network(task), self.structure_route(task, z))

    def structure(self) -> dict[str, Any]:
        return {
            "blocks": self.num_blocks,
            "levels": self.num_levels,
            "widths": [list(b.widths) for b in self.blocks()],
            "budget_levels": list(self.budget_levels),
            "budget_kind": self.budget_kind,
            "task_bn": self.task_bn,
        }

    # ---- selection ---------------------------------------------------------------------------------
    def selector_logits(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """The selector's logits ``(B, n, h)`` for task ``task``'s inputs."""
        return self.selector(x, self.spec(task))

    def selector_logits_tasks(self, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The selector's logits for several tasks' batches ``{task: x}``, its shared body run once over
        the concatenated batch (:meth:`Selector.forward_tasks`)."""
        tasks = list(xs)
        for t in tasks:
            self.check_task(t)
        out = self.selector.forward_tasks([(xs[t], self.spec(t)) for t in tasks])
        return dict(zip(tasks, out, strict=True))

    def forward_tasks(
        self, xs: dict[str, torch.Tensor], z: dict[str, torch.Tensor], masked: bool = False
    ) -> dict[str, torch.Tensor]:
        """The logits of several tasks' batches ``{task: x}`` with per-instance structures ``{task: z}``:
        each task's stem, then the trunk run **once** over the concatenated batch (one instance route),
        then each task's head. In training the trunk's shared batch norms then normalise with the task
        mixture's statistics, which their running statistics (used at inference) estimate; run one task at
        a time, each task would be trained on its own statistics and tested on the mixture's (the joint
        baseline measured Fashion-MNIST at 58.9 % instead of 86 % that way). With batch norms per task
        (``task_bn`` not shared) each task runs its own trunk on its own batch."""
        tasks = list(xs)
        if len(tasks) == 1 or self.task_bn != "shared":
            return {t: self(xs[t], t, self.instance_route(t, z[t], masked=masked)) for t in tasks}
        for t in tasks:
            self.check_task(t)
        feats = torch.cat([call(self.stem(t), xs[t], None) for t in tasks])
        zz = torch.cat([self.check_structures(z[t]) for t in tasks])
        inst = torch.nn.functional.one_hot(zz, self.num_levels).float() if masked else zz
        f = self.trunk(feats, Route("", instance=inst))
        return {
            t: call(self.heads[t], ft, None)
            for t, ft in zip(tasks, f.split([xs[t].shape[0] for t in tasks]), strict=True)
        }

    def choose(
        self, x: torch.Tensor, task: str | Sequence[str], bound: float | None = None, kind: str | None = None
    ) -> torch.Tensor:
        """Each instance's most probable structure ``(B, n)`` whose estimator cost fits ``bound``
        (``kind``: ``"flops"`` or ``"params"``, default the model's budget kind; None: no bound)."""
        task = self.check_one_task(task)
        self.check_input(x, task)
        plan = self.plan(task, None if bound is None else self.check_bound(task, bound, kind), kind)
        return plan(log_probs(self.selector_logits(x, task)))

    # ---- costs -------------------------------------------------------------------------------------
    def block_costs(self) -> dict[str, list[list[int]]]:
        """``{"flops": [[...h] * n], "params": [[...h] * n]}``: each block's FLOPs (per instance, 2 per
        MAC) and parameters at each level (the trunk's input size is the same for every task)."""
        if "blocks" not in self._cache:
            from virtnet.cost import count_flops
            from virtnet.cost.flops import eval_mode

            shapes: dict[int, tuple[int, ...]] = {}

            def record(i: int) -> Any:
                def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                    shapes.setdefault(i, tuple(args[0].shape[1:]))

                return hook

            hooks = [b.register_forward_pre_hook(record(i)) for i, b in enumerate(self.blocks())]
            t = self.trunk
            p = next(self.parameters())
            try:
                with eval_mode(self), torch.no_grad():
                    t(
                        torch.zeros(
                            1, t.in_channels, t.input_size, t.input_size, device=p.device, dtype=p.dtype
                        )
                    )
            finally:
                for hk in hooks:
                    hk.remove()
            flops, params = [], []
            for i, b in enumerate(self.blocks()):
                with torch.random.fork_rng(devices=[]):  # building a level's module draws no numbers
                    mods = [b.level_module(lv) for lv in range(self.num_levels)]
                flops.append([count_flops(m, shapes[i]) for m in mods])
                params.append([usage_count(b.level_usage(lv)) for lv in range(self.num_levels)])
            self._cache["blocks"] = {"flops": flops, "params": params}
        return self._cache["blocks"]

    def base_costs(self, task: str) -> dict[str, int]:
        """What every structure of ``task`` costs besides its blocks: stem, head, non-block trunk layers."""
        key = ("base", task)
        if key not in self._cache:
            from virtnet.cost import count_flops
            from virtnet.nn import compact

            full = self.full_structure()
            route = self.structure_route(task, full)
            net = compact(self.structure_network(task), route)
            bc = self.block_costs()
            flops = count_flops(net, self.spec(task).input_shape) - sum(r[-1] for r in bc["flops"])
            params = usage_count(self.structure_usage(task, full)) - sum(r[-1] for r in bc["params"])
            self._cache[key] = {"flops": flops, "params": params}
        return self._cache[key]

    def structure_cost(self, task: str, z: Sequence[int] | torch.Tensor, kind: str = "flops") -> int:
        """The estimator's FLOPs (or parameters) of structure ``z`` for ``task``."""
        zz = self.check_structure_value(z)
        bc = self.block_costs()[kind]
        return self.base_costs(task)[kind] + sum(bc[i][lv] for i, lv in enumerate(zz))

    def structure_costs(self, task: str, z: torch.Tensor, kind: str = "flops") -> torch.Tensor:
        """Per-instance costs ``(B,)`` of structures ``z`` ``(B, n)``."""
        table = torch.tensor(self.block_costs()[kind], dtype=torch.float64, device=z.device)  # (n, h)
        per = table.gather(1, z.t().long()).sum(0)  # (B,)
        return per + self.base_costs(task)[kind]

    def density_table(self) -> torch.Tensor:
        """``d_i(l)`` of eq. 5: block i's parameters at level l over its parameters at the top ``(n, h)``."""
        p = torch.tensor(self.block_costs()["params"], dtype=torch.float32)
        return p / p[:, -1:]

    def cost_range(self, task: str, kind: str = "flops") -> tuple[int, int]:
        """The cheapest and the full structure's cost."""
        bc = self.block_costs()[kind]
        base = self.base_costs(task)[kind]
        return base + sum(min(r) for r in bc), base + sum(r[-1] for r in bc)

    def selector_costs(self, task: str) -> dict[str, int]:
        """The selector's FLOPs per instance and parameters for ``task``."""
        from virtnet.cost import count_flops

        net = self.selector.net(self.spec(task))
        return {
            "flops": count_flops(net, self.spec(task).input_shape),
            "params": sum(p.numel() for p in net.parameters()),
        }

    def level_bound(self, task: str, level: int) -> int | None:
        """Budget level ``level``'s bound (None: no bound)."""
        f = self.budget_levels[level - 1]
        if f >= 1.0:
            return None
        lo, hi = self.cost_range(task, self.budget_kind)
        return int(lo + f * (hi - lo))

    def check_bound(self, task: str, bound: float, kind: str | None = None) -> int:
        kind = kind or self.budget_kind
        lo, _ = self.cost_range(task, kind)
        if bound < lo:
            raise BudgetError(
                f"task '{task}': budget {kind}={int(bound):,} is below the cheapest structure ({lo:,} {kind})"
            )
        return int(bound)

    def plan(self, task: str, bound: int | None, kind: str | None = None) -> BudgetPlan:
        """The budgeted decoding of ``task`` under ``bound`` (cached; bounds are estimator costs)."""
        kind = kind or self.budget_kind
        key = ("plan", task, kind, bound)
        if key not in self._cache:
            if bound is None:
                plan = BudgetPlan([[0] * self.num_levels] * self.num_blocks, None)
            else:
                base = self.base_costs(task)[kind]
                bc = self.block_costs()[kind]
                plan = BudgetPlan(bc, bound - base, self.max_states)
            self._cache[key] = plan
        return self._cache[key]

    def selector_parameters(self) -> int:
        return sum(p.numel() for p in self.selector.parameters())

    def estimator_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("selector."))

    def estimator_modules(self) -> list[nn.Module]:
        return [self.trunk, self.task_trunks, self.stems, self.heads]

    # ---- batch-norm calibration -------------------------------------------------------------------
    def estimator_norms(self) -> dict[str, nn.modules.batchnorm._BatchNorm]:
        """The estimator's batch norms (stems, trunk, heads) by name."""
        return {
            n: m
            for n, m in self.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not n.startswith("selector.")
        }

    def start_calibration(self) -> dict[str, Any]:
        """Begin re-estimating the estimator's batch-norm statistics: every norm's running statistics are
        reset and averaged over the batches that follow (``momentum=None``: the cumulative mean). Returns
        what :meth:`end_calibration` restores: the momenta and the statistics before."""
        saved: dict[str, Any] = {}
        for n, bn in self.estimator_norms().items():
            saved[n] = (
                bn.momentum,
                {
                    k: v.clone()
                    for k, v in bn.state_dict().items()
                    if k.startswith("running_") or k == "num_batches_tracked"
                },
            )
            bn.reset_running_stats()
            bn.momentum = None
        return saved

    def calibration_forward(
        self, xs: dict[str, torch.Tensor], z: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One calibration batch: the estimator's norms in training mode (batch statistics, running
        averages updated), every other layer in eval mode (no dropout), the masked path on structures
        ``z``; no gradient. Returns the logits per task."""
        for m in self.estimator_modules():
            m.eval()
        for bn in self.estimator_norms().values():
            bn.train()
        self.selector.eval()
        with torch.no_grad():
            out = self.forward_tasks(xs, z, masked=True)
        self.eval()
        return out

    def end_calibration(self, saved: dict[str, Any]) -> list[str]:
        """End a calibration: momenta restored; a norm that saw no batch (a private norm of a level no
        calibration structure used) gets its statistics from before back. Returns those norms' names."""
        kept = []
        for n, bn in self.estimator_norms().items():
            momentum, before = saved[n]
            bn.momentum = momentum
            tracked = bn.num_batches_tracked
            if tracked is not None and int(tracked) == 0:
                with torch.no_grad():
                    for k, v in before.items():
                        getattr(bn, k).copy_(v)
                kept.append(n)
        return kept

    def deployable(self, task: str, level: int | None = None) -> DENTaskNet:
        """A standalone copy of :meth:`task_network` (shares no tensor), in eval mode."""
        net = copy.deepcopy(self.task_network(task, level))
        for m in net.modules():
            cache = getattr(m, "_slice_cache", None)
            if isinstance(cache, dict):
                cache.clear()
        return net.eval()


__all__ = ["DENTaskNet", "ElasticNet"]
