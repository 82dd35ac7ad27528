"""Tokenised conversations into steps and micro-batches over cached vision features.

A step is a few conversations of similar length (`plan_steps`); within a step they are sorted by length
and cut into micro-batches (`micro_batches`), right-padded, each row naming the scene whose cached
features fill its image tokens. The loss of every micro-batch is divided by the step's supervised-token
count, so every answer token weighs the same within a step, whatever the micro-batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from workbench.training.loop import MicroBatch
from workbench.training.sequences import IGNORE_INDEX, TokenisedConversation

# Conversations are sorted by length within windows of this many steps, so a micro-batch pads little,
# while the order across windows stays random.
BUCKET_STEPS = 16


def plan_steps(conversations: Sequence[TokenisedConversation], per_step: int,
               rng: np.random.Generator) -> list[list[TokenisedConversation]]:
    """Steps of similar-length conversations: each window of BUCKET_STEPS steps is sorted by length, cut
    into steps, and those steps are shuffled."""
    steps: list[list[TokenisedConversation]] = []
    window = per_step * BUCKET_STEPS
    for start in range(0, len(conversations), window):
        ordered = sorted(conversations[start:start + window], key=lambda conversation: conversation.length)
        window_steps = [ordered[index:index + per_step] for index in range(0, len(ordered), per_step)]
        steps += [window_steps[index] for index in rng.permutation(len(window_steps))]
    return steps


def supervised_count(conversation: TokenisedConversation) -> int:
    return int((conversation.labels != IGNORE_INDEX).sum())


def collate(conversations: Sequence[TokenisedConversation], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` and `labels`, the `scenes` rows of the feature cache, and an `attention_mask`
    only when some row is padded (without one SDPA keeps its causal fast path)."""
    length = max(conversation.length for conversation in conversations)
    input_ids = torch.full((len(conversations), length), pad_token_id)
    labels = torch.full((len(conversations), length), IGNORE_INDEX)
    attention_mask = torch.zeros((len(conversations), length), dtype=torch.long)
    for row, conversation in enumerate(conversations):
        input_ids[row, :conversation.length] = conversation.input_ids
        labels[row, :conversation.length] = conversation.labels
        attention_mask[row, :conversation.length] = 1
    batch = {"input_ids": input_ids, "labels": labels,
             "scenes": torch.tensor([conversation.scene for conversation in conversations])}
    if bool((attention_mask == 0).any()):
        batch["attention_mask"] = attention_mask
    return batch


def micro_batches(step: Sequence[TokenisedConversation], micro_batch_size: int, pad_token_id: int,
                  per_token: bool) -> list[MicroBatch]:
    """The step's conversations, sorted by length, in micro-batches of `micro_batch_size`.

    `per_token`: the module returns a summed loss, divided by the step's supervised tokens; otherwise it
    returns a mean loss, divided by the number of micro-batches.
    """
    ordered = sorted(step, key=lambda conversation: conversation.length)
    groups = [ordered[start:start + micro_batch_size] for start in range(0, len(ordered), micro_batch_size)]
    divisor = sum(map(supervised_count, step)) if per_token else len(groups)
    return [MicroBatch(collate(group, pad_token_id), divisor) for group in groups]
