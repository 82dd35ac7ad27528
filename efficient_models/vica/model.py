"""ViCA as a model that answers questions: a `BenchVariant` on a loaded model, from a config (drop-in) or a
finished `wb train vica` run (its projector and LoRA applied to the dense model it was fine-tuned from).

Generation, prefill and decode run the fast form; the training loss runs the masks form, the form ViCA
trains in (`efficient_models.vica.engine`). Both are the token-schedule engine's calls (`ScheduledModel`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from efficient_models.token_schedule.finetune import finished_run_config
from efficient_models.token_schedule.scheduled_model import ScheduledModel, answer_loss
from efficient_models.token_schedule.schedule import TokenSchedule
from efficient_models.vica import ViCAConfig
from efficient_models.vica.cost import read_tokens, vica_flops
from efficient_models.vica.engine import Form, ViCALLM
from workbench.errors import InputError
from workbench.flops import FlopsCount, ModelShapes
from workbench.models.adapter import ArchitectureAdapter
from workbench.models.default_model import apply_trained_weights
from workbench.models.loading import LoadedModel


def check_depth(config: ViCAConfig, adapter: ArchitectureAdapter) -> None:
    if config.num_llm_layers != adapter.num_llm_layers:
        raise InputError(f"the vica config is for a {config.num_llm_layers}-layer LLM; the model has "
                         f"{adapter.num_llm_layers} layers")


def vica_engine(adapter: ArchitectureAdapter, config: ViCAConfig, form: Form = "fast") -> ViCALLM:
    """The config's ViCA decoder on `adapter`'s LLM, which must have the config's depth."""
    check_depth(config, adapter)
    return ViCALLM(adapter, config.cross_attention_layers, config.freeze_prefix, config.keep, form)


def describe(config: ViCAConfig, num_visual: int) -> str:
    """One line: the selected layers, what each reads, the prefix mode."""
    read = read_tokens(config, num_visual)[config.cross_attention_layers[0]]
    prefix = "prefix frozen" if config.freeze_prefix else "prefix attends"
    return (f"vica: no visual token in any layer's input; text reads {read}/{num_visual} visual tokens at layers "
            f"{config.cross_attention_layers}; {prefix}")


@dataclass
class ViCAModel(ScheduledModel):
    """A loaded model run as ViCA; a `BenchVariant`."""

    config: ViCAConfig | None = None

    @classmethod
    def of(cls, loaded: LoadedModel, config: ViCAConfig, name: str = "vica") -> ViCAModel:
        # Every layer's input holds text only, which is what the schedule says; the engines add the rest.
        return cls(loaded, TokenSchedule(loaded.adapter.num_llm_layers, exit_layer=0, name=name), name, config)

    def __post_init__(self):
        super().__post_init__()
        check_depth(self.config, self.loaded.adapter)  # refused when the variant is made, before any question

    @functools.cached_property
    def engine(self) -> ViCALLM:
        return vica_engine(self.loaded.adapter, self.config)

    @functools.cached_property
    def training_engine(self) -> ViCALLM:
        return vica_engine(self.loaded.adapter, self.config, form="masks")

    def describe(self, shapes: ModelShapes) -> str:
        return describe(self.config, shapes.visual_tokens_per_image)

    def training_loss(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        adapter = self.loaded.adapter
        return answer_loss(self.training_engine, adapter.input_embeddings(inputs), inputs["input_ids"], labels,
                           inputs.get("attention_mask"), adapter.position_ids(inputs))

    def flops(self, shapes: ModelShapes, text_tokens: int, answer_tokens: int = 1, decode_steps: int = 1) -> FlopsCount:
        return vica_flops(self.config, shapes, text_tokens, answer_tokens, decode_steps)


def check_vica_run(run_dir: str | Path) -> ViCAConfig:
    """The run's config, once the folder is known to hold a finished run."""
    return finished_run_config(run_dir, "vica")


def load_vica_run(run_dir: str | Path, loaded: LoadedModel) -> ViCAModel:
    """A finished `wb train vica` run on `loaded`, the dense model it was fine-tuned from (changed in place)."""
    run_dir = Path(run_dir)
    config = check_vica_run(run_dir)
    model, _, _ = apply_trained_weights(loaded.model, loaded.processor, run_dir)
    tuned = LoadedModel.from_model(model, loaded.processor, name=f"{loaded.name}+{run_dir.name}")
    return ViCAModel.of(tuned, config, name="vica")
