"""The training loop every efficient model uses: accelerate, gradient accumulation, safetensors checkpoints.

A method supplies a `nn.Module` whose forward takes one micro-batch (a dict of tensors) and returns
the loss, the parameters to train, and a step plan: a list of steps, each a list of micro-batches,
built deterministically from the seed. `train` runs the plan with Hugging Face accelerate, so the
same command runs on one CPU, one GPU, or several GPUs under `accelerate launch` (each process takes
every world-size-th micro-batch of a step).

Runs are seeded and resumable: a checkpoint holds the trainable weights and the AdamW state
(safetensors, no pickle), the step reached and the losses so far, with the method's config and the
recipe saved beside it; every step reseeds torch from (seed, step), so a resumed run ends with the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from workbench.errors import InputError
from workbench.recipes.checkpoints import ADAM_STATE_KEYS, optimizer_tensors, write_json_atomically
from workbench.recipes.config import AdamWSchedule

MicroBatch = Mapping[str, torch.Tensor]
STEP_SEED_STREAM = 7  # entropy tag of the per-step torch seeds (distinct from the default recipe's streams)


class Optimisation(AdamWSchedule):
    """The learning-rate schedule, precision, checkpoint interval and seed of a run."""

    precision: Literal["bf16", "fp32"] = "bf16"
    checkpoint_every: int = Field(gt=0)
    seed: int = 0


@dataclass
class TrainingRecord:
    """What a run has done so far: kept in checkpoints, summarised in metrics.json."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    finished: bool = False


@dataclass(frozen=True)
class RunFiles:
    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def state(self) -> Path:
        return self.checkpoint / "state.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"


def step_seed(seed: int, step: int) -> int:
    return int(np.random.default_rng([STEP_SEED_STREAM, seed, step]).integers(2**62))


def save_checkpoint(files: RunFiles, record: TrainingRecord, parameters: dict[str, nn.Parameter],
                    optimizer: torch.optim.Optimizer) -> None:
    """Tensors under a step-specific name, then the JSON that points at them (the commit point)."""
    files.checkpoint.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{name}": parameter.detach().cpu().contiguous() for name, parameter in parameters.items()}
    tensors |= {key: value.cpu() for key, value in optimizer_tensors(optimizer, list(parameters)).items()}
    tensor_file = f"step{record.step:06d}.safetensors"
    partial = files.checkpoint / f"{tensor_file}.partial"
    save_file(tensors, partial)
    os.replace(partial, files.checkpoint / tensor_file)
    write_json_atomically(files.state, {"tensors": tensor_file, "record": asdict(record)})
    for stale in files.checkpoint.glob("*.safetensors"):
        if stale.name != tensor_file:
            stale.unlink()


def restore_checkpoint(files: RunFiles, parameters: dict[str, nn.Parameter],
                       optimizer: torch.optim.Optimizer) -> TrainingRecord:
    saved = json.loads(files.state.read_text())
    tensors = load_file(files.checkpoint / saved["tensors"])
    names = list(parameters)
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(tensors[f"param/{name}"])
    state = {index: {key: tensors[f"adam/{key}/{name}"] for key in ADAM_STATE_KEYS}
             for index, name in enumerate(names) if f"adam/step/{name}" in tensors}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return TrainingRecord(**saved["record"])


def start_or_resume(files: RunFiles, saved_beside: Mapping[str, str], resume: bool) -> bool:
    """True when the run folder holds a checkpoint of the same config and recipe to continue from."""
    if resume and files.state.is_file():
        for name, text in saved_beside.items():
            if (files.root / name).read_text() != text:
                raise InputError(f"{files.root} holds a run with a different {name}; pass --no-resume to start "
                                 "over or choose another --out")
        return True
    shutil.rmtree(files.checkpoint, ignore_errors=True)
    files.metrics.unlink(missing_ok=True)
    files.root.mkdir(parents=True, exist_ok=True)
    for name, text in saved_beside.items():
        (files.root / name).write_text(text)
    return False


def yaml_text(model: BaseModel, header: str) -> str:
    return f"# {header}\n" + yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)


@dataclass
class TrainingResult:
    record: TrainingRecord
    resumed_at: int

    @property
    def median_step_seconds(self) -> float:
        return float(np.median(self.record.seconds)) if self.record.seconds else float("nan")


def train(module: nn.Module, parameters: dict[str, nn.Parameter], plan: Sequence[Sequence[MicroBatch]],
          optimisation: Optimisation, run_dir: Path, saved_beside: Mapping[str, str], resume: bool = True,
          description: str = "training", on_finish: Callable[[TrainingRecord], None] | None = None) -> TrainingResult:
    """Run `plan` (steps of micro-batches) on `module`, whose forward(**micro_batch) returns the loss.

    `saved_beside` maps file names in `run_dir` (the method's config, the recipe) to their text; a
    resumed run must have the same. `on_finish` writes the method's outputs once the last step is done.
    """
    files = RunFiles(Path(run_dir))
    # Accelerate keeps one process-wide state, whose precision cannot change once set: runs of different
    # precision in one process (tests, notebooks) would clash, so autocast is applied here instead.
    accelerator = Accelerator()
    autocast_bf16 = optimisation.precision == "bf16"
    optimizer = torch.optim.AdamW(list(parameters.values()), lr=optimisation.learning_rate,
                                  weight_decay=optimisation.weight_decay)
    record = TrainingRecord()
    if start_or_resume(files, saved_beside, resume):
        record = restore_checkpoint(files, parameters, optimizer)
    resumed_at = record.step
    if record.finished:
        return TrainingResult(record, resumed_at)
    module, optimizer = accelerator.prepare(module, optimizer)
    module.train()
    with tqdm(total=len(plan), initial=record.step, desc=description, unit="step",
              disable=not accelerator.is_main_process) as progress:
        for step in range(record.step, len(plan)):
            torch.manual_seed(step_seed(optimisation.seed, step))
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = optimisation.learning_rate_at(step)
            mine = list(plan[step])[accelerator.process_index::accelerator.num_processes]
            loss_sum = 0.0
            for micro_batch in mine:
                # Each micro-batch's mean loss counts equally; gradients sum over the step, then average.
                with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                    loss = module(**{name: tensor.to(accelerator.device) for name, tensor in micro_batch.items()})
                accelerator.backward(loss / len(mine))
                loss_sum += loss.item() / len(mine)
            accelerator.clip_grad_norm_(list(parameters.values()), optimisation.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record.losses.append(float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device),
                                                          reduction="mean")))
            record.seconds.append(time.perf_counter() - started)
            record.step = step + 1
            # The last step is saved once, after the outputs, as the finished run.
            if accelerator.is_main_process and record.step % optimisation.checkpoint_every == 0 \
                    and record.step < len(plan):
                save_checkpoint(files, record, parameters, optimizer)
            progress.set_postfix(loss=f"{np.mean(record.losses[-10:]):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
            progress.update()
    record.finished = True
    if accelerator.is_main_process:
        if on_finish is not None:
            on_finish(record)
        save_checkpoint(files, record, parameters, optimizer)
    accelerator.wait_for_everyone()
    return TrainingResult(record, resumed_at)
