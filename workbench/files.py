"""Atomic file writes for the whole project: a reader sees the old file or the new one, never half of one.

Run stores, checkpoints, configs and metrics all write through `write_atomically`, so an interrupted
process (Ctrl-C, kill -9, a full disk) leaves every file it touched either as it was or complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(temporary_path)` beside `path`, then move the result into place in one rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda target: target.write_text(text))


def write_json_atomically(path: str | Path, value: Any) -> Path:
    return write_text_atomically(path, json.dumps(value, indent=2, default=str) + "\n")
