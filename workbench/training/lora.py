"""LoRA on a vision-language model's decoder projections (settings, setup, saving the result with the
trained projector), and a model's trainable parameters."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import peft
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn

from workbench.files import write_atomically
from workbench.models.adapter import ArchitectureAdapter
from workbench.models.visual_input import visual_input_metadata

PROJECTOR_PREFIX = "multi_modal_projector."  # the key format the default model's loader expects


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


def save_projector_and_lora(run_dir: Path, adapter: ArchitectureAdapter, peft_model: peft.PeftModel,
                            processor: Any) -> None:
    """A finished run's weights: `projector.safetensors` (recording what it reads: vision layers, image size) and the `lora/`
    adapter folder. Each file goes through `write_atomically`, so it is whole and gets the umask's mode
    (safetensors and peft create theirs 0600)."""
    projector = {PROJECTOR_PREFIX + name: tensor.detach().cpu().contiguous()
                 for name, tensor in adapter.projector.state_dict().items()}
    metadata = visual_input_metadata(adapter.model, processor)
    write_atomically(run_dir / "projector.safetensors",
                     lambda target: save_file(projector, str(target), metadata=metadata))
    save_lora(run_dir, peft_model)


def save_lora(run_dir: Path, peft_model: peft.PeftModel) -> None:
    """The `lora/` adapter folder, each file written atomically (peft creates them 0600)."""
    lora = run_dir / "lora"
    lora.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir) as staging:
        # The adapter does not touch the embeddings; saying so skips peft's lookup of the base model's files.
        peft_model.save_pretrained(staging, save_embedding_layers=False)
        for written in Path(staging).iterdir():
            write_atomically(lora / written.name, lambda target, source=written: shutil.copyfile(source, target))
