"""The base of every method's typed, versioned config, and how a config is written to and read from YAML.

Each method (`efficient_models/<method>/`) subclasses `MethodConfig` with its own fields and a
`method` literal that names it; the registry (`efficient_models.registry`) knows them all and reads any
config file back with `load_config`. A config may come from an analysis run (`wb export-config`, which
records the run in `provenance`) or be written by hand (no provenance).

Layer convention (written into every layered config): layers are the LLM's decoder layers, 0-indexed.
"Inject at L" means visual tokens are part of layer L's input (layers < L never see them); "exit at X"
means layers >= X never see them; a stage starting at layer S applies to the input of layer S.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workbench.errors import InputError
from workbench.files import write_text_atomically

CONFIG_VERSION = 1
LAYER_CONVENTION = ("0-indexed LLM decoder layers; inject at L: visual tokens are part of layer L's input; "
                    "exit at X: layers >= X never see visual tokens; a stage starting at S applies from S's input")


class Provenance(BaseModel):
    """The analysis run a config was exported from."""

    model_config = ConfigDict(extra="forbid")
    run: str
    kind: str
    model: str
    data: str
    exported: str

    @classmethod
    def of_run(cls, manifest: Mapping[str, Any], folder: Path) -> Provenance:
        return cls(run=str(folder.resolve()), kind=manifest["kind"], model=manifest["model"], data=manifest["data"],
                   exported=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


class MethodConfig(BaseModel):
    """What every method's config has: a schema version, the model it is for, and where it came from."""

    model_config = ConfigDict(extra="forbid")
    method: str
    version: Literal[1] = CONFIG_VERSION
    model: str = "default"
    provenance: Provenance | None = None  # None: written by hand


class LayeredConfig(MethodConfig):
    """A config that names decoder layers of an LLM with `num_llm_layers` layers."""

    num_llm_layers: int = Field(gt=0)
    layer_convention: str = LAYER_CONVENTION

    def check_layer(self, layer: int, what: str, allow_end: bool = False) -> None:
        top = self.num_llm_layers if allow_end else self.num_llm_layers - 1
        if not 0 <= layer <= top:
            raise ValueError(f"{what} {layer} is outside 0..{top} for a {self.num_llm_layers}-layer LLM")


def error_lines(error: ValidationError) -> list[str]:
    """'where: message' for each problem of a validation error."""
    return [f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}"
            for problem in error.errors()]


def first_error(error: ValidationError) -> str:
    return error_lines(error)[0]


Recipe = TypeVar("Recipe", bound=BaseModel)


def read_recipe(path: str | Path, recipe_class: type[Recipe]) -> Recipe:
    """A training recipe file validated as `recipe_class`; an unreadable or invalid file is one `InputError` line."""
    try:
        return recipe_class.model_validate(yaml.safe_load(Path(path).read_text()))
    except OSError as error:
        raise InputError(f"cannot read recipe {path}: {error.strerror}") from None
    except (yaml.YAMLError, ValidationError) as error:
        raise InputError(f"invalid recipe {path}: {str(error).splitlines()[0]}") from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing, unreadable or malformed file is one `InputError` line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InputError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} holds no config (its top level is not a mapping)")
    return data


def yaml_text(model: BaseModel, header: str) -> str:
    """A config or recipe as YAML under a one-line comment."""
    return f"# {header}\n" + yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)


def config_yaml(config: MethodConfig, header: str | None = None) -> str:
    """The config as commented YAML: the header says where it came from."""
    source = f"exported from {config.provenance.run}" if config.provenance else "written by hand"
    return yaml_text(config, header or f"{config.method} config, {source}")


def write_config(config: MethodConfig, out: str | Path, header: str | None = None) -> Path:
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out} is a folder; give the YAML file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(out, config_yaml(config, header))
