"""The configs of the three runs: `reasoner` (SFT on verbose solutions, the starting point),
`onpolicy-sft` (fine-tuning on the model's own correct samples that finish within the length budget) and
`grpo-length` (the RL baseline on the same prompts, samples and steps).

Both name the task (seed and events per problem, so the splits are fixed) and the loop's optimisation;
`model` is where the weights start: "default" (SmolLM2-135M-Instruct, packaged), a Hugging Face model
folder, or a `wb train reasoner` run folder.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workbench.configs import MethodConfig
from workbench.training.optimisation import Optimisation


class ReasoningTask(BaseModel):
    """Which arithmetic word problems: the seed fixes the stream and the train/test split."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    min_events: int = Field(default=2, ge=1, le=4)
    max_events: int = Field(default=3, ge=1, le=4)

    @model_validator(mode="after")
    def _events(self):
        if self.min_events > self.max_events:
            raise ValueError(f"min_events {self.min_events} is above max_events {self.max_events}")
        return self


class ReasonerConfig(MethodConfig):
    """SFT on `train_problems` verbose worked solutions, `rows_per_step` of them per step."""

    method: Literal["reasoner"] = "reasoner"
    task: ReasoningTask = ReasoningTask()
    train_problems: int = Field(gt=0)
    rows_per_step: int = Field(gt=0)
    rows_per_micro_batch: int = Field(gt=0)
    optimisation: Optimisation


class OnPolicySFTConfig(MethodConfig):
    """Per step: `samples_per_prompt` samples of each of `prompts_per_step` train prompts at `temperature`,
    at most `max_new_tokens` each; kept when correct and finished within the step's budget, which moves
    linearly from `budget_start` to `budget_end` (None: constant) over the run, and, with `keep_shortest`, only
    the prompt's that many shortest of those (a budget that follows the model's own lengths)."""

    method: Literal["onpolicy-sft"] = "onpolicy-sft"
    task: ReasoningTask = ReasoningTask()
    prompts_per_step: int = Field(gt=0)
    samples_per_prompt: int = Field(gt=0)
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(gt=0)
    budget_start: int = Field(gt=0)
    budget_end: int | None = Field(default=None, gt=0)
    keep_shortest: int | None = Field(default=None, gt=0)
    prompts_per_generate: int | None = Field(default=None, gt=0)  # None: all prompts in one generate call
    rows_per_micro_batch: int = Field(gt=0)
    optimisation: Optimisation

    @model_validator(mode="after")
    def _budgets(self):
        if self.budget_start > self.max_new_tokens:
            raise ValueError(f"budget_start {self.budget_start} is above max_new_tokens {self.max_new_tokens}: "
                             "no sample could use it")
        if self.budget_end is not None and self.budget_end > self.budget_start:
            raise ValueError(f"budget_end {self.budget_end} is above budget_start {self.budget_start}: the "
                             "budget only shrinks")
        return self


class GRPOLengthConfig(OnPolicySFTConfig):
    """The RL baseline on the same prompts, samples and steps: TRL's GRPO with reward
    1[correct and finished] - `length_weight` x (share of the step's budget used; all of it when truncated),
    group-normalised advantages and a KL penalty `kl_beta` to the starting model. The step's
    `prompts_per_step x samples_per_prompt` rows are trained `rows_per_micro_batch` at a time. TRL generates a
    step's rows at once and keeps no checkpoints; every sample gets a reward: `prompts_per_generate`,
    `checkpoint_every` and `keep_shortest` do not apply."""

    method: Literal["grpo-length"] = "grpo-length"
    length_weight: float = Field(default=0.5, ge=0)
    kl_beta: float = Field(default=0.04, ge=0)

    @model_validator(mode="after")
    def _micro_batches(self):
        rows = self.prompts_per_step * self.samples_per_prompt
        if rows % self.rows_per_micro_batch:
            raise ValueError(f"rows_per_micro_batch {self.rows_per_micro_batch} must divide the step's {rows} rows")
        return self
