"""Benchmark: the cost of capturing every LLM layer through the tracing layer.

Against a plain forward with `output_hidden_states=True` on the same batch, in one process.
Plain and traced runs alternate so that drift (thermal, other load) hits both alike; the
reported figure is the median of the per-pair ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch

from workbench.models.loading import LoadedModel
from workbench.tracing import CaptureSpec, capture


@dataclass
class TraceOverhead:
    model: str
    batch_size: int
    sequence_length: int
    repeats: int
    plain_median_s: float
    traced_median_s: float
    median_ratio: float  # median over pairs of traced / plain
    goal: float = 1.2

    @property
    def meets_goal(self) -> bool:
        return self.median_ratio <= self.goal

    def to_dict(self) -> dict:
        return {**asdict(self), "meets_goal": self.meets_goal}


def _seconds(run: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure_trace_overhead(
    loaded: LoadedModel, inputs: Mapping[str, torch.Tensor], repeats: int = 10, warmup: int = 2,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> TraceOverhead:
    spec = CaptureSpec(llm_layers="all", logits=True)

    def plain() -> object:
        with torch.no_grad():
            return loaded.model(**inputs, output_hidden_states=True)

    def traced() -> object:
        return capture(loaded, inputs, spec)

    for _ in range(warmup):
        plain(), traced()
    plain_times, traced_times = [], []
    for done in range(repeats):
        plain_times.append(_seconds(plain))
        traced_times.append(_seconds(traced))
        progress(done + 1, repeats)
    input_ids = inputs["input_ids"]
    return TraceOverhead(
        model=loaded.name,
        batch_size=int(input_ids.shape[0]),
        sequence_length=int(input_ids.shape[1]),
        repeats=repeats,
        plain_median_s=statistics.median(plain_times),
        traced_median_s=statistics.median(traced_times),
        median_ratio=statistics.median(t / p for t, p in zip(traced_times, plain_times)),
    )
