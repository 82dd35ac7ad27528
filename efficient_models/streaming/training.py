"""`wb train streaming`'s work: LoRA fine-tuning of a causal chat LM on the generated task under the wait-k mask.

Each step is one forward pass per micro-batch over [source; target] with group position ids and the
streaming 4-D mask (`batch.py`); Hugging Face's own causal-LM loss covers the target tokens. The shared loop
(`workbench.training.loop`) runs it, seeded and resumable.

LoRA, not a full fine-tune: it is how every other method here trains, the run folder holds a few MB instead
of the whole model, and the base (SmolLM2 dequantized from a 4-bit GGUF) stays the packaged one, so the
same adapter can be measured against it. The run folder ends with `config.yaml`, `recipe.yaml`, `lora/` and
`metrics.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from efficient_models.streaming.batch import (
    StreamingExample, batch_example, collate, interleaved_example, streaming_example,
)
from efficient_models.streaming.chat_format import ChatFormat
from efficient_models.streaming.config import StreamingConfig
from efficient_models.streaming.mask import READ_EVERYTHING
from efficient_models.streaming.task import Pair, make_splits
from workbench.configs import config_yaml, read_recipe, yaml_text
from workbench.files import write_json_atomically
from workbench.training.lora import LoraSettings, save_lora, trainable_parameters
from workbench.training.loop import MicroBatch, TrainingResult, open_run, train
from workbench.training.metrics import hardware, loss_summary, versions
from workbench.training.optimisation import Optimisation

DEFAULT_RECIPE = Path(__file__).with_name("recipe.yaml")
OUTPUTS = ("lora", "metrics.json")
SMOKE_PAIRS, SMOKE_STEPS = 16, 4


class StreamingRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task_seed: int = 0
    train_pairs: int = Field(gt=0)
    pairs_per_step: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    optimisation: Optimisation
    lora: LoraSettings


def load_recipe(path: Path) -> StreamingRecipe:
    return read_recipe(path, StreamingRecipe)


def smoke_recipe(recipe: StreamingRecipe, steps: int | None = None) -> StreamingRecipe:
    """A few steps on a few pairs: checks the wiring and times a step."""
    optimisation = recipe.optimisation.model_copy(update={"steps": steps or SMOKE_STEPS, "warmup_steps": 1})
    return recipe.model_copy(update={"train_pairs": SMOKE_PAIRS, "optimisation": optimisation})


# Each training layout's example from (source group, target ids, target words, wait-k, config).
EXAMPLES = {
    "group": lambda source, target, words, k, config: streaming_example(source, target, words, k,
                                                                        config.target_offset),
    "batch": lambda source, target, words, k, config: batch_example(source, target),
    "interleaved": lambda source, target, words, k, config: interleaved_example(source, target, words, k),
}


def training_wait_ks(config: StreamingConfig, pairs: int, seed: int) -> list[int]:
    """Each training pair's k: the config's `wait_k`, or one of its `training_wait_ks` drawn with `seed`."""
    choices = [READ_EVERYTHING if k == "offline" else k for k in config.training_wait_ks]
    if not choices:
        return [config.wait_k] * pairs
    return [choices[index] for index in np.random.default_rng(seed).integers(len(choices), size=pairs)]


def encode_pairs(pairs: Sequence[Pair], tokenizer, chat: ChatFormat, config: StreamingConfig,
                 seed: int = 0) -> list[StreamingExample]:
    examples = []
    for pair, wait_k in zip(pairs, training_wait_ks(config, len(pairs), seed), strict=True):
        source = chat.source_group(tokenizer, pair.source_words)
        target, words = chat.target(tokenizer, pair.target)
        examples.append(EXAMPLES[config.training_layout](source, target, words, wait_k, config))
    return examples


class StepPlan(Sequence):
    """Steps of `pairs_per_step` examples drawn epoch by epoch in a seeded order; batches are built on demand."""

    def __init__(self, examples: Sequence[StreamingExample], recipe: StreamingRecipe, pad_id: int) -> None:
        self.examples, self.recipe, self.pad_id = examples, recipe, pad_id
        rng = np.random.default_rng(recipe.optimisation.seed)
        needed = recipe.optimisation.steps * recipe.pairs_per_step
        self.order = np.concatenate([rng.permutation(len(examples)) for _ in range(-(-needed // len(examples)))])

    def __len__(self) -> int:
        return self.recipe.optimisation.steps

    def __getitem__(self, step: int) -> list[MicroBatch]:
        size = self.recipe.pairs_per_step
        chosen = [self.examples[index] for index in self.order[step * size:(step + 1) * size]]
        groups = [chosen[start:start + self.recipe.micro_batch_size]
                  for start in range(0, len(chosen), self.recipe.micro_batch_size)]
        # An fp32 mask also under bf16 autocast, which casts it with the query in SDPA.
        return [MicroBatch(collate(group, torch.float32, self.pad_id), loss_divisor=len(groups)) for group in groups]


class StreamingLoss(nn.Module):
    """The model's own causal-LM loss on one micro-batch of streaming examples."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, labels) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          labels=labels).loss


def add_lora(model: nn.Module, settings: LoraSettings, seed: int):
    import peft

    torch.manual_seed(seed)  # LoRA's A matrices start random; seeded so a resumed run starts alike
    return peft.get_peft_model(model, peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                                                      lora_dropout=settings.dropout,
                                                      target_modules=settings.target_modules))


def _described(config: StreamingConfig) -> str:
    return {"group": f"streaming {config.trained_policies()}", "batch": "batch (offline) training",
            "interleaved": f"interleaved {config.trained_policies()}"}[config.training_layout]


def train_streaming(config: StreamingConfig, recipe: StreamingRecipe, run_dir: Path, model, tokenizer,
                    resume: bool = True) -> TrainingResult:
    """Fine-tune `model` (a causal chat LM) with LoRA under `config`'s wait-k mask; writes the run folder."""
    run_dir = Path(run_dir)
    chat = ChatFormat.from_tokenizer(tokenizer, config.instruction)
    pairs, _ = make_splits(recipe.task_seed, recipe.train_pairs)
    examples = encode_pairs(pairs, tokenizer, chat, config, recipe.optimisation.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else chat.end_token
    saved_beside = {"config.yaml": config_yaml(config, "streaming config of this run"),
                    "recipe.yaml": yaml_text(recipe, "streaming fine-tuning recipe")}
    with open_run(run_dir, saved_beside, resume, outputs=OUTPUTS):
        peft_model = add_lora(model, recipe.lora, recipe.optimisation.seed)

        def write_outputs(record) -> None:
            save_lora(run_dir, peft_model)
            write_json_atomically(run_dir / "metrics.json", {
                "description": f"{_described(config)} LoRA on {config.model}",
                "train_pairs": len(examples), "train": loss_summary(record),
                "hardware": hardware(next(peft_model.parameters()).device), "versions": versions()})

        record = train(StreamingLoss(peft_model), trainable_parameters(peft_model), StepPlan(examples, recipe, pad_id),
                       recipe.optimisation, run_dir, seed_entropy=(recipe.optimisation.seed,),
                       description=_described(config), on_finish=write_outputs)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return TrainingResult(run_dir, {"train": record}, metrics)
