"""A loaded model whose LLM runs under a token schedule: the bench variant of every schedule method.

`ScheduledModel` pairs a `LoadedModel` with a `TokenSchedule` and runs through `ScheduledLLM`, so
dense, late injection, HiDrop, FastV, PyramidDrop and EmbedLens category removal share one
implementation of generation, prefill / decode timing, the training loss and the FLOPs count.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from efficient_models.token_schedule.engine import ScheduleCache, ScheduledLLM
from efficient_models.token_schedule.schedule import TokenSchedule
from workbench.errors import InputError
from workbench.flops import PROBE_IMAGE_SIZE, FlopsCount, ModelShapes, token_schedule_flops
from workbench.models.inputs import build_inputs
from workbench.models.loading import LoadedModel
from workbench.training.sequences import IGNORE_INDEX


def visual_tokens_per_image(loaded: LoadedModel) -> int:
    """How many visual tokens the processor gives one image (the schedules' N)."""
    inputs = build_inputs(loaded.processor, [Image.new("RGB", PROBE_IMAGE_SIZE[::-1])], ["?"], device="cpu")
    return int(loaded.adapter.visual_token_mask(inputs["input_ids"]).sum())


def answer_queries(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: the token just before each supervised span (it predicts the answer's first token)."""
    supervised = labels != IGNORE_INDEX
    queries = torch.zeros_like(supervised)
    queries[:, :-1] = supervised[:, 1:] & ~supervised[:, :-1]
    return queries


def answer_loss(engine: ScheduledLLM, embeddings: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy of the supervised tokens, the LLM run under `engine`'s schedule, ranked by the
    token before each answer (as HiDrop ranks in training); `positions` as `ScheduledLLM.forward` takes them."""
    hidden = engine.forward(embeddings, input_ids, attention_mask, queries=answer_queries(labels),
                            positions=positions).hidden
    targets = labels[:, 1:]  # position t predicts token t + 1
    supervised = targets != IGNORE_INDEX
    logits = engine.adapter.lm_head(hidden[:, :-1][supervised]).float()
    return nn.functional.cross_entropy(logits, targets[supervised])


@dataclass
class SchedulePrefill:
    cache: ScheduleCache
    token: torch.Tensor  # [batch]: the first answer token

    @property
    def cache_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.kv.layers)


@dataclass
class ScheduledModel:
    """A model whose LLM runs under `schedule`; a `BenchVariant`."""

    loaded: LoadedModel
    schedule: TokenSchedule
    name: str = ""

    def __post_init__(self):
        self.name = self.name or self.schedule.name
        if self.schedule.num_layers != self.loaded.adapter.num_llm_layers:
            raise InputError(f"the {self.name} schedule is for a {self.schedule.num_layers}-layer LLM; "
                             f"{self.loaded.name} has {self.loaded.adapter.num_llm_layers} layers")

    @functools.cached_property
    def engine(self) -> ScheduledLLM:
        return ScheduledLLM(self.loaded.adapter, self.schedule)

    def describe(self, shapes: ModelShapes) -> str:
        return self.schedule.describe(shapes.visual_tokens_per_image)

    def generate_text(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int,
                      removed: torch.Tensor | None = None) -> list[str]:
        tokens = self.engine.generate(inputs, max_new_tokens, removed=removed)
        decoded = self.loaded.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [text.strip() for text in decoded]

    def prefill(self, inputs: Mapping[str, torch.Tensor]) -> SchedulePrefill:
        """Embeddings from pixels, the scheduled LLM filling its cache (ranked by the last token), the LM head
        on the last token."""
        adapter = self.loaded.adapter
        output = self.engine.forward(adapter.input_embeddings(inputs), inputs["input_ids"],
                                     inputs.get("attention_mask"), use_cache=True,
                                     positions=adapter.position_ids(inputs))
        return SchedulePrefill(output.cache, adapter.lm_head(output.hidden[:, -1]).argmax(-1))

    def decode(self, prefilled: SchedulePrefill, steps: int) -> None:
        adapter = self.loaded.adapter
        token = prefilled.token
        for _ in range(steps):
            hidden = self.engine.decode(adapter.embed_tokens(token[:, None]), prefilled.cache)
            token = adapter.lm_head(hidden[:, -1]).argmax(-1)

    def training_loss(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        adapter = self.loaded.adapter
        return answer_loss(self.engine, adapter.input_embeddings(inputs), inputs["input_ids"], labels,
                           inputs.get("attention_mask"), adapter.position_ids(inputs))

    def flops(self, shapes: ModelShapes, text_tokens: int, answer_tokens: int = 1, decode_steps: int = 1) -> FlopsCount:
        return token_schedule_flops(shapes, text_tokens, self.schedule.keep_counts(shapes.visual_tokens_per_image),
                                    answer_tokens, decode_steps)
