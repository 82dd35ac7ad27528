"""`wb train hidrop`: fine-tune the default model's projector and a LoRA with a token schedule active.

It is the default recipe's stage 2 (question/answer conversations on probe scenes, several per
conversation, answer-only loss) run through `ScheduledLLM`, so the model learns to answer from the
visual tokens the schedule keeps. The query rows that rank visual tokens at each cut are the token
before each answer, as HiDrop does in training; the selection passes gradient to the scores
(`token_scoring.differentiable_keep`). `--init dense` starts from the trained default model (its
LoRA merged, a fresh LoRA on top).

The run folder ends with `config.yaml` (the schedule), `recipe.yaml`, `projector.safetensors`,
`lora/` and `metrics.json`; `efficient_models.hidrop.load_hidrop_run` loads them.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import transformers
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save_file
from torch import nn

from efficient_models import schedule as schedules
from efficient_models.hidrop import RUN_CONFIG, visual_tokens_per_image
from efficient_models.scheduled_llm import ScheduledLLM
from efficient_models.training import Optimisation, TrainingRecord, TrainingResult, train, yaml_text
from workbench.configs import HiDropConfig
from workbench.errors import InputError
from workbench.models.loading import load_model
from workbench.recipes.checkpoints import RunPaths
from workbench.recipes.config import LoraSettings
from workbench.recipes.default_model import (
    PROJECTOR_PREFIX,
    add_lora,
    collate,
    hardware,
    plan_steps,
    trainable_parameters,
)
from workbench.recipes.features import prepare_features
from workbench.recipes.sequences import IGNORE_INDEX, qa_conversations, tokenise_conversation

DEFAULT_RECIPE = Path(__file__).with_name("recipes") / "hidrop_finetune.yaml"
QA_PACKING_STREAM, STEP_ORDER_STREAM, LORA_INIT_STREAM = 11, 12, 13


class FinetuneRecipe(BaseModel):
    """How the schedule is trained in: data, optimisation, LoRA. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    init: Literal["dense"] = "dense"  # start from the trained default model (its LoRA merged)
    train_scenes: int = Field(gt=0)
    feature_batch_size: int = Field(gt=0)
    conversations_per_step: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    max_turns: int = Field(gt=0)
    single_question_fraction: float = Field(ge=0, le=1)
    selection_sharpness: float = Field(gt=0)
    optimisation: Optimisation
    lora: LoraSettings


def load_recipe(path: Path = DEFAULT_RECIPE) -> FinetuneRecipe:
    try:
        return FinetuneRecipe.model_validate(yaml.safe_load(Path(path).read_text()))
    except OSError as error:
        raise InputError(f"cannot read recipe {path}: {error.strerror}") from None
    except (yaml.YAMLError, ValidationError) as error:
        raise InputError(f"invalid recipe {path}: {str(error).splitlines()[0]}") from None


def smoke_recipe(recipe: FinetuneRecipe) -> FinetuneRecipe:
    """4 steps on 8 scenes: checks the wiring and times real steps."""
    optimisation = recipe.optimisation.model_copy(update={"steps": 4, "warmup_steps": 1, "checkpoint_every": 2})
    return recipe.model_copy(update={"train_scenes": 8, "optimisation": optimisation})


def answer_queries(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: the token just before each supervised span (it predicts the answer's first token)."""
    supervised = labels != IGNORE_INDEX
    queries = torch.zeros_like(supervised)
    queries[:, :-1] = supervised[:, 1:] & ~supervised[:, :-1]
    return queries


def answer_loss(engine: ScheduledLLM, embeddings: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy of the supervised tokens, the LLM run under `engine`'s schedule, ranked by the answers."""
    hidden = engine.forward(embeddings, input_ids, attention_mask, queries=answer_queries(labels)).hidden
    targets = labels[:, 1:]  # position t predicts token t + 1
    supervised = targets != IGNORE_INDEX
    logits = engine.adapter.lm_head(hidden[:, :-1][supervised]).float()
    return nn.functional.cross_entropy(logits, targets[supervised])


class ScheduledLoss(nn.Module):
    """`answer_loss` from cached projector inputs: what `wb train hidrop` optimises."""

    def __init__(self, model: nn.Module, engine: ScheduledLLM):
        super().__init__()
        self.model, self.engine = model, engine  # `model` registered so accelerate / DDP see the weights

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, features: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        adapter = self.engine.adapter
        embeddings = adapter.embed_tokens(input_ids)
        visual = adapter.projector(features).to(embeddings.dtype)
        embeddings = embeddings.masked_scatter(adapter.visual_token_mask(input_ids)[..., None], visual)
        return answer_loss(self.engine, embeddings, input_ids, labels, attention_mask)


def step_plan(recipe: FinetuneRecipe, scenes, features: torch.Tensor, processor: Any,
              pad_token_id: int) -> list[list[dict[str, torch.Tensor]]]:
    """Steps of micro-batches of question/answer conversations, in a seeded order."""
    seed, per_step = recipe.optimisation.seed, recipe.conversations_per_step
    needed = recipe.optimisation.steps * per_step
    conversations, epoch = [], 0
    while len(conversations) < needed:
        for index in map(int, np.random.default_rng([QA_PACKING_STREAM, seed, epoch]).permutation(len(scenes))):
            rng = np.random.default_rng([QA_PACKING_STREAM, seed, epoch, index])
            conversations += qa_conversations(index, scenes[index].qa, rng, recipe.max_turns,
                                              recipe.single_question_fraction)
        epoch += 1
    tokenised = [tokenise_conversation(processor, conversation, features.shape[1])
                 for conversation in conversations[:needed]]
    steps = plan_steps(tokenised, per_step, np.random.default_rng([STEP_ORDER_STREAM, seed]))
    plan = []
    for step in steps:
        ordered = sorted(step, key=lambda conversation: conversation.length)
        micro = []
        for start in range(0, len(ordered), recipe.micro_batch_size):
            batch = collate(ordered[start:start + recipe.micro_batch_size], features, pad_token_id, torch.device("cpu"))
            micro.append({"input_ids": batch.input_ids, "labels": batch.labels, "features": batch.features}
                         | ({} if batch.attention_mask is None else {"attention_mask": batch.attention_mask}))
        plan.append(micro)
    return plan


@dataclass
class HiDropTraining:
    run_dir: Path
    result: TrainingResult
    schedule: schedules.TokenSchedule
    num_visual: int


def train_hidrop(config: HiDropConfig, recipe: FinetuneRecipe, run_dir: Path, resume: bool = True,
                 threads: int | None = None) -> HiDropTraining:
    """Fine-tune with the schedule of `config` active; see the module docstring."""
    if threads:
        torch.set_num_threads(threads)
    loaded = load_model("default", device="cpu", dtype=torch.float32, attn_implementation="sdpa")
    if config.num_llm_layers != loaded.adapter.num_llm_layers:
        raise InputError(f"the config is for a {config.num_llm_layers}-layer LLM; the default model has "
                         f"{loaded.adapter.num_llm_layers}")
    num_visual = visual_tokens_per_image(loaded)
    schedule = schedules.from_config(config, num_visual)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The frozen vision tower's outputs for the training scenes, cached in the run folder.
    scenes, features, _ = prepare_features(loaded.adapter, loaded.processor, recipe, RunPaths(run_dir),
                                           torch.device("cpu"))
    torch.manual_seed(recipe.optimisation.seed)
    peft_model = add_lora(loaded.adapter, recipe.lora, int(np.random.default_rng([LORA_INIT_STREAM,
                                                                                   recipe.optimisation.seed]).integers(2**31)))
    adapter = loaded.adapter  # LoRA layers now sit inside its modules
    parameters = trainable_parameters(loaded.model)
    engine = ScheduledLLM(adapter, schedule, sharpness=recipe.selection_sharpness)
    plan = step_plan(recipe, scenes, features, loaded.processor, loaded.processor.tokenizer.pad_token_id)

    def write_outputs(record: TrainingRecord) -> None:
        projector = {PROJECTOR_PREFIX + name: tensor.detach().cpu().contiguous()
                     for name, tensor in adapter.projector.state_dict().items()}
        save_file(projector, run_dir / "projector.safetensors")
        peft_model.save_pretrained(run_dir / "lora", save_embedding_layers=False)
        (run_dir / "metrics.json").write_text(json.dumps(metrics(record, schedule, num_visual, recipe), indent=2) + "\n")

    saved_beside = {RUN_CONFIG: yaml_text(config, "the schedule these weights are trained with"),
                    "recipe.yaml": yaml_text(recipe, "wb train hidrop recipe")}
    share = schedule.token_layer_fraction(num_visual)
    result = train(ScheduledLoss(loaded.model, engine), parameters, plan, recipe.optimisation, run_dir, saved_beside,
                   resume=resume, description=f"hidrop ({share:.0%} of dense visual-token-layers)",
                   on_finish=write_outputs)
    return HiDropTraining(run_dir, result, schedule, num_visual)


def metrics(record: TrainingRecord, schedule: schedules.TokenSchedule, num_visual: int,
            recipe: FinetuneRecipe) -> dict[str, Any]:
    tenth = max(1, len(record.losses) // 10)
    return {
        "schedule": schedule.describe(num_visual), "average_visual_tokens": schedule.average_visual_tokens(num_visual),
        "token_layer_fraction": round(schedule.token_layer_fraction(num_visual), 4), "init": recipe.init,
        "steps": record.step, "loss_first_tenth": round(float(np.mean(record.losses[:tenth])), 4),
        "loss_last_tenth": round(float(np.mean(record.losses[-tenth:])), 4),
        "seconds": round(sum(record.seconds), 1), "median_step_seconds": round(float(np.median(record.seconds)), 3),
        "hardware": hardware(torch.device("cpu")),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
