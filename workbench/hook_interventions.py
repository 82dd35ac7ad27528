"""Change how an LLM's layers treat visual tokens, for one batch, through hooks (works with `generate`).

An `Intervention` says what to do; `intervene(loaded, inputs, intervention)` applies it while
inside. Every visual token stays in the sequence and keeps its position; only sublayer outputs
and attention edges change:

- `skip_attention` / `skip_mlp`: layers whose attention / MLP update of visual tokens is zeroed;
- `block_visual_to_visual` / `block_text_to_visual`: layers where those attention edges are cut.

Changing *which* visual tokens a layer sees (late entry, early exit, pruning, removing tokens)
is `efficient_models.token_schedule.engine`'s job: the one implementation of token sets.

Layers are 0-indexed decoder layers. Needs eager or SDPA attention (FlashAttention takes no mask).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from workbench.errors import InputError
from workbench.models.loading import LoadedModel


@dataclass(frozen=True)
class Intervention:
    skip_attention: frozenset[int] = field(default_factory=frozenset)
    skip_mlp: frozenset[int] = field(default_factory=frozenset)
    block_visual_to_visual: frozenset[int] = field(default_factory=frozenset)
    block_text_to_visual: frozenset[int] = field(default_factory=frozenset)

    def check(self, num_layers: int) -> None:
        layers = self.skip_attention | self.skip_mlp | self.block_visual_to_visual | self.block_text_to_visual
        bad = sorted(layer for layer in layers if not 0 <= layer < num_layers)
        if bad:
            raise InputError(f"intervention layers {bad} out of range: the LLM has {num_layers} layers (0-indexed)")


def _blocked(visual: torch.Tensor, layer: int, query_len: int, key_len: int,
             intervention: Intervention) -> torch.Tensor | None:
    """The (query, key) pairs cut at `layer` [batch, 1, query, key], or None; `visual` covers the prompt."""
    # Tokens generated after the prompt are text.
    visual_keys = torch.cat([visual, visual.new_zeros(visual.shape[0], key_len - visual.shape[1])], 1)
    visual_queries = visual_keys[:, key_len - query_len:]
    cut = visual_keys.new_zeros(visual.shape[0], query_len, key_len)
    if layer in intervention.block_visual_to_visual:
        cut |= visual_queries[:, :, None] & visual_keys[:, None, :]
    if layer in intervention.block_text_to_visual:
        cut |= ~visual_queries[:, :, None] & visual_keys[:, None, :]
    return cut[:, None] if cut.any() else None


def _with_cut(mask: torch.Tensor | None, cut: torch.Tensor, query_len: int, key_len: int, eager: bool,
              dtype: torch.dtype) -> torch.Tensor:
    """The layer's attention mask with `cut` pairs removed, in the format the attention expects."""
    if mask is None:  # SDPA's causal fast path: build the causal mask it implied
        queries = torch.arange(key_len - query_len, key_len, device=cut.device)
        mask = (torch.arange(key_len, device=cut.device)[None, :] <= queries[:, None])[None, None]
        if eager:
            mask = torch.zeros(mask.shape, dtype=dtype, device=cut.device).masked_fill(~mask, torch.finfo(dtype).min)
    mask = mask[..., -key_len:]
    if mask.dtype == torch.bool:
        return mask & ~cut
    return mask.masked_fill(cut, torch.finfo(mask.dtype).min)


@contextmanager
def intervene(loaded: LoadedModel, inputs: Mapping[str, torch.Tensor], intervention: Intervention) -> Iterator[None]:
    """Apply `intervention` to every forward of `loaded` (prefill and decoding) while inside."""
    adapter = loaded.adapter
    intervention.check(adapter.num_llm_layers)
    implementation = adapter.language_model.config._attn_implementation
    if implementation not in ("eager", "sdpa"):
        raise InputError(f"interventions need eager or sdpa attention, not {implementation!r}")
    visual = adapter.visual_token_mask(inputs["input_ids"])
    prompt_len = visual.shape[1]
    blocking = intervention.block_visual_to_visual | intervention.block_text_to_visual
    handles = []

    def cut_edges(layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            query_len = hidden.shape[1]
            cache = kwargs.get("past_key_values")
            key_len = query_len + (cache.get_seq_length(layer) if cache is not None else 0)
            cut = _blocked(visual, layer, query_len, key_len, intervention)
            if cut is not None:
                kwargs = kwargs | {"attention_mask": _with_cut(kwargs.get("attention_mask"), cut, query_len, key_len,
                                                               implementation == "eager", hidden.dtype)}
            return args, kwargs
        return hook

    def zero_visual_update(module, args, output):
        states = output[0] if isinstance(output, tuple) else output
        if states.shape[1] != prompt_len:  # decoding steps carry no visual tokens
            return output
        states = states.masked_fill(visual[..., None], 0.0)
        return (states, *output[1:]) if isinstance(output, tuple) else states

    try:
        for layer, block in enumerate(adapter.llm_layers):
            if layer in blocking:
                handles.append(block.register_forward_pre_hook(cut_edges(layer), with_kwargs=True))
            if layer in intervention.skip_attention:
                handles.append(block.self_attn.register_forward_hook(zero_visual_update))
            if layer in intervention.skip_mlp:
                handles.append(block.mlp.register_forward_hook(zero_visual_update))
        yield
    finally:
        for handle in handles:
            handle.remove()
