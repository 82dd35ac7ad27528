"""A fusion config applied to a loaded model, as a bench variant: untrained (`fusion_variant`, the extra
layers at zero, so it answers as the model did) or a finished `wb train fusion` run (`load_fusion_run`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from efficient_models.fusion.config import FusionConfig
from efficient_models.fusion.cost import fusion_flops
from efficient_models.fusion.input_fusion import check_llava, fuse_at_input
from efficient_models.fusion.internal_fusion import InternalFusion, attach, load_internal_fusion
from efficient_models.fusion.layer_sets import Group, resolve_layer_set
from efficient_models.token_schedule.schedule import dense
from efficient_models.token_schedule.finetune import finished_run_config
from efficient_models.token_schedule.scheduled_model import ScheduledModel
from workbench.errors import InputError
from workbench.flops import FlopsCount, ModelShapes
from workbench.models.default_model import apply_trained_weights
from workbench.models.loading import LoadedModel


def fusion_groups(loaded: LoadedModel, config: FusionConfig) -> list[Group]:
    """The config's layer set on this model's tower, its current `vision_feature_layer` the base."""
    check_llava(loaded.model)
    num_layers = loaded.adapter.num_vision_layers
    if config.num_vision_layers not in (None, num_layers):
        raise InputError(f"the config is for a {config.num_vision_layers}-layer vision tower; "
                         f"{loaded.name} has {num_layers}")
    return resolve_layer_set(config.layers, num_layers, loaded.model.config.vision_feature_layer)


def apply_fusion(loaded: LoadedModel, groups: list[Group], mode: str) -> InternalFusion | None:
    """Change `loaded` in place: E_D widens its projector; I_D attaches its projectors (returned) by hooks."""
    if mode == "input":
        fuse_at_input(loaded.model, groups)
        return None
    fusion = InternalFusion.for_model(loaded.adapter, groups).to(loaded.device)
    attach(loaded.adapter, fusion)  # for good: the variant owns this copy of the model
    return fusion


@dataclass
class FusedModel(ScheduledModel):
    """A fused model run dense; a `BenchVariant` whose FLOPs count the fusion's projectors."""

    config: FusionConfig | None = None
    groups: list[Group] | None = None  # the vision layers it reads, the base last
    fusion: InternalFusion | None = None  # I_D's projectors, kept with the model they are attached to

    def describe(self, shapes: ModelShapes) -> str:
        return f"{self.config.mode} fusion of vision layers {self.groups}; every visual token in every layer"

    def flops(self, shapes: ModelShapes, text_tokens: int, answer_tokens: int = 1, decode_steps: int = 1) -> FlopsCount:
        return fusion_flops(self.config, shapes, text_tokens, answer_tokens, decode_steps)


def fusion_variant(loaded: LoadedModel, config: FusionConfig, name: str = "fusion") -> FusedModel:
    """`config` applied to `loaded` (a copy the variant owns: its weights or hooks change)."""
    groups = fusion_groups(loaded, config)
    fusion = apply_fusion(loaded, groups, config.mode)
    return FusedModel(loaded, dense(loaded.adapter.num_llm_layers), name, config=config, groups=groups, fusion=fusion)


def check_fusion_run(run_dir: str | Path) -> FusionConfig:
    """The run's config, once the folder is known to hold a finished run."""
    return finished_run_config(run_dir, "fusion")


def load_fusion_run(run_dir: str | Path, loaded: LoadedModel) -> FusedModel:
    """A finished `wb train fusion` run on `loaded`, the dense model it was fine-tuned from (changed in place):
    the model widened as the run's config says, then its trained projector loaded and its LoRA merged."""
    run_dir = Path(run_dir)
    config = check_fusion_run(run_dir)
    groups = fusion_groups(loaded, config)
    fusion = apply_fusion(loaded, groups, config.mode)
    if fusion is not None:
        load_internal_fusion(fusion, run_dir)
    # Merging the LoRA replaces only the decoder's projections: the hooked modules, and so I_D's hooks, stay.
    model, _, _ = apply_trained_weights(loaded.model, loaded.processor, run_dir)
    tuned = LoadedModel.from_model(model, loaded.processor, name=f"{loaded.name}+{run_dir.name}")
    return FusedModel(tuned, dense(tuned.adapter.num_llm_layers), "fusion", config=config, groups=groups,
                      fusion=fusion)
