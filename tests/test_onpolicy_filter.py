"""The on-policy filter: wrong, truncated and over-budget samples are dropped, each counted once."""

import pytest

from efficient_models.onpolicy_sft.filtering import Sample, filter_samples


def _sample(prompt: int, text: str, length: int, finished: bool = True) -> Sample:
    return Sample(prompt, text, tuple(range(length)), finished)


def test_each_rejection_is_counted_once_and_counts_add_up():
    answers = ["4", "7", "10"]
    samples = [
        _sample(0, "\\boxed{4}", 5),  # kept
        _sample(0, "\\boxed{4.0}", 8),  # kept: an equivalent answer
        _sample(0, "\\boxed{5}", 5),  # wrong
        _sample(0, "\\boxed{4}", 12, finished=False),  # truncated with a correct box: still dropped
        _sample(1, "\\boxed{7}", 11),  # over budget (10)
        _sample(1, "no box", 3),  # wrong
        _sample(1, "\\boxed{7", 10, finished=False),  # truncated
        _sample(2, "\\boxed{10}", 10),  # kept: exactly at the budget
    ]
    result = filter_samples(samples, answers, budget=10)
    assert [s.text for s in result.kept] == ["\\boxed{4}", "\\boxed{4.0}", "\\boxed{10}"]
    counts = result.counts.as_dict()
    assert counts == {"samples": 8, "kept": 3, "truncated": 2, "over_budget": 1, "wrong": 2, "correct": 5,
                      "correct_but_truncated": 1, "prompts": 3, "prompts_dropped": 1}
    assert counts["kept"] + counts["truncated"] + counts["over_budget"] + counts["wrong"] == counts["samples"]


def test_truncation_is_checked_before_the_answer_and_the_budget():
    # A truncated sample is one "truncated", never also "wrong" or "over budget".
    result = filter_samples([_sample(0, "\\boxed{1}", 50, finished=False)], ["2"], budget=10)
    assert (result.counts.truncated, result.counts.over_budget, result.counts.wrong) == (1, 0, 0)


def test_no_budget_keeps_any_finished_correct_length():
    samples = [_sample(0, "\\boxed{3}", 900), _sample(0, "\\boxed{3}", 900, finished=False)]
    result = filter_samples(samples, ["3"], budget=None)
    assert result.counts.kept == 1 and result.counts.truncated == 1 and result.counts.prompts_dropped == 0


def test_prompts_without_samples_or_kept_samples_are_dropped():
    result = filter_samples([_sample(1, "\\boxed{2}", 2)], ["1", "2", "3"], budget=4)
    assert result.counts.prompts_dropped == 2 and [s.prompt_index for s in result.kept] == [1]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="budget"):
        filter_samples([], ["1"], budget=0)
    with pytest.raises(ValueError, match="prompt 3"):
        filter_samples([_sample(3, "\\boxed{1}", 1)], ["1"], budget=4)
