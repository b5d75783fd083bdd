"""Error types. Every error virtnet raises on bad input is one of these, with a one-line message that
names the problem (file, key, task, shape). The CLI prints the message alone and exits with status 2."""

from __future__ import annotations


class VirtnetError(Exception):
    """Base class of every error virtnet raises for bad input."""


class ConfigError(VirtnetError):
    """A config file or value is invalid (unknown key, wrong type, impossible value)."""


class DataError(VirtnetError):
    """A dataset file is missing, truncated or malformed, or an input does not fit its task."""


class CheckpointError(VirtnetError):
    """A checkpoint is missing, altered after saving, or saved for a different network."""


class TaskError(VirtnetError):
    """A task that the model does not have, or a task index out of range."""


class BudgetError(VirtnetError):
    """A budget that no level of a task fits, or an invalid budget specification."""


class TrainingError(VirtnetError):
    """Training cannot go on meaningfully (a non-finite loss: the run diverged)."""


class DataWarning(UserWarning):
    """Data was built differently from what the config asked by default (e.g. a training split too small
    for the default validation split: the task gets none). Shown once per message."""
