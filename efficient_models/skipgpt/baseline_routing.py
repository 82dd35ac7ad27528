"""Mixture-of-Depths' token bookkeeping: which tokens run a layer, and how they are gathered and masked.

`capacity_selection` is the paper's top-k: in each row the ceil(capacity x real tokens) real tokens of highest
router score. `Gathered` packs the chosen tokens of every row, in sequence order, into a rectangular
(batch, k) set; rows that chose fewer than k are filled with invalid slots that attend only to themselves
and whose results are dropped (`cache.attention_bias`, the KV rule SkipGPT's modules follow too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.errors import InputError

# ceil(capacity x tokens) of a product such as 0.7 x 10 = 7.000000000000001 is 7, not 8.
_CEIL_TOLERANCE = 1e-9


def check_capacity(capacity: float) -> float:
    """`capacity` when it is a share of tokens in (0, 1]; a one-line `InputError` otherwise."""
    if not 0 < capacity <= 1:
        raise InputError(f"the capacity must be in (0, 1], not {capacity}")
    return capacity


def capacity_count(capacity: float, tokens: int) -> int:
    """How many of a row's `tokens` real tokens run a layer: ceil(capacity x tokens)."""
    return math.ceil(capacity * tokens - _CEIL_TOLERANCE)


def capacity_selection(scores: torch.Tensor, real: torch.Tensor, capacity: float) -> torch.Tensor:
    """(batch, tokens) bool: per row, the `capacity_count` real tokens of highest score (padding never)."""
    counts = torch.tensor([capacity_count(capacity, int(n)) for n in real.sum(1)], device=scores.device)
    order = scores.detach().masked_fill(~real, float("-inf")).argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                                             .expand_as(order).contiguous())
    return (ranks < counts[:, None]) & real


@dataclass
class Gathered:
    """The chosen tokens of each row, in sequence order: their indices (batch, k) and validity (batch, k)."""

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(cls, chosen: torch.Tensor) -> Gathered:
        """Pack `chosen` (batch, tokens) bool; k is the largest count of a row."""
        counts = chosen.sum(1)
        width = int(counts.max()) if chosen.numel() else 0
        # A stable sort of "not chosen" puts each row's chosen indices first, in increasing order.
        index = (~chosen).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=chosen.device)[None] < counts[:, None]
        return cls(index, valid)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The gathered rows of a (batch, tokens, ...) tensor."""
        index = self.index.view(*self.index.shape, *([1] * (tensor.dim() - 2)))
        return tensor.gather(1, index.expand(-1, -1, *tensor.shape[2:]))

    def add_to(self, hidden: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """`hidden` (batch, tokens, d) plus `update` (batch, k, d) at the valid gathered tokens."""
        update = update * self.valid[..., None].to(update.dtype)
        return hidden.scatter_add(1, self.index[..., None].expand(-1, -1, hidden.shape[-1]), update)
