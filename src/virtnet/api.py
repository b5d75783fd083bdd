"""The Python API: train from a config, load a checkpoint, evaluate it, and account for its costs.

>>> from virtnet import api
>>> run = api.train("configs/demo.yaml")                 # or a dict, or a RunConfig
>>> loaded = api.load(run.out_dir / "model.json")
>>> rows = api.evaluate_model(loaded, loaded.taskset())  # accuracy per (task, level)
>>> costs = api.cost_rows(loaded)                        # params, FLOPs, latency per (task, level)
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.config import RunConfig, read_config_file
from virtnet.data.config import DataConfig, build_taskset
from virtnet.data.core import TaskSet
from virtnet.errors import CheckpointError, ConfigError, DataError
from virtnet.methods.base import Method, make_method
from virtnet.schema import format_validation_error
from virtnet.train.checkpoint import TaskSpecMeta, load_checkpoint, load_model_state
from virtnet.train.evaluate import evaluate
from virtnet.train.loop import Trainer
from virtnet.train.runtime import Runtime


def task_specs(taskset: TaskSet) -> list[TaskSpec]:
    """One :class:`TaskSpec` per task of ``taskset``, with its input normalisation (inputs must be
    square)."""
    specs = []
    for t in taskset:
        c, h, w = t.input_shape
        if h != w:
            raise DataError(f"task '{t.name}': inputs must be square, got {h}x{w}")
        specs.append(TaskSpec(t.name, c, h, t.num_outputs, tuple(t.mean), tuple(t.std)))
    return specs


def normalised_as(taskset: TaskSet, specs: list[TaskSpec]) -> TaskSet:
    """``taskset`` with each task normalised as the model's spec says (the statistics the model was
    trained with, whatever data the task set was rebuilt from); tasks whose spec records none keep
    theirs."""
    by = {s.name: s for s in specs}
    tasks = []
    for t in taskset:
        s = by.get(t.name)
        if s is not None and s.mean and (tuple(t.mean), tuple(t.std)) != (s.mean, s.std):
            t = dataclasses.replace(t, mean=s.mean, std=s.std)
        tasks.append(t)
    return TaskSet(tasks, taskset.name)


def _as_config(config: RunConfig | dict[str, Any] | str | Path) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return RunConfig.from_dict(config)
    return RunConfig.load(config)


def build(
    cfg: RunConfig, specs: list[TaskSpec], structure: dict[str, Any] | None = None
) -> tuple[Method, nn.Module]:
    """The method and its model, freshly initialised (seeded with ``cfg.seed``); with ``structure`` (a
    saved :meth:`MultiTaskModel.structure`) exactly the model it describes, ready for its weights."""
    method = make_method(cfg.method.name, cfg.method.options())
    torch.manual_seed(cfg.seed)
    model = method.create(specs, cfg.model, structure)
    return method, model


@dataclass
class Run:
    """What :func:`train` returns."""

    config: RunConfig
    method: Method
    model: nn.Module
    taskset: TaskSet
    out_dir: Path
    summary: dict[str, Any]
    test_rows: list[dict[str, Any]] = field(default_factory=list)


def run_meta(cfg: RunConfig, specs: list[TaskSpec], taskset: TaskSet) -> dict[str, Any]:
    """Metadata stored in every checkpoint: enough to rebuild the model without the data."""
    return {
        "config": cfg.to_dict(),
        "method": cfg.method.name,
        "tasks": [s.to_dict() for s in specs],
        "task_info": taskset.describe(),
        "class_names": {t.name: list(t.class_names) for t in taskset},
    }


def train(
    config: RunConfig | dict[str, Any] | str | Path,
    resume: bool = False,
    out_dir: str | Path | None = None,
    taskset: TaskSet | None = None,
    log: Any = None,
    allow_changes: list[str] | tuple[str, ...] | None = None,
) -> Run:
    """Train the run described by ``config`` and evaluate it on the test split.

    Writes ``metrics.jsonl``, ``checkpoints/last.*``, ``model.*`` (the final weights) and
    ``config.json`` (the config with defaults filled in) under ``out_dir`` (default: the config's
    ``output_dir``).

    ``resume``: continue from the run's last checkpoint. Options that change what the weights mean
    (anything but :data:`virtnet.config.FREE_KEYS`) must then be the run's own, unless named in
    ``allow_changes`` (keys or sections); allowed changes are recorded in ``config.json`` and every
    checkpoint as ``changes`` with the global step at which they took effect.

    A user ``taskset`` is checked first: class labels integers in range, multilabel targets 0/1
    (:func:`virtnet.inputs.check_taskset`). When ``train.threads`` is unset, torch's threads follow
    :func:`virtnet.threads.apply_default` (unless ``virtnet`` on the command line chose them already).
    """
    import json

    from virtnet.config import check_model_size, prepare_output_dir, record_changes
    from virtnet.inputs import check_taskset
    from virtnet.threads import apply_default

    cfg = _as_config(config)
    out = Path(out_dir if out_dir is not None else cfg.output_dir)
    if allow_changes and not resume:
        raise ConfigError("allow_changes: only meaningful with resume=True")
    if resume and (out / "config.json").is_file():
        record = out / "config.json"
        try:
            previous = RunConfig.from_dict(json.loads(record.read_text(encoding="utf-8")), source=str(record))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{record}: not valid JSON: {e}") from None
        cfg = record_changes(previous, cfg, _resume_step(out), allow_changes or (), source=str(record))
    apply_default(cfg.train.threads, once=cfg.train.threads is None)
    if taskset is None:
        taskset = build_taskset(cfg.data, cfg.seed)
    else:
        check_taskset(taskset)
    specs = task_specs(taskset)
    feature = cfg.model.feature_size or max(8, min(s.input_size for s in specs))
    check_model_size(cfg.model, feature, cfg.train.batch_size)
    out = prepare_output_dir(out)
    method, model = build(cfg, specs)
    runtime = Runtime.from_env(cfg.train.device)  # under torchrun: rank, world size, process group
    runtime.barrier()  # every rank has read the old record before rank 0 rewrites it
    if runtime.is_main:
        if not resume and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    runtime.barrier()
    trainer = Trainer(
        method,
        model,
        taskset,
        cfg.train,
        cfg.seed,
        out,
        run_meta(cfg, specs, taskset),
        sampling=cfg.data.sampling,
        log=log,
        runtime=runtime,
    )
    summary = trainer.fit(resume=resume)
    rows = evaluate(method, model, taskset, split="test")
    return Run(cfg, method, model, taskset, out, summary, rows)


def _resume_step(out: Path) -> int:
    """The global step of the run's last checkpoint (its previous one when the last is damaged; 0 when
    there is none): where options changed on resume take effect."""
    from virtnet.train.checkpoint import checkpoint_paths, load_checkpoint_with_fallback

    last = out / "checkpoints" / "last"
    if not checkpoint_paths(last)[1].is_file():
        return 0
    try:
        ck = load_checkpoint_with_fallback(last)
    except CheckpointError:
        return 0
    return int((ck.meta.get("state") or {}).get("global_step", 0))


@dataclass
class Loaded:
    """A model loaded from a checkpoint, with what is needed to use it."""

    method: Method
    model: nn.Module
    meta: dict[str, Any]
    specs: list[TaskSpec]
    path: Path

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.meta["config"])

    def taskset(self, data_root: str | None = None) -> TaskSet:
        """Rebuild the run's task set (reads the data; ``data_root`` overrides the config's), normalised
        with the statistics stored in the model (:func:`normalised_as`)."""
        cfg = self.config
        data: DataConfig = cfg.data
        if data_root is not None:
            data = data.model_copy(update={"root": data_root})
        return normalised_as(build_taskset(data, cfg.seed), self.specs)


def load(path: str | Path) -> Loaded:
    """Load a checkpoint (``model.json``, ``checkpoints/last.json``, either file of a pair, or a run
    folder). The model is rebuilt from the config, the task specs and the saved structure, then its
    weights are loaded: no training phase is replayed."""
    ck = load_checkpoint(path)
    meta = ck.meta
    if "config" not in meta or "tasks" not in meta:
        raise ConfigError(f"{ck.path}: checkpoint has no run config or task list")
    cfg = RunConfig.from_dict(meta["config"], source=str(ck.path))
    specs = [TaskSpec.from_dict(s) for s in meta["tasks"]]
    structure = meta.get("structure")
    if structure is None:
        raise CheckpointError(f"{ck.path}: structure: missing (saved by a virtnet before the model protocol)")
    try:
        method, model = build(cfg, specs, structure)
    except CheckpointError as e:
        raise CheckpointError(f"{ck.path}: {e}") from None
    load_model_state(model, ck.model_state, str(ck.path))
    model.eval()
    return Loaded(method, model, meta, specs, Path(ck.path))


def evaluate_model(
    loaded: Loaded, taskset: TaskSet, split: str = "test", levels: str | list[int] = "all"
) -> list[dict[str, Any]]:
    """Accuracy per (task, level) of a loaded model, its inputs normalised as the model was trained."""
    taskset = normalised_as(taskset, loaded.specs)
    return evaluate(loaded.method, loaded.model, taskset, split=split, levels=levels)


def cost_rows(
    loaded: Loaded,
    latency: bool | None = None,
    threads: int | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
) -> list[dict[str, Any]]:
    """Parameters, FLOPs, bytes and latency of every (task, level), from each level's exported network.

    ``density`` is the level's parameters over the task's largest level's (a fraction). Every timing
    setting left as None comes from the run's ``cost:`` section (``measure_latency``, ``threads``,
    ``batch_sizes``, ``warmup``, ``repeats``).
    """
    from virtnet.cost import level_costs

    cost = loaded.config.cost
    latency = cost.measure_latency if latency is None else latency
    threads = cost.threads if threads is None else threads
    batch_sizes = tuple(cost.batch_sizes) if batch_sizes is None else batch_sizes
    warmup = cost.warmup if warmup is None else warmup
    repeats = cost.repeats if repeats is None else repeats

    rows = []
    for spec in loaded.specs:
        shape = (spec.in_channels, spec.input_size, spec.input_size)
        rows.extend(
            level_costs(
                loaded.method,
                loaded.model,
                spec.name,
                shape,
                latency=latency,
                threads=threads,
                batch_sizes=batch_sizes,
                warmup=warmup,
                repeats=repeats,
            )
        )
    return rows


def total_parameters(model: nn.Module) -> int:
    """Physical parameters of a whole model, each tensor counted once."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def merge_rows(acc_rows: list[dict[str, Any]], cost: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join accuracy rows and cost rows on (task, level)."""
    by = {(r["task"], r["level"]): r for r in cost}
    out = []
    for r in acc_rows:
        merged = copy.copy(by.get((r["task"], r["level"]), {}))
        merged.update(r)
        out.append(merged)
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    return read_config_file(path)


def run_dir_of(path: str | Path) -> Path:
    """The run folder of a checkpoint (``RUN/model.json`` or ``RUN/checkpoints/<name>.json``)."""
    p = Path(path).resolve()
    parent = p.parent
    return parent.parent if parent.name == "checkpoints" else parent


def sequence_rows(
    path: str | Path, taskset: TaskSet | None = None, split: str = "test", data_root: str | None = None
) -> list[dict[str, Any]]:
    """Accuracy of every task learned so far after each phase (PackNet's Figure 2, LwF's forgetting).

    Reads the run's per-phase checkpoints ``RUN/checkpoints/phase-<k>.json``; after phase k, every task of
    phases 0..k is evaluated at its largest level. Rows: ``after_phase``, ``after_task`` (the tasks
    added in that phase), ``task``, ``level``, ``accuracy``, ``error`` (%); each task once per phase (a
    task trained over several phases, as PackNet's train and re-train, is listed once). ``path``: a
    checkpoint of the run or the run folder.
    """
    run = Path(path) if Path(path).is_dir() else run_dir_of(path)
    ckpts = sorted((run / "checkpoints").glob("phase-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not ckpts:
        raise ConfigError(f"{run}: no per-phase checkpoints (checkpoints/phase-<k>.json) in this run")
    rows: list[dict[str, Any]] = []
    for ck in ckpts:
        loaded = load(ck)
        if taskset is None:
            taskset = loaded.taskset(data_root)
        k = int(ck.stem.split("-")[1])
        phases = loaded.method.phases([s.name for s in loaded.specs])
        learned = list(dict.fromkeys(t for ph in phases[: k + 1] for t in ph.tasks))
        acc = evaluate(
            loaded.method, loaded.model, normalised_as(taskset, loaded.specs), split=split, tasks=learned,
            levels="top",
        )
        for r in acc:
            rows.append(
                {
                    "after_phase": k,
                    "after_task": "+".join(phases[k].tasks),
                    **r,
                    "error": 100.0 - r["accuracy"],
                }
            )
    return rows


# ---- budgets ------------------------------------------------------------------------------------------
def resolve_level(loaded: Loaded, task: str, budget: Any = None) -> int:
    """The level of ``task`` to run under ``budget`` (a Budget, a string like ``"params=1e5"``, an int
    level, or None for the largest); BudgetError when none fits."""
    from virtnet.methods.budget import Budget, choose_level, level_costs, parse_budget

    spec = next((s for s in loaded.specs if s.name == task), None)
    if spec is None:
        from virtnet.errors import TaskError

        raise TaskError(f"unknown task '{task}': the model has {[s.name for s in loaded.specs]}")
    if budget is None:
        return loaded.method.levels(loaded.model, task)[-1].index
    if isinstance(budget, int):
        return loaded.method.level(loaded.model, task, budget).index
    b = budget if isinstance(budget, Budget) else parse_budget(str(budget))
    if b.kind == "level":
        return loaded.method.level(loaded.model, task, int(b.value)).index
    costs = level_costs(
        loaded.method, loaded.model, task, (spec.in_channels, spec.input_size, spec.input_size)
    )
    return choose_level(costs, b, task).level


def predict(
    loaded: Loaded, x: Any, task: str, budget: Any = None, allow_nonfinite: bool = False
) -> torch.Tensor:
    """Logits of ``task`` on the batch ``x`` at the largest level that fits ``budget``.

    ``x``: a ``(B, C, H, W)`` tensor or numpy array of the task's shape on the model's device:
    ``float32`` normalised inputs as they are, ``float64`` cast to ``float32``, ``uint8`` raw pixels
    scaled by 1/255 and normalised with the task's recorded mean and std; other dtypes, empty batches
    and (unless ``allow_nonfinite``) NaN or infinite values are refused with a one-line DataError
    (see :mod:`virtnet.inputs`)."""
    from virtnet.errors import TaskError
    from virtnet.inputs import prepare_inputs

    spec = next((s for s in loaded.specs if s.name == task), None)
    if spec is None:
        raise TaskError(f"unknown task '{task}': the model has {[s.name for s in loaded.specs]}")
    param = next(iter(loaded.model.parameters()), None)
    device = param.device if param is not None else None
    x = prepare_inputs(x, spec, device=device, allow_nonfinite=allow_nonfinite)
    level = resolve_level(loaded, task, budget)
    with torch.inference_mode():
        return loaded.method.predict(loaded.model, x, task, level)


def shared_budget(
    loaded: Loaded,
    taskset: TaskSet,
    budget: Any,
    tasks: list[str] | None = None,
    allow_test: bool = False,
) -> dict[str, Any]:
    """One level per task maximising the summed accuracy on the validation split within one total budget
    of params or flops; see :func:`virtnet.methods.budget.choose_levels`.

    Every task must have a validation split (``data.val_fraction``, default 0.1): a task without one is a
    one-line ConfigError naming it, unless ``allow_test`` (then the levels are chosen on the test split,
    and ``selected_on`` says ``"test"``). The result's ``accuracy`` is that split's."""
    from virtnet.methods.budget import Budget, choose_levels, parse_budget

    b = budget if isinstance(budget, Budget) else parse_budget(str(budget))
    tasks = tasks or [s.name for s in loaded.specs]
    taskset = normalised_as(taskset, loaded.specs)
    split = taskset.choice_split(tasks, allow_test, "levels under a shared budget")
    rows = evaluate(loaded.method, loaded.model, taskset, split=split, tasks=tasks)
    acc = {(r["task"], r["level"]): r["accuracy"] for r in rows}
    shapes = {s.name: (s.in_channels, s.input_size, s.input_size) for s in loaded.specs}
    out = choose_levels(loaded.method, loaded.model, tasks, b, acc, shapes)
    out["selected_on"] = split
    out["accuracy"] = {t: acc[(t, lv)] for t, lv in out["levels"].items()}
    return out


# ---- export -------------------------------------------------------------------------------------------
EXPORT_FORMAT = "virtnet-export"
EXPORT_VERSION = 2


def export_network(
    loaded: Loaded,
    task: str,
    level: int,
    path: str | Path,
    format: str = "safetensors",
    external_data: bool = False,
) -> Path:
    """Write (task, level)'s standalone network as ``<path>.safetensors`` + ``<path>.json``.

    ``format`` ``"onnx"`` writes ``<path>.onnx`` and ``"pt2"`` ``<path>.pt2`` instead: standalone graphs
    that start with the task's input normalisation (:mod:`virtnet.export.onnx`; ``external_data``: ONNX
    weights in a side file); :func:`load_deployed` reads any of the three.

    The JSON describes the network fully — its module tree (:func:`virtnet.export.network.describe`),
    the task's spec with its input normalisation, the level, where it came from — so
    :func:`load_exported` rebuilds it with no config, method or training code; the tensor file holds only
    the exported network's weights.
    """
    from virtnet.export.network import describe
    from virtnet.storage import write_pair

    if format != "safetensors":
        return export_deployed(loaded, task, level, path, format, external_data)
    net = loaded.method.export(loaded.model, task, level)
    lv = loaded.method.level(loaded.model, task, level)
    spec = loaded.model.spec(task)  # type: ignore[operator]
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "task": spec.to_dict(),
        "level": lv.index,
        "level_name": lv.name,
        "method": loaded.meta.get("method"),
        "network": describe(net),
        "parameters": sum(p.numel() for p in net.parameters()),
        "source": str(loaded.path),
    }
    return write_pair(path, dict(net.state_dict()), meta)


class ExportMeta(BaseModel):
    """Schema of an exported network's sidecar (keys the pair writer adds, such as ``sha256``, pass
    through; :func:`virtnet.storage.read_pair_meta` has checked them)."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: Literal["virtnet-export"]
    format_version: StrictInt
    task: TaskSpecMeta
    level: Annotated[StrictInt, Field(ge=1)]
    level_name: StrictStr
    method: StrictStr | None = None
    network: dict[str, Any]
    parameters: Annotated[StrictInt, Field(ge=0)]
    source: StrictStr


def validate_export_meta(meta: Any, source: str | Path) -> None:
    """One-line CheckpointError ``<file>: <key>: <problem>`` unless ``meta`` fits :class:`ExportMeta`."""
    try:
        ExportMeta.model_validate(meta)
    except ValidationError as err:
        raise CheckpointError(f"{source}: {format_validation_error(err)}") from None


@dataclass
class Exported:
    """A network read by :func:`read_exported`: the module, its task's spec and level."""

    network: nn.Module
    spec: TaskSpec
    level: int
    meta: dict[str, Any]
    path: Path


def read_exported(path: str | Path) -> Exported:
    """Read an exported network's files (checked: format, version, sha256, the tensors against the
    description) and rebuild it in eval mode."""
    from safetensors.torch import load_file

    from virtnet.export.network import rebuild
    from virtnet.storage import read_pair_meta

    tpath, jpath, meta = read_pair_meta(path, EXPORT_FORMAT, EXPORT_VERSION, "exported virtnet network")
    validate_export_meta(meta, jpath)
    try:
        spec = TaskSpec.from_dict(meta["task"])
    except (KeyError, TypeError, ValueError, DataError) as e:
        raise CheckpointError(f"{jpath}: task: {e}") from None
    net = rebuild(meta["network"], where=f"{jpath}: network")
    try:
        state = load_file(str(tpath))
    except Exception as e:  # noqa: BLE001 (safetensors raises several types)
        raise CheckpointError(f"{tpath}: unreadable safetensors file: {e}") from None
    load_model_state(net, state, str(tpath))
    return Exported(net.eval(), spec, int(meta["level"]), meta, Path(jpath))


def load_exported(path: str | Path) -> nn.Module:
    """The network of an exported file pair (eval mode); see :func:`read_exported`."""
    return read_exported(path).network


# ---- deployment: ONNX / pt2 exports, the multi-task runtime, the planner, benchmarks -------------------
def export_deployed(
    loaded: Loaded,
    task: str,
    level: int,
    path: str | Path,
    format: str = "onnx",
    external_data: bool = False,
) -> Path:
    """Write (task, level)'s standalone network as ONNX (``<path>.onnx``) or pt2 (``<path>.pt2``), its
    graph starting with the task's ``(x - mean) / std``: fed ``float32`` pixels in [0, 1]. ConfigError
    for an unknown format or a network the format cannot hold (see :mod:`virtnet.export.onnx`)."""
    from virtnet.export import onnx as deploy

    deploy.check_format(format)
    if format == "safetensors":
        return export_network(loaded, task, level, path)
    lv = loaded.method.level(loaded.model, task, level)
    spec = loaded.model.spec(task)  # type: ignore[operator]
    net = loaded.method.export(loaded.model, task, lv.index)
    method = loaded.meta.get("method")
    what = f"method '{method}' task '{task}' level {lv.index}"
    meta = deploy.describe_deployed(
        spec,
        lv.index,
        {
            "level_name": lv.name,
            "method": method,
            "parameters": sum(p.numel() for p in net.parameters()),
            "source": str(loaded.path),
            "exported_as": format,
        },
    )
    out = deploy.output_path(path, format)
    if format == "onnx":
        return deploy.export_onnx(net, spec, out, meta, external_data=external_data, what=what)
    return deploy.export_pt2(net, spec, out, meta, what=what)


def load_deployed(path: str | Path, threads: int | None = 1) -> Any:
    """Read any exported network — ``.onnx`` (an onnxruntime session), ``.pt2`` (``torch.export.load``)
    or a safetensors pair — as a :class:`virtnet.export.onnx.Deployed`: called on ``float32`` pixels in
    [0, 1] ``(B, C, S, S)``, it returns the logits (numpy). The ONNX and pt2 graphs normalise inside;
    for a safetensors pair the normalisation recorded in its JSON is applied before the network."""
    from virtnet.export import onnx as deploy

    p = Path(path)
    if p.suffix == ".onnx":
        return deploy.read_onnx(p, threads)
    if p.suffix == ".pt2":
        return deploy.read_pt2(p)
    ex = read_exported(p)
    meta = deploy.describe_deployed(ex.spec, ex.level, {"method": ex.meta.get("method")})
    module = deploy.Normalised(ex.network, ex.spec).eval()
    return deploy.Deployed("safetensors", ex.spec, ex.level, meta, ex.path, module=module)


def runtime(
    path: str | Path,
    accuracy: Any = "val",
    data_root: str | None = None,
    threads: int | None = None,
    allow_test: bool = False,
) -> Any:
    """A :class:`virtnet.export.runtime.Runtime` over a checkpoint (loaded once); the planner maximises
    the ``accuracy`` split's accuracy (``"val"``, ``"test"``, a ``{(task, level): acc}`` mapping, or None
    for the largest levels). ``"val"`` needs a validation split in every task (a one-line ConfigError
    otherwise) unless ``allow_test``, which falls back to the test split."""
    from virtnet.export.runtime import Runtime

    return Runtime.load(path, accuracy, data_root, threads, allow_test=allow_test)


def plan(
    loaded: Loaded,
    budget: Any,
    tasks: list[str] | None = None,
    accuracy: Any = "val",
    data_root: str | None = None,
    allow_test: bool = False,
) -> dict[str, Any]:
    """One level per task of ``tasks`` (default: all) within a total ``budget`` (``params=N`` or
    ``bytes=N``), maximising the summed accuracy, shared parameters counted once; applied in a runtime,
    which reports the resident memory it measured beside the estimate (``measured``). ``accuracy``
    ``"val"`` (the default) needs a validation split in every task: a task without one is a one-line
    ConfigError unless ``allow_test`` (the test split then, ``selected_on: "test"``); ``"test"`` chooses
    on the test split explicitly."""
    from virtnet.export.runtime import Runtime, level_accuracy

    split: str | None = "given" if accuracy is not None else None
    acc = accuracy
    if isinstance(accuracy, str):
        acc, split = level_accuracy(loaded, accuracy, data_root, allow_test=allow_test)
    rt = Runtime(loaded.method, loaded.model, acc)
    out = rt.plan(budget, tasks or [s.name for s in loaded.specs]).to_dict()
    out["selected_on"] = split
    return out


def bench(loaded: Loaded, **options: Any) -> dict[str, Any]:
    """Latency of every (task, level) export in eager PyTorch and onnxruntime beside its FLOPs ratio and
    a plain network of the same shape; see :func:`virtnet.export.bench.bench_model`."""
    from virtnet.export.bench import bench_model

    return bench_model(loaded.method, loaded.model, source=str(loaded.path), **options)


def is_exported(path: str | Path) -> bool:
    """True when ``path`` names an exported network (``.onnx``, ``.pt2``, or a pair written by
    :func:`export_network`) rather than a training checkpoint or a run folder."""
    import json as _json

    from virtnet.storage import checkpoint_paths

    p = Path(path)
    if p.suffix in (".onnx", ".pt2"):
        return True
    if p.is_dir():
        return False
    _, jpath = checkpoint_paths(p)
    try:
        meta = _json.loads(jpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # not readable here: the checkpoint loader says what is wrong
    return isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT


def describe_exported(path: str | Path, threads: int | None = 1) -> dict[str, Any]:
    """What an exported network is: its file and format, task (input shape, outputs, normalisation),
    level, method, parameters and FLOPs per image (read with :func:`load_deployed`)."""
    from virtnet.cost import count_flops

    d = load_deployed(path, threads)
    info: dict[str, Any] = {
        "file": str(d.path),
        "format": d.format,
        "task": d.spec.to_dict(),
        "level": d.level,
        "method": d.meta.get("method"),
        "source": d.meta.get("source"),
    }
    if d.module is not None:
        info["parameters"] = sum(int(p.numel()) for p in d.module.parameters())
        info["flops"] = int(count_flops(d.module, d.spec.input_shape))
    return info
