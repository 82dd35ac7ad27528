"""SkipGPT's training losses: the sparsity loss over real tokens, and the next-token loss beside it.

Sparsity loss: weight * |(1 - s) - mean run gate|, the mean taken over every layer, both modules and every
real token of the micro-batch (one global budget: compute may go unevenly to layers, modules and tokens).
Attention and MLP gates count equally, as the reference's (mean_attn + mean_mlp) / 2 does. Unlike the
reference, padding does not count: a padded position's gate does not move the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SPARSITY_WEIGHT = 20.0


def mean_run_share(gates: Sequence[torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """The share of (module, real token) pairs that run: `gates` are (batch, tokens) run gates, `real` the
    (batch, tokens) attention mask (1 for a real token, 0 for padding)."""
    weight = real.to(gates[0].dtype)
    ran = sum((gate * weight).sum() for gate in gates)
    return ran / (weight.sum() * len(gates)).clamp(min=1)


def sparsity_loss(gates: Sequence[torch.Tensor], real: torch.Tensor, sparsity: float,
                  weight: float = SPARSITY_WEIGHT) -> torch.Tensor:
    """weight * |(1 - sparsity) - mean run gate| over `gates` (every layer's attention and MLP gates)."""
    return weight * ((1 - sparsity) - mean_run_share(gates, real)).abs()


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each real token's prediction of the next real token."""
    targets = input_ids[:, 1:].masked_fill(~(real[:, 1:].bool() & real[:, :-1].bool()), -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=-100)
