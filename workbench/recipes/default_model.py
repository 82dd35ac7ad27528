"""`wb train default`: the training recipe of the embedded default model, LLaVA-1.5 style, on probe scenes.

Stage 1 trains the projector alone on captions ("Describe the image." -> caption), vision tower and
LLM frozen; stage 2 trains the projector and a LoRA adapter on the LLM on the scenes' question/answer
pairs, several per conversation (`sequences`). The vision tower never changes, so its output (what
the projector consumes) is computed once per run and cached; a step builds the LLM's input
embeddings from token embeddings plus projected cached features and computes logits only where a
label is.

Runs are seeded and resumable: checkpoints (safetensors + JSON, no pickle) hold the trainable
weights, the AdamW state and the position in the run; the step plan is a function of the seed and
every step reseeds torch from (seed, stage, step), so a resumed run ends with the same weights as an
uninterrupted one. The run folder ends up with `projector.safetensors`, `lora/`, `recipe.yaml` and
`metrics.json`; `install_run` copies them to where `load_model("default")` applies them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration

from workbench.models.adapter import ArchitectureAdapter, adapter_for
from workbench.models.default_model import (
    DEFAULT_WEIGHTS_DIR,
    DefaultModelInfo,
    build_default_model,
    load_default_model,
)
from workbench.models.loading import default_device
from workbench.recipes.checkpoints import (
    LORA_INIT_STREAM,
    QA_PACKING_STREAM,
    SCENE_ORDER_STREAM,
    STEP_ORDER_STREAM,
    RunPaths,
    RunState,
    StageRecord,
    restore,
    save_checkpoint,
    seed_from,
    stage_number,
    start_or_resume,
    step_seed,
)
from workbench.recipes.config import LoraSettings, RecipeConfig, RecipeError, StageConfig, StageName
from workbench.recipes.features import SceneText, prepare_features
from workbench.recipes.sequences import (
    IGNORE_INDEX,
    Conversation,
    TokenisedConversation,
    caption_conversation,
    qa_conversations,
    tokenise_conversation,
)

DEFAULT_RUN_DIR = Path("runs/train-default")
PROJECTOR_PREFIX = "multi_modal_projector."  # the key format `load_default_model` expects
# Conversations are sorted by length within windows of this many steps, so a micro-batch pads little,
# while the order across windows stays random.
BUCKET_STEPS = 16
LOSS_CURVE_POINTS = 20
INSTALLED_FILES = ("projector.safetensors", "lora/adapter_model.safetensors", "lora/adapter_config.json",
                   "recipe.yaml", "metrics.json")
# The LoRA ships in bf16 (9.8 MB instead of 19.6 MB); loading merges it into the float32 weights.
SHIPPED_IN_BF16 = {"lora/adapter_model.safetensors"}
STAGE_TITLES = {"stage1": "projector on captions", "stage2": "projector + LoRA on questions"}


# --- the base model ---------------------------------------------------------------------


def load_base_model() -> tuple[LlavaForConditionalGeneration, Any]:
    """The cached default-model assembly with its untrained projector: training never starts from shipped weights."""
    cache_dir = build_default_model()
    model = LlavaForConditionalGeneration.from_pretrained(cache_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoProcessor.from_pretrained(cache_dir)



# --- the step plan ---------------------------------------------------------------------


def stage_conversations(config: RecipeConfig, stage: StageName, scenes: Sequence[SceneText]) -> list[Conversation]:
    """The stage's conversations in training order: epochs over the scenes, each in a seeded order."""
    stage_config = config.stage(stage)
    needed = stage_config.steps * stage_config.conversations_per_step
    conversations: list[Conversation] = []
    epoch = 0
    while len(conversations) < needed:
        order = np.random.default_rng([SCENE_ORDER_STREAM, config.seed, stage_number(stage), epoch]).permutation(
            len(scenes))
        for index in map(int, order):
            if stage == "stage1":
                conversations.append(caption_conversation(index, scenes[index].caption))
            else:
                rng = np.random.default_rng([QA_PACKING_STREAM, config.seed, epoch, index])
                conversations += qa_conversations(index, scenes[index].qa, rng, config.stage2.max_turns,
                                                  config.stage2.single_question_fraction)
        epoch += 1
    return conversations[:needed]


def plan_steps(conversations: Sequence[TokenisedConversation], per_step: int,
               rng: np.random.Generator) -> list[list[TokenisedConversation]]:
    """Steps of similar-length conversations: each window of BUCKET_STEPS steps is sorted by length, cut
    into steps, and those steps are shuffled."""
    steps: list[list[TokenisedConversation]] = []
    window = per_step * BUCKET_STEPS
    for start in range(0, len(conversations), window):
        ordered = sorted(conversations[start:start + window], key=lambda conversation: conversation.length)
        window_steps = [ordered[index:index + per_step] for index in range(0, len(ordered), per_step)]
        steps += [window_steps[index] for index in rng.permutation(len(window_steps))]
    return steps


def stage_plan(config: RecipeConfig, stage: StageName, scenes: Sequence[SceneText], processor: Any,
               image_tokens: int) -> list[list[TokenisedConversation]]:
    conversations = [tokenise_conversation(processor, conversation, image_tokens)
                     for conversation in stage_conversations(config, stage, scenes)]
    rng = np.random.default_rng([STEP_ORDER_STREAM, config.seed, stage_number(stage)])
    return plan_steps(conversations, config.stage(stage).conversations_per_step, rng)


# --- the training step ---------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, length], right-padded
    labels: torch.Tensor  # [batch, length]
    attention_mask: torch.Tensor | None  # None when no row is padded (keeps SDPA on its causal fast path)
    features: torch.Tensor  # [batch, visual tokens, vision width]: cached projector inputs, one image per row


def collate(conversations: Sequence[TokenisedConversation], features: torch.Tensor, pad_token_id: int,
            device: torch.device) -> Batch:
    length = max(conversation.length for conversation in conversations)
    input_ids = torch.full((len(conversations), length), pad_token_id)
    labels = torch.full((len(conversations), length), IGNORE_INDEX)
    attention_mask = torch.zeros((len(conversations), length), dtype=torch.long)
    for row, conversation in enumerate(conversations):
        input_ids[row, :conversation.length] = conversation.input_ids
        labels[row, :conversation.length] = conversation.labels
        attention_mask[row, :conversation.length] = 1
    padded = bool((attention_mask == 0).any())
    rows = torch.tensor([conversation.scene for conversation in conversations])
    return Batch(input_ids.to(device), labels.to(device), attention_mask.to(device) if padded else None,
                 features[rows].float().to(device))


def supervised_logits(adapter: ArchitectureAdapter, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32) at the positions that predict a label, and those labels.

    Equals the model's own forward on pixels: the projected features replace the image tokens'
    embeddings in order, as `LlavaModel.forward` scatters them; only the LM head is restricted to the
    supervised positions, since the other 49k-way logits would be thrown away.
    """
    embeddings = adapter.embed_tokens(batch.input_ids)
    visual = adapter.projector(batch.features).to(embeddings.dtype)
    image_positions = adapter.visual_token_mask(batch.input_ids).unsqueeze(-1)
    embeddings = embeddings.masked_scatter(image_positions, visual)
    hidden = adapter.language_model(inputs_embeds=embeddings, attention_mask=batch.attention_mask).last_hidden_state
    targets = batch.labels[:, 1:]  # position t predicts token t + 1
    supervised = targets != IGNORE_INDEX
    return adapter.lm_head(hidden[:, :-1][supervised]).float(), targets[supervised]


@dataclass
class StageRun:
    """What the steps of one stage share."""

    name: StageName
    config: StageConfig
    adapter: ArchitectureAdapter
    parameters: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    features: torch.Tensor
    pad_token_id: int
    device: torch.device
    bf16: bool


def supervised_count(conversation: TokenisedConversation) -> int:
    return int((conversation.labels != IGNORE_INDEX).sum())


def train_step(run: StageRun, step: int, conversations: Sequence[TokenisedConversation]) -> float:
    """One optimizer step over `conversations` in length-sorted micro-batches; the mean loss per label token."""
    for group in run.optimizer.param_groups:
        group["lr"] = run.config.learning_rate_at(step)
    run.optimizer.zero_grad(set_to_none=True)
    total_labels = sum(map(supervised_count, conversations))
    ordered = sorted(conversations, key=lambda conversation: conversation.length)
    step_loss = 0.0
    for start in range(0, len(ordered), run.config.micro_batch_size):
        batch = collate(ordered[start:start + run.config.micro_batch_size], run.features, run.pad_token_id,
                        run.device)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
            logits, targets = supervised_logits(run.adapter, batch)
        # Summed and divided by the step's label count: every label token weighs the same in the step.
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum") / total_labels
        loss.backward()
        step_loss += loss.item()
    nn.utils.clip_grad_norm_(list(run.parameters.values()), run.config.max_grad_norm)
    run.optimizer.step()
    return step_loss


def record_step(record: StageRecord, conversations: Sequence[TokenisedConversation], loss: float,
                seconds: float) -> None:
    record.losses.append(loss)
    record.conversations += len(conversations)
    record.answers += sum(conversation.num_answers for conversation in conversations)
    record.supervised_tokens += sum(map(supervised_count, conversations))
    record.tokens += sum(conversation.length for conversation in conversations)
    record.seconds += seconds


def run_stage(run: StageRun, plan: list[list[TokenisedConversation]], state: RunState, recipe: RecipeConfig,
              paths: RunPaths) -> None:
    """Steps `state.step`.. of the stage, with a checkpoint every `checkpoint_every` steps and at the end."""
    record = state.records[run.name]
    smoothed = float("nan")
    with tqdm(total=len(plan), initial=state.step, desc=f"{run.name} ({STAGE_TITLES[run.name]})",
              unit="step") as progress:
        for step in range(state.step, len(plan)):
            torch.manual_seed(step_seed(recipe.seed, run.name, step))
            started = time.perf_counter()
            loss = train_step(run, step, plan[step])
            record_step(record, plan[step], loss, time.perf_counter() - started)
            state.step = step + 1
            if state.step % recipe.checkpoint_every == 0 or state.step == len(plan):
                save_checkpoint(paths, recipe, state, run.parameters, run.optimizer)
            smoothed = loss if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * loss
            progress.set_postfix(loss=f"{smoothed:.3f}", lr=f"{run.optimizer.param_groups[0]['lr']:.1e}")
            progress.update()


# --- stages --------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def freeze_all_but_projector(adapter: ArchitectureAdapter) -> None:
    adapter.model.requires_grad_(False)
    adapter.projector.requires_grad_(True)


def add_lora(adapter: ArchitectureAdapter, settings: LoraSettings, seed: int) -> peft.PeftModel:
    """LoRA on the LLM's decoder projections only (the vision tower may use the same module names)."""
    modules = "|".join(settings.target_modules)
    lora_config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                  target_modules=rf".*{re.escape(adapter.language_model_path)}\..*\.({modules})")
    torch.manual_seed(seed)  # LoRA's A matrices start random; seeded so a resumed stage 2 starts alike
    peft_model = peft.get_peft_model(adapter.model, lora_config)
    # Recorded in adapter_config.json: the adapter belongs to load_model("default"), not to a cache path.
    peft_model.peft_config["default"].base_model_name_or_path = "default"
    adapter.projector.requires_grad_(True)  # get_peft_model froze everything but the adapter
    return peft_model


def make_optimizer(parameters: dict[str, nn.Parameter], config: StageConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(parameters.values()), lr=config.learning_rate, weight_decay=config.weight_decay)


# --- outputs -------------------------------------------------------------------------


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict[str, Any]:
    return {"device": device.type, "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def loss_curve(losses: list[float]) -> list[dict[str, float]]:
    """Mean loss over about LOSS_CURVE_POINTS equal spans of steps, each labelled with its last step."""
    span = max(1, math.ceil(len(losses) / LOSS_CURVE_POINTS))
    return [{"step": min(start + span, len(losses)), "loss": round(float(np.mean(losses[start:start + span])), 4)}
            for start in range(0, len(losses), span)]


def stage_metrics(record: StageRecord, config: StageConfig) -> dict[str, Any]:
    head = record.losses[: max(1, len(record.losses) // 10)]
    tail = record.losses[-max(1, len(record.losses) // 10):]
    return {
        "steps": len(record.losses), "conversations": record.conversations, "answers": record.answers,
        "supervised_tokens": record.supervised_tokens, "tokens": record.tokens,
        "seconds": round(record.seconds, 1), "seconds_per_step": round(record.seconds / max(1, len(record.losses)), 3),
        "learning_rate": config.learning_rate,
        "loss_first_tenth": round(float(np.mean(head)), 4), "loss_last_tenth": round(float(np.mean(tail)), 4),
        "loss_curve": loss_curve(record.losses),
    }


def run_metrics(config: RecipeConfig, state: RunState, device: torch.device) -> dict[str, Any]:
    stages = {name: stage_metrics(state.records[name], config.stage(name)) for name in ("stage1", "stage2")}
    return {
        "recipe_seed": config.seed, "train_scenes": config.train_scenes, "precision": config.precision,
        "feature_seconds": round(state.feature_seconds, 1),
        "total_seconds": round(state.feature_seconds + sum(stage["seconds"] for stage in stages.values()), 1),
        "stages": stages, "hardware": hardware(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
    }


def save_outputs(paths: RunPaths, adapter: ArchitectureAdapter, peft_model: peft.PeftModel,
                 metrics: dict[str, Any]) -> None:
    projector = {PROJECTOR_PREFIX + name: tensor.detach().cpu().contiguous()
                 for name, tensor in adapter.projector.state_dict().items()}
    save_file(projector, paths.projector)
    # The adapter does not touch the embeddings; saying so skips peft's lookup of the base model's files.
    peft_model.save_pretrained(paths.lora, save_embedding_layers=False)
    paths.metrics.write_text(json.dumps(metrics, indent=2) + "\n")


# --- the run -------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingResult:
    run_dir: Path
    metrics: dict[str, Any]


BaseModelLoader = Callable[[], tuple[LlavaForConditionalGeneration, Any]]


def train_default_model(config: RecipeConfig, run_dir: Path = DEFAULT_RUN_DIR, resume: bool = True,
                        base_model_loader: BaseModelLoader = load_base_model) -> TrainingResult:
    """Run (or continue) the recipe in `run_dir`; a finished run is returned as it is."""
    paths = RunPaths(Path(run_dir))
    checkpoint = start_or_resume(paths, config, resume)
    state = checkpoint.state if checkpoint else RunState()
    if state.finished:
        return TrainingResult(paths.root, json.loads(paths.metrics.read_text()))
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    seed_everything(config.seed)
    device = torch.device(default_device())
    model, processor = base_model_loader()
    model.to(device).eval()
    adapter = adapter_for(model)
    scenes, features, feature_seconds = prepare_features(adapter, processor, config, paths, device)
    model.train()  # for LoRA dropout; the LLM itself has none
    if checkpoint is None:
        state.feature_seconds = feature_seconds
    image_tokens = features.shape[1]

    def stage_run(name: StageName, parameters: dict[str, nn.Parameter]) -> StageRun:
        optimizer = make_optimizer(parameters, config.stage(name))
        if checkpoint is not None and checkpoint.stage == name:
            restore(checkpoint, parameters, optimizer)
        return StageRun(name, config.stage(name), adapter, parameters, optimizer, features,
                        processor.tokenizer.pad_token_id, device, config.precision == "bf16")

    freeze_all_but_projector(adapter)
    if state.stage == "stage1":
        run = stage_run("stage1", trainable_parameters(model))
        run_stage(run, stage_plan(config, "stage1", scenes, processor, image_tokens), state, config, paths)
        state.stage, state.step = "stage2", 0
        save_checkpoint(paths, config, state, run.parameters, optimizer=None)
    peft_model = add_lora(adapter, config.stage2.lora, seed_from(LORA_INIT_STREAM, config.seed))
    run = stage_run("stage2", trainable_parameters(model))
    run_stage(run, stage_plan(config, "stage2", scenes, processor, image_tokens), state, config, paths)
    state.finished = True
    metrics = run_metrics(config, state, device)
    save_outputs(paths, adapter, peft_model, metrics)
    save_checkpoint(paths, config, state, run.parameters, run.optimizer)
    return TrainingResult(paths.root, metrics)


# --- installing the result -----------------------------------------------------------


def install_run(run_dir: Path = DEFAULT_RUN_DIR, weights_dir: Path = DEFAULT_WEIGHTS_DIR) -> list[Path]:
    """Copy a finished run's projector, LoRA adapter, recipe and metrics to where the default model loads them."""
    run_dir, weights_dir = Path(run_dir), Path(weights_dir)
    missing = [name for name in INSTALLED_FILES if not (run_dir / name).is_file()]
    if missing:
        raise RecipeError(f"{run_dir} holds no finished run (missing {', '.join(missing)}); "
                          "run `wb train default` first")
    shutil.rmtree(weights_dir / "lora", ignore_errors=True)
    installed = []
    for name in INSTALLED_FILES:
        target = weights_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in SHIPPED_IN_BF16:
            save_file({key: value.to(torch.bfloat16) for key, value in load_file(run_dir / name).items()}, target)
        else:
            shutil.copyfile(run_dir / name, target)
        installed.append(target)
    return installed


def verify_installation(weights_dir: Path = DEFAULT_WEIGHTS_DIR) -> DefaultModelInfo:
    """Load the default model with the installed weights; fail unless both the projector and LoRA apply."""
    _, _, info = load_default_model(weights_dir=Path(weights_dir))
    if not (info.projector_trained and info.lora_loaded):
        raise RecipeError(f"the default model did not pick up the weights in {weights_dir}")
    return info


