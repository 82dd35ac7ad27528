"""Installing a finished `wb train default` run as the default model's shipped weights, and checking it took."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workbench.default_recipe.recipe import RecipeError
from workbench.default_recipe.train import DEFAULT_RUN_DIR
from workbench.models.default_model import DEFAULT_WEIGHTS_DIR, DefaultModelInfo, load_default_model

INSTALLED_FILES = ("projector.safetensors", "lora/adapter_model.safetensors", "lora/adapter_config.json",
                   "recipe.yaml", "metrics.json")
# The LoRA ships in bf16 (9.8 MB instead of 19.6 MB); loading merges it into the float32 weights.
SHIPPED_IN_BF16 = {"lora/adapter_model.safetensors"}


def install_run(run_dir: Path = DEFAULT_RUN_DIR, weights_dir: Path = DEFAULT_WEIGHTS_DIR) -> list[Path]:
    """Copy a finished run's projector, LoRA adapter, recipe and metrics to where the default model loads them."""
    run_dir, weights_dir = Path(run_dir), Path(weights_dir)
    missing = [name for name in INSTALLED_FILES if not (run_dir / name).is_file()]
    if missing:
        raise RecipeError(f"{run_dir} holds no finished run (missing {', '.join(missing)}); "
                          "run `wb train default` first")
    shutil.rmtree(weights_dir / "lora", ignore_errors=True)
    installed = []
    for name in INSTALLED_FILES:
        target = weights_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in SHIPPED_IN_BF16:
            save_file({key: value.to(torch.bfloat16) for key, value in load_file(run_dir / name).items()}, target)
        else:
            shutil.copyfile(run_dir / name, target)
        installed.append(target)
    return installed


def verify_installation(weights_dir: Path = DEFAULT_WEIGHTS_DIR) -> DefaultModelInfo:
    """Load the default model with the installed weights; fail unless both the projector and LoRA apply."""
    _, _, info = load_default_model(weights_dir=Path(weights_dir))
    if not (info.projector_trained and info.lora_loaded):
        raise RecipeError(f"the default model did not pick up the weights in {weights_dir}")
    return info


