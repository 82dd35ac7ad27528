"""Key/value stores kept outside the model, and one forward of new tokens against a chosen set of them.

Streaming keeps two: the source cache and the target cache. A READ runs new source tokens against the
source cache only; a WRITE runs target tokens against source + target. Each forward hands the model an
ordinary `DynamicCache` filled with the stores it may see (concatenated) and the model's own forward, with
explicit position ids and a 4-D mask, so any Hugging Face causal LM works without a forked modeling file.
Keys are cached after the rotary embedding, so a token keeps the position it arrived with. Each forward adds
what it ran to a `ComputeCount`: the decode's compute, whatever the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from efficient_models.streaming.mask import additive_mask


@dataclass
class ComputeCount:
    """What a decode ran through the model: tokens (each through every layer) and the query-key pairs their
    attention used (the mask's allowed entries), re-feeds and re-encodings included."""

    tokens: int = 0
    attended_pairs: int = 0


class KVStore:
    """Per decoder layer, keys and values [batch, heads, tokens, head_dim]; empty until the first append."""

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return self.layers[0][0].shape[-2] if self.layers else 0

    def append(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not self.layers:
            self.layers = list(layers)
            return
        self.layers = [(torch.cat([keys, new_keys], dim=-2), torch.cat([values, new_values], dim=-2))
                       for (keys, values), (new_keys, new_values) in zip(self.layers, layers, strict=True)]

    def crop(self, length: int) -> None:
        """Keep the first `length` tokens (a WRITE takes back a token it fed too early)."""
        self.layers = [(keys[..., :length, :], values[..., :length, :]) for keys, values in self.layers]


def _joined(stores: Sequence[KVStore]) -> DynamicCache:
    cache = DynamicCache()
    filled = [store for store in stores if len(store)]
    if filled:
        for layer, pairs in enumerate(zip(*(store.layers for store in filled), strict=True)):
            cache.update(torch.cat([keys for keys, _ in pairs], dim=-2),
                         torch.cat([values for _, values in pairs], dim=-2), layer)
    return cache


@torch.no_grad()
def forward_new_tokens(model, ids: Sequence[int], positions: Sequence[int], context: Sequence[KVStore],
                       sees_context: torch.Tensor, among_new: torch.Tensor | None = None,
                       count: ComputeCount | None = None
                       ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run `ids` at `positions` after the stores in `context`; returns their logits [n, vocab] and new keys/values.

    `sees_context` (bool [n, context tokens]) says which context tokens each new token attends to;
    `among_new` (bool [n, n]) which new tokens each attends to, causally by default; `count` adds this forward.
    """
    past = sum(len(store) for store in context)
    new = len(ids)
    among_new = torch.ones(new, new, dtype=torch.bool).tril() if among_new is None else among_new
    allowed = torch.cat([sees_context.reshape(new, past), among_new], dim=1)
    if count is not None:
        count.tokens += new
        count.attended_pairs += int(allowed.sum())
    device = model.device
    cache = _joined(context)
    output = model(input_ids=torch.tensor([list(ids)], device=device),
                   position_ids=torch.tensor([list(positions)], device=device),
                   attention_mask=additive_mask(allowed, model.dtype).to(device),
                   past_key_values=cache, use_cache=True)
    fresh = [(layer.keys[..., past:, :], layer.values[..., past:, :]) for layer in output.past_key_values.layers]
    return output.logits[0].float(), fresh
