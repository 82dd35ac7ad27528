"""HiDrop and its baselines as models that answer questions: a loaded model plus a token schedule.

`ScheduledModel` pairs a `LoadedModel` with a `TokenSchedule` and generates through `ScheduledLLM`,
so HiDrop (late entry, concave pyramid, early exit), FastV, PyramidDrop, late injection and
EmbedLens category pruning are one implementation. A trained HiDrop run folder holds the exported
config (`config.yaml`), the fine-tuned projector and LoRA; `load_hidrop_run` applies them to the
dense default model it was fine-tuned from.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image

from efficient_models import schedule as schedules
from efficient_models.schedule import TokenSchedule
from efficient_models.scheduled_llm import ScheduledLLM
from workbench.configs import HiDropConfig, load_config
from workbench.errors import InputError
from workbench.models.default_model import apply_trained_weights
from workbench.models.inputs import build_inputs
from workbench.models.loading import LoadedModel

RUN_CONFIG = "config.yaml"
BASELINES = ("dense", "fastv", "pdrop")


@dataclass
class ScheduledModel:
    """A model whose LLM runs under `schedule`; `generate_text` answers like `LoadedModel.generate_text`."""

    loaded: LoadedModel
    schedule: TokenSchedule
    name: str = ""

    def __post_init__(self):
        self.name = self.name or self.schedule.name

    @functools.cached_property
    def engine(self) -> ScheduledLLM:
        return ScheduledLLM(self.loaded.adapter, self.schedule)

    def generate_text(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int,
                      removed: torch.Tensor | None = None) -> list[str]:
        tokens = self.engine.generate(inputs, max_new_tokens, removed=removed)
        decoded = self.loaded.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [text.strip() for text in decoded]


def visual_tokens_per_image(loaded: LoadedModel) -> int:
    """How many visual tokens the processor gives one image (the schedules' N)."""
    inputs = build_inputs(loaded.processor, [Image.new("RGB", (64, 64))], ["?"], device="cpu")
    return int(loaded.adapter.visual_token_mask(inputs["input_ids"]).sum())


def hidrop_model(loaded: LoadedModel, config: HiDropConfig, name: str = "hidrop") -> ScheduledModel:
    """The config's schedule on `loaded` as it is (drop-in, no training)."""
    if config.num_llm_layers != loaded.adapter.num_llm_layers:
        raise InputError(f"the config is for a {config.num_llm_layers}-layer LLM; {loaded.name} has "
                         f"{loaded.adapter.num_llm_layers} layers")
    return ScheduledModel(loaded, schedules.from_config(config, visual_tokens_per_image(loaded)), name)


def baseline_model(loaded: LoadedModel, name: str) -> ScheduledModel:
    """dense, or FastV / PyramidDrop at their published settings, scaled to the model's depth."""
    depth = loaded.adapter.num_llm_layers
    builders = {"dense": schedules.dense, "fastv": schedules.fastv, "pdrop": schedules.pyramid_drop}
    if name not in builders:
        raise InputError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return ScheduledModel(loaded, builders[name](depth), name)


def read_run_config(run_dir: Path) -> HiDropConfig:
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise InputError(f"{run_dir} is not a HiDrop training run (no {RUN_CONFIG}); run `wb train hidrop` first")
    config = load_config(path)
    if not isinstance(config, HiDropConfig):
        raise InputError(f"{path} is a {config.method!r} config, not hidrop")
    return config


def load_hidrop_run(run_dir: str | Path, loaded: LoadedModel) -> ScheduledModel:
    """A finished `wb train hidrop` run on top of `loaded`, the dense model it was fine-tuned from.

    The run's projector replaces the dense one and its LoRA is merged into the LLM, in place: pass a
    model loaded for this purpose.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if not (run_dir / "projector.safetensors").is_file():
        raise InputError(f"{run_dir} holds no finished HiDrop run (no projector.safetensors)")
    model, _, _ = apply_trained_weights(loaded.model, run_dir)
    tuned = LoadedModel.from_model(model, loaded.processor, name=f"{loaded.name}+{run_dir.name}")
    return hidrop_model(tuned, config, name="hidrop")


def write_run_config(config: HiDropConfig, run_dir: Path) -> Path:
    path = Path(run_dir) / RUN_CONFIG
    path.write_text("# the schedule these weights were trained with (`wb train hidrop`)\n"
                    + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
