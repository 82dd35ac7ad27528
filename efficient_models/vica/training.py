"""`wb train vica`: the default model's projector and a fresh LoRA fine-tuned with ViCA active
(`efficient_models.token_schedule.finetune`), in ViCA's masks form, so the model learns to answer with its
visual tokens frozen and read only at the selected layers; the recipe is `recipe.yaml` beside this file.
`efficient_models.vica.model.load_vica_run` loads the run folder.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from efficient_models.registry import RUN_CONFIG
from efficient_models.token_schedule.finetune import FinetuneRecipe, finetune
from efficient_models.vica import ViCAConfig
from efficient_models.vica.model import check_depth, vica_engine
from workbench.configs import yaml_text
from workbench.models.loading import load_model
from workbench.training.loop import TrainingResult

DEFAULT_RECIPE = Path(__file__).with_name("recipe.yaml")


def train(config: ViCAConfig, recipe: FinetuneRecipe, run_dir: Path, resume: bool = True) -> TrainingResult:
    """Fine-tune with `config`'s ViCA active."""
    loaded = load_model("default", device="cpu", dtype=torch.float32, attn_implementation="sdpa")
    check_depth(config, loaded.adapter)
    engine = functools.partial(vica_engine, config=config, form="masks")
    # The engine's schedule says what every layer's input holds (text only); the metrics read it.
    schedule = engine(loaded.adapter).schedule
    return finetune(loaded, schedule, recipe, run_dir,
                    {RUN_CONFIG: yaml_text(config, "the ViCA layers these weights are trained with")},
                    f"vica (text reads the image at {len(config.cross_attention_layers)} of {config.num_llm_layers} "
                    "layers)", resume, engine=engine)
