"""A training run's folder, its state and its checkpoints (safetensors + JSON, no pickle), and the
seeded random streams that make a resumed run end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.recipes.config import RecipeConfig, RecipeError, StageName, recipe_yaml

ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
# Each use of randomness draws from its own seeded stream, tagged by its first entropy word.
SCENE_ORDER_STREAM, QA_PACKING_STREAM, STEP_ORDER_STREAM, STEP_SEED_STREAM, LORA_INIT_STREAM = range(5)



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
