"""The SkipGPT config: the target sparsity and how the routers and their training are shaped."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workbench.configs import MethodConfig


class SkipGPTConfig(MethodConfig):
    """Per-token routers that skip attention and MLP modules of a Llama-family causal LM.

    `sparsity`: the share of (module, real token) pairs to skip, over every layer, attention and MLP alike;
    `sparsity_weight` multiplies |(1 - sparsity) - mean run gate|; the Gumbel temperature falls linearly from
    `temperature_start` to `temperature_end` over the router stage, and the scale of its noise from `noise_start`
    to `noise_end` (1 to 0: the routers end on the argmax routing evaluation uses; 1 to 1 is the reference);
    each router's hidden width is d / `router_reduction`.
    """

    method: Literal["skipgpt"] = "skipgpt"
    sparsity: float = Field(0.25, ge=0, lt=1)
    sparsity_weight: float = Field(20.0, ge=0)
    temperature_start: float = Field(5.0, gt=0)
    temperature_end: float = Field(1.0, gt=0)
    noise_start: float = Field(1.0, ge=0)
    noise_end: float = Field(0.0, ge=0)
    router_reduction: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _cooling(self):
        if self.temperature_end > self.temperature_start:
            raise ValueError(f"temperature_end {self.temperature_end} is above temperature_start "
                             f"{self.temperature_start}: the temperature falls")
        return self
