"""From a finished analysis run to a method's validated config: what `wb export-config` and the app's
export page write. The method's own `from_run` reads the run; the fields every config shares (the
model, its depth, the run it came from) are filled in here."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from efficient_models.registry import method as registered_method
from efficient_models.registry import methods
from workbench.configs import MethodConfig, Provenance, first_error
from workbench.errors import InputError
from workbench.store import RunStore


def exportable_methods() -> dict[str, str]:
    """Method name -> the run kinds its config is exported from."""
    return {name: ", ".join(entry.run_kinds) for name, entry in methods().items() if entry.from_run is not None}


def build_config(run: str | Path, method: str) -> MethodConfig:
    """The config of `method` that the finished analysis run `run` recommends."""
    entry = registered_method(method)
    if entry.from_run is None:
        raise InputError(f"method {method!r} has no export from analysis runs; write its config by hand "
                         f"(choose one of {', '.join(exportable_methods())} to export)")
    store = RunStore.load(run)
    if store.status != "complete":
        raise InputError(f"run {run} did not finish; run its command again to complete it")
    manifest = store.manifest
    common = {"model": manifest["model"], "num_llm_layers": manifest.get("num_llm_layers"),
              "provenance": Provenance.of_run(manifest, store.folder)}
    fields = entry.config.model_fields
    try:
        return entry.config(**{key: value for key, value in common.items() if key in fields}, **entry.from_run(store))
    except ValidationError as error:
        raise InputError(f"run {run} gives an invalid {method} config: {first_error(error)}") from None
