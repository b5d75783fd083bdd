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

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from virtnet.errors import ConfigError
from virtnet.schema import Strict, _loc, format_validation_error, validate  # noqa: F401 (re-exported)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format '{path.suffix}' (use .yaml, .toml or .json)")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {first}") from None
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

    threads: int = Field(default=2, ge=1)  # torch intra-op threads while timing
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    warmup: int = Field(default=5, ge=0)
    repeats: int = Field(default=20, ge=1)
    measure_latency: bool = True

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be a non-empty list of positive integers")
        return v


def _sections() -> dict[str, type[BaseModel]]:
    from virtnet.backbones.registry import BackboneConfig
    from virtnet.data.config import DataConfig
    from virtnet.train.config import TrainConfig

    return {"data": DataConfig, "model": BackboneConfig, "train": TrainConfig}


class RunConfig:
    """A validated run config: ``seed``, ``output_dir`` and the sections ``data``, ``model``,
    ``method``, ``train`` and ``cost``. Build with :meth:`from_dict` or :meth:`load`."""

    TOP_KEYS = ("seed", "output_dir", "data", "model", "method", "train", "cost")

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

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> RunConfig:
        """Validate a config dict; errors are one-line ConfigErrors naming ``source`` and the key."""
        prefix = f"{source}: " if source else ""
        for k in d:
            if k not in cls.TOP_KEYS:
                raise ConfigError(f"{prefix}{k}: unknown key (sections: {', '.join(cls.TOP_KEYS)})")
        seed = d.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"{prefix}seed: must be a non-negative integer, got {seed!r}")
        out = d.get("output_dir", "runs/run")
        if not isinstance(out, str) or not out:
            raise ConfigError(f"{prefix}output_dir: must be a non-empty string, got {out!r}")
        sec = _sections()
        data = validate(sec["data"], d.get("data"), "data", source)
        model = validate(sec["model"], d.get("model"), "model", source)
        train = validate(sec["train"], d.get("train"), "train", source)
        cost = validate(CostConfig, d.get("cost"), "cost", source)
        method = validate(MethodSection, d.get("method"), "method", source)
        # the method validates its own options now, so a bad option fails at load, not mid-run
        from virtnet.methods.base import get_method_class

        try:
            mcls = get_method_class(method.name)
        except ConfigError as e:
            raise ConfigError(prefix + str(e)) from None
        validate(mcls.Config, method.options(), "method", source)
        return cls(seed, out, data, model, method, train, cost, raw=d)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read and validate a YAML/TOML/JSON config file."""
        return cls.from_dict(read_config_file(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The config with every default filled in (JSON-serialisable)."""
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


__all__ = [
    "ConfigError",
    "CostConfig",
    "MethodSection",
    "RunConfig",
    "Strict",
    "format_validation_error",
    "read_config_file",
    "validate",
]
