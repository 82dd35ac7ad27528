"""The streaming attention mask over [source; target], and the wait-k visibility it is built from.

Source tokens attend causally to source tokens only (in streaming they are encoded before, and without, any
target). Target token t attends to the target tokens up to itself and to the source units < visible[t].
Under wait-k at word granularity, target word j may see source units < min(k + j, total) (the prompt is
unit 0), and the visibility is shifted by one token: the token that predicts word j (the last token of
word j - 1) already has word j's visibility. The assistant prefix (word 0) is written at the first WRITE, so
it sees what word 1 sees; the end token is written only after the whole source is read. Decoding
(`decoding.py`) produces exactly this mask; a test holds it to that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

READ_EVERYTHING = 10**9  # a wait-k so large that every word sees the whole source (offline)


def wait_k_visibility(word: int, wait_k: int, total_units: int) -> int:
    """The source units target word `word` may see: those < min(k + max(word, 1), total)."""
    return min(wait_k + max(word, 1), total_units)


def visible_units(words: Sequence[int], wait_k: int, total_units: int, ends: bool = True) -> list[int]:
    """Per target token, the source units it sees: those of the word the next token belongs to.

    With `ends`, the last word is the end token, which is written only once the whole source is read. The
    last target token predicts nothing; it keeps its own word's visibility.
    """
    seen = [wait_k_visibility(word, wait_k, total_units) for word in words]
    if ends:
        seen = [total_units if word == words[-1] else units for word, units in zip(words, seen, strict=True)]
    return [*seen[1:], seen[-1]]


def streaming_visibility(source_units: Sequence[int], target_visible: Sequence[int]) -> torch.Tensor:
    """Boolean [S + T, S + T]: row i may attend to column j."""
    units = torch.tensor(source_units)
    visible = torch.tensor(target_visible)
    source_length, target_length = len(units), len(visible)
    allowed = torch.zeros(source_length + target_length, source_length + target_length, dtype=torch.bool)
    allowed[:source_length, :source_length] = torch.ones(source_length, source_length, dtype=torch.bool).tril()
    allowed[source_length:, :source_length] = units[None, :] < visible[:, None]
    allowed[source_length:, source_length:] = torch.ones(target_length, target_length, dtype=torch.bool).tril()
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float mask the model adds to attention scores: 0 where allowed, the dtype's minimum elsewhere.

    Float rather than boolean because eager attention adds the mask, while SDPA takes either.
    Shape [batch, 1, query, key] from [query, key] or [batch, query, key].
    """
    blocked = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return blocked[None, None] if allowed.dim() == 2 else blocked[:, None]
