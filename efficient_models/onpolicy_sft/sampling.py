"""On-policy sampling: G responses to each of P prompts at temperature T, capped at a token budget.

One batched `generate` call per chunk of prompts, with the KV cache, left-padded prompts, and pure
temperature sampling (no top-k / top-p: the on-policy claim is about samples of the policy itself, and
transformers' defaults would otherwise apply top-k 50). A response is finished when it produced an
end-of-sequence token within the cap; the budget can shrink linearly over training (`BudgetSchedule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from efficient_models.onpolicy_sft.filtering import Sample


@dataclass(frozen=True)
class BudgetSchedule:
    """The response-token budget of each step: `start`, moving linearly to `end` (None: constant) over `steps`."""

    start: int
    end: int | None = None
    steps: int = 1

    def __post_init__(self):
        if self.start < 1 or (self.end is not None and self.end < 1) or self.steps < 1:
            raise ValueError(f"budgets must be >= 1 token and steps >= 1; got {self.start} -> {self.end} over "
                             f"{self.steps} steps")

    def at(self, step: int) -> int:
        if self.end is None or self.steps == 1:
            return self.start
        progress = min(max(step, 0), self.steps - 1) / (self.steps - 1)
        return round(self.start + (self.end - self.start) * progress)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt as the model's user turn (its chat template, when it has one), ready for the answer."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def stop_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The end-of-sequence tokens: the tokenizer's and those of the model's generation config (<|im_end|> ...)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    ids = {*configured, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
    if not ids:
        raise ValueError("the tokenizer and the model name no end-of-sequence token: responses could never finish")
    return ids


def cut_at_stop(generated: Sequence[int], stops: set[int]) -> tuple[tuple[int, ...], bool]:
    """A generated row up to and including its first stop token, and whether it had one."""
    for position, token in enumerate(generated):
        if token in stops:
            return tuple(generated[:position + 1]), True
    return tuple(generated), False


@torch.no_grad()
def sample_responses(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[Sequence[int]],
                     samples_per_prompt: int, max_new_tokens: int, temperature: float = 1.0,
                     prompts_per_batch: int | None = None) -> list[Sample]:
    """`samples_per_prompt` sampled responses per prompt, prompt by prompt; seed torch first to reproduce them."""
    if samples_per_prompt < 1 or max_new_tokens < 1 or temperature <= 0:
        raise ValueError(f"need samples >= 1, max_new_tokens >= 1 and temperature > 0; got {samples_per_prompt}, "
                         f"{max_new_tokens}, {temperature}")
    stops = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunk = prompts_per_batch or len(prompt_ids)
    samples = []
    try:
        for first in range(0, len(prompt_ids), chunk):
            rows = prompt_ids[first:first + chunk]
            width = max(map(len, rows))
            input_ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows], device=device)
            attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                    temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
                                    num_return_sequences=samples_per_prompt, max_new_tokens=max_new_tokens,
                                    min_new_tokens=0, eos_token_id=sorted(stops), pad_token_id=pad_id, use_cache=True)
            for row, generated in enumerate(output[:, width:].tolist()):
                response, finished = cut_at_stop(generated, stops)
                samples.append(Sample(first + row // samples_per_prompt,
                                      tokenizer.decode(response, skip_special_tokens=True), response, finished))
    finally:
        model.train(was_training)
    return samples
