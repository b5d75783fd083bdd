"""Methods, one folder each, registered by name (see ``virtnet.methods.base``).

Every sub-package of this folder except ``common`` is a method and is imported here, so registering a
new method means adding its folder: no list to edit.
"""

import importlib
import pkgutil

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

NOT_METHODS = frozenset({"common"})

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.ispkg and _info.name not in NOT_METHODS:
        importlib.import_module(f"{__name__}.{_info.name}")

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
