"""Latency of simultaneous translation in source words: Average Lagging (AL) and Length-Adaptive AL (LAAL).

`delays[i]` is how many source words had been read when target word i was written; `source_length` counts
source words only (the end marker is not a word). The formulas follow SimulEval 1.1.4
(`simuleval/evaluator/scorers/latency_scorer.py`, ALScorer and LAALScorer, with a reference given):

    AL   = 1/tau * sum_{i < tau} (d_i - i * |X| / |Y_ref|)
    LAAL = 1/tau * sum_{i < tau} (d_i - i * |X| / max(|Y_hyp|, |Y_ref|))

where tau is the first (1-based) index whose delay reaches |X|, or the number of delays if none does, and
a first delay beyond |X| is the score itself. The reference implementation's LAAL used the delays' own
count in place of the reference length, which makes LAAL equal AL whenever the hypothesis is longer.
Corpus scores are the mean over sentences, as SimulEval reports them; a sentence with no delays is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import mean

from workbench.errors import InputError


def _lagging(delays: Sequence[float], source_length: int, rate_length: int) -> float:
    if source_length <= 0 or rate_length <= 0:
        raise InputError(f"latency needs a source and a reference of at least one word "
                         f"(got {source_length} and {rate_length})")
    if delays[0] > source_length:
        return float(delays[0])
    total, tau = 0.0, 0
    for index, delay in enumerate(delays):
        total += delay - index * source_length / rate_length
        tau = index + 1
        if delay >= source_length:
            break
    return total / tau


def average_lagging(delays: Sequence[float], source_length: int, reference_length: int) -> float:
    return _lagging(delays, source_length, reference_length)


def length_adaptive_average_lagging(delays: Sequence[float], source_length: int, reference_length: int) -> float:
    return _lagging(delays, source_length, max(len(delays), reference_length))


@dataclass(frozen=True)
class Lagged:
    """One translated sentence for latency: its delays, source length and reference length, in words."""

    delays: list[int]
    source_length: int
    reference_length: int


def corpus_latency(sentences: Sequence[Lagged]) -> dict[str, float]:
    """Mean AL and LAAL over the sentences that wrote at least one word."""
    scored = [sentence for sentence in sentences if sentence.delays]
    if not scored:
        raise InputError("no sentence wrote a target word: there is no latency to report")
    return {
        "AL": mean(average_lagging(s.delays, s.source_length, s.reference_length) for s in scored),
        "LAAL": mean(length_adaptive_average_lagging(s.delays, s.source_length, s.reference_length) for s in scored),
    }
