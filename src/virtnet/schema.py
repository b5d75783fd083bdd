"""Schema helpers shared by every validated file: config sections, checkpoint sidecars, exported networks.

This is a bottom-level module: it imports nothing from virtnet except :mod:`virtnet.errors`, so any
module (configs, storage, methods, backbones) may use it without import cycles.

* :class:`Strict`: the base of validated sections (unknown keys are errors, assignments are validated);
* :func:`validate`: validate data against a pydantic model; errors become one-line :class:`ConfigError`
  messages ``<source>: <key>: <problem>``;
* :func:`format_validation_error`: the one line of a pydantic ``ValidationError``;
* bounded integer types (:data:`Seed`, :data:`NumUnits`, :data:`PositiveInt`) and :func:`check_num_units`,
  so sizes are bounded before anything is allocated.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from virtnet.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

#: seeds are 63-bit non-negative integers (torch.manual_seed and numpy accept them)
MAX_SEED = 2**63 - 1
#: the most units (DVN / NestedNet / grouped PackNet) a model may be split into
MAX_UNITS = 4096

Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
NumUnits = Annotated[StrictInt, Field(ge=1, le=MAX_UNITS)]


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def format_validation_error(err: ValidationError, where: str = "") -> str:
    """One line naming the first offending key and what is wrong with it."""
    errors = err.errors()
    e = errors[0]
    key = _loc(tuple(e.get("loc", ())))
    if where:
        key = f"{where}.{key}" if key else where
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        msg = "unknown key"
    elif e.get("type") == "missing":
        msg = "required key is missing"
    elif e.get("type") in ("int_type", "int_parsing", "int_from_float") and isinstance(
        e.get("input"), bool
    ):
        msg = "Input should be a valid integer, not a boolean"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return _one_line(f"{key}: {msg}{more}" if key else f"{msg}{more}")


def validate(model: type[M], data: Any, where: str = "", source: str = "") -> M:
    """Validate ``data`` against the pydantic ``model``; errors become a one-line ConfigError."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as err:
        prefix = f"{source}: " if source else ""
        raise ConfigError(prefix + format_validation_error(err, where)) from None
    except (RecursionError, OverflowError, MemoryError) as err:  # absurdly nested or sized input
        prefix = f"{source}: " if source else ""
        key = f"{where}: " if where else ""
        problem = f"value too large or too deeply nested ({type(err).__name__})"
        raise ConfigError(f"{prefix}{key}{problem}") from None


def check_num_units(value: Any, key: str = "method.num_units", limit: int = MAX_UNITS) -> int:
    """``value`` as a unit count in ``1..limit`` (a strict int, not a boolean); a one-line ConfigError
    naming ``key`` otherwise. Methods that split a backbone into units call this before building lists
    of units, so ``num_units: 10**12`` fails at once instead of hanging."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    if not 1 <= value <= limit:
        raise ConfigError(f"{key}: must be between 1 and {limit}, got {value}")
    return value


class Strict(BaseModel):
    """Base of config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


__all__ = [
    "MAX_SEED",
    "MAX_UNITS",
    "NumUnits",
    "PositiveInt",
    "Seed",
    "Strict",
    "check_num_units",
    "format_validation_error",
    "validate",
]
