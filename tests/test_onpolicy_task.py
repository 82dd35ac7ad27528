"""The on-policy SFT task and grader: fixed disjoint splits, checkable answers, equivalent answers graded equal."""

import operator
import threading

import pytest

from efficient_models.onpolicy_sft.grader import answers_match, is_correct, last_boxed
from efficient_models.onpolicy_sft.task import MAX_VERBOSITY, VERBOSITY_WEIGHTS, problems
from workbench.errors import InputError


OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


def _replay(problem) -> int:
    """The answer recomputed from the events' arithmetic text, independently of the generator's bookkeeping."""
    amount = problem.start
    for event in problem.events:
        tokens = event.arithmetic.split(" = ")[0].split()  # "a op b" or "a + b * c"
        assert int(tokens[0]) == amount
        right = int(tokens[2]) if len(tokens) == 3 else OPERATORS[tokens[3]](int(tokens[2]), int(tokens[4]))
        if len(tokens) == 5:
            assert tokens[1] == "+"
        result = OPERATORS[tokens[1]](amount, right)
        if tokens[1] == "/":
            assert amount % right == 0  # shares are exact
        amount = result
    return amount


def test_splits_are_fixed_disjoint_and_prefix_stable():
    train, test = problems("train", 200, seed=3), problems("test", 60, seed=3)
    assert len(train) == 200 and len(test) == 60
    assert not {p.question for p in train} & {p.question for p in test}
    assert [p.question for p in problems("test", 20, seed=3)] == [p.question for p in test[:20]]
    assert [p.question for p in problems("test", 20, seed=4)] != [p.question for p in test[:20]]
    assert len({p.question for p in train}) == 200


def test_answers_are_the_arithmetic_of_the_events():
    for problem in problems("train", 300, seed=0, min_events=2, max_events=4):
        assert 2 <= len(problem.events) <= 4
        assert int(problem.answer) == _replay(problem) >= 0
        assert all(event.sentence in problem.question for event in problem.events)


def test_solutions_end_in_the_answer_and_verbose_is_much_longer():
    chosen = problems("test", 200, seed=1)
    for problem in chosen:
        concise, verbose = problem.concise_solution(), problem.verbose_solution()
        assert is_correct(concise, problem.answer) and is_correct(verbose, problem.answer)
        assert len(verbose) > (3 if problem.verbosity >= 1 else 1.2) * len(concise)
    assert sum(len(p.verbose_solution()) for p in chosen) > 5 * sum(len(p.concise_solution()) for p in chosen)


def test_verbosity_levels_add_their_redundancy_and_follow_their_weights():
    chosen = problems("train", 1000, seed=0)
    for problem in chosen[:100]:
        verbose, level = problem.verbose_solution(), problem.verbosity
        assert verbose.count("Let me check") == (len(problem.events) if level >= 2 else 0)
        assert ("Let me restate" in verbose) == (level >= 1)
        assert ("recheck once more" in verbose) == (level >= 3)
    shares = [sum(p.verbosity == level for p in chosen) / len(chosen) for level in range(MAX_VERBOSITY + 1)]
    assert shares == pytest.approx(VERBOSITY_WEIGHTS, abs=0.05)
    # The same problem always gets the same level: the reasoner's data is fixed by the seed.
    assert [p.verbosity for p in problems("train", 50, seed=0)] == [p.verbosity for p in chosen[:50]]


def test_bad_task_settings_are_one_line_errors():
    with pytest.raises(InputError, match="split"):
        problems("validation", 3)
    with pytest.raises(InputError, match="events"):
        problems("train", 3, min_events=3, max_events=2)


@pytest.mark.parametrize("response, reference", [
    ("so \\boxed{0.5}", "1/2"), ("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{12.0}", "12"), ("first \\boxed{3}, no: \\boxed{4}", "4"), ("\\boxed{{12}}", "12"),
    ("\\fbox{7}", "7"), ("\\boxed{ 18 }", "18"),
])
def test_equivalent_answers_are_correct(response, reference):
    assert is_correct(response, reference)


@pytest.mark.parametrize("response, reference", [
    ("first \\boxed{3}, no: \\boxed{4}", "3"),  # only the last box counts
    ("the answer is 4", "4"),  # no box
    ("\\boxed{4", "4"),  # never closed
    ("\\boxed{4} and \\boxed{4", "4"),  # the last box never closed: not the earlier one either
    ("\\boxed{}", "4"), ("\\boxed{-4}", "4"), ("\\boxed{x}", "4"), ("\\boxed{\\text{four}}", "4"),
    ("\\boxed{" + "1+" * 40 + "1}", "41"),  # too long to parse: refused
])
def test_wrong_missing_or_malformed_answers_are_wrong(response, reference):
    assert not is_correct(response, reference)


def test_nested_braces_are_read_whole():
    assert last_boxed("x \\boxed{\\frac{a}{b+\\sqrt{2}}} y") == "\\frac{a}{b+\\sqrt{2}}"
    assert last_boxed("\\boxed{a}\\boxed{b}") == "b"
    assert last_boxed("nothing") is None


def test_grading_works_off_the_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(answers_match("\\frac{1}{2}", "0.5")))
    worker.start()
    worker.join()
    assert results == [True]
