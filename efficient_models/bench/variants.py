"""The bench's variants, built from the registry: names, the configs and trained runs they need, checked
before any model loads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from efficient_models.registry import RUN_CONFIG, load_config, methods, variants
from efficient_models.variant import BenchVariant, VariantRequest, require
from workbench.configs import MethodConfig, first_error
from workbench.errors import InputError
from workbench.models import loading

REFERENCE = "dense"  # every speed and FLOPs ratio is taken against it


def variant_names(names: Sequence[str]) -> list[str]:
    """The requested variants, each once, dense first (added when missing): every speed is relative to it."""
    if not names:
        raise InputError(f"no variants given; choose from {', '.join(variants())}")
    known = variants()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InputError(f"unknown variant {unknown[0]!r}; choose from {', '.join(known)}")
    return [REFERENCE, *dict.fromkeys(name for name in names if name != REFERENCE)]


def read_runs(run_dirs: Sequence[Path]) -> tuple[dict[str, Path], dict[str, MethodConfig]]:
    """Each trained run folder by its method, and the config it was trained with."""
    runs, configs = {}, {}
    for run_dir in map(Path, run_dirs):
        if not (run_dir / RUN_CONFIG).is_file():
            raise InputError(f"{run_dir} is not a training run (no {RUN_CONFIG}); run `wb train METHOD` first")
        method = load_config(run_dir / RUN_CONFIG).method
        configs[method], runs[method] = methods()[method].read_run(run_dir), run_dir
    return runs, configs


def build_variants(names: Sequence[str], model_name: str = "default", configs: Sequence[Path] = (),
                   runs: Sequence[Path] = ()) -> list[BenchVariant]:
    """The named variants on `model_name`, dense first; every option is checked before a model loads.

    `configs`: config files (any registered method); `runs`: trained run folders. A variant that needs a
    method's config takes the given file, else the config a given run of that method was trained with.
    """
    names = variant_names(names)
    run_dirs, by_method = read_runs(runs)
    by_method |= {config.method: config for config in map(load_config, configs)}
    specs = variants()
    for name in names:  # a missing config or run fails now, not after the dense model has loaded
        require(name, specs[name].needs, specs[name].of, by_method, run_dirs)
    loaded = loading.load_model(model_name)
    built = []
    for name in names:
        try:
            built.append(specs[name].build(VariantRequest(name, loaded, lambda: loading.load_model(model_name),
                                                          by_method, run_dirs)))
        except ValidationError as error:  # a default config that does not fit the model, e.g. too few layers
            raise InputError(f"variant {name} does not fit {model_name}: {first_error(error)}") from None
    return built
