"""The on-policy filter: keep the samples that are correct AND finished within the length budget.

Each rejected sample is counted under exactly one reason, checked in this order: truncated (it hit the
generation cap without ending), over budget (it ended, but longer than the budget), wrong (it ended within
the budget with a wrong or missing answer), not shortest (optional: a prompt keeps only its `keep_shortest`
shortest passing samples, a budget relative to what the model itself just wrote). A prompt none of whose
samples is kept is dropped. The counts always add up (samples = kept + truncated + over budget + wrong + not
shortest), so nothing is dropped silently; they are logged for every step. `correct` and
`correct_but_truncated` also show what a filter that checks only the answer (as the reference does) would have
kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from efficient_models.onpolicy_sft.grader import is_correct


@dataclass(frozen=True)
class Sample:
    """One sampled response to prompt `prompt_index`: its text, its tokens, and whether it ended by itself."""

    prompt_index: int
    text: str
    response_ids: tuple[int, ...]  # generated tokens, the end-of-sequence token included when finished
    finished: bool  # produced end-of-sequence before the generation cap

    @property
    def num_tokens(self) -> int:
        """The response's length against the budget: its end-of-sequence token counts, as it is generated."""
        return len(self.response_ids)


@dataclass(frozen=True)
class FilterCounts:
    samples: int
    kept: int
    truncated: int
    over_budget: int
    wrong: int
    not_shortest: int
    correct: int  # correct answers whatever their length or ending, kept or not
    correct_but_truncated: int  # what a filter that never checks truncation would also have kept
    prompts: int
    prompts_dropped: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class FilterResult:
    kept: list[Sample]
    counts: FilterCounts


def rejection(sample: Sample, correct: bool, budget: int | None) -> str | None:
    """Why `sample` is rejected ("truncated", "over_budget", "wrong"), or None when it is kept."""
    if not sample.finished:
        return "truncated"
    if budget is not None and sample.num_tokens > budget:
        return "over_budget"
    return None if correct else "wrong"


def filter_samples(samples: Sequence[Sample], answers: Sequence[str], budget: int | None,
                   grade: Callable[[str, str], bool] = is_correct, keep_shortest: int | None = None) -> FilterResult:
    """Keep the correct samples that finished within `budget` tokens (None: any finished length), and of each
    prompt's, with `keep_shortest`, only that many of the shortest (the earlier sample on a tie)."""
    if budget is not None and budget < 1:
        raise ValueError(f"the length budget must be >= 1 token, not {budget}")
    if keep_shortest is not None and keep_shortest < 1:
        raise ValueError(f"keep_shortest must be >= 1 sample per prompt, not {keep_shortest}")
    reasons = {"truncated": 0, "over_budget": 0, "wrong": 0}
    passed, correct, correct_but_truncated = [], 0, 0
    for sample in samples:
        if not 0 <= sample.prompt_index < len(answers):
            raise ValueError(f"sample of prompt {sample.prompt_index}, but there are {len(answers)} prompts")
        is_right = grade(sample.text, answers[sample.prompt_index])
        correct += is_right
        reason = rejection(sample, is_right, budget)
        if reason is None:
            passed.append(sample)
        else:
            reasons[reason] += 1
            correct_but_truncated += is_right and reason == "truncated"
    kept = passed if keep_shortest is None else shortest_per_prompt(passed, keep_shortest)
    prompts_with_kept = {sample.prompt_index for sample in kept}
    counts = FilterCounts(samples=len(samples), kept=len(kept), **reasons, not_shortest=len(passed) - len(kept),
                          correct=correct, correct_but_truncated=correct_but_truncated, prompts=len(answers),
                          prompts_dropped=len(answers) - len(prompts_with_kept))
    return FilterResult(kept, counts)


def shortest_per_prompt(samples: Sequence[Sample], count: int) -> list[Sample]:
    """Each prompt's `count` shortest samples, in the order given (a stable sort breaks ties by that order)."""
    chosen: dict[int, list[int]] = {}
    for index in sorted(range(len(samples)), key=lambda index: samples[index].num_tokens):
        picked = chosen.setdefault(samples[index].prompt_index, [])
        if len(picked) < count:
            picked.append(index)
    keep = {index for picked in chosen.values() for index in picked}
    return [sample for index, sample in enumerate(samples) if index in keep]
