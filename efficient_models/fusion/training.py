"""`wb train fusion`: the default model made to read the config's vision layers, then fine-tuned on the dense
schedule (`efficient_models.token_schedule.finetune`) with the recipe beside this file:
- input fusion (E_D): the projector widened, its new columns at zero; the projector and a fresh LoRA train;
- internal fusion (I_D): one projector per extra layer (copies of the trained one, outputs at zero), trained
  with the projector and a fresh LoRA from the extra layers' outputs, which the run's feature cache keeps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from efficient_models.fusion.config import FusionConfig
from efficient_models.fusion.internal_fusion import CallState, InternalFusion, attach, save_internal_fusion
from efficient_models.fusion.layer_sets import Group
from efficient_models.fusion.model import apply_fusion, fusion_groups
from efficient_models.registry import RUN_CONFIG
from efficient_models.token_schedule.finetune import CachedExtension, FinetuneRecipe, finetune
from efficient_models.token_schedule.schedule import dense
from workbench.configs import yaml_text
from workbench.models.adapter import ArchitectureAdapter
from workbench.models.loading import load_model
from workbench.training.loop import TrainingResult

DEFAULT_RECIPE = Path(__file__).with_name("recipe.yaml")


class CachedInternalFusion(CachedExtension):
    """I_D's projectors attached to the model, reading the extra layers from the feature cache."""

    def __init__(self, adapter: ArchitectureAdapter, groups: list[Group]):
        super().__init__()
        self.fusion = InternalFusion.for_model(adapter, groups)
        self.fusion.requires_grad_(True)  # copies of the loaded projector, which loading froze
        self.vision_layers = self.fusion.vision_layers
        self.state = CallState()
        attach(adapter, self.fusion, cached=self.state)

    def feed(self, layers: dict[int, torch.Tensor]) -> None:
        self.state.layer_outputs = dict(layers)

    def save(self, run_dir: Path) -> None:
        save_internal_fusion(self.fusion, run_dir)


def train(config: FusionConfig, recipe: FinetuneRecipe, run_dir: Path, resume: bool = True) -> TrainingResult:
    """Fine-tune the default model fused with `config`'s vision layers, at its input or inside its LLM."""
    loaded = load_model("default", device="cpu", dtype=torch.float32, attn_implementation="sdpa")
    groups = fusion_groups(loaded, config)
    extension = None
    if config.mode == "internal":
        extension = CachedInternalFusion(loaded.adapter, groups)
    else:
        apply_fusion(loaded, groups, config.mode)
    saved_beside = {RUN_CONFIG: yaml_text(config, "the vision layers these weights read")}
    return finetune(loaded, dense(loaded.adapter.num_llm_layers), recipe, run_dir, saved_beside,
                    f"{config.mode} fusion of vision layers {groups}", resume, extension)
