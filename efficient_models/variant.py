"""The one interface every bench variant implements, and what a variant is built from.

`wb bench` (`efficient_models.bench`) times and scores variants only through `BenchVariant`: it knows
nothing of schedules, routers or cross-attention. A method that changes layers or attention implements
the same five calls its own way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from workbench.configs import MethodConfig
from workbench.errors import InputError
from workbench.flops import FlopsCount, ModelShapes
from workbench.models.loading import LoadedModel


class Prefilled(Protocol):
    """What a prefill leaves for decoding: the next token of each row, and the bytes its cache holds."""

    token: torch.Tensor  # [batch] long

    @property
    def cache_bytes(self) -> int: ...


class BenchVariant(Protocol):
    name: str
    loaded: LoadedModel  # the model it runs on (its processor tokenises its inputs)

    def describe(self, shapes: ModelShapes) -> str:
        """One line: what this variant changes (e.g. its visual tokens per layer) on a model of these shapes."""

    def generate_text(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int) -> list[str]:
        """Greedy answers to a batch of prompts with pixels, as `LoadedModel.generate_text` gives them."""

    def prefill(self, inputs: Mapping[str, torch.Tensor]) -> Prefilled:
        """What generation does before its first decode step: pixels to the first answer token, filling the cache."""

    def decode(self, prefilled: Prefilled, steps: int) -> None:
        """`steps` greedy steps after `prefill`, never stopping early (every variant decodes the same count)."""

    def training_loss(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy of the supervised tokens (`labels` != IGNORE_INDEX), differentiable."""

    def flops(self, shapes: ModelShapes, text_tokens: int, answer_tokens: int = 1, decode_steps: int = 1) -> FlopsCount:
        """Counted FLOPs of one prompt with one image and `text_tokens` text tokens, split by part."""


def require(variant: str, needs: str | None, method: str | None, configs: Mapping[str, MethodConfig],
            runs: Mapping[str, Path]) -> None:
    """Refuse, in one line, a variant whose config or trained run was not given."""
    if needs == "config" and method not in configs:
        raise InputError(f"variant {variant} needs a {method} config: pass --config FILE.yaml or --run RUN_DIR")
    if needs == "run" and method not in runs:
        raise InputError(f"variant {variant} needs a finished `wb train {method}` run: pass --run RUN_DIR")


@dataclass
class VariantRequest:
    """What a variant is built from: the shared model, and the configs and trained runs the user named."""

    name: str  # the variant to build
    loaded: LoadedModel  # shared by every variant that does not change weights
    load_fresh: Callable[[], LoadedModel]  # a separate copy, for a variant that changes weights in place
    configs: dict[str, MethodConfig] = field(default_factory=dict)  # by method
    runs: dict[str, Path] = field(default_factory=dict)  # by method

    def config(self, method: str) -> MethodConfig:
        require(self.name, "config", method, self.configs, self.runs)
        return self.configs[method]

    def run(self, method: str) -> Path:
        require(self.name, "run", method, self.configs, self.runs)
        return self.runs[method]
