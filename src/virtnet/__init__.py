"""virtnet: memory-efficient multi-task deep networks.

One physical network hosts many task-specific virtual networks, each runnable at several memory
budgets; tasks are added without forgetting; any virtual network exports as a physically smaller one.
"""

from virtnet.errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    DataError,
    TaskError,
    TrainingError,
    VirtnetError,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "TaskError",
    "TrainingError",
    "VirtnetError",
    "__version__",
]
