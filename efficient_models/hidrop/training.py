"""`wb train hidrop`: the default model's projector and a fresh LoRA fine-tuned with a HiDrop schedule active
(`efficient_models.token_schedule.finetune`), so the model learns to answer from the visual tokens the
schedule keeps; the recipe is `recipe.yaml` beside this file. `efficient_models.hidrop.model.load_hidrop_run`
loads the run folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from efficient_models.hidrop.config import HiDropConfig
from efficient_models.hidrop.pyramid import hidrop_schedule
from efficient_models.registry import RUN_CONFIG
from efficient_models.token_schedule.finetune import FinetuneRecipe, finetune
from efficient_models.token_schedule.scheduled_model import visual_tokens_per_image
from workbench.configs import yaml_text
from workbench.errors import InputError
from workbench.models.loading import load_model
from workbench.training.loop import TrainingResult

DEFAULT_RECIPE = Path(__file__).with_name("recipe.yaml")


def train(config: HiDropConfig, recipe: FinetuneRecipe, run_dir: Path, resume: bool = True) -> TrainingResult:
    """Fine-tune with the schedule of `config` active."""
    loaded = load_model("default", device="cpu", dtype=torch.float32, attn_implementation="sdpa")
    if config.num_llm_layers != loaded.adapter.num_llm_layers:
        raise InputError(f"the config is for a {config.num_llm_layers}-layer LLM; the default model has "
                         f"{loaded.adapter.num_llm_layers}")
    num_visual = visual_tokens_per_image(loaded)
    schedule = hidrop_schedule(config, num_visual)
    share = schedule.token_layer_fraction(num_visual)
    return finetune(loaded, schedule, recipe, run_dir, {RUN_CONFIG: yaml_text(config, "the schedule these weights "
                                                                                        "are trained with")},
                    f"hidrop ({share:.0%} of dense visual-token-layers)", resume)
