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
from transformers import PreTrainedModel

from efficient_models.skipgpt.baseline_routing import Gathered, capacity_selection, check_capacity
from efficient_models.skipgpt.cache import SkipCache, attention_bias
from workbench.errors import InputError

Routing = Literal["topk", "predictor"]


@dataclass
class DepthOutput:
    """Logits, which tokens ran each layer (layers, batch, tokens), the predictor's logits (same shape) and the
    cache (None without one)."""

    logits: torch.Tensor
    ran: torch.Tensor
    predictor_logits: torch.Tensor
    cache: SkipCache | None = field(default=None)


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
                cache: SkipCache | None = None) -> DepthOutput:
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
        seen = 0 if cache is None or cache.real_seen is None else cache.real_seen[:, None]
        positions = (seen + real.long().cumsum(1) - 1).clamp(min=0)
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
            cache.real_seen = real.long().sum(1) + (0 if cache.real_seen is None else cache.real_seen)
        logits = self.model.lm_head(decoder.norm(hidden))
        return DepthOutput(logits, torch.stack(ran), torch.stack(predicted), cache)

    def _run_layer(self, index: int, layer: nn.Module, hidden: torch.Tensor, chosen: torch.Tensor,
                   weight: torch.Tensor | None, rotary: tuple[torch.Tensor, torch.Tensor],
                   cache: SkipCache | None) -> torch.Tensor:
        """`hidden` after decoder layer `layer` ran on the `chosen` tokens only (weighted by `weight`)."""
        tokens = Gathered.of(chosen)
        if tokens.index.shape[1] == 0:
            return hidden  # no token runs this layer: it is skipped, and writes nothing to the cache
        inputs = tokens.take(hidden)
        batch = hidden.shape[0]
        past_valid = (torch.zeros(batch, 0, dtype=torch.bool, device=hidden.device) if cache is None
                      else cache.past_valid(index, batch, hidden.device))
        outputs = layer(inputs, attention_mask=attention_bias(past_valid, tokens.valid, hidden.dtype),
                        position_embeddings=(tokens.take(rotary[0]), tokens.take(rotary[1])),
                        past_key_values=None if cache is None else cache.writer(index, tokens.valid))
        update = outputs - inputs
        if weight is not None:
            update = update * tokens.take(weight)[..., None]
        return tokens.add_to(hidden, update)

    def empty_cache(self) -> SkipCache:
        """A cache to prefill and decode with predictor routing."""
        return SkipCache(len(self.model.get_decoder().layers))
