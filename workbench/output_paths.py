"""Where a command will write (its `--out`), checked when its options are parsed: before torch is imported or a model loads.

`output_folder` and `output_file` are typer option callbacks (they also work as plain calls): a run
folder must not be a file, a file must not be a folder, and the nearest existing parent must be a
writable folder. A bad `--out` is then one line at once, not an OS error after minutes of work.
"""

from __future__ import annotations

import os
from pathlib import Path

from workbench.errors import InputError


OPTION = "--out"  # every command names its output so


def _check_parent(path: Path) -> None:
    for parent in path.absolute().parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise InputError(f"{OPTION} {path}: {parent} is a file, so no folder can be made under it")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"{OPTION} {path}: no permission to write in {parent}")
        return


def output_folder(value: str | Path | None):
    """A folder to create or resume; returns `value` unchanged (None stays None: the command's default)."""
    if value is None:
        return value
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise InputError(f"{OPTION} {path} is a file; it needs a folder: give a new or existing folder path")
    _check_parent(path)
    return value


def output_file(value: str | Path | None):
    """A file to write; returns `value` unchanged."""
    if value is None:
        return value
    path = Path(value)
    if path.is_dir():
        raise InputError(f"{OPTION} {path} is a folder; it needs a file path, e.g. {path / 'config.yaml'}")
    _check_parent(path)
    return value
