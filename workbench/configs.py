"""Typed, versioned configs that carry what an analysis found to the efficient models.

`wb export-config --run RUN --method {prune,injection,hidrop,vica}` writes one of these as YAML;
the efficient models' training reads it back with `load_config`, which validates it.

Layer convention (written into every file): layers are the LLM's decoder layers, 0-indexed.
"Inject at L" means visual tokens are part of layer L's input (layers < L never see them);
"exit at X" means layers >= X never see them; a stage starting at layer S applies to the
input of layer S.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from workbench.errors import InputError
from workbench.store import RunStore

CONFIG_VERSION = 1
LAYER_CONVENTION = ("0-indexed LLM decoder layers; inject at L: visual tokens are part of layer L's input; "
                    "exit at X: layers >= X never see visual tokens; a stage starting at S applies from S's input")
METHODS = ("prune", "injection", "hidrop", "vica")


class Provenance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: str
    kind: str
    model: str
    data: str
    exported: str


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = CONFIG_VERSION
    model: str
    num_llm_layers: int = Field(gt=0)
    layer_convention: str = LAYER_CONVENTION
    provenance: Provenance

    def check_layer(self, layer: int, what: str, allow_end: bool = False) -> None:
        top = self.num_llm_layers if allow_end else self.num_llm_layers - 1
        if not 0 <= layer <= top:
            raise ValueError(f"{what} {layer} is outside 0..{top} for a {self.num_llm_layers}-layer LLM")


class PruneConfig(MethodConfig):
    """Keep only visual tokens of `keep_categories`, decided by the tokens run's rule."""

    method: Literal["prune"] = "prune"
    keep_categories: list[Literal["sink", "dead", "alive"]] = ["alive"]
    rule: dict  # analyses.tokens.TokenRule.to_dict(): kind, top-k, anchors, norm statistics
    measured_fractions: dict[str, float]


class InjectionConfig(MethodConfig):
    method: Literal["injection"] = "injection"
    inject_layer: int

    @model_validator(mode="after")
    def _layers(self):
        self.check_layer(self.inject_layer, "inject_layer")
        return self


class Stage(BaseModel):
    """From `start_layer` on, keep this share of an image's visual tokens: a fraction, or a token count."""

    model_config = ConfigDict(extra="forbid")
    start_layer: int
    keep_fraction: float | None = Field(default=None, gt=0, le=1)
    keep_tokens: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_share(self):
        if (self.keep_fraction is None) == (self.keep_tokens is None):
            raise ValueError(f"stage at layer {self.start_layer}: give exactly one of keep_fraction and keep_tokens")
        return self

    def fraction_of(self, num_visual: int | None) -> float:
        if self.keep_fraction is not None:
            return self.keep_fraction
        if num_visual is None:
            raise ValueError(f"stage at layer {self.start_layer} keeps {self.keep_tokens} tokens: "
                             "the image's token count is needed")
        return min(1.0, self.keep_tokens / num_visual)


class HiDropConfig(MethodConfig):
    """Late injection at `inject_layer`, pruning, all visual tokens dropped at `exit_layer`.

    `schedule: stages` cuts the tokens at the listed stages; `schedule: concave` keeps
    (1 - (l - E) / (X - E)) ** schedule_power of them at every layer l between E and X (no stages).
    """

    method: Literal["hidrop"] = "hidrop"
    inject_layer: int
    exit_layer: int
    schedule: Literal["stages", "concave"] = "stages"
    stages: list[Stage] = []
    schedule_power: float = Field(gt=0)

    @model_validator(mode="after")
    def _layers(self):
        self.check_layer(self.inject_layer, "inject_layer")
        self.check_layer(self.exit_layer, "exit_layer", allow_end=True)
        if self.exit_layer <= self.inject_layer:
            raise ValueError(f"exit_layer {self.exit_layer} must come after inject_layer {self.inject_layer}")
        starts = [stage.start_layer for stage in self.stages]
        if starts != sorted(set(starts)) or not all(self.inject_layer <= s < self.exit_layer for s in starts):
            raise ValueError(f"stage start layers {starts} must increase within [{self.inject_layer}, {self.exit_layer})")
        if (self.schedule == "concave") == bool(self.stages):
            raise ValueError("schedule 'stages' needs a list of stages; schedule 'concave' takes none")
        kinds = {"fraction" if stage.keep_fraction is not None else "tokens" for stage in self.stages}
        if len(kinds) > 1:
            raise ValueError("stages must all give keep_fraction or all give keep_tokens")
        keeps = [stage.keep_fraction or stage.keep_tokens for stage in self.stages]
        if keeps != sorted(keeps, reverse=True):
            raise ValueError(f"stage keeps {keeps} must not increase")
        return self


class ViCAConfig(MethodConfig):
    """Visual tokens skip the LLM's blocks; text reads them by cross-attention at these layers."""

    method: Literal["vica"] = "vica"
    cross_attention_layers: list[int] = Field(min_length=1)

    @model_validator(mode="after")
    def _layers(self):
        for layer in self.cross_attention_layers:
            self.check_layer(layer, "cross-attention layer")
        if self.cross_attention_layers != sorted(set(self.cross_attention_layers)):
            raise ValueError(f"cross-attention layers {self.cross_attention_layers} must be increasing and distinct")
        return self


AnyConfig = Annotated[PruneConfig | InjectionConfig | HiDropConfig | ViCAConfig, Field(discriminator="method")]


def load_config(path: str | Path) -> PruneConfig | InjectionConfig | HiDropConfig | ViCAConfig:
    """Read and validate an exported config; any problem becomes one `InputError` line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
        return TypeAdapter(AnyConfig).validate_python(data)
    except yaml.YAMLError as error:
        raise InputError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise InputError(f"invalid config {path}: {where}: {first['msg']}") from None


# --- export from a run -------------------------------------------------------------

def _provenance(store: RunStore) -> dict:
    manifest = store.manifest
    return {"run": str(store.folder.resolve()), "kind": manifest["kind"], "model": manifest["model"],
            "data": manifest["data"], "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _tokens_store(store: RunStore) -> RunStore:
    """The tokens run itself, or the one an alignment / probe / interventions run made in its folder."""
    if store.manifest["kind"] == "tokens":
        return store
    nested = store.folder / "tokens"
    if (nested / "manifest.json").exists():
        return RunStore.load(nested, kind="tokens")
    raise InputError(f"{store.folder} is a {store.manifest['kind']!r} run with no token categories; "
                     f"export --method prune from a tokens run")


def _vica_layers(store: RunStore, count: int = 3) -> list[int]:
    """The layers where the text gains most from the image: largest steps of the vision-effect curve."""
    curves = store.read_table("layers")
    steps = curves["vision_effect"].diff().fillna(curves["vision_effect"])
    return sorted(int(layer) for layer in curves.loc[steps.nlargest(count).index, "layer"])


def build_config(run: str | Path, method: str) -> MethodConfig:
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    store = RunStore.load(run)
    if store.status != "complete":
        raise InputError(f"run {run} did not finish; run its command again to complete it")
    common = {"model": store.manifest["model"], "num_llm_layers": store.manifest["num_llm_layers"],
              "provenance": _provenance(store)}
    kind = store.manifest["kind"]
    try:
        if method == "prune":
            summary = _tokens_store(store).read_json("summary")
            return PruneConfig(**common, rule=summary["rule"], measured_fractions=summary["fractions"])
        if method == "injection" and kind in ("alignment", "similarity"):
            summary = store.read_json("summary")
            layer = (summary["recommended_injection_layer"] if kind == "alignment"
                     else summary["recommendation"]["injection_layer"])
            return InjectionConfig(**common, inject_layer=layer)
        if method in ("hidrop", "vica") and kind == "similarity":
            if method == "vica":
                return ViCAConfig(**common, cross_attention_layers=_vica_layers(store))
            recommendation = store.read_json("summary")["recommendation"]
            return HiDropConfig(**common, inject_layer=recommendation["injection_layer"],
                                exit_layer=recommendation["exit_layer"], stages=recommendation["stages"],
                                schedule_power=store.config["power"])
    except ValidationError as error:
        raise InputError(f"run {run} gives an invalid {method} config: {error.errors()[0]['msg']}") from None
    sources = {"injection": "an alignment or similarity run", "hidrop": "a similarity run", "vica": "a similarity run"}
    raise InputError(f"--method {method} needs {sources[method]}; {run} is a {kind!r} run")


def write_config(config: MethodConfig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {config.method} config exported by `wb export-config` from {config.provenance.run}\n"
                   + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return out


def export_config(run: str | Path, method: str, out: str | Path) -> Path:
    return write_config(build_config(run, method), out)
