"""The streaming method's config: the wait-k policy training and decoding use, and the group positions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from workbench.configs import MethodConfig

INSTRUCTION = "Translate English to French:\n"


class StreamingConfig(MethodConfig):
    """Group position encoding for simultaneous translation with any Hugging Face causal chat LM.

    `wait_k`: the policy (at word granularity) of the training mask and of decoding; `target_offset`: phi,
    the target group's first position id; a WRITE stops after `max_tokens_per_write` tokens of one word;
    decoding halts once the target is more than `max_lag_words` words longer than the source.
    `training_layout`: "group" trains with group positions and the streaming mask (the method); "batch"
    trains on the ordinary chat sequence (contiguous positions, causal mask), the baselines' batch model;
    "interleaved" on the wait-k arrival order (one causal sequence, contiguous positions), baseline (b)'s model.
    """

    method: Literal["streaming"] = "streaming"
    wait_k: int = Field(3, ge=1)
    target_offset: int = Field(0, ge=0)
    instruction: str = INSTRUCTION
    max_tokens_per_write: int = Field(50, ge=1)
    max_lag_words: int = Field(100, ge=0)
    training_layout: Literal["group", "batch", "interleaved"] = "group"
