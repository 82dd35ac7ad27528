"""Tokenised training conversations: chat-template text, expanded image tokens, answer-only labels.

A conversation is about one probe scene: its image sits in the first user turn, followed by one or
more question/answer turns. The text comes from the processor's own chat template, rendered one
turn at a time, so the first turn is exactly the evaluation prompt (`format_prompt`: the question
after the image, with the generation prompt) and later turns are what the template renders for a
multi-turn chat. Only each answer and the end-of-turn token after it are supervised, so the model
learns to answer and to stop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workbench.data.probe_scenes import QAPair
from workbench.errors import InputError

IGNORE_INDEX = -100  # label of positions without loss (the index torch's cross entropy skips)
CAPTION_PROMPT = "Describe the image."

Turn = tuple[str, str]  # (question, answer)


@dataclass(frozen=True)
class Conversation:
    """Turns about one scene; the scene's image belongs to the first question."""

    scene: int  # row of the scene in the run's feature cache
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class TokenisedConversation:
    scene: int
    input_ids: torch.Tensor  # [length]; the image placeholder expanded to one token per visual token
    labels: torch.Tensor  # [length]; the token itself where it is supervised, IGNORE_INDEX elsewhere
    num_answers: int

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def caption_conversation(scene: int, caption: str) -> Conversation:
    return Conversation(scene, ((CAPTION_PROMPT, caption),))


def split_evenly(items: Sequence[Any], max_size: int) -> list[list[Any]]:
    """Consecutive chunks of at most `max_size`, as equal in size as possible (10 into 4 -> 4, 3, 3)."""
    chunks = math.ceil(len(items) / max_size)
    if chunks == 0:
        return []
    size, larger = divmod(len(items), chunks)
    bounds = np.cumsum([0] + [size + 1] * larger + [size] * (chunks - larger))
    return [list(items[start:end]) for start, end in zip(bounds[:-1], bounds[1:])]


def qa_conversations(scene: int, pairs: Sequence[QAPair], rng: np.random.Generator, max_turns: int,
                     single_question_fraction: float) -> list[Conversation]:
    """All of a scene's pairs, shuffled and packed into conversations of at most `max_turns` turns.

    With probability `single_question_fraction` the first pair gets a conversation of its own.
    """
    turns = [(pairs[index].question, pairs[index].answer) for index in rng.permutation(len(pairs))]
    groups = []
    if turns and rng.random() < single_question_fraction:
        groups.append(turns[:1])
        turns = turns[1:]
    groups += split_evenly(turns, max_turns)
    return [Conversation(scene, tuple(group)) for group in groups]


def chat_messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """Chat messages with the image item before the first question, as `format_prompt` builds them."""
    messages: list[dict[str, Any]] = []
    for index, (question, answer) in enumerate(turns):
        content = [{"type": "image"}] if index == 0 else []
        content.append({"type": "text", "text": question})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def render(processor: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def text_segments(processor: Any, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
    """The conversation's text as consecutive (piece, supervised) segments.

    Each turn's prompt is the template rendered up to that turn with the generation prompt; the
    supervised piece is the answer plus the end-of-turn token, and whatever the template puts after
    that (a newline) is not supervised.
    """
    messages = chat_messages(turns)
    end_of_turn = processor.tokenizer.eos_token
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for index, (_, answer) in enumerate(turns):
        prompt = render(processor, messages[: 2 * index + 1], add_generation_prompt=True)
        full = render(processor, messages[: 2 * index + 2], add_generation_prompt=False)
        reply, supervised = full[len(prompt):], answer + end_of_turn
        if not (prompt.startswith(rendered) and full.startswith(prompt) and reply.startswith(supervised)):
            raise InputError(f"the model's chat template does not extend a conversation turn by turn, each answer "
                             f"closed by {end_of_turn!r}, so training sequences (a trained variant's) cannot be "
                             "built from it")
        segments += [(prompt[len(rendered):], False), (supervised, True), (reply[len(supervised):], False)]
        rendered = full
    return [(text, supervised) for text, supervised in segments if text]


def expand_image_token(token_ids: list[int], image_token_id: int, image_tokens: int) -> list[int]:
    """One placeholder per visual token, as the processor expands `<image>` before tokenising."""
    expanded: list[int] = []
    for token_id in token_ids:
        expanded += [token_id] * image_tokens if token_id == image_token_id else [token_id]
    return expanded


def tokenise_conversation(processor: Any, conversation: Conversation, image_tokens: int) -> TokenisedConversation:
    """Token ids and labels of one conversation; `image_tokens` visual tokens stand for its image."""
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    input_ids: list[int] = []
    labels: list[int] = []
    # Pieces are tokenised one by one so labels follow segment bounds exactly; every bound sits next to
    # a special token or a newline, which the tokenizer never merges across (a test checks the result
    # equals the processor's tokenisation of the whole text).
    for text, supervised in text_segments(processor, conversation.turns):
        piece = expand_image_token(tokenizer(text, add_special_tokens=False)["input_ids"], image_token_id,
                                   image_tokens)
        input_ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return TokenisedConversation(conversation.scene, torch.tensor(input_ids), torch.tensor(labels),
                                 len(conversation.turns))
