"""Where dataset files are looked for.

The candidate data roots, in order:

1. an explicit root (the config's ``data.root`` or a task's ``root``, or a benchmark's ``--data-root``):
   when one is given it is the ONLY root searched, so that pointing at a folder never silently loads
   another copy of the data;
2. else the environment variable ``VIRTNET_DATA_ROOT`` (again the only root searched);
3. else ``../shared/data`` relative to the current directory and relative to the repository root (found
   from this file's location), each when it exists, then ``/usr/share/datasets`` (where Debian's
   ``dataset-fashion-mnist`` package installs ``fashion-mnist/``).

Each loader then looks in dataset-specific sub-folders of every candidate root (e.g. ``fashion-mnist/``,
``FashionMNIST/raw/``) and, when the dataset is found nowhere, raises a :class:`DataError` listing every
folder it looked in. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from virtnet.errors import DataError

ENV_VAR = "VIRTNET_DATA_ROOT"
SYSTEM_ROOT = Path("/usr/share/datasets")


def repository_root() -> Path | None:
    """The repository holding this source file (a folder with ``pyproject.toml``), or None when installed."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "src" / "virtnet").is_dir():
            return parent
    return None


def _dedupe(paths: list[Path]) -> list[Path]:
    seen: set[str] = set()
    out: list[Path] = []
    for p in paths:
        key = os.path.normpath(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def candidate_roots(explicit: str | os.PathLike[str] | None = None) -> list[Path]:
    """The data roots to search, in order (see the module docstring).

    Args:
        explicit: a root given by the user; when set, it is the only candidate.

    Returns:
        The candidate roots. Only the explicit root and the environment root are returned whether or
        not they exist (so that an error can name them); the default roots are returned when they exist,
        except ``/usr/share/datasets`` which is always the last candidate.
    """
    if explicit is not None and str(explicit) != "":
        return [Path(explicit).expanduser()]
    env = os.environ.get(ENV_VAR, "")
    if env:
        return [Path(env).expanduser()]
    shared: list[Path] = [Path.cwd().parent / "shared" / "data"]
    repo = repository_root()
    if repo is not None:
        shared.append(repo.parent / "shared" / "data")
    return _dedupe([p for p in shared if p.is_dir()] + [SYSTEM_ROOT])


def resolve_data_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The first existing candidate root.

    Args:
        explicit: a root given by the user (config ``data.root``, ``--data-root``); it takes precedence
            over ``VIRTNET_DATA_ROOT`` and the default roots.

    Returns:
        The data root folder.

    Raises:
        DataError: the explicit (or environment) root does not exist, or no default root exists.
    """
    cands = candidate_roots(explicit)
    for c in cands:
        if c.is_dir():
            return c
    if explicit is not None and str(explicit) != "":
        raise DataError(f"{cands[0]}: data root not found (given explicitly)")
    if os.environ.get(ENV_VAR, ""):
        raise DataError(f"{cands[0]}: data root not found (from ${ENV_VAR})")
    raise DataError(
        f"no data root found: looked in {', '.join(map(str, cands))} "
        f"(set data.root, --data-root or ${ENV_VAR})"
    )


__all__ = ["ENV_VAR", "SYSTEM_ROOT", "candidate_roots", "repository_root", "resolve_data_root"]
