"""HiDrop's config: late injection at E, pruning stages or the concave pyramid, exit at X."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workbench.configs import LayeredConfig


class Stage(BaseModel):
    """From `start_layer` on, keep this share of an image's visual tokens: a fraction, or a token count."""

    model_config = ConfigDict(extra="forbid")
    start_layer: int
    keep_fraction: float | None = Field(default=None, gt=0, le=1)
    keep_tokens: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_share(self):
        if (self.keep_fraction is None) == (self.keep_tokens is None):
            raise ValueError(f"stage at layer {self.start_layer}: give exactly one of keep_fraction and keep_tokens")
        return self

    def fraction_of(self, num_visual: int | None) -> float:
        if self.keep_fraction is not None:
            return self.keep_fraction
        if num_visual is None:
            raise ValueError(f"stage at layer {self.start_layer} keeps {self.keep_tokens} tokens: "
                             "the image's token count is needed")
        return min(1.0, self.keep_tokens / num_visual)


class HiDropConfig(LayeredConfig):
    """Late injection at `inject_layer`, pruning, all visual tokens dropped at `exit_layer`.

    `schedule: stages` cuts the tokens at the listed stages; `schedule: concave` keeps
    (1 - (l - E) / (X - E)) ** schedule_power of them at every layer l between E and X (no stages).
    """

    method: Literal["hidrop"] = "hidrop"
    inject_layer: int
    exit_layer: int
    schedule: Literal["stages", "concave"] = "stages"
    stages: list[Stage] = []
    schedule_power: float = Field(gt=0)

    @model_validator(mode="after")
    def _layers(self):
        self.check_layer(self.inject_layer, "inject_layer")
        self.check_layer(self.exit_layer, "exit_layer", allow_end=True)
        if self.exit_layer <= self.inject_layer:
            raise ValueError(f"exit_layer {self.exit_layer} must come after inject_layer {self.inject_layer}")
        starts = [stage.start_layer for stage in self.stages]
        if starts != sorted(set(starts)) or not all(self.inject_layer <= s < self.exit_layer for s in starts):
            raise ValueError(f"stage start layers {starts} must increase within [{self.inject_layer}, {self.exit_layer})")
        if (self.schedule == "concave") == bool(self.stages):
            raise ValueError("schedule 'stages' needs a list of stages; schedule 'concave' takes none")
        kinds = {"fraction" if stage.keep_fraction is not None else "tokens" for stage in self.stages}
        if len(kinds) > 1:
            raise ValueError("stages must all give keep_fraction or all give keep_tokens")
        keeps = [stage.keep_fraction or stage.keep_tokens for stage in self.stages]
        if keeps != sorted(keeps, reverse=True):
            raise ValueError(f"stage keeps {keeps} must not increase")
        return self


