"""The KV cache and attention mask of skipped tokens (SkipGPT's modules, Mixture-of-Depths' layers): a token
that skips a layer's attention leaves nothing there.

The rule (one for cached and uncached forwards alike, so cached generation equals uncached): a token that
skips attention at layer l writes no key or value at layer l, and no token attends to it at layer l (in
the uncached forward the mask drops its key too). Keys are cached after the rotary embedding, so a token
keeps its original position wherever it sits in the cache.

Per layer the cache holds keys and values (batch, kv heads, slots, head dim) and which slots hold a token:
a batch is rectangular, so a row whose token skips while another row's runs gets an empty slot, marked
invalid. When no row runs a layer's attention, nothing is appended: at batch size 1 a layer's cache holds
exactly the tokens that ran its attention. `attention_bias` is the mask that goes with it.
"""

from __future__ import annotations

import torch


class SkipCache:
    """Keys, values and slot validity per decoder layer, and each row's count of real tokens so far."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: list[torch.Tensor | None] = [None] * num_layers
        self.real_seen: torch.Tensor | None = None  # (batch,) real tokens fed so far: the next position id

    def past_valid(self, layer: int, batch: int, device: torch.device) -> torch.Tensor:
        """(batch, slots) True where a slot holds a token's K/V; no slots before the first write."""
        valid = self.valid[layer]
        return torch.zeros(batch, 0, dtype=torch.bool, device=device) if valid is None else valid

    def slots(self, layer: int) -> int:
        return 0 if self.keys[layer] is None else self.keys[layer].shape[-2]

    def writer(self, layer: int, valid: torch.Tensor) -> LayerWrite:
        """What a decoder layer's attention receives as `past_key_values`: it appends the new slots."""
        return LayerWrite(self, layer, valid)


class LayerWrite:
    """The `past_key_values` of one attention call: Hugging Face's attention calls `update(keys, values,
    layer_idx)` with the new keys and values and attends to what it returns (the past ones, then the new)."""

    def __init__(self, cache: SkipCache, layer: int, valid: torch.Tensor) -> None:
        self.cache, self.layer, self.new_valid = cache, layer, valid

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        cache, layer = self.cache, self.layer
        if cache.keys[layer] is None:
            cache.keys[layer], cache.values[layer], cache.valid[layer] = keys, values, self.new_valid
        else:
            cache.keys[layer] = torch.cat([cache.keys[layer], keys], dim=-2)
            cache.values[layer] = torch.cat([cache.values[layer], values], dim=-2)
            cache.valid[layer] = torch.cat([cache.valid[layer], self.new_valid], dim=1)
        return cache.keys[layer], cache.values[layer]


def attention_bias(past_valid: torch.Tensor, new_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, new, past + new) mask: every valid past slot; new slots causally, the valid ones and
    the query's own slot (so no softmax row is empty; a skipped token's row is discarded)."""
    new = new_valid.shape[1]
    causal = torch.ones(new, new, dtype=torch.bool, device=new_valid.device).tril()
    own = torch.eye(new, dtype=torch.bool, device=new_valid.device)
    among_new = causal & (new_valid[:, None, :] | own)
    allowed = torch.cat([past_valid[:, None, :].expand(-1, new, -1), among_new], dim=2)
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
