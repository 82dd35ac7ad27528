"""Where the app may write: every run folder, job log and saved config is a name under one run root.

The root is the server's setting (`wb app --runs-dir`, else `$WB_RUNS_DIR`, else `runs/` in the working
directory), never a browser widget, so no one at the browser can move it. A name is refused, in one line,
when it is absolute or climbs with `..`, or when it resolves outside the root (through a symlink, say).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from workbench.errors import InputError

RUNS_DIR_ENV = "WB_RUNS_DIR"
DEFAULT_RUNS_DIR = "runs"


def run_root() -> Path:
    """The run root as an absolute path (it need not exist yet)."""
    return Path(os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR).expanduser().absolute()


def path_under_root(root: str | Path, name: str) -> Path:
    """`root / name`, absolute; raises `InputError` unless it is a relative name strictly inside `root`."""
    name = name.strip()
    if not name:
        raise InputError("give a name (a folder or file under the run root)")
    if "\0" in name:
        raise InputError("a name cannot contain a NUL character")
    if PurePath(name).is_absolute() or name.startswith("~"):
        raise InputError(f"{name!r} is not under the run root: give a name relative to it, not a path")
    if ".." in PurePath(name).parts:
        raise InputError(f"{name!r} climbs out with '..': give a name under the run root")
    return inside_root(root, Path(root).absolute() / name)


def inside_root(root: str | Path, path: Path) -> Path:
    """`path` when it resolves (symlinks followed) to something strictly inside `root`; else `InputError`."""
    try:
        real_root, real_path = Path(root).resolve(), path.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop (RuntimeError before Python 3.13)
        raise InputError(f"cannot follow {path.name!r}: {error}") from None
    if real_path == real_root or not real_path.is_relative_to(real_root):
        raise InputError(f"{path.name!r} resolves to {real_path}, not to something inside the run root {root}")
    return path
