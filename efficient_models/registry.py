"""The method registry: every efficient model registers itself here once, and everything else reads it.

A method is one subpackage of `efficient_models` whose `__init__` calls `register(Method(...))` with
- its config class (a `workbench.configs.MethodConfig` with a `method` literal of its name);
- for a method over a vision-language model's visual tokens, its FLOPs count: prefill, decode step and
  training step, split by part (`workbench.flops.FlopsCount`); a text-only method (streaming, on-policy SFT)
  has none;
- optionally, how to check a trained run folder and read the config it was trained with (`check_run`);
- optionally, how to derive a config from an analysis run (`from_run`), which `wb export-config` uses;
- optionally, its bench variants: how to build each from a config or a trained run (`Variant`);
- optionally, its training entry, a typer command function, which becomes `wb train <method>`;
- optionally, its evaluations, named typer command functions, which become `wb eval <name>`;
- once it has a model (variants or a training entry), which architecture adapters it runs on (`runs_on`),
  which README's support table reads (`wb support-table`).
`load_config`, `wb export-config`, the app's export page and FLOPs view, `wb bench --variants` and
`wb train --help` all read this registry, so adding a method touches no file outside its folder.

Variants that belong to no method (dense, the reference every bench ratio is taken against) register
with `register_variant`. Method subpackages are found and imported on first use (`discover`). Every `wb`
command imports them, so a method's `__init__` imports only light modules at the top; its variant builders
and training entry import the engine and model loading (transformers, seconds) when they are called.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from workbench.configs import MethodConfig, first_error, read_yaml_mapping
from workbench.errors import InputError
from workbench.flops import FlopsCount, ModelShapes

if TYPE_CHECKING:
    from efficient_models.variant import BenchVariant, VariantRequest
    from workbench.models.adapter import ArchitectureAdapter
    from workbench.store import RunStore

# (config, shapes, text tokens, answer tokens=1, decode steps=1) -> the count of one prompt with one image
FlopsCounter = Callable[..., FlopsCount]
RunExporter = Callable[["RunStore"], dict[str, Any]]  # analysis run -> the method's own config fields
VariantBuilder = Callable[["VariantRequest"], "BenchVariant"]
RUN_CONFIG = "config.yaml"  # the config a trained run folder was trained with


@dataclass(frozen=True)
class Variant:
    """A bench variant: `build` makes it from a request; `needs` says what the request must carry.

    needs "config": a config of method `of` (a file, or a trained run's config.yaml); "run": a trained
    run folder of method `of`; None: nothing but the model.
    """

    name: str
    summary: str
    build: VariantBuilder
    needs: Literal["config", "run"] | None = None
    of: str | None = None


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line, for help texts and the app
    config: type[MethodConfig]
    flops: FlopsCounter | None = None  # None: a text-only method, whose cost is no per-image count
    from_run: RunExporter | None = None
    variants: tuple[Variant, ...] = ()
    train: Callable[..., None] | None = None  # a typer command function: `wb train <name>`
    # (name, typer command function) pairs: `wb eval <name>`; methods that share an evaluation list it once
    evaluations: tuple[tuple[str, Callable[..., None]], ...] = ()
    run_kinds: tuple[str, ...] = ()  # analysis run kinds `from_run` reads, for help texts
    check_run: Callable[[Path], MethodConfig] | None = None  # a trained run folder's config, once it is checked
    # (config, budget) -> the config refitted to `budget` of dense visual-token-layers (`--token-budget`)
    fit_budget: Callable[[Any, float], MethodConfig] | None = None
    # (adapter class) -> whether the method's model runs on that architecture; None: not declared, which only a
    # method without a model yet may leave
    runs_on: Callable[[type[ArchitectureAdapter]], bool] | None = None

    def read_run(self, run_dir: Path) -> MethodConfig:
        """The config of a trained run of this method; a wrong or unfinished folder is one `InputError` line."""
        return self.check_run(run_dir) if self.check_run else run_config(run_dir, self.name)


_METHODS: dict[str, Method] = {}
_VARIANTS: dict[str, Variant] = {}
_discovered = False


def register(method: Method) -> Method:
    """Add `method` and its variants; a name taken by another method or variant is refused."""
    declared = method.config.model_fields["method"].default
    if declared != method.name:
        raise ValueError(f"method {method.name!r}: its config's `method` defaults to {declared!r}")
    if method.name in _METHODS and _METHODS[method.name] != method:
        raise ValueError(f"method {method.name!r} is already registered")
    for variant in method.variants:
        register_variant(variant)
    _METHODS[method.name] = method
    return method


def register_variant(variant: Variant) -> Variant:
    if variant.name in _VARIANTS and _VARIANTS[variant.name] != variant:
        raise ValueError(f"bench variant {variant.name!r} is already registered")
    _VARIANTS[variant.name] = variant
    return variant


def unregister(name: str) -> None:
    """Remove a method and its variants (tests that register a method of their own clean up with this)."""
    method = _METHODS.pop(name)
    for variant in method.variants:
        _VARIANTS.pop(variant.name, None)


def discover() -> None:
    """Import every subpackage of `efficient_models` once; each method's `__init__` registers it."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("efficient_models")
    for module in pkgutil.iter_modules(package.__path__):
        if module.ispkg:
            importlib.import_module(f"efficient_models.{module.name}")


def methods() -> dict[str, Method]:
    """Every registered method, by name, in alphabetical order."""
    discover()
    return dict(sorted(_METHODS.items()))


def variants() -> dict[str, Variant]:
    """Every bench variant, by name: those of no method (dense) first, then each method's, by method name."""
    discover()
    owned = {variant.name for method in _METHODS.values() for variant in method.variants}
    ordered = [name for name in _VARIANTS if name not in owned]
    ordered += [variant.name for _, method in sorted(_METHODS.items()) for variant in method.variants]
    return {name: _VARIANTS[name] for name in ordered}


def method(name: str) -> Method:
    known = methods()
    if name not in known:
        raise InputError(f"unknown method {name!r}; choose one of {', '.join(known)}")
    return known[name]


def parse_config(data: Mapping[str, Any], source: str) -> MethodConfig:
    """The registered method's config that `data["method"]` names, validated; problems are one line."""
    name = data.get("method")
    known = methods()
    if name not in known:
        raise InputError(f"invalid config {source}: method: {name!r} is not a registered method "
                         f"({', '.join(known)})")
    try:
        return known[name].config.model_validate(data)
    except ValidationError as error:
        raise InputError(f"invalid config {source}: {first_error(error)}") from None


def load_config(path: str | Path) -> MethodConfig:
    """Read and validate a config file of any registered method; any problem becomes one `InputError` line."""
    return parse_config(read_yaml_mapping(path), str(path))


def run_config(run_dir: str | Path, name: str) -> MethodConfig:
    """The config a trained run of method `name` was trained with (its `config.yaml`)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise InputError(f"{run_dir} is not a training run (no {RUN_CONFIG}); run `wb train {name}` first")
    config = load_config(path)
    if config.method != name:
        raise InputError(f"{run_dir} is a {config.method!r} run, not {name}")
    return config


def count_flops(config: MethodConfig, shapes: ModelShapes, text_tokens: int, answer_tokens: int = 1,
                decode_steps: int = 1) -> FlopsCount:
    """The method's FLOPs count of one prompt with `text_tokens` text tokens and one image (see `FlopsCount`)."""
    counter = method(config.method).flops
    if counter is None:
        raise InputError(f"method {config.method!r} is text-only: it has no per-image FLOPs count")
    return counter(config, shapes, text_tokens, answer_tokens, decode_steps)

