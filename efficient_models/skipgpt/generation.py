"""Greedy generation with SkipGPT's routed model, with its KV cache (`cache.py`) or recomputing every step.

Both follow the same rule for tokens that skip attention, so they produce the same tokens; the uncached
path is the reference the cache is tested against.
"""

from __future__ import annotations

import torch

from efficient_models.skipgpt.cache import SkipCache
from efficient_models.skipgpt.routed_lm import RoutedLM


def _last_real(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each row's logits at its last real token (left or right padding alike)."""
    last = real.shape[1] - 1 - real.long().flip(1).argmax(1)
    return logits[torch.arange(len(logits)), last]


@torch.no_grad()
def greedy_generate(routed: RoutedLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 8, use_cache: bool = True) -> torch.Tensor:
    """(batch, max_new_tokens) greedily chosen tokens after each row's prompt, with real skipping."""
    real = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    ones = torch.ones(len(input_ids), 1, dtype=real.dtype, device=real.device)
    chosen = []
    if use_cache:
        cache = SkipCache(routed.num_layers)
        logits = _last_real(routed(input_ids, real, cache=cache, skip=True).logits, real.bool())
        for _ in range(max_new_tokens):
            chosen.append(logits.argmax(-1, keepdim=True))
            if len(chosen) < max_new_tokens:
                logits = routed(chosen[-1], ones, cache=cache, skip=True).logits[:, -1]
        return torch.cat(chosen, dim=1)
    ids, mask = input_ids, real
    for _ in range(max_new_tokens):
        logits = _last_real(routed(ids, mask, skip=True).logits, mask.bool())
        chosen.append(logits.argmax(-1, keepdim=True))
        ids, mask = torch.cat([ids, chosen[-1]], dim=1), torch.cat([mask, ones], dim=1)
    return torch.cat(chosen, dim=1)
