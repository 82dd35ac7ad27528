"""Training inputs for one forward pass over [source; target]: ids, group position ids, the 4-D mask, labels.

`batch_example` is the same pair laid out as ordinary chat training sees it (the batch-trained baseline).
The loss covers every target token, the assistant prefix and the end token included (as the reference
does); source tokens carry no label. Batches are right-padded; a padding row attends to itself only, so
that no softmax row is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from efficient_models.streaming.groups import SourceGroup, target_position_ids
from efficient_models.streaming.mask import additive_mask, streaming_visibility, visible_units

IGNORE = -100  # the label Hugging Face's causal-LM loss skips


@dataclass(frozen=True)
class StreamingExample:
    input_ids: list[int]
    position_ids: list[int]
    allowed: torch.Tensor  # bool [L, L]
    labels: list[int]


def streaming_example(source: SourceGroup, target: Sequence[int], words: Sequence[int], wait_k: int,
                      target_offset: int = 0) -> StreamingExample:
    """One pair under wait-k: `target` is [prefix, content, end] and `words` their target words."""
    visible = visible_units(words, wait_k, source.num_units)
    return StreamingExample(
        input_ids=[*source.ids, *target],
        position_ids=[*source.position_ids(), *target_position_ids(len(target), target_offset)],
        allowed=streaming_visibility(source.units, visible),
        labels=[IGNORE] * len(source.ids) + list(target),
    )


def batch_example(source: SourceGroup, target: Sequence[int]) -> StreamingExample:
    """The same pair as an ordinary (batch) chat sequence: contiguous positions, a causal mask."""
    length = len(source.ids) + len(target)
    return StreamingExample(input_ids=[*source.ids, *target], position_ids=list(range(length)),
                            allowed=torch.ones(length, length, dtype=torch.bool).tril(),
                            labels=[IGNORE] * len(source.ids) + list(target))


def collate(examples: Sequence[StreamingExample], dtype: torch.dtype, pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs for a batch: input_ids, position_ids, a float 4-D attention_mask, labels."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id)
    position_ids = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE)
    allowed = torch.eye(length, dtype=torch.bool).repeat(len(examples), 1, 1)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        position_ids[row, :size] = torch.tensor(example.position_ids)
        labels[row, :size] = torch.tensor(example.labels)
        allowed[row, :size, :size] = example.allowed
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
            "attention_mask": additive_mask(allowed, dtype)}
