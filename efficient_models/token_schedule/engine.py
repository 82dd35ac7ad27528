"""Run a vision-language model's LLM under a `TokenSchedule`: each layer sees only its visual tokens.

Read top to bottom, `ScheduledLLM.forward` is the decoder loop of the Hugging Face model with one
change: the sequence a layer runs on is a *token set* (original indices + validity, per row) that
changes between layers. Layers before the entry layer run on text only; at the entry layer the raw
projector outputs are put back at their slots; before a cut the visual tokens are ranked by the
attention of a few query rows (`scoring`) and the best are kept; from the exit layer on only
text is left. Tokens are physically removed, so the FLOPs and time saved are real.

The cut ranks by the attention of the layer about to run, or (`ranking_layer="previous"`, FastV) of
the layer before it, scored before that layer runs. Positions persist by default: every token keeps
the rotary position ids the adapter gives it in the full prompt (gaps allowed): one per token, or
Qwen2-VL's three (time, height, width); decoding continues after the prompt's largest id, on every
axis (what Qwen2-VL's `rope_deltas` give). With `positions="renumbered"` (PyramidDrop) each token set
that lacks some of the prompt's tokens is numbered 0..n-1 (on every axis, as text is) and its layers
decode from its length. Each layer's KV cache holds that layer's token set, so cache lengths differ
per layer; the decode step masks keys by the validity recorded at prefill.
Rows may be left-padded; padding and removed tokens stay in the set as invalid entries (never
attended to), which keeps every tensor rectangular. The main layers get a boolean mask (SDPA), an
additive one (eager), or a padding mask (flash-attention 2, which the index-ordered sets allow).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import DynamicCache

from efficient_models.token_schedule.schedule import TokenSchedule
from efficient_models.token_schedule.scoring import differentiable_keep, query_attention_scores
from workbench.errors import InputError
from workbench.models.adapter import ArchitectureAdapter


@dataclass
class TokenSet:
    """The tokens one layer runs on: per row, original sequence indices (increasing) and validity."""

    index: torch.Tensor  # [batch, n] long
    valid: torch.Tensor  # [batch, n] bool: False for padding and removed tokens

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of a full-length [batch, seq, ...] tensor at this set's indices."""
        index = self.index.view(*self.index.shape, *([1] * (tensor.dim() - 2)))
        return tensor.gather(1, index.expand(-1, -1, *tensor.shape[2:]))

    def subset(self, keep: torch.Tensor) -> tuple[TokenSet, torch.Tensor]:
        """The entries where `keep` [batch, n] is True (the same count per row), and their places in this set."""
        count = int(keep[0].sum())
        places = torch.arange(keep.shape[1], device=keep.device)
        places = torch.where(keep, places, places + keep.shape[1]).argsort(1)[:, :count]
        return TokenSet(self.index.gather(1, places), self.valid.gather(1, places)), places


def rows_where(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of each row of `mask` (which must have the same count per row)."""
    return torch.arange(mask.shape[1], device=mask.device).expand_as(mask)[mask].view(mask.shape[0], -1)


@dataclass
class ScheduleCache:
    """Decoding state: the KV cache (one token set per layer) and what the decode steps need to mask and place."""

    kv: DynamicCache
    key_valid: list[torch.Tensor]  # per layer [batch, keys]
    next_position: torch.Tensor  # [layers, batch]: rotary position of the next token in each layer
    length: int  # tokens so far in the full (unpruned) sequence


@dataclass
class PromptPositions:
    """The full prompt's rotary embeddings, and where numbering continues after it."""

    cos: torch.Tensor  # [batch, seq, head_dim]
    sin: torch.Tensor
    next_position: torch.Tensor  # [batch]: after the prompt's largest id, on every axis
    real_tokens: torch.Tensor  # [batch]: real (not padding) tokens in the prompt


class PromptInputs(NamedTuple):
    real: torch.Tensor  # [batch, seq] bool: not padding
    visual: torch.Tensor  # [batch, seq] bool: image tokens
    entering: torch.Tensor  # [batch, seq] bool: the real visual tokens not removed
    queries: torch.Tensor  # [batch, seq] bool: the rows whose attention ranks visual tokens
    prompt: PromptPositions


@dataclass
class LayerInputs:
    """What the layers running on one token set share: rotary embeddings, attention mask, next position."""

    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin [batch, n, head_dim]
    mask: torch.Tensor | None
    next_position: torch.Tensor  # [batch]: where a decoded token continues the numbering


@dataclass
class ScheduledOutput:
    hidden: torch.Tensor  # [batch, seq, d]: final-normed states; zeros where a token did not reach the end
    present: torch.Tensor  # [batch, seq] bool: tokens that reached the last layer
    cache: ScheduleCache | None = None
    layer_outputs: list[torch.Tensor] = field(default_factory=list)  # per layer [batch, seq, d] (zeros: absent)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # cut layer -> [batch, seq] visual tokens kept


class ScheduledLLM:
    """A vision-language model's LLM run under a token schedule (dense: the plain model)."""

    def __init__(self, adapter: ArchitectureAdapter, schedule: TokenSchedule, sharpness: float = 1.0):
        if schedule.num_layers != adapter.num_llm_layers:
            raise InputError(f"schedule {schedule.name!r} is for {schedule.num_layers} layers; "
                             f"the model has {adapter.num_llm_layers}")
        if not adapter.token_schedules:
            raise InputError(f"{type(adapter).__name__} does not build its LLM's input embeddings and rotary "
                             "positions outside the model, which token schedules need")
        self.adapter, self.schedule, self.sharpness = adapter, schedule, sharpness
        self.language_model = adapter.language_model
        self.attention = self.language_model.config._attn_implementation

    # --- masks ---------------------------------------------------------------------------

    def layer_mask(self, allowed: torch.Tensor | None, valid: torch.Tensor, dtype: torch.dtype):
        """The layer's attention mask from `allowed` [batch, q, k] (None: plain causal, nothing invalid)."""
        if self.attention == "flash_attention_2":
            return None if allowed is None else valid.long()  # index order = causal order: a padding mask suffices
        if allowed is None and self.attention == "sdpa":
            return None
        if allowed is None:
            allowed = torch.ones(valid.shape[1], valid.shape[1], dtype=torch.bool, device=valid.device).tril()[None]
        if self.attention == "sdpa":
            return allowed[:, None]
        return torch.zeros(allowed[:, None].shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed[:, None], torch.finfo(dtype).min)

    @staticmethod
    def prefill_allowed(tokens: TokenSet) -> torch.Tensor | None:
        if bool(tokens.valid.all()):
            return None
        allowed = tokens.valid[:, None, :] & (tokens.index[:, None, :] <= tokens.index[:, :, None])
        # A query that may see nothing (padding) attends to itself, so no softmax row is empty.
        return allowed | torch.eye(tokens.index.shape[1], dtype=torch.bool, device=allowed.device)

    # --- prefill -------------------------------------------------------------------------

    def prompt_inputs(self, embeddings: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      queries: torch.Tensor | None, removed: torch.Tensor | None, positions: torch.Tensor | None
                      ) -> PromptInputs:
        """`forward`'s arguments resolved: which tokens are real and visual, which visual ones enter (not
        `removed`), the ranking query rows (default: the last token), and the rotary tables."""
        batch, length, _ = embeddings.shape
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        visual = self.adapter.visual_token_mask(input_ids)
        entering = visual & real & (~removed.to(embeddings.device) if removed is not None else True)
        if queries is None:
            queries = torch.zeros_like(real)
            queries[:, -1] = True
        if positions is None:
            positions = self.adapter.position_ids({"input_ids": input_ids, "attention_mask": attention_mask})
        # A token decoded after the prompt continues after its largest id on every axis (left padding sits at 0).
        prompt = PromptPositions(*self.language_model.rotary_emb(embeddings, positions),
                                 positions.reshape(-1, batch, length).amax((0, 2)) + 1, real.sum(1))
        return PromptInputs(real, visual, entering, queries, prompt)

    def forward(self, embeddings: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                queries: torch.Tensor | None = None, removed: torch.Tensor | None = None, use_cache: bool = False,
                layer_outputs: bool = False, positions: torch.Tensor | None = None) -> ScheduledOutput:
        """Prefill (or a training forward) over full sequences.

        embeddings [batch, seq, d]: token embeddings with the projector outputs at the image tokens;
        attention_mask [batch, seq]: 1 for real tokens (left padding); queries [batch, seq] bool: the rows
        whose attention ranks visual tokens (default: the last token; in training, the token before each
        answer); removed [batch, seq] bool: visual tokens that never enter (category pruning);
        positions: the rotary position ids `adapter.position_ids(inputs)` gives ([batch, seq] or
        [axes, batch, seq]); by default the adapter's from `input_ids` and the mask alone.
        """
        batch, length, _ = embeddings.shape
        device = embeddings.device
        real, visual, entering, queries, prompt = self.prompt_inputs(embeddings, input_ids, attention_mask, queries,
                                                                     removed, positions)
        per_row = visual.sum(1)
        if not bool((per_row == per_row[0]).all()):
            raise InputError(f"rows of the batch hold different numbers of visual tokens ({per_row.tolist()}); "
                             "schedules need the same number of image tokens in every row (images of one size, "
                             "where the model tiles them or keeps their resolution)")
        num_visual = int(per_row[0])
        counts = self.schedule.keep_counts(num_visual)

        text_index = rows_where(~visual)
        tokens = TokenSet(text_index, real.gather(1, text_index))
        hidden = tokens.take(embeddings)
        present = 0  # visual entries in the set (invalid ones included): known from the schedule, no sync
        cache = DynamicCache() if use_cache else None
        key_valid, next_positions, outputs, kept = [], [], [], {}
        layer_inputs = None  # rebuilt only when the set changes
        scores = None  # the previous layer's ranking of the set, for a cut that ranks by it
        for number, layer in enumerate(self.adapter.llm_layers):
            if counts[number] and number == self.schedule.inject_layer:
                everything = torch.arange(length, device=device).expand(batch, -1)
                hidden = embeddings.scatter(1, tokens.index[..., None].expand_as(hidden), hidden)
                tokens, present, layer_inputs = TokenSet(everything, real & (~visual | entering)), num_visual, None
            if counts[number] == 0 and present:
                tokens, places = tokens.subset(~tokens.take(visual))
                hidden = hidden.gather(1, places[..., None].expand(-1, -1, hidden.shape[-1]))
                present, layer_inputs = 0, None
            elif 0 < counts[number] < present:
                if scores is None:
                    rotary = layer_inputs.rotary if layer_inputs else self.rotary(tokens, hidden, prompt)
                    scores = self.rank(layer, tokens, hidden, rotary, queries)
                tokens, hidden, kept[number] = self.cut(tokens, hidden, scores, visual, entering, counts[number])
                present, layer_inputs, scores = counts[number], None, None
            if layer_inputs is None:
                layer_inputs = self.layer_inputs(tokens, hidden, prompt)
            following = counts[number + 1] if number + 1 < len(counts) else 0
            if self.schedule.ranking_layer == "previous" and 0 < following < present:
                scores = self.rank(layer, tokens, hidden, layer_inputs.rotary, queries)
            hidden = layer(hidden, attention_mask=layer_inputs.mask, past_key_values=cache, use_cache=use_cache,
                           position_embeddings=layer_inputs.rotary)
            key_valid.append(tokens.valid)
            next_positions.append(layer_inputs.next_position)
            if layer_outputs:
                outputs.append(self.scatter(hidden, tokens, length))
        hidden = self.scatter(self.language_model.norm(hidden), tokens, length)
        present_mask = torch.zeros_like(real).scatter(1, tokens.index, True)
        state = ScheduleCache(cache, key_valid, torch.stack(next_positions), length) if use_cache else None
        return ScheduledOutput(hidden, present_mask, state, outputs, kept)

    def renumbered(self, tokens: TokenSet, prompt: PromptPositions) -> bool:
        """Whether the set is numbered 0..n-1 anew: under a renumbering schedule, once it lacks a real token of
        the prompt. Until then the prompt's own ids stand (the same numbers where a token has one position;
        Qwen2-VL's image tokens keep their grid ids)."""
        return self.schedule.positions == "renumbered" and not bool((tokens.valid.sum(1) == prompt.real_tokens).all())

    def rotary(self, tokens: TokenSet, hidden: torch.Tensor, prompt: PromptPositions
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The set's rotary embeddings: its entries' full-prompt ones, or renumbered 0..n-1 (on every axis)."""
        if not self.renumbered(tokens, prompt):
            return tokens.take(prompt.cos), tokens.take(prompt.sin)
        return self.language_model.rotary_emb(hidden, (tokens.valid.long().cumsum(1) - 1).clamp_min(0))

    def layer_inputs(self, tokens: TokenSet, hidden: torch.Tensor, prompt: PromptPositions) -> LayerInputs:
        return LayerInputs(self.rotary(tokens, hidden, prompt),
                           self.layer_mask(self.prefill_allowed(tokens), tokens.valid, hidden.dtype),
                           tokens.valid.sum(1) if self.renumbered(tokens, prompt) else prompt.next_position)

    def rank(self, layer, tokens: TokenSet, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
             queries: torch.Tensor) -> torch.Tensor:
        """[batch, n]: the attention `layer` pays from the query rows to each entry of `tokens`."""
        return query_attention_scores(layer, hidden, *rotary, tokens.index, tokens.valid, tokens.take(queries))

    def cut(self, tokens: TokenSet, hidden: torch.Tensor, scores: torch.Tensor, visual: torch.Tensor,
            entering: torch.Tensor, keep: int):
        """Keep the `keep` visual tokens of each row that score highest (text all stays)."""
        is_visual = tokens.take(visual)
        candidates = tokens.take(entering) & tokens.valid
        # Invalid visual entries rank below every candidate and above text, so every row keeps `keep` entries.
        ranking = torch.where(candidates, scores, torch.where(is_visual, -1e30, float("-inf")))
        chosen = torch.zeros_like(is_visual).scatter(1, ranking.topk(keep, dim=1).indices, True)
        multiplier = None
        if torch.is_grad_enabled() and hidden.requires_grad:
            _, multiplier = differentiable_keep(scores, candidates, keep, self.sharpness)
        new_tokens, places = tokens.subset(~is_visual | chosen)
        hidden = hidden.gather(1, places[..., None].expand(-1, -1, hidden.shape[-1]))
        if multiplier is not None:
            hidden = hidden * multiplier.gather(1, places).where(new_tokens.take(visual), 1.0)[..., None].to(hidden.dtype)
        kept = torch.zeros_like(visual).scatter(1, new_tokens.index, True) & visual
        return new_tokens, hidden, kept

    @staticmethod
    def scatter(hidden: torch.Tensor, tokens: TokenSet, length: int) -> torch.Tensor:
        full = hidden.new_zeros(hidden.shape[0], length, hidden.shape[-1])
        return full.scatter(1, tokens.index[..., None].expand_as(hidden), hidden)

    # --- decoding ------------------------------------------------------------------------

    def decode(self, embeddings: torch.Tensor, cache: ScheduleCache) -> torch.Tensor:
        """Final-normed states of new tokens [batch, t, d] appended after everything in `cache` (a text step)."""
        batch, steps, _ = embeddings.shape
        layers = cache.next_position.shape[0]
        positions = cache.next_position[..., None] + torch.arange(steps, device=embeddings.device)
        # One rotary call for every layer's positions (they differ per layer only when renumbered).
        cos, sin = self.language_model.rotary_emb(embeddings, positions.view(layers * batch, steps))
        cos, sin = cos.view(layers, batch, steps, -1), sin.view(layers, batch, steps, -1)
        hidden = embeddings
        for number, layer in enumerate(self.adapter.llm_layers):
            key_valid = torch.cat([cache.key_valid[number], cache.key_valid[number].new_ones(batch, steps)], 1)
            cache.key_valid[number] = key_valid
            mask = None  # one new token and every key valid: it may see them all
            if steps > 1 or not bool(key_valid.all()):
                past = key_valid.shape[1] - steps
                causal = torch.ones(steps, key_valid.shape[1], dtype=torch.bool, device=key_valid.device).tril(past)
                mask = self.layer_mask(key_valid[:, None, :] & causal[None], key_valid, hidden.dtype)
            hidden = layer(hidden, attention_mask=mask,
                           past_key_values=cache.kv, use_cache=True, position_embeddings=(cos[number], sin[number]))
        cache.next_position = cache.next_position + steps
        cache.length += steps
        return self.language_model.norm(hidden)

    # --- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int, use_cache: bool = True,
                 removed: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy new token ids [batch, <= max_new_tokens]; rows that ended are filled with the pad token."""
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeddings = self.adapter.input_embeddings(inputs)
        config = self.adapter.model.generation_config
        eos = torch.tensor(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id],
                           device=input_ids.device)
        pad = config.pad_token_id if config.pad_token_id is not None else int(eos[0])
        last_prompt = torch.zeros_like(input_ids, dtype=torch.bool)
        last_prompt[:, -1] = True
        positions = self.adapter.position_ids({**inputs, "attention_mask": attention_mask})
        output = self.forward(embeddings, input_ids, attention_mask, last_prompt, removed, use_cache=use_cache,
                              positions=positions)
        new_tokens, finished = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        hidden = output.hidden[:, -1:]
        for _ in range(max_new_tokens):
            token = self.adapter.lm_head(hidden[:, -1]).argmax(-1).masked_fill(finished, pad)
            new_tokens.append(token)
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or len(new_tokens) == max_new_tokens:
                break
            step = self.adapter.embed_tokens(token[:, None])
            if use_cache:
                hidden = self.decode(step, output.cache)
                continue
            # Without a cache: the whole sequence again, still ranked by the last prompt token, its positions
            # numbered by the adapter as a longer prompt (independent of how `decode` continues them).
            input_ids = torch.cat([input_ids, token[:, None]], 1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], 1)
            embeddings = torch.cat([embeddings, step], 1)
            last_prompt = torch.cat([last_prompt, torch.zeros_like(last_prompt[:, :1])], 1)
            positions = self.adapter.position_ids({**inputs, "input_ids": input_ids, "attention_mask": attention_mask})
            hidden = self.forward(embeddings, input_ids, attention_mask, last_prompt, removed,
                                  positions=positions).hidden
        return torch.stack(new_tokens, 1)
