"""Schema helpers shared by every validated file: config sections, checkpoint sidecars, exported networks.

This is a bottom-level module: it imports nothing from virtnet except :mod:`virtnet.errors`, so any
module (configs, storage, methods, backbones) may use it without import cycles.

* :class:`Strict`: the base of validated sections (unknown keys are errors, assignments are validated);
* :func:`validate`: validate data against a pydantic model; errors become one-line :class:`ConfigError`
  messages ``<source>: <key>: <problem>``;
* :func:`format_validation_error`: the one line of a pydantic ``ValidationError``;
* :class:`StrictNumbers`: booleans are not numbers, floats and strings are not integers, integers
  fit in 64 bits, floats are finite (the base of :class:`Strict`; method option classes may use it too);
* bounded integer types (:data:`Seed`, :data:`NumUnits`, :data:`PositiveInt`) and :func:`check_num_units`,
  so sizes are bounded before anything is allocated.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

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


MAX_INT = 2**63 - 1
"""The largest magnitude of any integer in a validated file (what torch and numpy can hold)."""


def _number_problem(ann: Any, v: Any) -> str | None:
    """Why ``v`` is not acceptable for a field annotated ``ann`` under the strict-number rules, or None.
    Only the kind of number is checked here; ranges stay with the field's own constraints."""
    origin = typing.get_origin(ann)
    if origin is Annotated:
        return _number_problem(typing.get_args(ann)[0], v)
    if origin is Union or origin is types.UnionType:
        members = typing.get_args(ann)
        if v is None and type(None) in members:
            return None
        plain = [m for m in members if m is not type(None)]
        if len(plain) == 1:
            return _number_problem(plain[0], v)
        kinds = {_kind(m) for m in plain}
        if "other" in kinds or "str" in kinds:
            return None
        if isinstance(v, bool):
            return None if "bool" in kinds else "Input should be a valid number, not a boolean"
        if isinstance(v, int) and abs(v) > MAX_INT:
            return f"integer too large (at most {MAX_INT})"
        return None
    if origin is list and isinstance(v, list):
        (item,) = typing.get_args(ann) or (Any,)
        for i, x in enumerate(v):
            problem = _number_problem(item, x)
            if problem:
                return f"item {i}: {problem}"
        return None
    kind = _kind(ann)
    if kind == "int":
        if v is None:
            return "Input should be a valid integer, got None"
        if isinstance(v, bool):
            return "Input should be a valid integer, not a boolean"
        if isinstance(v, float):
            return f"Input should be a valid integer, got the number {v!r}"
        if isinstance(v, str):
            return f"Input should be a valid integer, got the string {v!r}"
        if isinstance(v, int) and abs(v) > MAX_INT:
            return f"integer too large (at most {MAX_INT})"
    elif kind == "float":
        if isinstance(v, bool):
            return "Input should be a valid number, not a boolean"
        if isinstance(v, int) and abs(v) > MAX_INT:
            return f"number too large (at most {MAX_INT})"
    elif kind == "bool" and not isinstance(v, bool):
        return f"Input should be a valid boolean (true or false), got {v!r}"
    return None


def _kind(ann: Any) -> str:
    if ann is bool:
        return "bool"
    if ann is int:
        return "int"
    if ann is float:
        return "float"
    if ann is str:
        return "str"
    if typing.get_origin(ann) is Annotated:
        return _kind(typing.get_args(ann)[0])
    if typing.get_origin(ann) is Literal:
        return "other"
    return "other"


class StrictNumbers(BaseModel):
    """Numbers mean numbers: ``epochs: true`` and ``epochs: 1e30`` are errors, not 1 and 10**30.

    For every field annotated ``int`` (also inside ``Optional`` and ``list``): booleans, floats and
    strings are refused and the magnitude is at most :data:`MAX_INT`; ``float`` fields refuse booleans
    (integers and numeric strings such as YAML's ``1e-3`` are accepted) and infinities and NaN; ``bool``
    fields accept only true and false."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return v
        problem = _number_problem(field.annotation, v)
        if problem:
            raise PydanticCustomError("strict_number", "{problem}", {"problem": problem})
        return v


class Strict(StrictNumbers):
    """Base of config sections: unknown keys are errors, values are validated on assignment, numbers are
    strict (:class:`StrictNumbers`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


__all__ = [
    "MAX_INT",
    "MAX_SEED",
    "MAX_UNITS",
    "NumUnits",
    "PositiveInt",
    "Seed",
    "Strict",
    "StrictNumbers",
    "check_num_units",
    "format_validation_error",
    "validate",
]
