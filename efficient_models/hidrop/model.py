"""HiDrop as a model that answers questions: the default (or any LLaVA or Qwen2-VL family) model under its schedule.

A trained run folder (`wb train hidrop`) holds the config it was trained with (`config.yaml`), the
fine-tuned projector and LoRA; `load_hidrop_run` applies them to the dense model it was fine-tuned from.
"""

from __future__ import annotations

from pathlib import Path

from efficient_models.hidrop.config import HiDropConfig
from efficient_models.hidrop.pyramid import hidrop_schedule
from efficient_models.token_schedule.finetune import finished_run_config
from efficient_models.token_schedule.scheduled_model import ScheduledModel, visual_tokens_per_image
from workbench.models.default_model import apply_trained_weights
from workbench.models.loading import LoadedModel


def hidrop_model(loaded: LoadedModel, config: HiDropConfig, name: str = "hidrop") -> ScheduledModel:
    """The config's schedule on `loaded` as it is (drop-in, no training)."""
    return ScheduledModel(loaded, hidrop_schedule(config, visual_tokens_per_image(loaded)), name)


def check_hidrop_run(run_dir: str | Path) -> HiDropConfig:
    """The run's config, once the folder is known to hold a finished run."""
    return finished_run_config(run_dir, "hidrop")


def load_hidrop_run(run_dir: str | Path, loaded: LoadedModel) -> ScheduledModel:
    """A finished `wb train hidrop` run on top of `loaded`, the dense model it was fine-tuned from.

    The run's projector replaces the dense one and its LoRA is merged into the LLM, in place: pass a
    model loaded for this purpose.
    """
    run_dir = Path(run_dir)
    config = check_hidrop_run(run_dir)
    model, _, _ = apply_trained_weights(loaded.model, loaded.processor, run_dir)
    tuned = LoadedModel.from_model(model, loaded.processor, name=f"{loaded.name}+{run_dir.name}")
    return hidrop_model(tuned, config, name="hidrop")
