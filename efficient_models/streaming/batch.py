"""Training inputs for one forward pass over [source; target]: ids, group position ids, the 4-D mask, labels.

`batch_example` is the same pair laid out as ordinary chat training sees it (the batch-trained baseline);
`interleaved_example` lays it out in arrival order under wait-k, one causal sequence with contiguous positions
(the interleaved-trained baseline, decoded by `streams.InterleavedStream`).
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


def interleaved_example(source: SourceGroup, target: Sequence[int], words: Sequence[int], wait_k: int,
                        ends: bool = True) -> StreamingExample:
    """The pair in the order a wait-k reader sees it: each target token right after the source it may see.

    Target token t is fed once the source units < visible[t] have arrived, as decoding feeds the token that
    predicts the next word after the READ that word waits for. So the token after t's predictor may be a source
    token, and each label is placed one position after its predictor (the model's loss shifts labels by one).
    `ends`: the target's last word is the end token, written once the whole source is read (`visible_units`).
    """
    visible = visible_units(words, wait_k, source.num_units, ends)
    input_ids: list[int] = []
    target_positions = []
    read = 0
    for token, units in zip(target, visible, strict=True):
        stop = source.tokens_of_units(units)
        input_ids += source.ids[read:stop]
        read = max(read, stop)
        target_positions.append(len(input_ids))
        input_ids.append(token)
    labels = [IGNORE] * len(input_ids)
    predictors = [target_positions[0] - 1, *target_positions[:-1]]  # the first is predicted by the last source read
    for predictor, token in zip(predictors, target, strict=True):
        labels[predictor + 1] = token
    return StreamingExample(input_ids=input_ids, position_ids=list(range(len(input_ids))),
                            allowed=torch.ones(len(input_ids), len(input_ids), dtype=torch.bool).tril(),
                            labels=labels)


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
