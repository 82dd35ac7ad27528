"""Streaming translation with group positions, two KV caches and a wait-k policy at word granularity.

READ appends the next source unit to the source cache (attending to the source cache only). WRITE feeds
target tokens against source + target (`streams.GroupStream`; the baselines are other `streams` layouts)
and decodes greedily, always (a checkpoint's generation config, which may ask for sampling, is not read).

Before the first token of target word j is chosen, the source units < min(k + j, total) must have been
read (`mask.wait_k_visibility`). Whether a token starts a new word is known only once it is chosen, so then
the token before it (the last token of the previous word) is taken back from the target cache, the source
is read, and that token is fed again with the new visibility; the decision to end the word stands, so the
token it then predicts is the best one that starts a word (or the end token). That costs one extra
single-token forward per word and makes decoding see exactly the mask training used (training gives the
last token of word j - 1 word j's visibility, and it predicts a word start).

A WRITE ends at a word boundary (`groups.WordBoundaries`: whitespace, or after punctuation), after
`max_tokens_per_write` tokens of one word, or at the end token, which is written only after the whole
source is read; decoding halts when the target runs more than `max_lag_words` words past the source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from efficient_models.streaming.groups import SourceGroup, WordBoundaries
from efficient_models.streaming.mask import wait_k_visibility
from efficient_models.streaming.streams import LAYOUTS
from efficient_models.streaming.two_caches import ComputeCount


@dataclass(frozen=True)
class StreamingPolicy:
    wait_k: int
    target_offset: int = 0  # phi: the first target position id
    max_tokens_per_write: int = 50
    max_lag_words: int = 100


@dataclass
class StreamingResult:
    """What a streaming decode produced, and what each fed target token saw (for checking against a mask)."""

    target: list[int]  # [prefix, generated tokens, end token if produced]
    delays: list[int] = field(default_factory=list)  # per generated target word, source words read before it
    visible: list[int] = field(default_factory=list)  # per fed target token, the source units it attended to
    logits: list[torch.Tensor] = field(default_factory=list)  # per fed target token, its final logits
    units_read: int = 0
    compute: ComputeCount = field(default_factory=ComputeCount)  # what the decode ran through the model
    # layouts that keep one sequence in arrival order (interleaved, the ablation's): (token id, is target)
    arrival_order: list[tuple[int, bool]] = field(default_factory=list)


@torch.no_grad()
def stream_translate(model, source: SourceGroup, prefix: Sequence[int], end_token: int,
                     boundaries: WordBoundaries, policy: StreamingPolicy, layout: str = "group") -> StreamingResult:
    """Greedy simultaneous decoding of `source` under wait-k; the result holds the target and its delays.

    `layout`: "group" (two caches, group positions), "interleaved" (one cache in arrival order, baseline b),
    "reencode" (the batch layout encoded afresh after each READ, baseline a) or one of the ablation's
    "fix-..." layouts; see `streams` and `ablation`.
    """
    stream = LAYOUTS[layout](model, source, policy.target_offset)
    total = source.num_units

    def visibility(word: int) -> int:
        return wait_k_visibility(word, policy.wait_k, total)

    result = StreamingResult(target=list(prefix))
    stream.read_until(visibility(1))  # the first READ: the prompt and k source words
    if len(prefix) > 1:
        logits = stream.write(prefix[:-1], 0)
        result.logits += list(logits)
        result.visible += [stream.units_read] * (len(prefix) - 1)
    word, tokens_in_word = 0, 0
    word_decided, restrict_to_word_starts = False, False
    while True:
        pending = len(result.target) - 1  # the last target token, not yet in the target cache
        logits = stream.write(result.target[pending:], pending)[-1]
        previous = result.target[pending]
        if restrict_to_word_starts:
            # The model chose to end the word before this READ; it now picks how the next word starts.
            allowed = boundaries.word_starts_after(previous).to(logits.device)
            allowed[end_token] = True
            token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
        else:
            token = int(logits.argmax())
        chose_word_start = token == end_token or boundaries.starts_word(previous, token)
        starts_word = (word_decided or word == 0 or chose_word_start
                       or tokens_in_word >= policy.max_tokens_per_write)
        needed = total if token == end_token else visibility(word + 1)  # the end comes after the whole source
        if starts_word and stream.units_read < needed:
            # The pending token predicts the next word: take it back, read, and feed it again.
            stream.take_back_last()
            stream.read_until(needed)
            word_decided, restrict_to_word_starts = True, chose_word_start
            continue
        word_decided, restrict_to_word_starts = False, False
        result.logits.append(logits)
        result.visible.append(stream.units_read)
        result.target.append(token)
        if token == end_token:
            break
        if starts_word:
            word, tokens_in_word = word + 1, 0
            result.delays.append(min(stream.units_read - 1, source.num_words))
            if word - source.num_words > policy.max_lag_words:
                break
        tokens_in_word += 1
    result.units_read, result.compute = stream.units_read, stream.compute
    result.arrival_order = list(getattr(stream, "order", []))
    return result
