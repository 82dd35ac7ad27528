"""How every training recipe optimises: AdamW with its learning-rate schedule, precision, checkpoints, seed."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from workbench.training.precision import Precision


class AdamWSchedule(BaseModel):
    """AdamW with linear warmup over `warmup_steps`, then cosine decay to `final_learning_rate_ratio` of the peak."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    final_learning_rate_ratio: float = Field(ge=0, le=1)
    weight_decay: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)

    def learning_rate_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        ratio = self.final_learning_rate_ratio
        return self.learning_rate * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Optimisation(AdamWSchedule):
    """The learning-rate schedule, precision, checkpoint interval and seed of one run of the loop."""

    precision: Precision = "auto"  # see `workbench.training.precision`
    checkpoint_every: int = Field(gt=0)
    seed: int = 0
