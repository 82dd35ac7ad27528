"""The training loop every model uses: accelerate, gradient accumulation, seeded, resumable.

A recipe supplies a `nn.Module` whose forward takes one micro-batch's tensors and returns a loss, the
parameters to train, and a plan: a list of steps, each a list of `MicroBatch`es, built deterministically
from the seed. `train` runs the plan with Hugging Face accelerate, so the same command runs on one CPU,
one GPU, or several GPUs under `accelerate launch` (each process takes every world-size-th micro-batch
of a step). A multi-stage recipe calls `train` once per stage, each stage with its own checkpoint folder.

Runs are resumable to the same weights: a checkpoint holds the trainable weights, the AdamW state and
the losses so far; every step reseeds torch from the recipe's seed stream and the step, so randomness
inside a step does not depend on where the run was resumed. A recipe holds its run folder open with
`open_run`, which takes the folder's writer lock, so a second process on the same folder is refused.
The forward pass runs in the precision `workbench.training.precision` resolves (bf16 autocast or fp32).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from torch import nn
from tqdm.auto import tqdm

from workbench.errors import InputError
from workbench.files import RunFolderLock, write_text_atomically
from workbench.training.checkpoints import STATE_FILE, has_checkpoint, restore_checkpoint, save_checkpoint
from workbench.training.optimisation import Optimisation
from workbench.training.precision import autocast, resolve_precision

CHECKPOINTS = "checkpoint"


@dataclass
class MicroBatch:
    """One forward pass's tensors; its loss is divided by `loss_divisor` before the backward pass.

    Divisors let a recipe weigh micro-batches as it means to: 1 / (micro-batches in the step) for a mean
    of means, or the step's supervised-token count with a summed loss, so every token weighs the same.
    """

    tensors: dict[str, torch.Tensor]
    loss_divisor: float = 1.0


Step = Sequence[MicroBatch]


@dataclass
class TrainingRecord:
    """What one stage has done so far: kept in its checkpoints."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    finished: bool = False
    resumed_at: int = 0  # the step this process started from (0: from the beginning)

    @property
    def median_step_seconds(self) -> float:
        return float(np.median(self.seconds)) if self.seconds else float("nan")


@dataclass
class TrainingResult:
    """A finished (or already finished) run: its folder, each stage's record and the metrics it wrote."""

    run_dir: Path
    stages: dict[str, TrainingRecord]
    metrics: dict


def step_seed(entropy: Sequence[int], step: int) -> int:
    """The torch seed of one step, drawn from the recipe's own seed stream (`entropy`)."""
    return int(np.random.default_rng([*entropy, step]).integers(2**62))


@contextlib.contextmanager
def open_run(run_dir: Path, saved_beside: Mapping[str, str], resume: bool, outputs: Sequence[str] = ()
             ) -> Iterator[bool]:
    """Hold `run_dir`'s writer lock and prepare the folder; yields True when it holds a run of the same
    config and recipe to continue. The lock is released when the `with` block ends, normally or not.

    `saved_beside` maps file names (the method's config, the recipe) to their text: a resumed run must
    have the same. Starting over removes the checkpoints and the named `outputs`, and keeps caches.
    Under `accelerate launch` only the main process takes the lock: the others write the same run.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunFolderLock(run_dir) if PartialState().is_main_process else contextlib.nullcontext():
        yield _prepare_run(run_dir, saved_beside, resume, outputs)


def _prepare_run(run_dir: Path, saved_beside: Mapping[str, str], resume: bool, outputs: Sequence[str]) -> bool:
    """`open_run`'s work on the folder, done while holding its lock."""
    if resume and (run_dir / CHECKPOINTS).is_dir():
        for name, text in saved_beside.items():
            path = run_dir / name
            if not path.is_file() or path.read_text() != text:
                raise InputError(f"{run_dir} holds a run with a different {name}; pass --no-resume to start "
                                 "over or choose another --out")
        return True
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    for name in outputs:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    for name, text in saved_beside.items():
        write_text_atomically(run_dir / name, text)
    return False


def finished_record(run_dir: Path, stage: str = "train") -> TrainingRecord | None:
    """The record of a stage that has finished in `run_dir`, or None."""
    state = Path(run_dir) / CHECKPOINTS / stage / STATE_FILE
    if not state.is_file():
        return None
    record = TrainingRecord(**json.loads(state.read_text())["record"])
    record.resumed_at = record.step
    return record if record.finished else None


def train(module: nn.Module, parameters: dict[str, nn.Parameter], plan: Sequence[Step], optimisation: Optimisation,
          run_dir: Path, stage: str = "train", seed_entropy: Sequence[int] = (), description: str = "training",
          on_finish: Callable[[TrainingRecord], None] | None = None) -> TrainingRecord:
    """Run `plan` on `module` from the stage's last checkpoint in `run_dir` (held open with `open_run`); a
    finished stage only has its weights restored. `on_finish` writes the method's outputs after the last step.

    `seed_entropy`: the recipe's seed stream; each step seeds torch from it and the step index.
    """
    folder = Path(run_dir) / CHECKPOINTS / stage
    # Accelerate keeps one process-wide state, whose precision cannot change once set: runs of different
    # precision in one process (tests, notebooks) would clash, so autocast is applied here instead.
    accelerator = Accelerator()
    precision = resolve_precision(optimisation.precision, accelerator.device)
    optimizer = torch.optim.AdamW(list(parameters.values()), lr=optimisation.learning_rate,
                                  weight_decay=optimisation.weight_decay)
    record = TrainingRecord()
    if has_checkpoint(folder):
        record = TrainingRecord(**restore_checkpoint(folder, parameters, optimizer))
    record.resumed_at = record.step
    if record.finished:
        return record
    module, optimizer = accelerator.prepare(module, optimizer)
    module.train()
    with tqdm(total=len(plan), initial=record.step, desc=description, unit="step",
              disable=not accelerator.is_main_process) as progress:
        for step in range(record.step, len(plan)):
            torch.manual_seed(step_seed(seed_entropy, step))
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = optimisation.learning_rate_at(step)
            mine = list(plan[step])[accelerator.process_index::accelerator.num_processes]
            loss_sum = 0.0
            for micro_batch in mine:
                with autocast(precision, accelerator.device):
                    loss = module(**{name: tensor.to(accelerator.device)
                                     for name, tensor in micro_batch.tensors.items()})
                # Gradients are averaged over processes, so each process's share is scaled back up.
                loss = loss * accelerator.num_processes / micro_batch.loss_divisor
                accelerator.backward(loss)
                loss_sum += loss.item() / accelerator.num_processes
            accelerator.clip_grad_norm_(list(parameters.values()), optimisation.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record.losses.append(float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device),
                                                          reduction="sum")))
            record.seconds.append(time.perf_counter() - started)
            record.step = step + 1
            # The last step is saved once, after the outputs, as the finished stage.
            if accelerator.is_main_process and record.step % optimisation.checkpoint_every == 0 \
                    and record.step < len(plan):
                save_checkpoint(folder, record.step, asdict(record), parameters, optimizer)
            progress.set_postfix(loss=f"{np.mean(record.losses[-10:]):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
            progress.update()
    record.finished = True
    if accelerator.is_main_process:
        if on_finish is not None:
            on_finish(record)
        save_checkpoint(folder, record.step, asdict(record), parameters, optimizer)
    accelerator.wait_for_everyone()
    return record
