"""Perplexity of a causal LM on token blocks: exp of the token-mean next-token loss over every block."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

# (input_ids) -> logits (batch, tokens, vocab): a model, or a method's forward over it
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def perplexity(logits_of: LogitsFn, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token cross-entropy) over all predicted tokens of `blocks` (blocks, tokens)."""
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        batch = blocks[start:start + batch_size]
        logits = logits_of(batch)[:, :-1].float()
        targets = batch[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   reduction="sum").item()
        count += targets.numel()
    return math.exp(total / count)
