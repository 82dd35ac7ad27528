"""Group position ids and word segmentation: which source unit and which target word each token belongs to.

The source group is [prompt, source words, end]; its units are numbered 0 (the prompt), 1..N (the words)
and N + 1 (the end marker), and its position ids count 0..S-1 in arrival order. The target group is
[assistant prefix, target words, end]; its words are numbered 0 (the prefix), 1..T (the words) and T + 1
(the end token), and its position ids count from an offset phi. Nothing is ever re-encoded: a token keeps
the position it was given when it arrived.

Target words are found from the tokens themselves (`WordBoundaries`), so that training and decoding, which
sees only the tokens it generates, cut words in the same places.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workbench.errors import InputError

SPACE_MARKERS = ("Ġ", "▁", "Ċ", " ", "\n")  # byte-level BPE, SentencePiece and plain leading whitespace


@dataclass(frozen=True)
class SourceGroup:
    """The source as it arrives: token ids and the unit (0 prompt, 1..N words, N + 1 end) of each."""

    ids: list[int]
    units: list[int]

    @classmethod
    def build(cls, prompt: Sequence[int], words: Sequence[Sequence[int]], end: Sequence[int]) -> SourceGroup:
        pieces = [prompt, *words, end]
        if any(len(piece) == 0 for piece in pieces):
            raise InputError("the prompt, every source word and the end marker must each have at least one token")
        ids = [token for piece in pieces for token in piece]
        units = [unit for unit, piece in enumerate(pieces) for _ in piece]
        return cls(ids, units)

    @property
    def num_words(self) -> int:
        """Source words, not counting the prompt or the end marker (the source length latency uses)."""
        return self.num_units - 2

    @property
    def num_units(self) -> int:
        return self.units[-1] + 1

    def tokens_of_units(self, count: int) -> int:
        """How many tokens units 0..count-1 span."""
        return sum(1 for unit in self.units if unit < count)

    def position_ids(self) -> list[int]:
        return list(range(len(self.ids)))


@dataclass(frozen=True)
class WordBoundaries:
    """Which tokens start a new word: one led by whitespace, or a non-punctuation token after punctuation."""

    space_led: torch.Tensor  # bool, one per vocabulary id
    punctuation: torch.Tensor  # bool: the token is punctuation only

    @classmethod
    def from_pieces(cls, pieces: Sequence[str]) -> WordBoundaries:
        """From each vocabulary id's token string (`tokenizer.convert_ids_to_tokens(range(len(tokenizer)))`)."""
        space_led = [piece.startswith(SPACE_MARKERS) for piece in pieces]
        bare = [piece.lstrip("".join(SPACE_MARKERS)) for piece in pieces]
        punctuation = [bool(text) and all(char in string.punctuation for char in text) for text in bare]
        return cls(torch.tensor(space_led), torch.tensor(punctuation))

    def starts_word(self, previous: int, token: int) -> bool:
        return bool(self.space_led[token]) or bool(self.punctuation[previous] and not self.punctuation[token])

    def word_starts_after(self, previous: int) -> torch.Tensor:
        """Bool over the vocabulary: the tokens that would start a new word after `previous`."""
        after_punctuation = ~self.punctuation if self.punctuation[previous] else torch.zeros_like(self.punctuation)
        return self.space_led | after_punctuation


def target_words(prefix: Sequence[int], content: Sequence[int], end: Sequence[int],
                 boundaries: WordBoundaries) -> list[int]:
    """The word of each target token: 0 for the prefix, 1..T for the content, T + 1 for the end tokens."""
    words = [0] * len(prefix)
    word = 0
    for index, token in enumerate(content):
        if index == 0 or boundaries.starts_word(content[index - 1], token):
            word += 1
        words.append(word)
    return words + [word + 1] * len(end)


def target_position_ids(length: int, offset: int = 0) -> list[int]:
    """The target group's position ids: phi, phi + 1, ... (phi = 0 by default, as the source starts)."""
    return list(range(offset, offset + length))
