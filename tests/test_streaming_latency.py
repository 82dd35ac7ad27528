"""AL and LAAL in source words: hand-computed cases, and SimulEval's own values on the same delays."""

import pytest

from efficient_models.streaming.latency import (
    Lagged, average_lagging, corpus_latency, length_adaptive_average_lagging,
)
from workbench.errors import InputError


def test_hand_computed_al_and_laal_when_the_hypothesis_is_longer():
    # |X| = 5 source words, reference of 4 words, hypothesis of 6 (delays), wait-2-like.
    delays = [2, 3, 4, 5, 5, 5]
    # AL: rate |X|/|Y_ref| = 1.25; tau = 4 (first delay reaching 5):
    # (2 - 0) + (3 - 1.25) + (4 - 2.5) + (5 - 3.75) = 6.5 -> 6.5 / 4
    assert average_lagging(delays, 5, 4) == pytest.approx(1.625)
    # LAAL: rate |X|/max(6, 4) = 5/6: 2 + (3 - 5/6) + (4 - 10/6) + (5 - 15/6) = 9 -> 9 / 4
    assert length_adaptive_average_lagging(delays, 5, 4) == pytest.approx(2.25)


def test_laal_equals_al_when_the_hypothesis_is_not_longer():
    delays = [1, 2, 3, 4]
    # rate 4/6: 1 + (2 - 2/3) + (3 - 4/3) + (4 - 2) = 6 -> 6 / 4
    assert average_lagging(delays, 4, 6) == length_adaptive_average_lagging(delays, 4, 6) == pytest.approx(1.5)


def test_the_reference_implementations_errors_change_the_score():
    """Counting the end marker as a source word, or the hypothesis as the reference, gives other numbers."""
    delays = [2, 3, 4, 5, 5, 5]
    correct = length_adaptive_average_lagging(delays, 5, 4)
    assert length_adaptive_average_lagging(delays, 6, 4) != pytest.approx(correct)
    assert average_lagging(delays, 5, len(delays)) == pytest.approx(correct)  # why their LAAL came out as AL
    assert average_lagging(delays, 5, 4) != pytest.approx(correct)


def test_a_first_delay_past_the_source_is_the_score():
    assert average_lagging([7], 5, 3) == length_adaptive_average_lagging([7], 5, 3) == 7


# Delays, |X|, |Y_ref| and the AL / LAAL that SimulEval 1.1.4's own ALScorer.compute and LAALScorer.compute
# returned on them (its latency_scorer.py run from the unpacked wheel, `pip download simuleval==1.1.4
# --no-deps`, with its unrelated imports stubbed; it is not installed because it pins tqdm==4.64.1).
# Over 205 cases (these and 200 random ones) our functions matched it to 4e-15.
SIMULEVAL_CASES = [
    ([2, 3, 4, 5, 5, 5], 5, 4, 1.625, 2.25),
    ([1, 2, 3, 4], 4, 6, 1.5, 1.5),
    ([3, 3, 6, 6, 6, 6, 6, 6, 6], 6, 5, 2.8000000000000003, 3.3333333333333335),
    ([7], 5, 3, 7, 7),
    ([2, 2, 2], 10, 3, -1.3333333333333333, -1.3333333333333333),
]


@pytest.mark.parametrize(("delays", "source", "reference", "al", "laal"), SIMULEVAL_CASES)
def test_simuleval_gives_the_same_values(delays, source, reference, al, laal):
    assert average_lagging(delays, source, reference) == pytest.approx(al, abs=1e-12)
    assert length_adaptive_average_lagging(delays, source, reference) == pytest.approx(laal, abs=1e-12)


def test_corpus_latency_is_the_mean_over_sentences_that_wrote():
    sentences = [Lagged([2, 3, 4, 5, 5, 5], 5, 4), Lagged([1, 2, 3, 4], 4, 6), Lagged([], 3, 3)]
    assert corpus_latency(sentences) == pytest.approx({"AL": (1.625 + 1.5) / 2, "LAAL": (2.25 + 1.5) / 2})
    with pytest.raises(InputError):
        corpus_latency([Lagged([], 3, 3)])
    with pytest.raises(InputError):
        average_lagging([1], 0, 3)
