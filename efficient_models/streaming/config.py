"""The streaming method's config: the wait-k policy training and decoding use, and the group positions."""

from __future__ import annotations

from typing import Annotated, Literal

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
    `training_wait_ks`: train one model for several policies: each training pair draws one of these k (or
    "offline", the whole source), fixed by the recipe's seed; empty: every pair trains at `wait_k`.
    """

    method: Literal["streaming"] = "streaming"
    wait_k: int = Field(3, ge=1)
    target_offset: int = Field(0, ge=0)
    instruction: str = INSTRUCTION
    max_tokens_per_write: int = Field(50, ge=1)
    max_lag_words: int = Field(100, ge=0)
    training_layout: Literal["group", "batch", "interleaved"] = "group"
    training_wait_ks: list[Annotated[int, Field(ge=1)] | Literal["offline"]] = Field(default_factory=list)

    def trained_policies(self) -> str:
        """The training policies, for names: "wait-3", "wait-1/3/5/7/offline"."""
        return "wait-" + "/".join(str(k) for k in self.training_wait_ks or [self.wait_k])
