"""Visual-token importance without an attention map, and a top-k that passes gradient to it.

`query_attention_scores` recomputes, for a few query rows only, the attention a layer would pay to
each key: the layer's own input norm, q / k projections and rotary embedding, on detached hidden
states. The layers themselves never return attention weights, so they run SDPA or FlashAttention.

`differentiable_keep` is HiDrop's soft top-k applied as a straight-through estimator: the forward
pass keeps exactly the top k (the hidden states are multiplied by 1), the backward pass sends the
gradient of a soft mask m = sigmoid(lambda * N * (rank(c) - (1 - k/N))) to the scores, with a smooth
rank so that the gradient is not zero almost everywhere.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def rotary_function(attention: nn.Module):
    """`apply_rotary_pos_emb` of the attention module's own modelling file (Llama, Mistral, Qwen2, ...)."""
    module = sys.modules[type(attention).__module__]
    if not hasattr(module, "apply_rotary_pos_emb"):
        raise NotImplementedError(f"{type(attention).__name__} has no apply_rotary_pos_emb to score tokens with")
    return module.apply_rotary_pos_emb


def query_attention_scores(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           order: torch.Tensor, valid: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Attention of the `queries` rows to every key at `layer`, averaged over heads and query rows: [batch, n].

    hidden [batch, n, d] (the layer's input; gradient flows only into the layer's norm / q / k weights),
    cos / sin [batch, n, head_dim], order [batch, n] (original sequence index: causality),
    valid [batch, n] (keys that exist), queries [batch, n] bool (at least one per row).
    """
    attention = layer.self_attn
    states = layer.input_layernorm(hidden.detach())
    batch, n, _ = states.shape
    head_dim = attention.head_dim
    count = int(queries.sum(1).max())
    # The query rows of each row, padded to the same count (padding rows get zero weight).
    rank = torch.where(queries, torch.arange(n, device=hidden.device), n + torch.arange(n, device=hidden.device))
    picked = rank.argsort(1)[:, :count]
    weight = queries.gather(1, picked).to(states.dtype)
    query_states = attention.q_proj(states.gather(1, picked[..., None].expand(-1, -1, states.shape[-1])))
    query_states = query_states.view(batch, count, -1, head_dim).transpose(1, 2)
    key_states = attention.k_proj(states).view(batch, n, -1, head_dim).transpose(1, 2)
    query_cos, query_sin = (t.gather(1, picked[..., None].expand(-1, -1, head_dim)) for t in (cos, sin))
    apply_rotary = rotary_function(attention)
    query_states, _ = apply_rotary(query_states, query_states, query_cos, query_sin)
    _, key_states = apply_rotary(key_states, key_states, cos, sin)
    key_states = key_states.repeat_interleave(query_states.shape[1] // key_states.shape[1], dim=1)
    logits = query_states @ key_states.transpose(-1, -2) * attention.scaling  # [batch, heads, count, n]
    allowed = valid[:, None, :] & (order[:, None, :] <= order.gather(1, picked)[:, :, None])
    probabilities = logits.float().masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    per_query = probabilities.mean(1)  # [batch, count, n]
    return (per_query * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)


def smooth_rank(scores: torch.Tensor, candidates: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Fraction of a row's candidates scoring at most each score, smoothed by a sigmoid (scale-free)."""
    spread = scores[candidates].std().clamp_min(1e-8) if candidates.sum() > 1 else scores.new_tensor(1.0)
    pairwise = torch.sigmoid((scores[:, :, None] - scores[:, None, :]) / (temperature * spread))
    pairwise = pairwise * candidates[:, None, :]
    return pairwise.sum(-1) / candidates.sum(-1, keepdim=True).clamp_min(1)


def top_k_keep(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [batch, n]: the k best-scoring candidates of each row (fewer where a row has fewer)."""
    masked = scores.masked_fill(~candidates, float("-inf"))
    chosen = torch.zeros_like(candidates)
    chosen.scatter_(1, masked.topk(k, dim=1).indices, True)
    return chosen & candidates


def differentiable_keep(scores: torch.Tensor, candidates: torch.Tensor, k: int,
                        sharpness: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The hard top-k selection and the straight-through multiplier (1 forward, soft-mask gradient backward)."""
    keep = top_k_keep(scores, candidates, k)
    num_candidates = candidates.sum(-1, keepdim=True).clamp_min(1)
    threshold = 1 - k / num_candidates
    soft = torch.sigmoid(sharpness * num_candidates * (smooth_rank(scores, candidates) - threshold))
    return keep, 1 + soft - soft.detach()
