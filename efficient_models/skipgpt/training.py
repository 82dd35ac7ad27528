"""`wb train skipgpt`'s work: the two stages, on the shared loop (`workbench.training.loop`), seeded and resumable.

- `routers`: the model frozen; the routers learn from next-token loss + the sparsity loss (`loss.py`), with
  hard Gumbel gates whose temperature and noise scale fall linearly over the stage (each step's values travel
  in its micro-batches, so a resumed run continues the schedule).
- `lora`: the routers of a finished `routers` run frozen; LoRA (peft) on the decoder's projections learns from
  the next-token loss alone. Tokens are routed by argmax, as at inference, so LoRA recovers quality under the
  routing it will be evaluated with rather than under Gumbel noise.

The run folder ends with `config.yaml`, `recipe.yaml`, `stage.yaml`, `routers.safetensors` (the routers and,
as metadata, their shapes), `lora/` (the lora stage) and `metrics.json`; `checkpoint/` holds the loop's
resumable state.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from efficient_models.skipgpt.config import SkipGPTConfig
from efficient_models.skipgpt.loss import next_token_loss, sparsity_loss
from efficient_models.skipgpt.routed_lm import RoutedLM
from efficient_models.skipgpt.routers import linear_at
from efficient_models.skipgpt.text_data import text_blocks
from workbench.configs import config_yaml, read_recipe, yaml_text
from workbench.errors import InputError
from workbench.files import write_atomically, write_json_atomically
from workbench.training.lora import LoraSettings, save_lora, trainable_parameters
from workbench.training.loop import MicroBatch, TrainingResult, open_run, train
from workbench.training.metrics import hardware, loss_summary, versions
from workbench.training.optimisation import Optimisation

DEFAULT_RECIPE = Path(__file__).with_name("recipe.yaml")
ROUTERS_FILE = "routers.safetensors"
OUTPUTS = (ROUTERS_FILE, "lora", "metrics.json")
SMOKE_BLOCKS, SMOKE_STEPS = 8, 3
Stage = Literal["routers", "lora"]


class RouterStage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optimisation: Optimisation


class LoraStage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optimisation: Optimisation
    adapter: LoraSettings


class SkipGPTRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data_seed: int = 0
    block_size: int = Field(gt=1)
    blocks_per_step: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    train_blocks: int | None = Field(default=None, gt=0)  # None: every block of the train split
    routers: RouterStage
    lora: LoraStage

    def optimisation(self, stage: Stage) -> Optimisation:
        return getattr(self, stage).optimisation

    def with_optimisation(self, stage: Stage, **updates) -> SkipGPTRecipe:
        part = getattr(self, stage)
        part = part.model_copy(update={"optimisation": part.optimisation.model_copy(update=updates)})
        return self.model_copy(update={stage: part})


def load_recipe(path: Path) -> SkipGPTRecipe:
    return read_recipe(path, SkipGPTRecipe)


def smoke_recipe(recipe: SkipGPTRecipe, stage: Stage, steps: int | None = None) -> SkipGPTRecipe:
    """A few steps on a few blocks: checks the wiring and times a step."""
    smoke = recipe.with_optimisation(stage, steps=steps or SMOKE_STEPS, warmup_steps=1)
    return smoke.model_copy(update={"train_blocks": SMOKE_BLOCKS})


class StepPlan(Sequence):
    """Steps of `blocks_per_step` blocks drawn epoch by epoch in a seeded order; with a config (the router
    stage) each micro-batch carries its step's Gumbel temperature and noise scale."""

    def __init__(self, blocks: torch.Tensor, recipe: SkipGPTRecipe, optimisation: Optimisation,
                 config: SkipGPTConfig | None) -> None:
        self.blocks, self.recipe, self.steps, self.config = blocks, recipe, optimisation.steps, config
        rng = np.random.default_rng(optimisation.seed)
        needed = self.steps * recipe.blocks_per_step
        self.order = np.concatenate([rng.permutation(len(blocks)) for _ in range(-(-needed // len(blocks)))])

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> list[MicroBatch]:
        size, micro = self.recipe.blocks_per_step, self.recipe.micro_batch_size
        chosen = self.blocks[torch.from_numpy(self.order[step * size:(step + 1) * size])]
        groups = [chosen[start:start + micro] for start in range(0, len(chosen), micro)]
        extra = {}
        if self.config is not None:
            config = self.config
            extra["temperature"] = torch.tensor(linear_at(step, self.steps, config.temperature_start,
                                                          config.temperature_end))
            extra["noise"] = torch.tensor(linear_at(step, self.steps, config.noise_start, config.noise_end))
        return [MicroBatch({"input_ids": group, "attention_mask": torch.ones_like(group), **extra},
                           loss_divisor=len(groups)) for group in groups]


class SkipGPTLoss(nn.Module):
    """Next-token loss of the gated routed model, plus the sparsity loss when a target is given."""

    def __init__(self, routed: RoutedLM, config: SkipGPTConfig, with_sparsity: bool) -> None:
        super().__init__()
        self.routed, self.config, self.with_sparsity = routed, config, with_sparsity

    def forward(self, input_ids, attention_mask, temperature=None, noise=1.0) -> torch.Tensor:
        output = self.routed(input_ids, attention_mask, temperature=temperature, noise=noise)
        loss = next_token_loss(output.logits, input_ids, attention_mask)
        if self.with_sparsity:
            loss = loss + sparsity_loss(output.attention_gates + output.mlp_gates, attention_mask,
                                        self.config.sparsity, self.config.sparsity_weight)
        return loss


def save_routers(path: Path, routed: RoutedLM) -> None:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in routed.routers.state_dict().items()}
    metadata = {"layers": str(routed.num_layers), "hidden_size": str(routed.routers[0].attention.net[0].in_features)}
    write_atomically(path, lambda target: save_file(tensors, str(target), metadata=metadata))


def load_routers(path: Path, routed: RoutedLM) -> None:
    """Routers saved by `save_routers` into `routed`; a file for another model is one `InputError` line."""
    if not path.is_file():
        raise InputError(f"{path.parent} has no {ROUTERS_FILE}: it is not a finished `wb train skipgpt` run")
    with safe_open(str(path), framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    expected = routed.routers.state_dict()
    if set(tensors) != set(expected) or any(tensors[name].shape != expected[name].shape for name in expected):
        raise InputError(f"{path} holds routers for another model (layers or hidden size differ)")
    routed.routers.load_state_dict(tensors)


def _stage_yaml(stage: Stage, routers_run: Path | None) -> str:
    return f"# the stage this run trains\nstage: {stage}\n" + (f"routers_run: {routers_run.resolve()}\n"
                                                             if routers_run else "")


def train_skipgpt(config: SkipGPTConfig, recipe: SkipGPTRecipe, stage: Stage, run_dir: Path, model, tokenizer,
                  routers_run: Path | None = None, resume: bool = True) -> TrainingResult:
    """Train `stage` on `model` (a Llama-family causal LM) under `config`; writes the run folder."""
    run_dir = Path(run_dir)
    if (stage == "lora") != (routers_run is not None):
        raise InputError("--stage lora needs --routers RUN (a finished router run); --stage routers takes none")
    blocks = text_blocks(tokenizer, "train", recipe.block_size, recipe.data_seed)[:recipe.train_blocks]
    if not len(blocks):
        raise InputError(f"the train split has no block of {recipe.block_size} tokens")
    optimisation = recipe.optimisation(stage)
    routed = RoutedLM(model, config.router_reduction)
    saved_beside = {"config.yaml": config_yaml(config, "skipgpt config of this run"),
                    "recipe.yaml": yaml_text(recipe, "skipgpt training recipe"),
                    "stage.yaml": _stage_yaml(stage, routers_run)}
    with open_run(run_dir, saved_beside, resume, outputs=OUTPUTS):
        model.requires_grad_(False)
        if stage == "routers":
            peft_model = None
            parameters = {f"routers.{name}": parameter for name, parameter in routed.routers.named_parameters()}
        else:
            load_routers(Path(routers_run) / ROUTERS_FILE, routed)
            routed.routers.requires_grad_(False)
            peft_model = add_lora(model, recipe.lora.adapter, optimisation.seed)
            parameters = trainable_parameters(peft_model)
        description = (f"skipgpt routers at sparsity {config.sparsity:g}" if stage == "routers"
                       else f"skipgpt LoRA under the routers of {routers_run}")

        def write_outputs(record) -> None:
            save_routers(run_dir / ROUTERS_FILE, routed)
            if peft_model is not None:
                save_lora(run_dir, peft_model)
            write_json_atomically(run_dir / "metrics.json", {
                "description": f"{description} on {config.model}", "stage": stage,
                "train_blocks": len(blocks), "block_size": recipe.block_size, "train": loss_summary(record),
                "hardware": hardware(next(model.parameters()).device), "versions": versions()})

        plan = StepPlan(blocks, recipe, optimisation, config if stage == "routers" else None)
        record = train(SkipGPTLoss(routed, config, with_sparsity=stage == "routers"), parameters, plan, optimisation,
                       run_dir, stage=stage, seed_entropy=(optimisation.seed,), description=description,
                       on_finish=write_outputs)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return TrainingResult(run_dir, {stage: record}, metrics)


def add_lora(model: nn.Module, settings: LoraSettings, seed: int):
    import peft

    torch.manual_seed(seed)  # LoRA's A matrices start random; seeded so a resumed run starts alike
    return peft.get_peft_model(model, peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                                                      lora_dropout=settings.dropout,
                                                      target_modules=settings.target_modules))
