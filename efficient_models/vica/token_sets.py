"""Which tokens ViCA's layers run on: each row's text or visual tokens as a rectangular set, and the text
tokens that `freeze_prefix` keeps out of attention.

Rows of a batch may hold different numbers of visual tokens (several images, images of other sizes, padding),
so a set is as wide as its largest row; the entries a row does not fill sit on the left and are invalid.
"""

from __future__ import annotations

import torch

from efficient_models.token_schedule.engine import TokenSet


def left_packed(mask: torch.Tensor) -> TokenSet:
    """Each row's True entries of `mask` [batch, seq], in order, at the right end of a set as wide as the
    largest count; the entries to their left are invalid (so a row's last token stays its last entry)."""
    width = int(mask.sum(1).max()) if mask.numel() else 0
    order = torch.where(mask, torch.arange(mask.shape[1], device=mask.device), -1).sort(1).values
    order = order[:, mask.shape[1] - width:]
    return TokenSet(order.clamp_min(0), order >= 0)


def pick(tokens: TokenSet, chosen: torch.Tensor) -> tuple[TokenSet, torch.Tensor]:
    """The entries of `tokens` where `chosen` [batch, n] is True (any count per row), and their places in `tokens`."""
    places = left_packed(chosen)
    return TokenSet(tokens.index.gather(1, places.index), places.valid), places.index


def as_mask(tokens: TokenSet, length: int) -> torch.Tensor:
    """[batch, length] bool: True at the set's valid entries."""
    # Summed, not scattered: invalid entries point at index 0, which may be a valid entry of the row.
    counts = torch.zeros(tokens.index.shape[0], length, dtype=torch.long, device=tokens.index.device)
    return counts.scatter_add(1, tokens.index, tokens.valid.long()) > 0


def frozen_prefix(visual: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: the real text tokens before each row's last visual token (none in a row without one)."""
    positions = torch.arange(visual.shape[1], device=visual.device)
    image_end = torch.where(visual, positions, -1).amax(1, keepdim=True)
    return real & ~visual & (positions < image_end)
