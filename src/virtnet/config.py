"""Typed run configuration, loaded from YAML or TOML and validated on load.

A run config has five sections::

    seed: 0
    output_dir: runs/demo
    data:    {...}   # virtnet.data.config.DataConfig: datasets, roots, tasks, class splits, sampling
    model:   {...}   # virtnet.backbones.registry.BackboneConfig: backbone name, depth, width
    method:  {name: joint, ...}   # the method's name and its own options (validated by the method)
    train:   {...}   # virtnet.train.config.TrainConfig: epochs, batch size, optimizer, schedule
    cost:    {...}   # latency measurement settings

An unknown key, a wrong type or an impossible value is a :class:`ConfigError` whose one-line message
names the file and the key, e.g. ``run.yaml: train.epochs: Input should be greater than or equal to 1``.
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from virtnet.errors import ConfigError
from virtnet.schema import (  # noqa: F401 (re-exported)
    MAX_SEED,
    Strict,
    _loc,
    format_validation_error,
    validate,
)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error (PyYAML keeps the
    last one silently)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges: later keys override the merged ones on purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # reported by PyYAML itself
                if key in seen:
                    problem = f"duplicate key '{key}' (first at line {seen[key] + 1})"
                    raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _no_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key '{k}'")
        out[k] = v
    return out


def parse_yaml(text: str) -> Any:
    """YAML text to Python values, refusing duplicate keys (:class:`UniqueKeyLoader`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{e.problem}{where}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return first


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file into a dict.

    The file must be UTF-8 text; a key given twice in one mapping is an error in every format. Every
    problem is a one-line ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"{path}: unknown config format '{path.suffix}' (use .yaml, .toml or .json)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = f"invalid byte 0x{raw[e.start]:02x} at offset {e.start}"
        raise ConfigError(f"{path}: not UTF-8 text ({bad})") from None
    kind = "YAML" if path.suffix in (".yaml", ".yml") else path.suffix[1:].upper()
    try:
        if kind == "YAML":
            data = parse_yaml(text)
        elif kind == "TOML":
            data = tomllib.loads(text)
        else:
            data = json.loads(text, object_pairs_hook=_no_duplicate_pairs)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not valid {kind}: {first}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid {kind}: nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


class MethodSection(BaseModel):
    """``method:``: the method's registered name; every other key is the method's own option."""

    model_config = ConfigDict(extra="allow")

    name: str = "joint"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CostConfig(Strict):
    """``cost:``: how latency is measured."""

    # torch intra-op threads while timing; None: the default rule of virtnet.threads (idle usable cores)
    threads: int | None = Field(default=None, ge=1, le=1024)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    warmup: int = Field(default=5, ge=0, le=100_000)
    repeats: int = Field(default=20, ge=1, le=100_000)
    measure_latency: bool = True

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be a non-empty list of positive integers")
        if any(b > MAX_BATCH for b in v):
            raise ValueError(f"batch sizes must be at most {MAX_BATCH}")
        return v


# ---- sizes bounded before anything is allocated -----------------------------------------------------
MAX_PARAMS = 10**9
"""The most parameters (estimated, see :func:`estimate_model_size`) a run's backbone may have."""
MAX_BATCH = 1 << 20
"""The largest batch size a config may ask for (also ``train.batch_size``'s bound)."""
BYTES_PER_PARAM = 16
"""Training memory per parameter in the estimate: weights, gradients, optimizer state, one copy."""

# per backbone: (largest channel count, first trunk layer's channels) before ``width``, and the default
# depth (the number of 3x3 convolutions is at most the depth)
_SHAPES = {
    ("resnet", "cifar"): (64, 16, 20),
    ("resnet", "imagenet"): (512, 64, 18),
    ("wrn", "cifar"): (64, 16, 16),  # times widen_factor for the largest
    ("vgg", "cifar"): (512, 64, 11),
    ("simpleconvnet", "cifar"): (32, 32, 4),
    ("resnet26", "cifar"): (256, 32, 26),
}


def machine_memory() -> int | None:
    """Physical memory of this machine in bytes (None where unknown)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def estimate_model_size(
    model: Any, feature_size: int | None = None, batch_size: int = 64
) -> dict[str, float | None]:
    """An upper estimate of a backbone's size, from its config alone (nothing is built).

    ``params = depth * 9 * C**2 + hidden FC weights``, ``C`` the backbone's largest channel count times
    ``width`` (WRN: times ``widen_factor``), an over-estimate by about 3x for ResNets;
    ``activation_bytes = batch_size * C1 * feature_size**2 * 4 * depth`` with ``C1`` the first trunk layer's
    channels (None when ``feature_size`` is unknown); ``train_bytes = 16 * params + activation_bytes``.
    """
    name = getattr(model, "name", "resnet")
    layout = getattr(model, "layout", "cifar") if name == "resnet" else "cifar"
    c_max, c_first, default_depth = _SHAPES.get((name, layout), (512, 64, 20))
    width = float(getattr(model, "width", 1.0))
    if name == "wrn":
        c_max *= int(getattr(model, "widen_factor", 1))
    depth = getattr(model, "depth", None) or default_depth
    c = max(1.0, c_max * width)
    params = float(depth) * 9.0 * c * c
    hidden = list(getattr(model, "hidden", None) or [])
    if name in ("vgg", "simpleconvnet") and not hidden:
        hidden = [max(1.0, (512 if name == "vgg" else 128) * width)] * (1 if name == "vgg" else 2)
    if hidden:
        fs = feature_size or 32
        first_in = c * (max(1, fs // 4) ** 2 if name == "simpleconvnet" else 1)
        widths = [first_in, *[float(h) for h in hidden]]
        params += sum(a * b for a, b in zip(widths, widths[1:], strict=False))
    act = None
    if feature_size is not None:
        act = float(batch_size) * max(1.0, c_first * width) * float(feature_size) ** 2 * 4.0 * float(depth)
    return {
        "params": params,
        "activation_bytes": act,
        "train_bytes": BYTES_PER_PARAM * params + (act or 0.0),
    }


def check_model_size(
    model: Any, feature_size: int | None = None, batch_size: int = 64, where: str = "model"
) -> dict[str, float | None]:
    """Refuse, with a one-line ConfigError naming ``where``, a backbone whose estimated size
    (:func:`estimate_model_size`) exceeds :data:`MAX_PARAMS` parameters or half of this machine's memory.
    Called on every config load (``feature_size`` from ``model.feature_size``) and by ``api.train`` with the
    tasks' feature size, before anything is built."""
    est = estimate_model_size(model, feature_size, batch_size)
    width = getattr(model, "width", 1.0)
    if est["params"] > MAX_PARAMS:
        raise ConfigError(
            f"{where}: about {est['params']:.3g} parameters (width {width}, depth "
            f"{getattr(model, 'depth', None) or 'default'}) exceed the limit of {MAX_PARAMS:.0e}"
        )
    mem = machine_memory()
    if mem is not None and est["train_bytes"] > mem / 2:
        by_activations = (est["activation_bytes"] or 0) > BYTES_PER_PARAM * est["params"]
        key = f"{where}.feature_size" if by_activations else where
        raise ConfigError(
            f"{key}: training would need about {est['train_bytes'] / 2**30:.3g} GiB "
            f"(feature size {feature_size}, batch {batch_size}, width {width}), more than half of this "
            f"machine's {mem / 2**30:.3g} GiB"
        )
    return est


def _sections() -> dict[str, type[BaseModel]]:
    from virtnet.backbones.registry import BackboneConfig
    from virtnet.data.config import DataConfig
    from virtnet.train.config import TrainConfig

    return {"data": DataConfig, "model": BackboneConfig, "train": TrainConfig}


class RunConfig:
    """A validated run config: ``seed``, ``output_dir`` and the sections ``data``, ``model``,
    ``method``, ``train`` and ``cost``. Build with :meth:`from_dict` or :meth:`load`."""

    TOP_KEYS = ("seed", "output_dir", "data", "model", "method", "train", "cost")
    RECORD_KEYS = ("changes",)  # in a run's record (config.json, checkpoints): changes made on resume

    def __init__(
        self,
        seed: int,
        output_dir: str,
        data: Any,
        model: Any,
        method: MethodSection,
        train: Any,
        cost: CostConfig,
        raw: dict[str, Any],
    ) -> None:
        self.seed = seed
        self.output_dir = output_dir
        self.data = data
        self.model = model
        self.method = method
        self.train = train
        self.cost = cost
        self.raw = raw
        # options changed on resume (see record_changes): each {key, old, new, step}; ``original`` is the
        # config as first trained (with the changes' keys at their old values)
        self.changes: list[dict[str, Any]] = []
        self.original: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> RunConfig:
        """Validate a config dict; errors are one-line ConfigErrors naming ``source`` and the key."""
        prefix = f"{source}: " if source else ""
        if not isinstance(d, dict):
            raise ConfigError(f"{prefix}the top level must be a mapping of sections, got {type(d).__name__}")
        for k in d:
            if k not in cls.TOP_KEYS + cls.RECORD_KEYS:
                raise ConfigError(f"{prefix}{k}: unknown key (sections: {', '.join(cls.TOP_KEYS)})")
        if "changes" in d:
            changes = _check_changes(d["changes"], prefix)
            base = {k: v for k, v in d.items() if k != "changes"}
            original = cls.from_dict(base, source).to_dict()
            effective = copy.deepcopy(original)
            for c in changes:
                try:
                    set_dotted(effective, c["key"], copy.deepcopy(c["new"]))
                except ConfigError as e:
                    raise ConfigError(f"{prefix}changes: {e}") from None
            cfg = cls.from_dict(effective, source)
            cfg.changes, cfg.original, cfg.raw = changes, original, d
            return cfg
        seed = d.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{prefix}seed: must be an integer from 0 to 2**63-1, got {seed!r}")
        out = d.get("output_dir", "runs/run")
        if not isinstance(out, str) or not out:
            raise ConfigError(f"{prefix}output_dir: must be a non-empty string, got {out!r}")
        sec = _sections()
        data = validate(sec["data"], d.get("data"), "data", source)
        model = validate(sec["model"], d.get("model"), "model", source)
        train = validate(sec["train"], d.get("train"), "train", source)
        try:
            check_model_size(model, model.feature_size, train.batch_size)
        except ConfigError as e:
            raise ConfigError(prefix + str(e)) from None
        cost = validate(CostConfig, d.get("cost"), "cost", source)
        method = validate(MethodSection, d.get("method"), "method", source)
        # the method validates its own options now, so a bad option fails at load, not mid-run
        from virtnet.methods.base import get_method_class

        try:
            mcls = get_method_class(method.name)
        except ConfigError as e:
            raise ConfigError(prefix + str(e)) from None
        _strict_method_numbers(mcls.Config, method.options(), prefix)
        validate(mcls.Config, method.options(), "method", source)
        return cls(seed, out, data, model, method, train, cost, raw=d)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read and validate a YAML/TOML/JSON config file."""
        return cls.from_dict(read_config_file(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The config with every default filled in (JSON-serialisable). A config resumed with changes
        is the original config plus ``changes`` (each key's old and new value and the step it took effect
        at): what the weights were trained with, in full."""
        if self.changes and self.original is not None:
            return {**copy.deepcopy(self.original), "changes": copy.deepcopy(self.changes)}
        return self.effective_dict()

    def effective_dict(self) -> dict[str, Any]:
        """The options in force now (after every recorded change), with every default filled in."""
        return {
            "seed": self.seed,
            "output_dir": self.output_dir,
            "data": self.data.model_dump(mode="json"),
            "model": self.model.model_dump(mode="json"),
            "method": {"name": self.method.name, **self.method_options().model_dump(mode="json")},
            "train": self.train.model_dump(mode="json"),
            "cost": self.cost.model_dump(mode="json"),
        }

    def method_options(self) -> BaseModel:
        from virtnet.methods.base import get_method_class

        return validate(get_method_class(self.method.name).Config, self.method.options(), "method")


# ---- resuming with changed options -------------------------------------------------------------------
FREE_KEYS = (
    "output_dir",
    "data.root",
    "data.scenario.root",
    "data.tasks[*].root",
    "train.threads",
    "train.progress",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.checkpoint_every_steps",
    "cost",
)
"""Keys a resumed run may change freely: where files are, how fast, what is logged and measured. They do
not change what the weights mean. Any other change (schedule, optimizer, epochs, data, model, method,
seed, determinism, ...) is refused on resume unless allowed by name, and is then recorded."""


def _path_tokens(key: str) -> list[str | int]:
    tokens: list[str | int] = []
    for part in key.split("."):
        name, _, rest = part.partition("[")
        if name:
            tokens.append(name)
        while rest:
            idx, _, rest = rest.partition("]")
            if not idx.isdigit():
                raise ConfigError(f"{key}: not a config key")
            tokens.append(int(idx))
            rest = rest.removeprefix("[")
    if not tokens:
        raise ConfigError(f"{key!r}: not a config key")
    return tokens


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``d[a][b][i]...`` named by the dotted key ``a.b[i]...`` (sections are created as needed)."""
    tokens = _path_tokens(key)
    cur: Any = d
    for t, nxt in zip(tokens, tokens[1:], strict=False):
        if isinstance(t, int):
            if not isinstance(cur, list) or t >= len(cur):
                raise ConfigError(f"{key}: no such entry")
            cur = cur[t]
        else:
            if not isinstance(cur, dict):
                raise ConfigError(f"{key}: '{t}' is not inside a section")
            cur = cur.setdefault(t, [] if isinstance(nxt, int) else {})
    last = tokens[-1]
    if isinstance(last, int):
        if not isinstance(cur, list) or last >= len(cur):
            raise ConfigError(f"{key}: no such entry")
        cur[last] = value
    elif isinstance(cur, dict):
        cur[last] = value
    else:
        raise ConfigError(f"{key}: '{last}' is not inside a section")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config: mappings recurse (``train.lr``), lists of mappings too
    (``data.tasks[0].root``); other values, lists of numbers included, are leaves."""
    out: dict[str, Any] = {}
    if isinstance(d, dict) and (d or not prefix):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = d
    return out


def _matches(key: str, pattern: str) -> bool:
    """``key`` is ``pattern`` or inside it (``train`` covers ``train.lr``); ``[*]`` matches any index."""
    import re

    rx = re.escape(pattern).replace(r"\[\*\]", r"\[\d+\]")
    return re.fullmatch(rx + r"(?:[.\[].*)?", key) is not None


def is_free_key(key: str) -> bool:
    """Whether changing ``key`` on resume leaves the weights' meaning alone (:data:`FREE_KEYS`)."""
    return any(_matches(key, p) for p in FREE_KEYS)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Every dotted key whose value differs between two effective configs: ``{key, old, new}`` (a key
    missing on one side has the value None there), in key order."""
    a, b = flatten(old), flatten(new)
    return [
        {"key": k, "old": a.get(k), "new": b.get(k)}
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def record_changes(
    previous: RunConfig,
    new: RunConfig,
    step: int,
    allow: Sequence[str] = (),
    source: str = "",
) -> RunConfig:
    """The record of a run resumed with ``new`` after it was trained with ``previous``.

    Free changes (:data:`FREE_KEYS`) simply take effect. Any other change must be named in ``allow`` (a
    key, or a section covering it); otherwise a one-line ConfigError names every such key with its old
    and new value. Allowed changes are appended to the record as ``{key, old, new, step}`` (``step``: the
    global step at which they take effect, the last checkpoint's). Returns the config to train and record
    with (its :meth:`RunConfig.to_dict` is the original config plus ``changes``)."""
    prefix = f"{source}: " if source else ""
    diffs = config_changes(previous.effective_dict(), new.effective_dict())
    meaningful = [c for c in diffs if not is_free_key(c["key"])]
    refused = [c for c in meaningful if not any(_matches(c["key"], p) for p in allow)]
    if refused:
        shown = ", ".join(f"{c['key']} ({c['old']!r} -> {c['new']!r})" for c in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        keys = " ".join(c["key"] for c in refused)
        raise ConfigError(
            f"{prefix}resuming with options that change what the weights mean: {shown}{more}; "
            f"resume with the run's own options, or record the change with --allow-changes {keys}"
        )
    if not meaningful and not previous.changes:
        return new
    original = copy.deepcopy(previous.original or previous.effective_dict())
    for c in diffs:  # free keys: the record says where things are now
        if is_free_key(c["key"]):
            set_dotted(original, c["key"], copy.deepcopy(c["new"]))
    changes = [dict(c) for c in previous.changes] + [{**c, "step": int(step)} for c in meaningful]
    return RunConfig.from_dict({**original, "changes": changes}, source)


def _check_changes(changes: Any, prefix: str) -> list[dict[str, Any]]:
    if not isinstance(changes, list):
        raise ConfigError(f"{prefix}changes: must be a list of {{key, old, new, step}}, got {changes!r:.60}")
    out = []
    for i, c in enumerate(changes):
        if not isinstance(c, dict) or set(c) != {"key", "old", "new", "step"}:
            raise ConfigError(f"{prefix}changes[{i}]: must have exactly the keys key, old, new and step")
        if not isinstance(c["key"], str) or not c["key"]:
            raise ConfigError(f"{prefix}changes[{i}].key: must be a dotted config key")
        st = c["step"]
        if isinstance(st, bool) or not isinstance(st, int) or not 0 <= st <= MAX_SEED:
            raise ConfigError(f"{prefix}changes[{i}].step: must be a non-negative integer, got {st!r}")
        out.append(dict(c))
    return out


def _strict_method_numbers(config_cls: type[BaseModel], options: dict[str, Any], prefix: str) -> None:
    """The strict-number rules of :class:`virtnet.schema.StrictNumbers` for a method's options."""
    from virtnet.schema import _number_problem

    for name, field in config_cls.model_fields.items():
        if name in options:
            problem = _number_problem(field.annotation, options[name])
            if problem:
                raise ConfigError(f"{prefix}method.{name}: {problem}")


def prepare_output_dir(path: str | Path, key: str = "output_dir") -> Path:
    """Create the run folder ``path`` (and its parents); a one-line ConfigError naming ``key`` when it is a
    file, lies under a file, or cannot be created or written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: {p} is a file, not a folder")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{key}: {p} cannot be created: {parent} is a file")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}: {p} cannot be created: {e.strerror or e}") from None
    import os

    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {p} is not writable")
    return p


__all__ = [
    "FREE_KEYS",
    "check_model_size",
    "config_changes",
    "estimate_model_size",
    "prepare_output_dir",
    "record_changes",
    "ConfigError",
    "CostConfig",
    "MethodSection",
    "RunConfig",
    "Strict",
    "format_validation_error",
    "read_config_file",
    "validate",
]
