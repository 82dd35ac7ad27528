"""The on-policy SFT loss: token-mean cross-entropy on the response tokens of the kept samples.

A batch is prompt + response per row, right-padded; labels are the response tokens and -100 elsewhere
(prompt and padding), so only what the model said is learned. `ResponseLoss` returns the SUM over the
micro-batch's response tokens: the training loop divides each micro-batch by the step's total response
token count (`MicroBatch.loss_divisor`), so the step's loss is a mean over all its tokens, whatever the
micro-batch split (a mean of per-micro-batch means would weigh the tokens of short batches more).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workbench.training.loop import MicroBatch

IGNORE = -100  # the label of a token that is not learned (prompt, padding)


def response_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
                   ) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (response tokens only) of prompt+response rows."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need one response per prompt and at least one row; got {len(prompts)} and {len(responses)}")
    if any(len(response) == 0 for response in responses):
        raise ValueError("an empty response has no tokens to learn")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor([*prompt, *response])
        attention_mask[row, :length] = 1
        labels[row, len(prompt):length] = torch.tensor(response)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_loss_sum(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of the labelled tokens, each predicted from the tokens before it."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def supervised_tokens(labels: torch.Tensor) -> int:
    """How many tokens `response_loss_sum` sums over (the first label is never predicted)."""
    return int((labels[:, 1:] != IGNORE).sum())


class ResponseLoss(nn.Module):
    """The training loop's module: a causal LM whose forward is the summed response-token loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return response_loss_sum(self.model, input_ids, attention_mask, labels)


def token_mean_micro_batches(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                             rows_per_micro_batch: int) -> list[MicroBatch]:
    """One step's rows as micro-batches whose summed losses, each divided by the step's response-token count,
    add up to the token mean over the whole step."""
    batches = [response_batch(prompts[first:first + rows_per_micro_batch],
                              responses[first:first + rows_per_micro_batch], pad_id)
               for first in range(0, len(prompts), rows_per_micro_batch)]
    total = sum(supervised_tokens(batch["labels"]) for batch in batches)
    return [MicroBatch(batch, loss_divisor=float(total)) for batch in batches]
