"""Safe writing for the whole project: atomic file writes, and one writer at a time per run folder.

Run stores, checkpoints, configs and metrics all write through `write_atomically`, so an interrupted
process (Ctrl-C, kill -9, a full disk) leaves every file it touched either as it was or complete.

A process that writes a run folder (an analysis run, a training run) holds its `RunFolderLock`: a file
naming the writer's PID, host and start time, created atomically. A second writer is refused with the
owner's name; a lock left by a process that is gone (its PID is dead on this host) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.errors import FolderInUse

LOCK_FILE = "writer.lock"


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(temporary_path)` beside `path`, then move the result into place in one rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Created here so that it gets the mode the umask gives (0644 with umask 022): some writers
        # (safetensors) create their file 0600, so that mode is put back after they have written.
        temporary.unlink(missing_ok=True)  # one a killed process left would keep its mode
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(temporary.stat().st_mode)
        write(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda target: target.write_text(text))


def write_json_atomically(path: str | Path, value: Any) -> Path:
    return write_text_atomically(path, json.dumps(value, indent=2, default=str) + "\n")


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks that the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def read_lock_owner(path: Path) -> dict[str, Any] | None:
    """The owner a lock file names, or None when it names none (cut short); FileNotFoundError when it is gone."""
    text = path.read_text()
    try:
        owner = json.loads(text)
    except ValueError:
        return None
    valid = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and owner["pid"] > 0
    return owner if valid else None


class RunFolderLock:
    """The writer lock of one run folder; a context manager, or `acquire` / `release`. Readers take none."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.owner: dict[str, Any] | None = None  # set while this object holds the lock

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise a one-line `FolderInUse` naming the process that holds it."""
        # `key` tells this lock from a later one of the same process, which `release` must leave alone.
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "key": os.urandom(8).hex()}
        while True:
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(owner, handle)
            self.owner = owner
            return

    def release(self) -> None:
        """Remove the lock file if it is still this object's (it may have been deleted and taken by another)."""
        if self.owner is None:
            return
        try:
            if read_lock_owner(self.path) == self.owner:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self.owner = None

    def _take_over_if_stale(self) -> None:
        """Return when the lock file is gone, or was stale and is removed; raise when another process holds it."""
        try:
            owner = read_lock_owner(self.path)
            if owner is None:  # probably being written this instant: look once more
                time.sleep(0.2)
                owner = read_lock_owner(self.path)
        except FileNotFoundError:
            return
        if owner is None or owner.get("host") != socket.gethostname() or process_is_alive(owner["pid"]):
            raise self._held_error(owner)
        # Moved aside before it is deleted, so that of two processes finding the same stale lock only one
        # removes it: the other finds it gone, or finds the new lock aside and puts it back.
        aside = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.stale")
        try:
            self.path.rename(aside)
        except FileNotFoundError:
            return
        moved = read_lock_owner(aside)
        if moved != owner:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # no-clobber, unlike a rename
            aside.unlink()
            raise self._held_error(moved)
        aside.unlink()
        print(f"note: {self.folder} was locked by process {owner['pid']} (since {owner.get('since')}), which is "
              "gone: taking the lock over", file=sys.stderr)

    def _held_error(self, owner: dict[str, Any] | None) -> FolderInUse:
        if owner is None:
            return FolderInUse(f"{self.folder} is locked by a writer that {self.path} does not name; if no other "
                              f"process writes there, delete {self.path}")
        return FolderInUse(f"{self.folder} is in use by process {owner['pid']} on {owner.get('host')} since "
                          f"{owner.get('since')}: wait for it to finish or stop it, or use another folder "
                          f"(if that process is gone, delete {self.path})")
