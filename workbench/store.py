"""The run store: one analysis run is one folder that can be read back, resumed and compared.

Layout of a run folder:

    manifest.json        what ran: kind, model, data source, config, package versions, times,
                         status ("running" / "complete"), skipped images, schema version
    parts/               per-batch results of a run in progress (Parquet / safetensors)
    <name>.parquet       final tables
    <name>.safetensors   final tensors
    <name>.json          summaries

Every file is written to a temporary name in the same folder and renamed into place, so a run
killed at any moment leaves either the old file or the new one, never half of one. A run
started again with the same command finds its finished batches in `parts/` and skips them;
because batches are fixed by the config, the result equals that of an uninterrupted run. A
folder written for another model, data source, config or schema version is refused. A folder an
interrupted start left without its manifest (only an empty `parts/` or temporary files) is started
afresh; one that holds parts but no manifest is refused, since nothing says what run they belong to.

A run being written holds the folder's writer lock (`workbench.files.RunFolderLock`) from `RunStore.open`
until `finish` (or until the store is closed or dropped), so a second process on the same folder is
refused instead of computing every batch again. Reading a run (`RunStore.load`) takes no lock.
"""

from __future__ import annotations

import json
import platform
import time
import weakref
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from workbench.errors import InputError
from workbench.files import LOCK_FILE, RunFolderLock, write_atomically, write_json_atomically

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PARTS = "parts"
VERSIONED_PACKAGES = ("torch", "transformers", "nnsight", "multimodal-workbench")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _write_parquet(path: Path, table: pd.DataFrame) -> None:
    write_atomically(path, lambda target: table.to_parquet(target, index=False))


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    write_atomically(path, lambda target: save_file(contiguous, str(target)))


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _left_by_an_interrupted_start(folder: Path) -> bool:
    """True when `folder` holds nothing but what a start cut short before its manifest leaves: an empty
    `parts/` (made before the manifest by earlier versions), temporary files, the lock."""
    for entry in folder.iterdir():
        if entry.name == PARTS and entry.is_dir():
            if not all(_is_temporary(part) for part in entry.iterdir()):
                return False
        elif not (entry.name == LOCK_FILE or _is_temporary(entry)):
            return False
    return True


class RunStore:
    """A run folder. Open it with `RunStore.open`; write results with the `write_*` methods.

    A store from `open` holds the folder's writer lock until `finish` or `close`; as a context manager it
    closes on the way out. A store that is dropped releases its lock too (e.g. after an error).
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], lock: RunFolderLock | None = None):
        self.folder = folder
        self.manifest = manifest
        self._lock = lock
        if lock is not None:
            weakref.finalize(self, lock.release)

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the writer lock (results written so far stay; the same command resumes from them)."""
        if self._lock is not None:
            self._lock.release()

    # --- opening ------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path, *, kind: str, model: str, data: str, config: Mapping[str, Any]) -> RunStore:
        """Start a run in `folder`, or resume the one there if it was started by the same command; the
        store holds the folder's writer lock (a second writer gets a one-line `InputError`)."""
        folder = Path(folder)
        identity = {"kind": kind, "model": model, "data": data, "config": dict(config)}
        folder.mkdir(parents=True, exist_ok=True)
        lock = RunFolderLock(folder)
        lock.acquire()
        try:
            manifest = cls._resumed_or_new_manifest(folder, identity)
            # After the manifest, so that a folder with parts always says which run they belong to.
            (folder / PARTS).mkdir(exist_ok=True)
            return cls(folder, manifest, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _resumed_or_new_manifest(cls, folder: Path, identity: dict[str, Any]) -> dict[str, Any]:
        path = folder / MANIFEST
        if path.exists():
            manifest = cls._read_manifest(path)
            cls._check_same_run(folder, manifest, identity)
            return manifest
        if not _left_by_an_interrupted_start(folder):
            if (folder / PARTS).is_dir():
                raise InputError(f"{folder} holds {PARTS}/ but no {MANIFEST}, so nothing says which run they belong "
                                 f"to; delete {folder} to start over, or choose a new folder for the run")
            raise InputError(f"{folder} is not empty and has no {MANIFEST}; choose a new folder for the run")
        for leftover in [*folder.glob(".*.tmp"), *folder.glob(f"{PARTS}/.*.tmp")]:
            leftover.unlink()
        manifest = identity | {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": package_versions(),
            "skipped_images": {},
        }
        write_json_atomically(path, manifest)
        return manifest

    @classmethod
    def load(cls, folder: str | Path, kind: str | None = None) -> RunStore:
        """An existing run, for reading (e.g. by `wb export-config` or the app)."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.exists():
            raise InputError(f"{folder} is not a run folder (no {MANIFEST})")
        manifest = cls._read_manifest(path)
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"{folder} was written with run schema version {manifest.get('schema_version')}; "
                             f"this workbench reads version {SCHEMA_VERSION}: run the analysis again")
        if kind is not None and manifest.get("kind") != kind:
            raise InputError(f"{folder} holds a {manifest.get('kind')!r} run, not a {kind!r} run")
        return cls(folder, manifest)

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"cannot read {path}: {error}") from None

    @staticmethod
    def _check_same_run(folder: Path, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"{folder} holds a run of schema version {manifest.get('schema_version')}, "
                             f"this workbench writes version {SCHEMA_VERSION}; use a new folder")
        for key, value in identity.items():
            if manifest.get(key) != json.loads(json.dumps(value, default=str)):
                raise InputError(f"{folder} holds a run with another {key} ({manifest.get(key)!r}, now {value!r}); "
                                 f"use a new folder or the same command")

    # --- state ----------------------------------------------------------------------

    @property
    def status(self) -> str:
        return self.manifest["status"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    def save_manifest(self) -> None:
        write_json_atomically(self.folder / MANIFEST, self.manifest)

    def record_skipped(self, skipped: Mapping[str, str]) -> None:
        """Images that could not be read (image id -> reason); the run goes on without them."""
        if skipped:
            self.manifest["skipped_images"].update(skipped)
            self.save_manifest()

    def finish(self, **extra: Any) -> None:
        """Mark the run complete and release the writer lock."""
        self.manifest.update(extra, status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.save_manifest()
        self.close()

    # --- final results --------------------------------------------------------------

    def write_table(self, name: str, table: pd.DataFrame) -> Path:
        path = self.folder / f"{name}.parquet"
        _write_parquet(path, table)
        return path

    def read_table(self, name: str) -> pd.DataFrame:
        path = self.folder / f"{name}.parquet"
        if not path.exists():
            raise InputError(f"run {self.folder} has no table {name!r}")
        return pd.read_parquet(path)

    def write_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        path = self.folder / f"{name}.safetensors"
        _write_safetensors(path, tensors)
        return path

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        path = self.folder / f"{name}.safetensors"
        if not path.exists():
            raise InputError(f"run {self.folder} has no tensors {name!r}")
        return load_file(str(path))

    def write_json(self, name: str, value: Any) -> Path:
        path = self.folder / f"{name}.json"
        write_json_atomically(path, value)
        return path

    def read_json(self, name: str) -> Any:
        path = self.folder / f"{name}.json"
        if not path.exists():
            raise InputError(f"run {self.folder} has no {name}.json")
        return json.loads(path.read_text())

    # --- per-batch parts (resume) ----------------------------------------------------

    def _part(self, name: str, index: int, suffix: str) -> Path:
        return self.folder / PARTS / f"{name}-{index:05d}{suffix}"

    def has_part(self, name: str, index: int) -> bool:
        return self._part(name, index, ".done").exists()

    def write_part(self, name: str, index: int, table: pd.DataFrame,
                   tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """One finished batch: its table, optional tensors, then a marker saying both are complete."""
        _write_parquet(self._part(name, index, ".parquet"), table)
        if tensors:
            _write_safetensors(self._part(name, index, ".safetensors"), tensors)
        write_atomically(self._part(name, index, ".done"), lambda target: target.write_text(""))

    def read_part(self, name: str, index: int) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
        tensors_path = self._part(name, index, ".safetensors")
        tensors = load_file(str(tensors_path)) if tensors_path.exists() else {}
        return pd.read_parquet(self._part(name, index, ".parquet")), tensors
