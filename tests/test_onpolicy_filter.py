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
    assert counts == {"samples": 8, "kept": 3, "truncated": 2, "over_budget": 1, "wrong": 2, "not_shortest": 0,
                      "correct": 5, "correct_but_truncated": 1, "prompts": 3, "prompts_dropped": 1}
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


def test_keep_shortest_keeps_each_prompts_shortest_passing_samples_and_counts_the_rest():
    answers = ["4", "7"]
    samples = [
        _sample(0, "\\boxed{4}", 9),
        _sample(0, "\\boxed{4}", 6),  # kept: shortest of prompt 0
        _sample(0, "\\boxed{5}", 2),  # wrong: shorter, but never a candidate
        _sample(0, "\\boxed{4}", 6),  # a tie: the earlier one is kept
        _sample(1, "\\boxed{7}", 8),  # kept: prompt 1's only passing sample
        _sample(1, "\\boxed{7}", 30),  # over budget
    ]
    result = filter_samples(samples, answers, budget=20, keep_shortest=1)
    assert [(s.prompt_index, s.num_tokens) for s in result.kept] == [(0, 6), (1, 8)]
    assert result.kept[0] is samples[1]
    counts = result.counts
    assert (counts.kept, counts.not_shortest, counts.wrong, counts.over_budget) == (2, 2, 1, 1)
    assert counts.kept + counts.truncated + counts.over_budget + counts.wrong + counts.not_shortest == counts.samples
    two = filter_samples(samples, answers, budget=20, keep_shortest=2)
    assert [s.num_tokens for s in two.kept] == [6, 6, 8] and two.counts.not_shortest == 1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="budget"):
        filter_samples([], ["1"], budget=0)
    with pytest.raises(ValueError, match="prompt 3"):
        filter_samples([_sample(3, "\\boxed{1}", 1)], ["1"], budget=4)
    with pytest.raises(ValueError, match="keep_shortest"):
        filter_samples([], ["1"], budget=4, keep_shortest=0)
