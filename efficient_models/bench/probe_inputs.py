"""The fixed batches every timing runs on, the same for every variant (one image per row)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from workbench.evaluation.vqa import Question
from workbench.models.adapter import ArchitectureAdapter
from workbench.models.inputs import build_inputs
from workbench.models.loading import LoadedModel
from workbench.training.sequences import IGNORE_INDEX, Conversation, tokenise_conversation


PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")  # the prompt's; the training batch has its own


@dataclass
class BenchBatches:
    prompts: Mapping[str, torch.Tensor]  # left-padded prompts with pixels: prefill and decode
    training: Mapping[str, torch.Tensor]  # left-padded prompt + answer with the same pixels
    labels: torch.Tensor  # [batch, seq] of `training`: the token where supervised, IGNORE_INDEX elsewhere


def text_lengths(adapter: ArchitectureAdapter, inputs: Mapping[str, torch.Tensor]) -> list[int]:
    """Real (unpadded) non-visual tokens of each row."""
    real = inputs.get("attention_mask")
    real = torch.ones_like(inputs["input_ids"], dtype=torch.bool) if real is None else real.bool()
    return (real & ~adapter.visual_token_mask(inputs["input_ids"])).sum(1).tolist()


def answer_lengths(labels: torch.Tensor) -> list[int]:
    """Supervised tokens of each row (the positions whose logits a training step computes)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()


def left_pad(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.stack([torch.cat([row.new_full((width - len(row),), value), row]) for row in rows])


def probe_batches(loaded: LoadedModel, questions: Sequence[Question]) -> BenchBatches:
    """Timing batches of `questions`: their prompts as `build_inputs` makes them, and for training the same
    prompts followed by the answer and end of turn (`tokenise_conversation`, what `wb train` supervises)."""
    images = [scene.image for scene, _ in questions]
    prompts = build_inputs(loaded.processor, images, [pair.question for _, pair in questions], device=loaded.device)
    num_visual = int(loaded.adapter.visual_token_mask(prompts["input_ids"])[0].sum())
    conversations = [tokenise_conversation(loaded.processor, Conversation(row, ((pair.question, pair.answer),)),
                                           num_visual) for row, (_, pair) in enumerate(questions)]
    pad = loaded.processor.tokenizer.pad_token_id
    input_ids = left_pad([conversation.input_ids for conversation in conversations], pad)
    attention_mask = left_pad([torch.ones_like(conversation.input_ids) for conversation in conversations], 0)
    labels = left_pad([conversation.labels for conversation in conversations], IGNORE_INDEX)
    images = {key: value for key, value in prompts.items() if key not in PER_TOKEN}  # pixels, and grids where given
    training = {"input_ids": input_ids.to(loaded.device), "attention_mask": attention_mask.to(loaded.device), **images}
    return BenchBatches(prompts, training, labels.to(loaded.device))


def prompt_text_tokens(loaded: LoadedModel, questions: Sequence[Question]) -> list[int]:
    """Each question's prompt length in text tokens (what its prefill FLOPs are counted on)."""
    return [text_lengths(loaded.adapter, build_inputs(loaded.processor, [scene.image], [pair.question]))[0]
            for scene, pair in questions]
