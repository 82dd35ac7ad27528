"""Change how an LLM treats visual tokens, for one batch, through hooks (works with `generate`).

An `Intervention` says what to do; `intervene(loaded, inputs, intervention)` applies it while
inside. Everything is expressed through the attention mask and sublayer outputs, so position ids
never change: a removed token leaves its position empty, as in the EmbedLens reference.

- `removed`: a [batch, seq] mask of visual tokens that no query may attend to, at any layer;
- `inject_layer` L: text cannot see visual tokens in layers < L, and at layer L the visual
  tokens' hidden states are reset to the raw projector output (late / mid-layer injection);
- `exit_layer` X: from layer X on no query sees visual tokens (visual tokens dropped);
- `skip_attention` / `skip_mlp`: layers whose attention / MLP update of visual tokens is zeroed;
- `block_visual_to_visual` / `block_text_to_visual`: layers where those attention edges are cut.

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
    removed: torch.Tensor | None = None  # [batch, seq] bool, over the prompt
    inject_layer: int = 0
    exit_layer: int | None = None
    skip_attention: frozenset[int] = field(default_factory=frozenset)
    skip_mlp: frozenset[int] = field(default_factory=frozenset)
    block_visual_to_visual: frozenset[int] = field(default_factory=frozenset)
    block_text_to_visual: frozenset[int] = field(default_factory=frozenset)

    def check(self, num_layers: int) -> None:
        layers = [self.inject_layer, *self.skip_attention, *self.skip_mlp, *self.block_visual_to_visual,
                  *self.block_text_to_visual] + ([] if self.exit_layer is None else [self.exit_layer])
        bad = sorted({layer for layer in layers if not 0 <= layer < num_layers + 1})
        if bad:
            raise InputError(f"intervention layers {bad} out of range: the LLM has {num_layers} layers (0-indexed)")


class _Masks:
    """Which (query, key) pairs the intervention cuts at one layer, for keys 0..k-1 of the batch."""

    def __init__(self, visual: torch.Tensor, removed: torch.Tensor):
        self.visual, self.removed = visual, removed  # [batch, prompt_len] bool

    def key_kinds(self, key_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual, removed) over all keys; tokens generated after the prompt are text."""
        extra = key_len - self.visual.shape[1]
        pad = self.visual.new_zeros(self.visual.shape[0], extra)
        return torch.cat([self.visual, pad], 1), torch.cat([self.removed, pad], 1)

    def blocked(self, layer: int, query_len: int, key_len: int, intervention: Intervention) -> torch.Tensor | None:
        visual_keys, removed_keys = self.key_kinds(key_len)
        visual_queries = visual_keys[:, key_len - query_len:]
        cut = removed_keys[:, None, :].expand(-1, query_len, -1).clone()
        every_query = layer < intervention.inject_layer or (
            intervention.exit_layer is not None and layer >= intervention.exit_layer)
        if every_query:
            cut |= visual_keys[:, None, :]
        if layer in intervention.block_visual_to_visual:
            cut |= visual_queries[:, :, None] & visual_keys[:, None, :]
        if layer in intervention.block_text_to_visual:
            cut |= ~visual_queries[:, :, None] & visual_keys[:, None, :]
        return cut[:, None] if cut.any() else None  # [batch, 1, query, key]


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
    removed = intervention.removed.to(visual.device) if intervention.removed is not None else torch.zeros_like(visual)
    masks = _Masks(visual, removed & visual)
    prompt_len = visual.shape[1]
    raw_visual: dict[str, torch.Tensor] = {}
    handles = []

    def before_layer(layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            query_len = hidden.shape[1]
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length(layer) if cache is not None else 0
            key_len = past + query_len
            if layer == 0 and past == 0:
                raw_visual["states"] = hidden[visual].clone()
            if layer == intervention.inject_layer and layer > 0 and past == 0:
                hidden = hidden.clone()
                hidden[visual] = raw_visual["states"]
                args = (hidden, *args[1:]) if args else args
                kwargs = kwargs if args else kwargs | {"hidden_states": hidden}
            cut = masks.blocked(layer, query_len, key_len, intervention)
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
            handles.append(block.register_forward_pre_hook(before_layer(layer), with_kwargs=True))
            if layer in intervention.skip_attention:
                handles.append(block.self_attn.register_forward_hook(zero_visual_update))
            if layer in intervention.skip_mlp:
                handles.append(block.mlp.register_forward_hook(zero_visual_update))
        yield
    finally:
        for handle in handles:
            handle.remove()
