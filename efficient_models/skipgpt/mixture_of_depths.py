"""SkipGPT's dynamic baseline: Mixture-of-Depths capacity routing (Raposo et al., 2024) on a pretrained causal LM.

Every decoder layer gets a router (Linear d -> 1) on its input hidden state. With `routing="topk"` (the
paper's training routing) the ceil(capacity x real tokens) tokens of highest score in each row run the
whole layer (attention + MLP): they are gathered, the Hugging Face decoder layer runs on them alone,
and its update is scattered back; the other tokens pass the layer unchanged. A layer no token runs is
skipped outright.

Router weighting: the paper multiplies the block's update by the router score r so that r gets a
gradient. On a pretrained model any multiplier other than 1 changes every block that runs, so the
weight here is 1 + r - stop_grad(r): its value is 1 (capacity 1 is the dense model exactly) and its
gradient is the paper's at r = 1.

Decoding: top-k over a sequence is non-causal (a token's rank depends on later tokens). As in the
paper's second option, a small causal predictor per layer (Linear d -> d/4, ReLU, Linear -> 1, on the
router's input with the gradient stopped) is trained with BCE to predict top-k membership;
`routing="predictor"` runs a token through a layer when that logit is positive. It decides per token
from that token's own state, so it can run with a KV cache.

KV rule (both routings, with or without cache): a token that does not run a layer writes no keys or
values there, and later tokens do not attend to it in that layer. With a batch, a row whose token does
not run fills a slot that is marked invalid (never attended), so rows stay rectangular; a row alone
writes only the tokens that run. Rotary positions are the tokens' positions in the full sequence
(left padding excluded). Attention runs through the model's SDPA or eager kernel with an additive mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from efficient_models.skipgpt.baseline_routing import Gathered, attention_bias, capacity_selection, check_capacity
from workbench.errors import InputError

Routing = Literal["topk", "predictor"]


@dataclass
class DepthCache:
    """Decoding state: the model's KV cache, which of each layer's cached slots are valid, and the real tokens
    seen per row (the next token's position)."""

    kv: DynamicCache
    valid: list[torch.Tensor | None]
    seen: torch.Tensor

    @classmethod
    def empty(cls, model: PreTrainedModel, batch: int, device: torch.device) -> DepthCache:
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        return cls(DynamicCache(config=model.config), [None] * layers,
                   torch.zeros(batch, dtype=torch.long, device=device))


@dataclass
class DepthOutput:
    """Logits, which tokens ran each layer (layers, batch, tokens), the predictor's logits (same shape) and the
    cache (None without one)."""

    logits: torch.Tensor
    ran: torch.Tensor
    predictor_logits: torch.Tensor
    cache: DepthCache | None = field(default=None)


class MixtureOfDepths(nn.Module):
    """A Llama-family causal LM (`model`, not copied) with a router and a causal predictor per decoder layer."""

    def __init__(self, model: PreTrainedModel, capacity: float):
        super().__init__()
        self.model = model
        self.capacity = check_capacity(capacity)
        decoder = model.get_decoder()
        width = decoder.config.hidden_size
        weight = decoder.embed_tokens.weight
        self.routers = nn.ModuleList(nn.Linear(width, 1) for _ in decoder.layers)
        self.predictors = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width // 4), nn.ReLU(), nn.Linear(width // 4, 1)) for _ in decoder.layers)
        self.routers.to(weight.device, weight.dtype)
        self.predictors.to(weight.device, weight.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, routing: Routing = "topk",
                cache: DepthCache | None = None) -> DepthOutput:
        """Run this call's tokens (batch, tokens); `attention_mask` marks their real tokens (left padding).

        With `cache` (predictor routing only) the tokens continue the cached ones and the cache is extended.
        """
        if routing not in ("topk", "predictor"):
            raise InputError(f"routing must be 'topk' or 'predictor', not {routing!r}")
        if routing == "topk" and cache is not None:
            raise InputError("top-k routing ranks a whole sequence and cannot decode with a cache: use 'predictor'")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        decoder = self.model.get_decoder()
        hidden = decoder.embed_tokens(input_ids)
        seen = cache.seen if cache is not None else torch.zeros(len(input_ids), dtype=torch.long,
                                                                device=input_ids.device)
        positions = (seen[:, None] + real.long().cumsum(1) - 1).clamp(min=0)
        rotary = decoder.rotary_emb(hidden, position_ids=positions)
        ran, predicted = [], []
        for index, layer in enumerate(decoder.layers):
            # The predictor reads the router's input but must not train it (the paper's stop-gradient).
            predicted.append(self.predictors[index](hidden.detach()).squeeze(-1))
            if routing == "topk":
                scores = self.routers[index](hidden).squeeze(-1)
                chosen = capacity_selection(scores, real, self.capacity)
                weight = 1 + scores - scores.detach()
            else:
                chosen, weight = (predicted[-1] > 0) & real, None
            hidden = self._run_layer(index, layer, hidden, chosen, weight, rotary, cache)
            ran.append(chosen)
        if cache is not None:
            cache.seen = seen + real.sum(1)
        logits = self.model.lm_head(decoder.norm(hidden))
        return DepthOutput(logits, torch.stack(ran), torch.stack(predicted), cache)

    def _run_layer(self, index: int, layer: nn.Module, hidden: torch.Tensor, chosen: torch.Tensor,
                   weight: torch.Tensor | None, rotary: tuple[torch.Tensor, torch.Tensor],
                   cache: DepthCache | None) -> torch.Tensor:
        """`hidden` after decoder layer `layer` ran on the `chosen` tokens only (weighted by `weight`)."""
        tokens = Gathered.of(chosen)
        if tokens.index.shape[1] == 0:
            return hidden  # no token runs this layer: it is skipped, and writes nothing to the cache
        inputs = tokens.take(hidden)
        past_valid = cache.valid[index] if cache is not None else None
        outputs = layer(inputs, attention_mask=attention_bias(tokens.valid, past_valid, hidden.dtype),
                        position_embeddings=(tokens.take(rotary[0]), tokens.take(rotary[1])),
                        past_key_values=cache.kv if cache is not None else None, use_cache=cache is not None)
        if cache is not None:
            cache.valid[index] = tokens.valid if past_valid is None else torch.cat([past_valid, tokens.valid], 1)
        update = outputs - inputs
        if weight is not None:
            update = update * tokens.take(weight)[..., None]
        return tokens.add_to(hidden, update)

    def empty_cache(self, batch: int) -> DepthCache:
        """A cache to prefill and decode `batch` rows with predictor routing."""
        return DepthCache.empty(self.model, batch, self.model.device)
