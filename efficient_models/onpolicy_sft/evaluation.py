"""`wb eval reasoning`: accuracy and length of a model's sampled solutions on the task's test split.

n samples per problem at temperature T under a token cap give pass@1 (the mean share correct) and
pass@k by the unbiased estimator, the mean and median response length in tokens, and the share of
responses truncated at the cap (a truncated response counts as wrong, whatever box it holds).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from efficient_models.onpolicy_sft.grader import is_correct
from efficient_models.onpolicy_sft.pass_at_k import mean_pass_at_k
from efficient_models.onpolicy_sft.sampling import encode_prompt, sample_responses
from efficient_models.onpolicy_sft.task import Problem


def evaluate_reasoning(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, test_problems: Sequence[Problem],
                       samples_per_problem: int, max_new_tokens: int, ks: Sequence[int] = (1,),
                       temperature: float = 1.0, seed: int = 0, prompts_per_generate: int | None = None) -> dict:
    """The metrics of `samples_per_problem` samples of each problem (seeded: the same numbers on a rerun)."""
    if not test_problems:
        raise ValueError("evaluation needs at least one problem")
    if any(not 1 <= k <= samples_per_problem for k in ks):
        raise ValueError(f"every k of pass@k must be within 1..{samples_per_problem} (the samples per problem); "
                         f"got {list(ks)}")
    torch.manual_seed(seed)
    prompt_ids = [encode_prompt(tokenizer, problem.prompt) for problem in test_problems]
    samples = sample_responses(model, tokenizer, prompt_ids, samples_per_problem, max_new_tokens, temperature,
                               prompts_per_generate)
    correct_counts = [0] * len(test_problems)
    for sample in samples:
        correct_counts[sample.prompt_index] += sample.finished and is_correct(sample.text,
                                                                              test_problems[sample.prompt_index].answer)
    lengths = [sample.num_tokens for sample in samples]
    return {"problems": len(test_problems), "samples_per_problem": samples_per_problem,
            "max_new_tokens": max_new_tokens, "temperature": temperature,
            **{f"pass@{k}": round(mean_pass_at_k(correct_counts, samples_per_problem, k), 4) for k in sorted(set(ks))},
            "mean_tokens": round(float(np.mean(lengths)), 2), "median_tokens": float(np.median(lengths)),
            "share_truncated": round(sum(not sample.finished for sample in samples) / len(samples), 4),
            "example": samples[0].text}
