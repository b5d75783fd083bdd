"""The thin-omega multi-task VGG whose layers grow into a tree of branches (Lu et al. 2017, Sec. 3.1-3.2).

Layers, bottom to top: a stem per input task (VGG's conv1_1: 3x3 convolution, BN, ReLU, mapping the task's
images to the trunk's size), the trunk's other convolutions (3x3 + BN + ReLU, width ``min(omega, VGG
width)``; a 2x2 max-pool before a layer wherever VGG has one and the maps are at least 2 wide), global
average pooling, ``fc_layers`` hidden layers (Linear + BN + ReLU, width ``2 omega``: fc6, fc7) and one
linear head per *branch task*. A branch task is what the paper calls a task: each output of a multilabel
task listed in ``attribute_tasks`` (a sigmoid attribute), or a whole task otherwise (a multi-class softmax,
or a multilabel task kept as one).

The tree: every trunk layer holds one or more *branches*, each serving a set of branch tasks; a layer's
branches partition the branch tasks and each is contained in one branch of the layer below (its parent),
so the layers from the top down form a tree. A fresh model shares every trunk layer (one branch each) and
has a junction only at the heads. Widening (eqs. 4-5) makes the layer under the active junction a junction:
the branches of the active layer are grouped, and the layer below gets one copy of its single module per
group (the first group keeps the module itself), so the widened network computes exactly what it computed
before. The active layer moves one down.

Parameter names: ``stems.<task or shared>.*``, ``trunk.<layer>.<branch>.*``, ``heads.<branch task>.*``;
the affinity estimate and a code of the tree are buffers (``affinity.*``, ``tree_code``), so a checkpoint
of a widened model carries its tree twice: as :meth:`structure` in the sidecar (what the rebuild follows)
and as tensors (what the rebuild is checked against).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from virtnet.backbones.base import Stem, init_weights
from virtnet.backbones.vgg import VGG_CONFIGS
from virtnet.errors import CheckpointError, ConfigError, DataError, TaskError
from virtnet.methods.branching.affinity import AffinityEstimator
from virtnet.nn import call
from virtnet.protocol import MultiTaskModel, TaskSpec

TREE_FORMAT = "virtnet-branching-tree"
TREE_VERSION = 1


# ---- layers ------------------------------------------------------------------------------------------
def layer_plan(depth: int, omega: int, fc_layers: int, feature_size: int) -> tuple[int, list[dict[str, Any]]]:
    """``(stem width, trunk layers)`` of the thin-omega VGG-``depth``: one plain dict per trunk layer with
    ``name``, ``kind`` (conv | fc), ``in``, ``out``, ``pool`` (a max-pool before it) and ``gap`` (global
    average pooling before it: the first FC layer)."""
    if depth not in VGG_CONFIGS:
        raise ConfigError(f"method.depth: VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
    cfg = VGG_CONFIGS[depth]
    first = cfg[0]
    assert isinstance(first, int)
    stem_width = min(omega, first)
    layers: list[dict[str, Any]] = []
    prev, size, stage, index, pool = stem_width, feature_size, 1, 1, False
    for v in cfg[1:]:
        if v == "M":
            stage, index = stage + 1, 0
            if size >= 2:
                pool, size = True, size // 2
            continue
        assert isinstance(v, int)
        index += 1
        width = min(omega, v)
        layers.append(
            {"name": f"conv{stage}_{index}", "kind": "conv", "in": prev, "out": width, "pool": pool}
        )
        layers[-1]["gap"] = False
        prev, pool = width, False
    for j in range(fc_layers):
        layers.append(
            {
                "name": f"fc{6 + j}",
                "kind": "fc",
                "in": prev,
                "out": 2 * omega,
                "pool": pool and j == 0,
                "gap": j == 0,
            }
        )
        prev = 2 * omega
    return stem_width, layers


def make_layer(desc: Mapping[str, Any], dropout: float = 0.0) -> nn.Sequential:
    """One trunk layer as a plain ``nn.Sequential`` (see :func:`layer_plan`)."""
    mods: list[nn.Module] = []
    if desc["pool"]:
        mods.append(nn.MaxPool2d(2))
    if desc["kind"] == "conv":
        mods += [nn.Conv2d(desc["in"], desc["out"], 3, padding=1, bias=False), nn.BatchNorm2d(desc["out"])]
        mods.append(nn.ReLU())
    else:
        if desc["gap"]:
            mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        mods += [nn.Linear(desc["in"], desc["out"], bias=False), nn.BatchNorm1d(desc["out"]), nn.ReLU()]
        if dropout > 0:
            mods.append(nn.Dropout(dropout))
    return nn.Sequential(*mods)


def weight_and_norm(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The convolution (or linear layer) and the batch norm of a trunk layer or a stem."""
    if isinstance(layer, Stem):
        assert layer.bn is not None
        return layer.conv, layer.bn
    lin = next(m for m in layer.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    bn = next(m for m in layer.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)))
    return lin, bn


# ---- exported networks: plain modules, no tree bookkeeping -------------------------------------------
class Chain(nn.Module):
    """An ordered container whose children are named ``m000``, ``m001``, ...: names that sort in their
    order, so a module tree written with sorted keys (the exported network's JSON) is rebuilt in order
    (an ``nn.Sequential`` or ``nn.ModuleList`` of more than ten children is not: "10" sorts before "2").
    ``Chain(mods)(x)`` runs them in sequence; ``list(chain)`` gives them."""

    def __init__(self, modules: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        for i, m in enumerate(modules):
            self.add_module(f"m{i:03d}", m)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._modules.values():
            x = m(x)
        return x


class Segment(nn.Module):
    """A run of trunk layers with no junction inside, then the branches above it (``children``); returns
    the features of every top-layer branch it leads to, in order."""

    def __init__(self, layers: Sequence[nn.Module], children: Sequence[Segment] = ()) -> None:
        super().__init__()
        self.layers = Chain(layers)
        self.branches = Chain(children)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.layers(x)
        if len(self.branches) == 0:
            return [y]
        out: list[torch.Tensor] = []
        for b in self.branches:
            out.extend(b(y))
        return out


class TreeTrunk(nn.Module):
    """The trunk of one task's network: the segments fed by the stem (several when the task's branch
    tasks split already at the first trunk layer)."""

    def __init__(self, roots: Sequence[Segment]) -> None:
        super().__init__()
        self.roots = Chain(roots)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for r in self.roots:
            out.extend(r(x))
        return out


class TreeHead(nn.Module):
    """The heads of one task's outputs, in output order; head ``k`` reads top-layer feature ``sources[k]``."""

    def __init__(self, heads: Sequence[nn.Module], sources: Sequence[int]) -> None:
        super().__init__()
        self.heads = Chain(heads)
        self.sources = tuple(int(s) for s in sources)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([h(feats[s]) for h, s in zip(self.heads, self.sources, strict=True)], dim=1)


class TaskTreeNet(nn.Module):
    """One task's network: its stem, the part of the tree its outputs use, its heads (``net(x, route)``;
    the route is ignored). Parameter names start with ``stem.``, ``trunk.`` and ``head.``."""

    def __init__(self, stem: nn.Module, trunk: TreeTrunk, head: TreeHead) -> None:
        super().__init__()
        self.stem = stem
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor, route: Any = None) -> torch.Tensor:
        return self.head(self.trunk(call(self.stem, x, None)))


# ---- the model ---------------------------------------------------------------------------------------
class BranchingNet(nn.Module, MultiTaskModel):
    """A thin-omega VGG-n whose trunk is a tree of branches (see the module docstring).

    Args:
        specs: one :class:`TaskSpec` per task.
        depth: VGG depth (11, 13, 16, 19).
        omega: thinness factor.
        fc_layers: hidden FC layers of width ``2 omega``.
        feature_size: the trunk's input side (the stems map every task's images to it).
        attribute_tasks: tasks whose outputs are separate branch tasks (binary attributes).
        shared_stem: one stem for every task (equal input shapes).
        dropout: after each hidden FC layer.
        decay: of the affinity estimate.
        init: ``kaiming`` or ``xavier`` (random initialisation; SOMP overwrites it).
    """

    def __init__(
        self,
        specs: Sequence[TaskSpec],
        depth: int = 16,
        omega: int = 32,
        fc_layers: int = 2,
        feature_size: int = 32,
        attribute_tasks: Sequence[str] = (),
        shared_stem: bool = False,
        dropout: float = 0.0,
        decay: float = 0.99,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        if not specs:
            raise ConfigError("tasks: a multi-task network needs at least one task")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks: task names must be unique, got {names}")
        unknown = [t for t in attribute_tasks if t not in names]
        if unknown:
            raise ConfigError(f"method.attribute_tasks: unknown task '{unknown[0]}' (tasks: {names})")
        self.specs = {s.name: s for s in specs}
        self.depth, self.omega, self.fc_layers, self.feature_size = depth, omega, fc_layers, feature_size
        self.attribute_tasks = tuple(attribute_tasks)
        self.shared_stem = shared_stem
        stem_width, plan = layer_plan(depth, omega, fc_layers, feature_size)
        self.plan = plan
        self.stem_width = stem_width
        # branch tasks: (task, first output, end output)
        self.branch_tasks: list[tuple[str, int, int]] = []
        for s in specs:
            if s.name in self.attribute_tasks:
                self.branch_tasks += [(s.name, a, a + 1) for a in range(s.num_outputs)]
            else:
                self.branch_tasks.append((s.name, 0, s.num_outputs))
        if shared_stem:
            shapes = {(s.in_channels, s.input_size) for s in specs}
            if len(shapes) != 1:
                raise DataError(f"a shared stem needs tasks of one input shape, got {sorted(shapes)}")
            self.stems = nn.ModuleDict(
                {"shared": Stem(specs[0].in_channels, specs[0].input_size, stem_width, feature_size)}
            )
        else:
            self.stems = nn.ModuleDict(
                {s.name: Stem(s.in_channels, s.input_size, stem_width, feature_size) for s in specs}
            )
        self.trunk = nn.ModuleList([nn.ModuleList([make_layer(d, dropout)]) for d in plan])
        top = plan[-1]["out"]
        self.heads = nn.ModuleList([nn.Linear(top, e - b) for _, b, e in self.branch_tasks])
        init_weights(self, init)
        self.affinity = AffinityEstimator(len(self.branch_tasks), decay)
        self.register_buffer("round_step", torch.zeros((), dtype=torch.int64))
        everyone = tuple(range(len(self.branch_tasks)))
        self._set_tree(
            [[everyone] for _ in plan], active=len(plan), done=len(self.branch_tasks) < 2, rounds=[]
        )

    # ---- the tree --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Trunk layers (the heads are layer ``num_layers``)."""
        return len(self.plan)

    @property
    def layer_names(self) -> list[str]:
        return [d["name"] for d in self.plan] + ["heads"]

    def branch_task_names(self) -> list[str]:
        """``task`` for a whole task, ``task/<output>`` for an attribute of an attribute task."""
        return [t if t not in self.attribute_tasks else f"{t}/{b}" for t, b, _ in self.branch_tasks]

    def _set_tree(
        self, layers: list[list[tuple[int, ...]]], active: int, done: bool, rounds: list[dict[str, Any]]
    ) -> None:
        self.tree = [[tuple(sorted(b)) for b in layer] for layer in layers]
        self.active = int(active)
        self.done = bool(done)
        self.rounds = list(rounds)
        nbt = len(self.branch_tasks)
        # parent[l][b]: the branch of layer l - 1 that feeds branch b of layer l (-1: the stem)
        self.parent: list[list[int]] = []
        where = [[0] * nbt for _ in self.tree]  # where[l][bt]: the branch of layer l serving bt
        for l, layer in enumerate(self.tree):
            for b, members in enumerate(layer):
                for bt in members:
                    where[l][bt] = b
            self.parent.append([-1 if l == 0 else where[l - 1][members[0]] for members in layer])
        self.where = where
        old = self._buffers.get("tree_code")
        device = old.device if old is not None else None
        code = torch.tensor(where, dtype=torch.int64, device=device).reshape(len(self.tree), nbt)
        self.register_buffer("tree_code", code)

    def branches_at(self, layer: int) -> list[tuple[int, ...]]:
        """The branches of ``layer`` as branch-task index tuples (layer ``num_layers``: the heads)."""
        if layer == self.num_layers:
            return [(i,) for i in range(len(self.branch_tasks))]
        return list(self.tree[layer])

    def pools_above(self, layer: int) -> int:
        """``p_l`` of eq. 9: max-pools applied above trunk layer ``layer``."""
        return sum(1 for d in self.plan[layer + 1 :] if d["pool"])

    def can_widen(self) -> bool:
        """True while a round can still create branches: not stopped, and a layer below the active one."""
        return not self.done and self.active >= 1 and len(self.branches_at(self.active)) > 1

    @torch.no_grad()
    def widen(self, labels: Sequence[int]) -> dict[str, str]:
        """Group the active layer's branches by ``labels`` (one group index per branch) and make the layer
        below a junction with one branch per group (eqs. 4-5): the first group keeps the layer's module,
        the others get copies of it (weights, batch-norm statistics), so every output is unchanged.

        One group stops the widening (:attr:`done`): nothing changes. Returns ``{new parameter name:
        origin parameter name}`` for the copies, what the optimizer's state is copied from."""
        if not self.can_widen():
            raise ConfigError("branching: the tree cannot be widened further")
        branches = self.branches_at(self.active)
        if len(labels) != len(branches):
            raise ValueError(f"widen: {len(labels)} labels for {len(branches)} branches")
        groups: dict[int, list[int]] = {}
        for members, g in zip(branches, labels, strict=True):
            groups.setdefault(int(g), []).extend(members)
        if len(groups) == 1:
            self._set_tree(self.tree, self.active, True, self.rounds)
            return {}
        below = self.active - 1
        new_branches = sorted((tuple(sorted(m)) for m in groups.values()), key=lambda m: m[0])
        if len(self.tree[below]) != 1:
            raise ConfigError(f"branching: layer {self.plan[below]['name']} is a junction already")
        origin = self.trunk[below][0]
        mods = [origin] + [copy.deepcopy(origin) for _ in new_branches[1:]]
        self.trunk[below] = nn.ModuleList(mods)
        layers = list(self.tree)
        layers[below] = new_branches
        self._set_tree(layers, below, below == 0, self.rounds)
        state_from: dict[str, str] = {}
        for j in range(1, len(mods)):
            for pname, _ in mods[j].named_parameters():
                state_from[f"trunk.{below}.{j}.{pname}"] = f"trunk.{below}.0.{pname}"
        return state_from

    def record_round(self, record: dict[str, Any]) -> None:
        """Keep one round's log (layer, affinity, every candidate's cost terms, the choice) in the tree."""
        self.rounds.append(json_plain(record))

    # ---- the model protocol ----------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    def spec(self, task: str) -> TaskSpec:
        if task not in self.specs:
            raise TaskError(f"unknown task '{task}': the model has {self.tasks}")
        return self.specs[task]

    def stem(self, task: str) -> nn.Module:
        self.spec(task)
        return self.stems["shared" if self.shared_stem else task]

    def task_branch_tasks(self, task: str) -> list[int]:
        """Indices of the task's branch tasks, in output order."""
        self.spec(task)
        return [i for i, (t, _, _) in enumerate(self.branch_tasks) if t == task]

    def run_tree(
        self, h: torch.Tensor, sizes: Mapping[str, int], wanted: Sequence[int]
    ) -> dict[int, tuple[torch.Tensor, tuple[str, ...]]]:
        """Run the trunk on stem features ``h`` whose rows are the tasks of ``sizes`` (in order, that many
        rows each), through the branches that serve a branch task of ``wanted``; each branch sees only
        the rows of the tasks it serves. Returns, per top-layer branch, its features and their tasks."""
        want = set(int(i) for i in wanted)
        order = tuple(sizes)
        prev: dict[int, tuple[torch.Tensor, tuple[str, ...]]] = {-1: (h, order)}
        for l, layer in enumerate(self.tree):
            cur: dict[int, tuple[torch.Tensor, tuple[str, ...]]] = {}
            for b, members in enumerate(layer):
                used = [i for i in members if i in want]
                if not used:
                    continue
                x, have = prev[self.parent[l][b]]
                need = {self.branch_tasks[i][0] for i in used}
                tasks = tuple(t for t in have if t in need)
                cur[b] = (self.trunk[l][b](_rows(x, have, tasks, sizes)), tasks)
            prev = cur
        return prev

    def head_outputs(
        self, top: Mapping[int, tuple[torch.Tensor, tuple[str, ...]]], task: str, sizes: Mapping[str, int]
    ) -> torch.Tensor:
        """The task's logits ``(B_task, outputs)`` from the top-layer features :meth:`run_tree` gave."""
        outs = []
        for i in self.task_branch_tasks(task):
            x, have = top[self.where[-1][i]]
            outs.append(self.heads[i](_rows(x, have, (task,), sizes)))
        return torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor, task: str, route: Any = None) -> torch.Tensor:
        """Logits ``(B, outputs)`` of ``task`` (``route`` is ignored: one level)."""
        h = call(self.stem(task), x, None)  # (B, C, S, S)
        sizes = {task: int(x.shape[0])}
        return self.head_outputs(self.run_tree(h, sizes, self.task_branch_tasks(task)), task, sizes)

    def task_network(self, task: str, level: int | None = None) -> TaskTreeNet:
        """The task's network (its stem, the branches its outputs use, its heads), sharing the modules."""
        if level is not None and level != 1:
            from virtnet.errors import BudgetError

            raise BudgetError(f"task '{task}' has levels [1], not {level}")
        wanted = self.task_branch_tasks(task)
        want = set(wanted)
        leaves: list[int] = []

        def node(l: int, b: int) -> Segment:
            mods = [self.trunk[l][b]]
            while l + 1 < self.num_layers:
                kids = self._children(l, b, want)
                if len(kids) != 1:
                    return Segment(mods, [node(l + 1, c) for c in kids])
                l, b = l + 1, kids[0]
                mods.append(self.trunk[l][b])
            leaves.append(b)
            return Segment(mods)

        roots = [node(0, b) for b, m in enumerate(self.tree[0]) if want & set(m)]
        sources = [leaves.index(self.where[-1][i]) for i in wanted]
        head = TreeHead([self.heads[i] for i in wanted], sources)
        return TaskTreeNet(self.stem(task), TreeTrunk(roots), head)

    def _children(self, l: int, b: int, want: set[int]) -> list[int]:
        return [c for c, m in enumerate(self.tree[l + 1]) if self.parent[l + 1][c] == b and want & set(m)]

    def parameter_usage(self, task: str, level: int | None = None) -> dict[str, torch.Tensor]:
        from virtnet.backbones.base import network_usage

        return network_usage(self, self.task_network(task, level), None)

    # ---- describing ------------------------------------------------------------------------------
    def structure(self) -> dict[str, Any]:
        return {
            "format": TREE_FORMAT,
            "version": TREE_VERSION,
            "branch_tasks": self.branch_task_names(),
            "layer_names": [d["name"] for d in self.plan],
            "tree": [[list(b) for b in layer] for layer in self.tree],
            "active": self.active,
            "done": self.done,
            "rounds": copy.deepcopy(self.rounds),
        }

    def apply_structure(self, structure: Mapping[str, Any]) -> None:
        """Rebuild the saved tree: every junction gets its branches (copies, whose weights the checkpoint
        then loads). CheckpointError when the tree does not fit this model."""
        if not isinstance(structure, Mapping):
            raise CheckpointError(f"structure: expected a mapping, got {type(structure).__name__}")
        keys = {"format", "version", "branch_tasks", "layer_names", "tree", "active", "done", "rounds"}
        extra, missing = sorted(set(structure) - keys), sorted(keys - set(structure))
        if extra or missing:
            raise CheckpointError(
                "structure: the saved tree does not match the model's "
                f"(unknown keys {extra}, missing {missing})"
            )
        if structure["format"] != TREE_FORMAT or structure["version"] != TREE_VERSION:
            raise CheckpointError(
                f"structure: format {structure['format']!r} version {structure['version']!r}"
            )
        for key, built in (
            ("branch_tasks", self.branch_task_names()),
            ("layer_names", self.layer_names[:-1]),
        ):
            if list(structure[key]) != built:
                raise CheckpointError(
                    f"structure: {key}: saved {list(structure[key])}, the model has {built}"
                )
        tree = structure["tree"]
        nbt = len(self.branch_tasks)
        try:
            layers = [[tuple(int(i) for i in b) for b in layer] for layer in tree]
        except (TypeError, ValueError):
            raise CheckpointError("structure: tree: expected lists of lists of branch-task indices") from None
        if len(layers) != self.num_layers:
            raise CheckpointError(f"structure: tree: {len(layers)} layers, the model has {self.num_layers}")
        for l, layer in enumerate(layers):
            flat = sorted(i for b in layer for i in b)
            if flat != list(range(nbt)) or any(not b for b in layer):
                raise CheckpointError(f"structure: tree: layer {l} does not partition the {nbt} branch tasks")
            if l > 0:
                below = [set(b) for b in layers[l - 1]]
                if any(not any(set(b) <= s for s in below) for b in layer):
                    raise CheckpointError(
                        f"structure: tree: a branch of layer {l} spans two branches below it"
                    )
        for l, layer in enumerate(layers):
            origin = self.trunk[l][0]
            self.trunk[l] = nn.ModuleList([origin] + [copy.deepcopy(origin) for _ in layer[1:]])
        self._set_tree(layers, int(structure["active"]), bool(structure["done"]), list(structure["rounds"]))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "tree_code")
        if saved is not None and (
            saved.shape != self.tree_code.shape or not torch.equal(saved.cpu(), self.tree_code.cpu())
        ):
            raise CheckpointError(
                "the tree of the structure does not match the checkpoint's tensors (tree_code differs): "
                "the sidecar and the tensor file are of different models"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def describe_tree(self, names: Sequence[str] | None = None) -> str:
        """The tree as text: per layer, top down, its branches and the branch tasks each serves; then the
        rounds (layer, chosen number of branches, every candidate's cost terms)."""
        names = list(names) if names is not None else self.branch_task_names()
        lines = [
            f"thin-{self.omega} VGG-{self.depth}: {len(names)} branch tasks, {self.num_layers} trunk layers"
        ]
        prev = None
        width = max(len(n) for n in self.layer_names)
        for l in range(self.num_layers - 1, -1, -1):
            layer = self.tree[l]
            text = " | ".join("{" + ", ".join(names[i] for i in b) + "}" for b in layer)
            if text != prev:
                lines.append(f"  {self.plan[l]['name']:<{width}}  {len(layer)} branch(es): {text}")
            else:
                lines.append(f"  {self.plan[l]['name']:<{width}}  (as above)")
            prev = text
        stems = ", ".join(self.stems)
        lines.append(f"  {'conv1_1':<{width}}  stems: {stems}")
        for k, r in enumerate(self.rounds, 1):
            cands = "; ".join(
                f"d={c['d']}: {c['complexity']:.3f} + {r['alpha']:g} x {c['separation']:.3f} "
                f"= {c['loss']:.3f}"
                for c in r["candidates"]
            )
            lines.append(
                f"round {k} at step {r['step']}: {r['layer']} (p={r['pools_above']}) -> d={r['d']} [{cands}]"
            )
        state = "done" if self.done else f"active layer {self.layer_names[self.active]}"
        lines.append(f"state: {state}")
        return "\n".join(lines)


def _rows(
    x: torch.Tensor, have: tuple[str, ...], want: tuple[str, ...], sizes: Mapping[str, int]
) -> torch.Tensor:
    """The rows of tasks ``want`` from ``x`` whose rows are the tasks ``have`` in order."""
    if want == have:
        return x
    offsets, o = {}, 0
    for t in have:
        offsets[t] = o
        o += sizes[t]
    parts = [x[offsets[t] : offsets[t] + sizes[t]] for t in want]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def json_plain(value: Any) -> Any:
    """``value`` with tensors as lists and tuples as lists (what a JSON round trip gives back)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): json_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_plain(v) for v in value]
    if isinstance(value, float):
        return float(value)
    return value


__all__ = [
    "BranchingNet",
    "Chain",
    "Segment",
    "TaskTreeNet",
    "TreeHead",
    "TreeTrunk",
    "layer_plan",
    "make_layer",
]
