"""LoRA on a vision-language model's decoder projections (settings and setup), and a model's trainable parameters."""

from __future__ import annotations

import re

import peft
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from workbench.models.adapter import ArchitectureAdapter


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)  # module names inside the LLM's decoder layers


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def add_lora(adapter: ArchitectureAdapter, settings: LoraSettings, seed: int) -> peft.PeftModel:
    """LoRA on the LLM's decoder projections only (the vision tower may use the same module names); the
    projector stays trainable."""
    modules = "|".join(settings.target_modules)
    lora_config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                  target_modules=rf".*{re.escape(adapter.language_model_path)}\..*\.({modules})")
    torch.manual_seed(seed)  # LoRA's A matrices start random; seeded so a resumed run starts alike
    peft_model = peft.get_peft_model(adapter.model, lora_config)
    # Recorded in adapter_config.json: the adapter belongs to load_model("default"), not to a cache path.
    peft_model.peft_config["default"].base_model_name_or_path = "default"
    adapter.projector.requires_grad_(True)  # get_peft_model froze everything but the adapter
    return peft_model
