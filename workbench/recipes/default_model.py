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
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import peft
import torch
import transformers
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration

from workbench.data.probe_scenes import QAPair, iter_split, scene_seed
from workbench.errors import WorkbenchError
from workbench.models.adapter import ArchitectureAdapter, adapter_for
from workbench.models.default_model import (
    DEFAULT_WEIGHTS_DIR,
    DefaultModelInfo,
    build_default_model,
    load_default_model,
)
from workbench.recipes.sequences import (
    IGNORE_INDEX,
    Conversation,
    TokenisedConversation,
    caption_conversation,
    qa_conversations,
    tokenise_conversation,
)

DEFAULT_RECIPE = Path(__file__).with_suffix(".yaml")
DEFAULT_RUN_DIR = Path("runs/train-default")
TRAIN_SPLIT = "train"
PROJECTOR_PREFIX = "multi_modal_projector."  # the key format `load_default_model` expects
# Conversations are sorted by length within windows of this many steps, so a micro-batch pads little,
# while the order across windows stays random.
BUCKET_STEPS = 16
ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
LOSS_CURVE_POINTS = 20
INSTALLED_FILES = ("projector.safetensors", "lora/adapter_model.safetensors", "lora/adapter_config.json",
                   "recipe.yaml", "metrics.json")
StageName = Literal["stage1", "stage2"]
STAGE_TITLES = {"stage1": "projector on captions", "stage2": "projector + LoRA on questions"}
# Each use of randomness draws from its own seeded stream, tagged by its first entropy word.
SCENE_ORDER_STREAM, QA_PACKING_STREAM, STEP_ORDER_STREAM, STEP_SEED_STREAM, LORA_INIT_STREAM = range(5)


class RecipeError(WorkbenchError):
    """A recipe or run folder that cannot be used as it is."""


# --- the recipe ----------------------------------------------------------------------


class StageConfig(BaseModel):
    """One stage's optimisation: AdamW, linear warmup, then cosine decay to a fraction of the peak."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(gt=0)
    conversations_per_step: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    final_learning_rate_ratio: float = Field(ge=0, le=1)
    weight_decay: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)  # module names inside the LLM's decoder layers


class QAStageConfig(StageConfig):
    max_turns: int = Field(gt=0)
    single_question_fraction: float = Field(ge=0, le=1)
    lora: LoraSettings


class RecipeConfig(BaseModel):
    """Everything that determines a run; a run folder keeps the one it was started with."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    train_scenes: int = Field(gt=0)
    precision: Literal["bf16", "fp32"]
    threads: PositiveInt | None  # None: one per CPU core
    feature_batch_size: int = Field(gt=0)
    checkpoint_every: int = Field(gt=0)
    stage1: StageConfig
    stage2: QAStageConfig

    def stage(self, name: StageName) -> StageConfig:
        return getattr(self, name)


def parse_recipe(data: Any, source: str) -> RecipeConfig:
    """Validate a recipe mapping; the first problem becomes a one-line `RecipeError`."""
    try:
        return RecipeConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
        raise RecipeError(f"recipe {source}: {where}: {first['msg']}{more}") from None


def load_recipe(path: Path = DEFAULT_RECIPE) -> RecipeConfig:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise RecipeError(f"cannot read recipe {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    return parse_recipe(data, str(path))


def smoke_recipe(config: RecipeConfig) -> RecipeConfig:
    """The same recipe cut to 4 steps per stage on 8 scenes: checks the wiring and times real steps."""
    short = {"steps": 4, "warmup_steps": 1}
    return config.model_copy(update={
        "train_scenes": 8, "checkpoint_every": 2,
        "stage1": config.stage1.model_copy(update=short), "stage2": config.stage2.model_copy(update=short),
    })


def recipe_yaml(config: RecipeConfig) -> str:
    return yaml.safe_dump(config.model_dump(), sort_keys=False)


# --- run folder and state ------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def features(self) -> Path:
        return self.root / "features.safetensors"

    @property
    def scenes(self) -> Path:
        return self.root / "scenes.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def checkpoint_state(self) -> Path:
        return self.checkpoint / "state.json"

    @property
    def projector(self) -> Path:
        return self.root / "projector.safetensors"

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"


@dataclass
class StageRecord:
    """What a stage has done so far: kept in checkpoints, summarised in metrics.json."""

    losses: list[float] = field(default_factory=list)
    conversations: int = 0
    answers: int = 0
    supervised_tokens: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class RunState:
    """Where a run is: `step` steps of `stage` are done (stage 2, step 0 right after stage 1)."""

    stage: StageName = "stage1"
    step: int = 0
    finished: bool = False
    feature_seconds: float = 0.0
    records: dict[str, StageRecord] = field(default_factory=lambda: {"stage1": StageRecord(),
                                                                     "stage2": StageRecord()})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        records = {name: StageRecord(**record) for name, record in data["records"].items()}
        return cls(data["stage"], data["step"], data["finished"], data["feature_seconds"], records)


@dataclass
class Checkpoint:
    stage: StageName  # the stage its tensors belong to (the run state moves on as training continues)
    state: RunState
    tensors: dict[str, torch.Tensor]  # "param/NAME" and "adam/KEY/NAME"


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def stage_number(stage: StageName) -> int:
    return int(stage[-1])


def seed_from(*entropy: int) -> int:
    return int(np.random.default_rng(list(entropy)).integers(2**62))


def step_seed(seed: int, stage: StageName, step: int) -> int:
    """The torch seed of one step: randomness inside a step (LoRA dropout) does not depend on resuming."""
    return seed_from(STEP_SEED_STREAM, seed, stage_number(stage), step)


def save_checkpoint(paths: RunPaths, config: RecipeConfig, state: RunState, parameters: dict[str, nn.Parameter],
                    optimizer: torch.optim.Optimizer | None) -> None:
    """Tensors first under a step-specific name, then the JSON that points at them (the commit point)."""
    paths.checkpoint.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{name}": parameter.detach().contiguous() for name, parameter in parameters.items()}
    if optimizer is not None:
        tensors |= optimizer_tensors(optimizer, list(parameters))
    tensor_file = f"{state.stage}-step{state.step:06d}.safetensors"
    # Written aside and renamed: the final save rewrites the file the current JSON points at.
    partial = paths.checkpoint / f"{tensor_file}.partial"
    save_file({name: tensor.cpu() for name, tensor in tensors.items()}, partial)
    os.replace(partial, paths.checkpoint / tensor_file)
    write_json_atomically(paths.checkpoint_state, {
        "tensors": tensor_file,
        "recipe": config.model_dump(),
        # Steps reseed torch (`step_seed`) and the step plan derives from the seed, so this is all the
        # randomness a resumed run needs.
        "rng": {"seed": config.seed, "next_step_torch_seed": step_seed(config.seed, state.stage, state.step)},
        "state": asdict(state),
    })
    for stale in paths.checkpoint.glob("*.safetensors"):
        if stale.name != tensor_file:
            stale.unlink()


def load_checkpoint(paths: RunPaths) -> Checkpoint | None:
    if not paths.checkpoint_state.is_file():
        return None
    saved = json.loads(paths.checkpoint_state.read_text())
    state = RunState.from_dict(saved["state"])
    return Checkpoint(state.stage, state, load_file(paths.checkpoint / saved["tensors"]))


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat named tensors (the optimizer has one group, in `names` order)."""
    state = optimizer.state_dict()["state"]
    return {f"adam/{key}/{name}": state[index][key].contiguous()
            for index, name in enumerate(names) if index in state for key in ADAM_STATE_KEYS}


def restore(checkpoint: Checkpoint, parameters: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint's weights, and its AdamW state where it has one, into this stage's parameters."""
    names = list(parameters)
    for key, tensor in checkpoint.tensors.items():
        kind, _, name = key.partition("/")
        if kind == "param":
            if name not in parameters:
                raise RecipeError(f"the checkpoint has weights for {name}, which this recipe does not train")
            with torch.no_grad():
                parameters[name].copy_(tensor)
    state = {index: {key: checkpoint.tensors[f"adam/{key}/{name}"] for key in ADAM_STATE_KEYS}
             for index, name in enumerate(names) if f"adam/step/{name}" in checkpoint.tensors}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def start_or_resume(paths: RunPaths, config: RecipeConfig, resume: bool) -> Checkpoint | None:
    """The checkpoint to continue from, or None after clearing what a previous run left (features stay)."""
    if resume and paths.checkpoint_state.is_file():
        saved = json.loads(paths.checkpoint_state.read_text())["recipe"]
        if saved != config.model_dump():
            raise RecipeError(f"{paths.root} holds a run of a different recipe; pass --no-resume to start over "
                              "or choose another --out")
        return load_checkpoint(paths)
    shutil.rmtree(paths.checkpoint, ignore_errors=True)
    shutil.rmtree(paths.lora, ignore_errors=True)
    for output in (paths.projector, paths.metrics):
        output.unlink(missing_ok=True)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.recipe.write_text(recipe_yaml(config))
    return None


# --- model and cached vision features -------------------------------------------------


def load_base_model() -> tuple[LlavaForConditionalGeneration, Any]:
    """The cached default-model assembly with its untrained projector: training never starts from shipped weights."""
    cache_dir = build_default_model()
    model = LlavaForConditionalGeneration.from_pretrained(cache_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoProcessor.from_pretrained(cache_dir)


def projector_inputs(adapter: ArchitectureAdapter, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the projector consumes for these images, captured at its input inside `get_image_features`."""
    captured: list[torch.Tensor] = []
    hook = adapter.projector.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    config = adapter.model.config
    try:
        with torch.no_grad():
            adapter.model.get_image_features(pixel_values=pixel_values,
                                             vision_feature_layer=config.vision_feature_layer,
                                             vision_feature_select_strategy=config.vision_feature_select_strategy)
    finally:
        hook.remove()
    return captured[0]


def vision_fingerprint(adapter: ArchitectureAdapter) -> str:
    """Identifies the frozen vision tower and feature selection, so a cache from another model is not reused."""
    digest = hashlib.sha256()
    config = adapter.model.config
    digest.update(f"{config.vision_feature_layer}/{config.vision_feature_select_strategy}".encode())
    for name, tensor in adapter.vision_tower.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class SceneText:
    """What a cached scene is trained on; its pixels live on only as cached features."""

    seed: int
    caption: str
    qa: list[QAPair]


def feature_metadata(config: RecipeConfig, fingerprint: str) -> dict[str, str]:
    return {"split": TRAIN_SPLIT, "first_seed": str(scene_seed(TRAIN_SPLIT, 0)), "scenes": str(config.train_scenes),
            "vision": fingerprint}


def read_cached_features(paths: RunPaths, metadata: dict[str, str]) -> tuple[list[SceneText], torch.Tensor] | None:
    if not (paths.features.is_file() and paths.scenes.is_file()):
        return None
    with safe_open(paths.features, framework="pt") as cache:
        if cache.metadata() != metadata:
            return None
        features = cache.get_tensor("features")
    scenes = [SceneText(record["seed"], record["caption"], [QAPair(**pair) for pair in record["qa"]])
              for record in map(json.loads, paths.scenes.read_text().splitlines())]
    return scenes, features


def extract_features(adapter: ArchitectureAdapter, processor: Any, config: RecipeConfig, paths: RunPaths,
                     metadata: dict[str, str], device: torch.device) -> None:
    """Render the run's scenes, run the vision tower once over them and cache its output (float16) with the texts."""
    scenes = iter_split(TRAIN_SPLIT, config.train_scenes)
    chunks: list[torch.Tensor] = []
    texts: list[str] = []
    with tqdm(total=config.train_scenes, desc="vision features", unit="scene") as progress:
        while len(texts) < config.train_scenes:
            batch = [next(scenes) for _ in range(min(config.feature_batch_size, config.train_scenes - len(texts)))]
            pixel_values = processor.image_processor([scene.image for scene in batch], return_tensors="pt")
            chunks.append(projector_inputs(adapter, pixel_values["pixel_values"].to(device)).half().cpu())
            texts += [json.dumps({"seed": scene.seed, "caption": scene.caption,
                                  "qa": [asdict(pair) for pair in scene.qa]}) for scene in batch]
            progress.update(len(batch))
    paths.scenes.write_text("\n".join(texts) + "\n")
    save_file({"features": torch.cat(chunks)}, paths.features, metadata=metadata)


def prepare_features(adapter: ArchitectureAdapter, processor: Any, config: RecipeConfig, paths: RunPaths,
                     device: torch.device) -> tuple[list[SceneText], torch.Tensor, float]:
    """Cached scene texts and features (computed first if the cache is missing or stale), and seconds spent."""
    started = time.perf_counter()
    metadata = feature_metadata(config, vision_fingerprint(adapter))
    cached = read_cached_features(paths, metadata)
    if cached is None:
        extract_features(adapter, processor, config, paths, metadata, device)
        cached = read_cached_features(paths, metadata)  # train on what the cache holds, resumed or not
    scenes, features = cached
    return scenes, features, time.perf_counter() - started


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


def learning_rate(config: StageConfig, step: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `final_learning_rate_ratio` of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    ratio = config.final_learning_rate_ratio
    return config.learning_rate * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(run: StageRun, step: int, conversations: Sequence[TokenisedConversation]) -> float:
    """One optimizer step over `conversations` in length-sorted micro-batches; the mean loss per label token."""
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.config, step)
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


def training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    device = training_device()
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
        shutil.copyfile(run_dir / name, target)
        installed.append(target)
    return installed


def verify_installation(weights_dir: Path = DEFAULT_WEIGHTS_DIR) -> DefaultModelInfo:
    """Load the default model with the installed weights; fail unless both the projector and LoRA apply."""
    _, _, info = load_default_model(weights_dir=Path(weights_dir))
    if not (info.projector_trained and info.lora_loaded):
        raise RecipeError(f"the default model did not pick up the weights in {weights_dir}")
    return info


