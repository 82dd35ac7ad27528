"""`wb train onpolicy-sft`: fine-tuning on the model's own correct samples that finish within the budget.

Each step: sample `samples_per_prompt` responses to each of the step's `prompts_per_step` train prompts
with the current weights (T=1, KV cache); keep those that are correct and finished within the step's
budget (`filtering`); train with token-mean cross-entropy on the kept responses. No reference model, KL,
critic or advantage. The steps are built on demand by `OnPolicySteps`, which the repo's training loop
indexes once per step after seeding torch for that step, so sampling is seeded and a resumed run samples
from the restored weights. Every step's filter counts, budget and lengths go to `steps.jsonl`.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from efficient_models.onpolicy_sft.config import OnPolicySFTConfig
from efficient_models.onpolicy_sft.filtering import filter_samples
from efficient_models.onpolicy_sft.grader import is_correct
from efficient_models.onpolicy_sft.loss import ResponseLoss, token_mean_micro_batches
from efficient_models.onpolicy_sft.models import RUN_MODEL, save_causal_lm
from efficient_models.onpolicy_sft.sampling import BudgetSchedule, encode_prompt, sample_responses
from efficient_models.onpolicy_sft.task import problems
from efficient_models.registry import RUN_CONFIG
from workbench.configs import yaml_text
from workbench.files import write_json_atomically, write_text_atomically
from workbench.training.loop import MicroBatch, TrainingRecord, TrainingResult, open_run, train
from workbench.training.metrics import hardware, loss_summary

STEP_STREAM = 1803
STEP_LOG = "steps.jsonl"
OUTPUTS = (RUN_MODEL, "metrics.json", STEP_LOG)


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory so far: the accelerator's allocations, or on CPU the process's resident peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class OnPolicySteps(Sequence[list[MicroBatch]]):
    """The training loop's plan, built one step at a time from fresh samples of `model`."""

    def __init__(self, config: OnPolicySFTConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 run_dir: Path, grade: Callable[[str, str], bool] = is_correct):
        self.config, self.model, self.tokenizer, self.run_dir, self.grade = config, model, tokenizer, run_dir, grade
        self.steps = config.optimisation.steps
        task = config.task
        self.problems = problems("train", self.steps * config.prompts_per_step, task.seed, task.min_events,
                                 task.max_events)
        self.budget = BudgetSchedule(config.budget_start, config.budget_end, self.steps)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> list[MicroBatch]:
        if not 0 <= step < self.steps:
            raise IndexError(step)
        config, started = self.config, time.perf_counter()
        chosen = self.problems[step * config.prompts_per_step:(step + 1) * config.prompts_per_step]
        prompt_ids = [encode_prompt(self.tokenizer, problem.prompt) for problem in chosen]
        samples = sample_responses(self.model, self.tokenizer, prompt_ids, config.samples_per_prompt,
                                   config.max_new_tokens, config.temperature, config.prompts_per_generate)
        budget = self.budget.at(step)
        result = filter_samples(samples, [problem.answer for problem in chosen], budget, self.grade,
                                config.keep_shortest)
        lengths = [sample.num_tokens for sample in samples]
        kept_lengths = [sample.num_tokens for sample in result.kept]
        self._log({"step": step, "budget": budget, **result.counts.as_dict(),
                   "mean_sample_tokens": round(float(np.mean(lengths)), 2),
                   "mean_kept_tokens": round(float(np.mean(kept_lengths)), 2) if kept_lengths else None,
                   "sampling_seconds": round(time.perf_counter() - started, 3),
                   "peak_memory_mb": round(peak_memory_mb(next(self.model.parameters()).device), 1)})
        # A step that keeps nothing trains on nothing: the loop then steps AdamW over no gradients.
        return token_mean_micro_batches([prompt_ids[s.prompt_index] for s in result.kept],
                                        [s.response_ids for s in result.kept], self.pad_id,
                                        config.rows_per_micro_batch) if result.kept else []

    def _log(self, entry: dict) -> None:
        """Append the step's entry, dropping any entry of this step or later left by an interrupted run."""
        if not PartialState().is_main_process:  # under `accelerate launch`, every process samples the same step
            return
        earlier = read_step_log(self.run_dir)
        lines = [json.dumps(line) for line in earlier if line["step"] < entry["step"]] + [json.dumps(entry)]
        write_text_atomically(self.run_dir / STEP_LOG, "\n".join(lines) + "\n")


def read_step_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / STEP_LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def summary(log: list[dict]) -> dict:
    """The run's filter counts summed over steps, and the kept length at its first and last logged step."""
    counted = ("samples", "kept", "truncated", "over_budget", "wrong", "not_shortest", "correct",
               "correct_but_truncated", "prompts", "prompts_dropped")
    return {"filter_totals": {name: sum(entry.get(name, 0) for entry in log) for name in counted},
            "budget_first_last": [log[0]["budget"], log[-1]["budget"]] if log else None,
            "mean_sample_tokens_first_last": [log[0]["mean_sample_tokens"], log[-1]["mean_sample_tokens"]]
            if log else None,
            "peak_memory_mb": max((entry["peak_memory_mb"] for entry in log), default=None)}


def train_onpolicy(config: OnPolicySFTConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   run_dir: Path, resume: bool = True, grade: Callable[[str, str], bool] = is_correct
                   ) -> TrainingResult:
    """On-policy SFT of all of `model`'s weights; the run folder gets `model/`, `steps.jsonl` and metrics."""
    run_dir = Path(run_dir)
    description = (f"onpolicy-sft ({config.prompts_per_step} prompts x {config.samples_per_prompt} samples, "
                   f"budget {config.budget_start}->{config.budget_end or config.budget_start})")

    def metrics(record: TrainingRecord) -> dict:
        return {"description": description, "precision": config.optimisation.precision, **loss_summary(record),
                **summary(read_step_log(run_dir)), "hardware": hardware(next(model.parameters()).device)}

    def write_outputs(record: TrainingRecord) -> None:
        save_causal_lm(model, tokenizer, run_dir)
        write_json_atomically(run_dir / "metrics.json", metrics(record))

    with open_run(run_dir, {RUN_CONFIG: yaml_text(config, "the on-policy SFT config")}, resume, OUTPUTS):
        plan = OnPolicySteps(config, model, tokenizer, run_dir, grade)
        record = train(ResponseLoss(model), dict(model.named_parameters()), plan, config.optimisation, run_dir,
                       seed_entropy=(STEP_STREAM, config.optimisation.seed), description=description,
                       on_finish=write_outputs)
    model.eval()
    return TrainingResult(run_dir, {"train": record}, metrics(record))
