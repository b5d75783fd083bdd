"""Methods, one folder each, registered by name (see ``virtnet.methods.base``)."""

from virtnet.methods import baselines  # noqa: F401  (registers the baselines)
from virtnet.methods.base import (
    Level,
    Method,
    MethodConfig,
    Phase,
    get_method_class,
    make_method,
    method_names,
    register,
    task_loss,
)

__all__ = [
    "Level",
    "Method",
    "MethodConfig",
    "Phase",
    "get_method_class",
    "make_method",
    "method_names",
    "register",
    "task_loss",
]
