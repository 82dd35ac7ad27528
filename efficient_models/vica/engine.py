"""ViCA's decoder: visual tokens skip every layer; text reads them by cross-attention at the selected layers.

One model in two forms, which tests hold equal (logits, cached and uncached generation):

- `form="fast"` (inference). Every layer runs on the text tokens only. Before a selected layer runs, the
  visual tokens, frozen at the projector output, pass through that layer's own input norm and k / v
  projections (rotary at their original positions) and go into that layer's KV cache; the layer's text
  queries then attend causally over [visual, text] keys. Other layers' caches hold text only. The visual
  K/V are computed once, at prefill; decoding (`ScheduledLLM.decode`) reads them from the cache.
- `form="masks"` (training, as the reference trains). The full sequence runs through every layer: text ->
  visual attention is masked outside the selected layers, visual query rows see no visual key, and after each
  layer the visual rows are put back to the projector output (they skip self-attention and FFN).

`freeze_prefix` (the reference's 7B behaviour): text tokens before a row's last visual token (its image end)
get no attention update in any layer. Their attention output rows are zeroed, so the residual passes them
through attention unchanged; they still run the FFN, and later tokens read their K/V. Rows without an image
freeze nothing. Decoded tokens come after the image and are never frozen.

No new parameters. Every token keeps the rotary position ids the adapter gives it in the full prompt (one per
token, or Qwen2-VL's three axes). Rows may hold any number of images and visual tokens, anywhere: each row's
text and visual tokens are packed to the left of rectangular sets whose padding entries are invalid (never
attended to). `removed` visual tokens (a given subset) and `keep` (the share ranked highest by the attention of
the query rows at the first selected layer, as FastV ranks) take visual tokens out of every cross-attention.

`visual_updates=True` (masks form only) gives the visual tokens back their own causal self-attention and FFN;
with every layer selected, `freeze_prefix` off and nothing pruned, that is the dense model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from transformers import DynamicCache

from efficient_models.token_schedule.engine import (
    ScheduleCache,
    ScheduledLLM,
    ScheduledOutput,
    TokenSet,
)
from efficient_models.token_schedule.schedule import TokenSchedule
from efficient_models.vica.cross_attention import keep_top, rank_visual, visual_keys, visual_keys_values
from efficient_models.vica.token_sets import as_mask, frozen_prefix, left_packed, pick
from workbench.errors import InputError
from workbench.models.adapter import ArchitectureAdapter

Form = Literal["fast", "masks"]


@contextmanager
def silenced(layers: Sequence[torch.nn.Module], rows: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the attention output of `rows` [batch, n] is zero in every layer (no query rows)."""
    if rows is None or not bool(rows.any()):
        yield
        return

    def hook(module, args, output):
        return (output[0].masked_fill(rows[..., None], 0.0), *output[1:])

    handles = [layer.self_attn.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def causal(queries: TokenSet, keys: TokenSet, strict: bool = False) -> torch.Tensor:
    """[batch, q, k]: the valid keys at (unless `strict`) or before each query's place in the prompt."""
    if strict:
        return keys.valid[:, None, :] & (keys.index[:, None, :] < queries.index[:, :, None])
    return keys.valid[:, None, :] & (keys.index[:, None, :] <= queries.index[:, :, None])


def with_self(allowed: torch.Tensor) -> torch.Tensor:
    """`allowed` [batch, n, n] where every query may see itself, so no softmax row is empty (padding, visual rows)."""
    return allowed | torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)


def gather_heads(tensor: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """Entries `places` [batch, k] of a [batch, heads, n, head_dim] tensor."""
    return tensor.gather(2, places[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[-1]))


class ViCALLM(ScheduledLLM):
    """A vision-language model's LLM run as ViCA; `generate` and `decode` are the token-schedule engine's."""

    def __init__(self, adapter: ArchitectureAdapter, cross_layers: Sequence[int], freeze_prefix: bool = True,
                 keep: float | None = None, form: Form = "fast", visual_updates: bool = False):
        # Every layer's input holds text only: the schedule in which the visual tokens never enter.
        super().__init__(adapter, TokenSchedule(adapter.num_llm_layers, exit_layer=0, name="vica"))
        if self.attention not in ("sdpa", "eager"):
            raise InputError(f"ViCA masks each layer's attention, which needs sdpa or eager attention, "
                             f"not {self.attention}")
        if not cross_layers or not all(0 <= layer < adapter.num_llm_layers for layer in cross_layers):
            raise InputError(f"cross-attention layers {list(cross_layers)} are not within "
                             f"0..{adapter.num_llm_layers - 1}")
        if visual_updates and form != "masks":
            raise InputError("visual_updates runs the visual tokens through the layers, which only form='masks' does")
        attention = adapter.llm_layers[0].self_attn
        if not all(hasattr(attention, name) for name in ("k_proj", "v_proj", "head_dim")):
            raise InputError(f"{type(attention).__name__} has no k_proj / v_proj to give the visual tokens K/V")
        self.cross_layers, self.first_cross = set(cross_layers), min(cross_layers)
        self.freeze_prefix, self.keep, self.form, self.visual_updates = freeze_prefix, keep, form, visual_updates

    def forward(self, embeddings: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                queries: torch.Tensor | None = None, removed: torch.Tensor | None = None, use_cache: bool = False,
                layer_outputs: bool = False, positions: torch.Tensor | None = None) -> ScheduledOutput:
        """Prefill (or a training forward) over full sequences, with `ScheduledLLM.forward`'s arguments: `queries`
        [batch, seq] (default: the last token) rank the visual tokens where `keep` is set; `removed` visual tokens
        are never read. `hidden` holds the final-normed states of the text tokens (`present`); the fast form
        leaves zeros at the visual tokens, the masks form their own rows. With `keep`, `kept` maps the first
        selected layer to the visual tokens [batch, seq] every selected layer reads."""
        length = embeddings.shape[1]
        real, visual, read, queries, prompt = self.prompt_inputs(embeddings, input_ids, attention_mask, queries,
                                                                 removed, positions)
        quiet = frozen_prefix(visual, real) if self.freeze_prefix else None
        run = self.fast if self.form == "fast" else self.masked
        cache = DynamicCache()  # also without `use_cache`: the selected layers read the visual K/V from it
        hidden, key_valid, outputs, kept = run(embeddings, visual, read, real, queries & real & ~visual, prompt, quiet,
                                               cache, layer_outputs)
        state = None
        if use_cache:  # a decoded token continues after the prompt's largest id in every layer
            next_position = prompt.next_position.expand(len(key_valid), -1).clone()
            state = ScheduleCache(cache, key_valid, next_position, length)
        return ScheduledOutput(self.language_model.norm(hidden), real & ~visual, state, outputs, kept)

    # --- the fast form ---------------------------------------------------------------------

    def fast(self, embeddings, visual, read, real, queries, prompt, quiet, cache, layer_outputs):
        """Text through every layer; before a selected layer runs, the visual K/V go into its cache."""
        length = embeddings.shape[1]
        text = left_packed(~visual)
        text = TokenSet(text.index, text.valid & real.gather(1, text.index))
        seen = left_packed(read)  # the visual tokens the text reads
        hidden, frozen = text.take(embeddings), seen.take(embeddings)
        rotary = (text.take(prompt.cos), text.take(prompt.sin))
        own = with_self(causal(text, text))  # text keys, in the selected layers' mask
        text_mask = self.layer_mask(self.prefill_allowed(text), text.valid, hidden.dtype)
        cross_mask = None  # the selected layers' mask, made once (again after the ranking changes what they read)
        key_valid, outputs, kept = [], [], {}
        with silenced(self.adapter.llm_layers, None if quiet is None else text.take(quiet)):
            for number, layer in enumerate(self.adapter.llm_layers):
                mask, valid = text_mask, text.valid
                if number in self.cross_layers and seen.index.shape[1]:
                    keys, values = visual_keys_values(layer, frozen, seen.take(prompt.cos), seen.take(prompt.sin))
                    if self.keep is not None and number == self.first_cross:
                        scores = rank_visual(layer, hidden, rotary, text.take(queries), keys,
                                             causal(text, seen, strict=True))
                        seen, places = pick(seen, keep_top(scores, seen.valid, self.keep))
                        kept[number] = as_mask(seen, length)
                        frozen = frozen.gather(1, places[..., None].expand(-1, -1, frozen.shape[-1]))
                        keys, values = gather_heads(keys, places), gather_heads(values, places)
                        cross_mask = None
                    cache.update(keys, values, layer.self_attn.layer_idx)
                    if cross_mask is None:
                        allowed = torch.cat([causal(text, seen, strict=True), own], 2)
                        cross_mask = self.layer_mask(allowed, valid, hidden.dtype)
                    mask, valid = cross_mask, torch.cat([seen.valid, text.valid], 1)
                hidden = layer(hidden, attention_mask=mask, past_key_values=cache, use_cache=True,
                               position_embeddings=rotary)
                key_valid.append(valid)
                if layer_outputs:
                    outputs.append(self.scatter(hidden, text, length))
        return self.scatter(hidden, text, length), key_valid, outputs, kept

    # --- the masks form --------------------------------------------------------------------

    def masked(self, embeddings, visual, read, real, queries, prompt, quiet, cache, layer_outputs):
        """The full sequence through every layer; ViCA is in the masks and in resetting the visual rows."""
        batch, length, _ = embeddings.shape
        everything = TokenSet(torch.arange(length, device=embeddings.device).expand(batch, -1), real)
        ordered = causal(everything, everything)
        own = ordered & ~visual[:, None, :]  # text keys
        if self.visual_updates:  # visual queries see the visual keys before them, as in the dense model
            own |= ordered & visual[:, :, None] & visual[:, None, :]
        own = with_self(own)
        rotary = (prompt.cos, prompt.sin)
        text_mask = self.layer_mask(own, real, embeddings.dtype)
        hidden, key_valid, outputs, kept = embeddings, [], [], {}
        with silenced(self.adapter.llm_layers, quiet):
            for number, layer in enumerate(self.adapter.llm_layers):
                mask, valid = text_mask, real & ~visual
                if number in self.cross_layers:
                    if self.keep is not None and number == self.first_cross:
                        read = kept[number] = self.ranked(layer, hidden, embeddings, read, everything, queries, prompt)
                    reads = ordered & read[:, None, :] & ~visual[:, :, None]  # text queries on the read visual keys
                    mask, valid = self.layer_mask(own | reads, real, hidden.dtype), real & (~visual | read)
                hidden = layer(hidden, attention_mask=mask, past_key_values=cache, use_cache=True,
                               position_embeddings=rotary)
                if not self.visual_updates:  # the visual tokens skip the layer: back to the projector output
                    hidden = torch.where(visual[..., None], embeddings, hidden)
                key_valid.append(valid)
                if layer_outputs:
                    outputs.append(hidden)
        return hidden, key_valid, outputs, kept

    def ranked(self, layer, hidden, embeddings, read, everything, queries, prompt) -> torch.Tensor:
        """[batch, seq]: the `keep` share of the `read` visual tokens, ranked as the fast form ranks them."""
        seen = left_packed(read)
        keys = visual_keys(layer, layer.input_layernorm(seen.take(embeddings)), seen.take(prompt.cos),
                           seen.take(prompt.sin))
        scores = rank_visual(layer, hidden, (prompt.cos, prompt.sin), queries, keys,
                             causal(everything, seen, strict=True))
        return as_mask(TokenSet(seen.index, keep_top(scores, seen.valid, self.keep)), read.shape[1])
