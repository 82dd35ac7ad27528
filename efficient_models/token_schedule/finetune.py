"""Fine-tune the default model (projector + a fresh LoRA) with a model change active: the default recipe's
stage 2 run through `ScheduledLLM`, shared by the methods that train this way (`wb train hidrop` with its
token schedule, `wb train fusion` with its fused vision layers on the dense schedule, `wb train vica` with its
own `ScheduledLLM` subclass).

Question/answer conversations on probe scenes, several per conversation, answer-only loss; the query rows
that rank visual tokens at a cut are the token before each answer, as HiDrop does in training, and the
selection passes gradient to the scores (`token_schedule.scoring.differentiable_keep`). The model starts as
the trained default model (its LoRA merged), with a fresh LoRA on top.

The run folder ends with what the method saves beside (its config), `recipe.yaml`, `projector.safetensors`,
`lora/` and `metrics.json`; `workbench.models.default_model.apply_trained_weights` applies them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from efficient_models.registry import run_config
from efficient_models.token_schedule.engine import ScheduledLLM
from efficient_models.token_schedule.scheduled_model import answer_loss, visual_tokens_per_image
from efficient_models.token_schedule.schedule import TokenSchedule
from workbench.configs import MethodConfig, read_recipe, yaml_text
from workbench.errors import InputError
from workbench.files import write_json_atomically
from workbench.models.adapter import ArchitectureAdapter
from workbench.models.loading import LoadedModel, default_device
from workbench.training.batches import micro_batches, plan_steps
from workbench.training.features import embeddings_from_features, prepare_features
from workbench.training.lora import LoraSettings, add_lora, save_projector_and_lora, trainable_parameters
from workbench.training.loop import TrainingRecord, TrainingResult, open_run, train
from workbench.training.metrics import hardware, loss_summary, versions
from workbench.training.optimisation import Optimisation
from workbench.training.precision import ResolvedPrecision, resolve_precision
from workbench.training.sequences import qa_conversations, tokenise_conversation

QA_PACKING_STREAM, STEP_ORDER_STREAM, LORA_INIT_STREAM, STEP_SEED_STREAM = 11, 12, 13, 7
OUTPUTS = ("projector.safetensors", "lora", "metrics.json")


class FinetuneRecipe(BaseModel):
    """Data, optimisation and LoRA of a fine-tuning run. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    init: Literal["dense"] = "dense"  # start from the trained default model (its LoRA merged)
    train_scenes: int = Field(gt=0)
    feature_batch_size: int = Field(gt=0)
    conversations_per_step: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    max_turns: int = Field(gt=0)
    single_question_fraction: float = Field(ge=0, le=1)
    selection_sharpness: float = Field(default=1.0, gt=0)  # HiDrop's soft top-k; only schedules with cuts use it
    optimisation: Optimisation
    lora: LoraSettings


def finished_run_config(run_dir: str | Path, method: str) -> MethodConfig:
    """The config a finished fine-tuning run of `method` was trained with; a one-line error for anything else."""
    config = run_config(run_dir, method)
    if not (Path(run_dir) / OUTPUTS[0]).is_file():
        raise InputError(f"{run_dir} holds no finished {method} run (no {OUTPUTS[0]})")
    return config


def load_recipe(path: Path) -> FinetuneRecipe:
    return read_recipe(path, FinetuneRecipe)


def smoke_recipe(recipe: FinetuneRecipe) -> FinetuneRecipe:
    """4 steps on 8 scenes: checks the wiring and times real steps."""
    optimisation = recipe.optimisation.model_copy(update={"steps": 4, "warmup_steps": 1, "checkpoint_every": 2})
    return recipe.model_copy(update={"train_scenes": 8, "optimisation": optimisation})


def with_steps(recipe: FinetuneRecipe, steps: int) -> FinetuneRecipe:
    return recipe.model_copy(update={"optimisation": recipe.optimisation.model_copy(update={"steps": steps})})


class CachedExtension(nn.Module):
    """Modules a method adds to the model and trains with the projector and LoRA (internal fusion's
    projectors), fed before each step with the cached vision-tower layers they read."""

    vision_layers: list[int]  # the tower's `hidden_states` indices the feature cache must keep

    def feed(self, layers: dict[int, torch.Tensor]) -> None:
        """This step's images' outputs of `vision_layers`, [images, tower tokens, width] each."""
        raise NotImplementedError

    def save(self, run_dir: Path) -> None:
        raise NotImplementedError


class ScheduledLoss(nn.Module):
    """`answer_loss` from cached projector inputs: what `wb train hidrop` optimises."""

    def __init__(self, model: nn.Module, engine: ScheduledLLM, features: torch.Tensor,
                 extension: CachedExtension | None = None, layers: Mapping[int, torch.Tensor] | None = None):
        super().__init__()
        self.model, self.engine = model, engine  # `model` registered so accelerate / DDP see the weights
        self.extension = extension
        self.register_buffer("features", features, persistent=False)
        for index, tensor in (layers or {}).items():
            self.register_buffer(f"layer_{index}", tensor, persistent=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, scenes: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.extension is not None:
            self.extension.feed({index: getattr(self, f"layer_{index}")[scenes].float()
                                 for index in self.extension.vision_layers})
        embeddings = embeddings_from_features(self.engine.adapter, input_ids, self.features[scenes].float())
        return answer_loss(self.engine, embeddings, input_ids, labels, attention_mask)


def step_plan(recipe: FinetuneRecipe, scenes, image_tokens: int, processor: Any, pad_token_id: int) -> list:
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
    tokenised = [tokenise_conversation(processor, conversation, image_tokens)
                 for conversation in conversations[:needed]]
    steps = plan_steps(tokenised, per_step, np.random.default_rng([STEP_ORDER_STREAM, seed]))
    return [micro_batches(step, recipe.micro_batch_size, pad_token_id, per_token=False) for step in steps]


def metrics(record: TrainingRecord, schedule: TokenSchedule, num_visual: int, recipe: FinetuneRecipe,
            precision: ResolvedPrecision) -> dict[str, Any]:
    return {"schedule": schedule.describe(num_visual), "average_visual_tokens": schedule.average_visual_tokens(num_visual),
            "token_layer_fraction": round(schedule.token_layer_fraction(num_visual), 4), "init": recipe.init,
            "precision": {"requested": recipe.optimisation.precision, "resolved": precision},
            **loss_summary(record), "hardware": hardware(torch.device("cpu")), "versions": versions()}


def finetune(loaded: LoadedModel, schedule: TokenSchedule, recipe: FinetuneRecipe, run_dir: Path,
             saved_beside: Mapping[str, str], description: str, resume: bool = True,
             extension: CachedExtension | None = None,
             engine: Callable[[ArchitectureAdapter], ScheduledLLM] | None = None) -> TrainingResult:
    """Fine-tune `loaded` (the default model, already changed as the method needs) under `schedule`.

    `saved_beside`: the method's files to keep with the weights (e.g. its config); `recipe.yaml` is added.
    `extension`: modules the method added, trained too and saved beside the weights.
    `engine`: builds the decoder the loss runs, on the adapter once the LoRA sits in it, for a method that changes
    more than which tokens a layer sees (ViCA's cross-attention); by default `ScheduledLLM` under `schedule`.
    """
    num_visual = visual_tokens_per_image(loaded)
    run_dir = Path(run_dir)
    saved_beside = {**saved_beside, "recipe.yaml": yaml_text(recipe, "fine-tuning recipe")}
    # The loop trains on accelerate's device, which is this one.
    precision = resolve_precision(recipe.optimisation.precision, torch.device(default_device()))
    with open_run(run_dir, saved_beside, resume, outputs=OUTPUTS):
        # The frozen vision tower's outputs for the training scenes, cached in the run folder.
        cached = prepare_features(loaded.adapter, loaded.processor, recipe.train_scenes, recipe.feature_batch_size,
                                  run_dir, torch.device("cpu"), extension.vision_layers if extension else ())
        torch.manual_seed(recipe.optimisation.seed)
        lora_seed = int(np.random.default_rng([LORA_INIT_STREAM, recipe.optimisation.seed]).integers(2**31))
        peft_model = add_lora(loaded.adapter, recipe.lora, lora_seed)
        adapter = loaded.adapter  # LoRA layers now sit inside its modules
        runner = engine(adapter) if engine else ScheduledLLM(adapter, schedule, sharpness=recipe.selection_sharpness)
        plan = step_plan(recipe, cached.scenes, cached.features.shape[1], loaded.processor,
                         loaded.processor.tokenizer.pad_token_id)

        def write_outputs(record: TrainingRecord) -> None:
            save_projector_and_lora(run_dir, adapter, peft_model, loaded.processor)
            if extension is not None:
                extension.save(run_dir)
            write_json_atomically(run_dir / "metrics.json", metrics(record, schedule, num_visual, recipe, precision))

        optimisation = recipe.optimisation.model_copy(update={"precision": precision})
        parameters = trainable_parameters(loaded.model)
        if extension is not None:
            parameters |= {f"extension.{name}": parameter for name, parameter in extension.named_parameters()}
        loss = ScheduledLoss(loaded.model, runner, cached.features, extension, cached.layers)
        record = train(loss, parameters, plan, optimisation, run_dir,
                       seed_entropy=(STEP_SEED_STREAM, recipe.optimisation.seed), description=description,
                       on_finish=write_outputs)
    return TrainingResult(run_dir, {"train": record},
                          {"description": description} | metrics(record, schedule, num_visual, recipe, precision))
