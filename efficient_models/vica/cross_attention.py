"""What a selected layer does with the frozen visual tokens: their K/V from the layer's own weights, and (with
pruning) which of them the text reads, ranked by the attention of a few text query rows.

Both work on Llama-style attention (Llama, Mistral, Qwen2 and Qwen2-VL's decoder): an input norm, k / v
projections of `head_dim` per head, and the rotary function of the attention's own modelling file.
"""

from __future__ import annotations

import torch
from torch import nn

from efficient_models.token_schedule.scoring import rotary_function
from efficient_models.vica.cost import kept_count
from efficient_models.vica.token_sets import left_packed


def visual_keys(layer: nn.Module, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys [batch, kv_heads, n, head_dim] of normed visual `states` [batch, n, d] at `layer`, rotated at the
    tokens' own positions."""
    attention = layer.self_attn
    keys = attention.k_proj(states).view(*states.shape[:-1], -1, attention.head_dim).transpose(1, 2)
    return rotary_function(attention)(keys, keys, cos, sin)[1]


def visual_keys_values(layer: nn.Module, frozen: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [batch, kv_heads, n, head_dim] of the visual tokens `frozen` [batch, n, d] at `layer`: its
    input norm, then its k / v projections. No query, output or FFN runs."""
    attention = layer.self_attn
    states = layer.input_layernorm(frozen)
    values = attention.v_proj(states).view(*states.shape[:-1], -1, attention.head_dim).transpose(1, 2)
    return visual_keys(layer, states, cos, sin), values


def rank_visual(layer: nn.Module, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """[batch, v]: the attention the `queries` rows [batch, n] of `hidden` (the layer's input) pay to each visual
    key `keys` [batch, kv_heads, v, head_dim] at `layer`, softmax over the visual keys each row may see
    (`allowed` [batch, n, v]), averaged over heads and query rows. A ranking: no gradient flows through it."""
    attention = layer.self_attn
    rows = left_packed(queries)

    def take(tensor: torch.Tensor) -> torch.Tensor:  # the query rows of a [batch, n, ...] tensor
        return tensor.gather(1, rows.index[..., None].expand(-1, -1, tensor.shape[-1]))

    states = layer.input_layernorm(take(hidden.detach()))
    query_states = attention.q_proj(states).view(*states.shape[:-1], -1, attention.head_dim).transpose(1, 2)
    query_states, _ = rotary_function(attention)(query_states, query_states, take(rotary[0]), take(rotary[1]))
    key_states = keys.detach().repeat_interleave(query_states.shape[1] // keys.shape[1], dim=1)
    logits = (query_states @ key_states.transpose(-1, -2) * attention.scaling).float()  # [batch, heads, rows, v]
    seen = take(allowed)[:, None]
    probabilities = logits.masked_fill(~seen, float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)
    weight = rows.valid.float()[..., None]
    return (probabilities * weight).sum(1) / weight.sum(1).clamp_min(1)


def keep_top(scores: torch.Tensor, candidates: torch.Tensor, keep: float) -> torch.Tensor:
    """[batch, v] bool: each row's `kept_count` best-scoring candidates (ties: the earlier token)."""
    counts = torch.tensor([kept_count(int(count), keep) for count in candidates.sum(1)], device=scores.device)
    order = scores.masked_fill(~candidates, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, places)
    return candidates & (rank < counts[:, None])
