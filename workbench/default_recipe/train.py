"""`wb train default`: the training recipe of the embedded default model, LLaVA-1.5 style, on probe scenes.

Stage 1 trains the projector alone on captions ("Describe the image." -> caption), vision tower and
LLM frozen; stage 2 trains the projector and a LoRA adapter on the LLM on the scenes' question/answer
pairs, several per conversation (`workbench.training.sequences`). The vision tower never changes, so
its output (what the projector consumes) is computed once per run and cached; a step builds the LLM's
input embeddings from token embeddings plus projected cached features and computes logits only where a
label is.

Both stages run on the shared loop (`workbench.training.loop`), each with its own checkpoints, so a
resumed run ends with the same weights as an uninterrupted one. The run folder ends up with
`projector.safetensors`, `lora/`, `recipe.yaml` and `metrics.json`; `install.install_run` copies them
to where `load_model("default")` applies them.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from workbench.data.probe_scenes import QUESTION_TYPES, QAPair
from workbench.default_recipe.recipe import FocusPhase, RecipeConfig, RecipeError, StageName, recipe_yaml
from workbench.files import write_json_atomically
from workbench.models.adapter import ArchitectureAdapter, adapter_for
from workbench.models.default_model import build_default_model
from workbench.models.loading import default_device
from workbench.models.visual_input import VisualInput, apply_visual_input
from workbench.training.batches import micro_batches, plan_steps, supervised_count
from workbench.training.features import FeatureScale, SceneText, embeddings_from_features, prepare_features
from workbench.training.lora import add_lora, save_projector_and_lora, trainable_parameters
from workbench.training.loop import Step, TrainingRecord, TrainingResult, finished_record, open_run, train
from workbench.training.metrics import hardware, loss_summary, versions
from workbench.training.precision import ResolvedPrecision, resolve_precision
from workbench.training.sequences import (
    IGNORE_INDEX,
    Conversation,
    TokenisedConversation,
    caption_conversation,
    qa_conversations,
    tokenise_conversation,
)

DEFAULT_RUN_DIR = Path("runs/train-default")
OUTPUTS = ("projector.safetensors", "lora", "metrics.json")
# Each use of randomness draws from its own seeded stream, tagged by its first entropy word.
(SCENE_ORDER_STREAM, QA_PACKING_STREAM, STEP_ORDER_STREAM, STEP_SEED_STREAM, LORA_INIT_STREAM,
 FOCUS_STREAM) = range(6)
STAGES: tuple[StageName, ...] = ("stage1", "stage2")
STAGE_TITLES = {"stage1": "projector on captions", "stage2": "projector + LoRA on questions"}


def seed_from(*entropy: int) -> int:
    return int(np.random.default_rng(list(entropy)).integers(2**62))


def stage_number(stage: StageName) -> int:
    return int(stage[-1])


def load_base_model() -> tuple[LlavaForConditionalGeneration, Any]:
    """The cached default-model assembly with its untrained projector: training never starts from shipped weights."""
    cache_dir = build_default_model()
    model = LlavaForConditionalGeneration.from_pretrained(cache_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoProcessor.from_pretrained(cache_dir)


# --- the step plan ---------------------------------------------------------------------


def stage_conversations(config: RecipeConfig, stage: StageName, scenes: Sequence[SceneText]) -> list[Conversation]:
    """The stage's conversations in training order: the focus phases' first, if any, then epochs over the
    scenes, each in a seeded order."""
    stage_config = config.stage(stage)
    per_step = stage_config.conversations_per_step
    needed = stage_config.steps * per_step
    conversations: list[Conversation] = []
    if stage == "stage2":
        for number, phase in enumerate(config.stage2.focus):
            conversations += focus_conversations(config, scenes, phase, number, phase.steps * per_step)
    epoch = 0
    while len(conversations) < needed:
        order = np.random.default_rng([SCENE_ORDER_STREAM, config.seed, stage_number(stage), epoch]).permutation(
            len(scenes)).tolist()
        if stage == "stage2" and epoch == 0 and config.stage2.simple_scenes_first:
            order.sort(key=lambda index: scenes[index].num_objects)  # stable: random within each count
        for index in order:
            if stage == "stage1":
                conversations.append(caption_conversation(index, scenes[index].caption))
            else:
                rng = np.random.default_rng([QA_PACKING_STREAM, config.seed, epoch, index])
                pairs = capped_per_type(scenes[index].qa, config.stage2.max_questions_per_type, rng)
                conversations += qa_conversations(index, pairs, rng, config.stage2.max_turns,
                                                  config.stage2.single_question_fraction)
        epoch += 1
    return conversations[:needed]


def capped_per_type(pairs: Sequence[QAPair], cap: int | None, rng: np.random.Generator) -> list[QAPair]:
    """`pairs` with at most `cap` of each question type, drawn at random (None: all, untouched)."""
    if cap is None:
        return list(pairs)
    kept = []
    for kind in QUESTION_TYPES:
        of_kind = [pair for pair in pairs if pair.type == kind]
        kept += [of_kind[index] for index in sorted(rng.permutation(len(of_kind))[:cap])]
    return kept


def focus_conversations(config: RecipeConfig, scenes: Sequence[SceneText], phase: FocusPhase, number: int,
                        needed: int) -> list[Conversation]:
    """`needed` conversations of focus phase `number`: passes over the simple scenes, each asked only the
    phase's types."""
    pairs = {index: [pair for pair in scene.qa if pair.type in phase.question_types]
             for index, scene in enumerate(scenes) if scene.num_objects <= phase.max_objects}
    pairs = {index: scene_pairs for index, scene_pairs in pairs.items() if scene_pairs}
    if not pairs:
        raise RecipeError(f"stage2.focus: no train scene of at most {phase.max_objects} objects has a question of "
                          f"type {', '.join(phase.question_types)}")
    # Phase 0 draws the streams a single-phase recipe drew before phases were a list, so its runs repeat.
    stream = [FOCUS_STREAM, config.seed] + ([number] if number else [])
    conversations: list[Conversation] = []
    epoch = 0
    while len(conversations) < needed:
        for index in np.random.default_rng([*stream, epoch]).permutation(list(pairs)).tolist():
            rng = np.random.default_rng([*stream, epoch, index])
            conversations += qa_conversations(index, pairs[index], rng, config.stage2.max_turns,
                                              config.stage2.single_question_fraction)
        epoch += 1
    return conversations[:needed]


def stage_plan(config: RecipeConfig, stage: StageName, scenes: Sequence[SceneText], processor: Any,
               image_tokens: int) -> list[list[TokenisedConversation]]:
    conversations = [tokenise_conversation(processor, conversation, image_tokens)
                     for conversation in stage_conversations(config, stage, scenes)]
    rng = np.random.default_rng([STEP_ORDER_STREAM, config.seed, stage_number(stage)])
    return plan_steps(conversations, config.stage(stage).conversations_per_step, rng)


# --- the loss ---------------------------------------------------------------------------


def supervised_logits(adapter: ArchitectureAdapter, input_ids: torch.Tensor, labels: torch.Tensor,
                      features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32) at the positions that predict a label, and those labels: only there is the LM
    head applied, since the other 49k-way logits would be thrown away."""
    embeddings = embeddings_from_features(adapter, input_ids, features)
    hidden = adapter.language_model(inputs_embeds=embeddings, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t + 1
    supervised = targets != IGNORE_INDEX
    return adapter.lm_head(hidden[:, :-1][supervised]).float(), targets[supervised]


class CachedFeatureLoss(nn.Module):
    """Summed cross entropy of the supervised tokens of a micro-batch over cached vision features; the loop
    divides it by the step's supervised-token count, so every label token weighs the same in a step."""

    def __init__(self, adapter: ArchitectureAdapter, features: torch.Tensor):
        super().__init__()
        self.model, self.adapter = adapter.model, adapter  # `model` registered so accelerate sees the weights
        self.register_buffer("features", features, persistent=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, scenes: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits, targets = supervised_logits(self.adapter, input_ids, labels, self.features[scenes].float(),
                                            attention_mask)
        return nn.functional.cross_entropy(logits, targets, reduction="sum")


# --- metrics and outputs -------------------------------------------------------------------


def stage_metrics(record: TrainingRecord, plan: Sequence[Sequence[TokenisedConversation]],
                  config: RecipeConfig, stage: StageName) -> dict[str, Any]:
    conversations = [conversation for step in plan for conversation in step]
    return {"conversations": len(conversations),
            "answers": sum(conversation.num_answers for conversation in conversations),
            "supervised_tokens": sum(map(supervised_count, conversations)),
            "tokens": sum(conversation.length for conversation in conversations),
            "learning_rate": config.stage(stage).learning_rate, **loss_summary(record)}


def run_metrics(config: RecipeConfig, stages: dict[str, dict[str, Any]], feature_seconds: float,
                device: torch.device, precision: ResolvedPrecision) -> dict[str, Any]:
    return {"recipe_seed": config.seed, "train_scenes": config.train_scenes,
            "precision": {"requested": config.precision, "resolved": precision},
            "feature_seconds": round(feature_seconds, 1),
            "total_seconds": round(feature_seconds + sum(stage["seconds"] for stage in stages.values()), 1),
            "stages": stages, "hardware": hardware(device), "versions": versions()}


# --- the run -------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


BaseModelLoader = Callable[[], tuple[LlavaForConditionalGeneration, Any]]


def train_default_model(config: RecipeConfig, run_dir: Path = DEFAULT_RUN_DIR, resume: bool = True,
                        base_model_loader: BaseModelLoader = load_base_model) -> TrainingResult:
    """Run (or continue) the recipe in `run_dir`, holding its writer lock; a finished run is returned as it is."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    with open_run(run_dir, {"recipe.yaml": recipe_yaml(config)}, resume, outputs=OUTPUTS) as resumed:
        if resumed and metrics_path.is_file():
            finished = {stage: finished_record(run_dir, stage) for stage in STAGES}
            if all(finished.values()):
                return TrainingResult(run_dir, finished, json.loads(metrics_path.read_text()))
        return run_stages(config, run_dir, base_model_loader)


def run_stages(config: RecipeConfig, run_dir: Path, base_model_loader: BaseModelLoader) -> TrainingResult:
    """Both stages in the open run folder `run_dir`, each from its last checkpoint; then the outputs."""
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    seed_everything(config.seed)
    device = torch.device(default_device())
    precision = resolve_precision(config.precision, device)
    model, processor = base_model_loader()
    # A fresh first projector linear for other vision layers, seeded by the recipe.
    apply_visual_input(model, processor, VisualInput(config.vision_feature_layer, config.image_size))
    model.to(device).eval()
    adapter = adapter_for(model)
    cached = prepare_features(adapter, processor, config.train_scenes, config.feature_batch_size, run_dir, device)
    model.train()  # for LoRA dropout; the LLM itself has none
    scale = FeatureScale.of(cached.features) if config.standardise_features else None
    features = scale.standardise(cached.features) if scale else cached.features
    loss = CachedFeatureLoss(adapter, features.to(device))
    pad = processor.tokenizer.pad_token_id
    records: dict[str, TrainingRecord] = {}
    stage_metrics_by_name: dict[str, dict[str, Any]] = {}
    peft_model = None
    model.requires_grad_(False)
    adapter.projector.requires_grad_(True)
    for stage in STAGES:
        if stage == "stage2":
            peft_model = add_lora(adapter, config.stage2.lora, seed_from(LORA_INIT_STREAM, config.seed))
        settings = config.stage(stage)
        conversations = stage_plan(config, stage, cached.scenes, processor, cached.features.shape[1])
        plan: list[Step] = [micro_batches(step, settings.micro_batch_size, pad, per_token=True)
                            for step in conversations]
        records[stage] = train(loss, trainable_parameters(model), plan, config.optimisation(stage, precision), run_dir,
                               stage=stage, seed_entropy=(STEP_SEED_STREAM, config.seed, stage_number(stage)),
                               description=f"{stage} ({STAGE_TITLES[stage]})")
        stage_metrics_by_name[stage] = stage_metrics(records[stage], conversations, config, stage)
    metrics = run_metrics(config, stage_metrics_by_name, cached.seconds, device, precision)
    if scale:
        scale.fold_into(adapter.projector.linear_1)
    save_projector_and_lora(run_dir, adapter, peft_model, processor)
    write_json_atomically(run_dir / "metrics.json", metrics)
    return TrainingResult(run_dir, records, metrics)
