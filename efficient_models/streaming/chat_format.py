"""A chat model's own template, cut into the streaming groups: prompt, source words, source end; prefix, end.

The template is rendered once around marker strings, and the text around the markers gives the pieces,
so any Hugging Face chat tokenizer works. Source words are tokenized one at a time, as they would arrive
(a space before every word but the first), so training and streaming see the same source tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from efficient_models.streaming.config import INSTRUCTION
from efficient_models.streaming.groups import SourceGroup, WordBoundaries, target_words
from workbench.errors import InputError

SOURCE_MARKER, TARGET_MARKER = "\u2063SOURCE\u2063", "\u2063TARGET\u2063"


@dataclass(frozen=True)
class ChatFormat:
    prompt: list[int]
    source_end: list[int]
    prefix: list[int]  # the assistant prefix, the target group's word 0
    end_token: int
    boundaries: WordBoundaries

    @classmethod
    def from_tokenizer(cls, tokenizer, instruction: str = INSTRUCTION) -> ChatFormat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"{type(tokenizer).__name__} has no chat template: streaming needs a chat model")
        user = [{"role": "user", "content": instruction + SOURCE_MARKER}]
        asked = tokenizer.apply_chat_template(user, tokenize=False)
        prompted = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        answered = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": TARGET_MARKER}],
                                                 tokenize=False)
        if not prompted.startswith(asked) or TARGET_MARKER not in answered:
            raise InputError("the chat template does not put the assistant's prefix after the user turn")
        before, after = asked.split(SOURCE_MARKER)
        end = _ids(tokenizer, answered.split(TARGET_MARKER)[1])
        if not end:
            raise InputError("the chat template writes nothing after the assistant's answer: no end token")
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return cls(prompt=_ids(tokenizer, before), source_end=_ids(tokenizer, after),
                   prefix=_ids(tokenizer, prompted[len(asked):]), end_token=end[0],
                   boundaries=WordBoundaries.from_pieces([piece or "" for piece in pieces]))

    def source_group(self, tokenizer, words: Sequence[str]) -> SourceGroup:
        if not words:
            raise InputError("the source has no words")
        return SourceGroup.build(self.prompt, [_ids(tokenizer, (" " if index else "") + word)
                                               for index, word in enumerate(words)], self.source_end)

    def target(self, tokenizer, text: str) -> tuple[list[int], list[int]]:
        """The target group's ids [prefix, text, end token] and the word of each."""
        content = _ids(tokenizer, text)
        return [*self.prefix, *content, self.end_token], target_words(self.prefix, content, [self.end_token],
                                                                      self.boundaries)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
