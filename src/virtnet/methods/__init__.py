"""Methods, one folder each, registered by name (see ``virtnet.methods.base``)."""

from virtnet.methods import adapters, baselines, dvn, packnet  # noqa: F401  (registers the methods)
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
