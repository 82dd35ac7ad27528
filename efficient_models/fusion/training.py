"""`wb train fusion`: the default model made to read the config's vision layers at its input (E_D: the
projector widened, the new columns at zero), then that projector and a fresh LoRA fine-tuned on the dense
schedule (`efficient_models.token_schedule.finetune`), with the recipe beside this file.

Internal fusion (I_D) would train one projector per extra layer from features the run's cache does not
hold (it keeps the projector's input only), so it is refused here for now.
"""

from __future__ import annotations

from pathlib import Path

import torch

from efficient_models.fusion.config import FusionConfig
from efficient_models.fusion.model import apply_fusion, fusion_groups
from efficient_models.registry import RUN_CONFIG
from efficient_models.token_schedule.finetune import FinetuneRecipe, finetune
from efficient_models.token_schedule.schedule import dense
from workbench.configs import yaml_text
from workbench.errors import InputError
from workbench.models.loading import load_model
from workbench.training.loop import TrainingResult

DEFAULT_RECIPE = Path(__file__).with_name("recipe.yaml")


def train(config: FusionConfig, recipe: FinetuneRecipe, run_dir: Path, resume: bool = True) -> TrainingResult:
    """Fine-tune the default model fused at its input with `config`'s vision layers."""
    if config.mode != "input":
        raise InputError("`wb train fusion` trains input fusion (mode: input) so far; internal fusion needs the "
                         "extra layers' features cached, which the training cache does not hold yet")
    loaded = load_model("default", device="cpu", dtype=torch.float32, attn_implementation="sdpa")
    groups = fusion_groups(loaded, config)
    apply_fusion(loaded, groups, config.mode)
    saved_beside = {RUN_CONFIG: yaml_text(config, "the vision layers these weights read")}
    return finetune(loaded, dense(loaded.adapter.num_llm_layers), recipe, run_dir, saved_beside,
                    f"fusion of vision layers {groups}", resume)
