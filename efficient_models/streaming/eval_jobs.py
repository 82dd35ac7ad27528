"""`wb eval streaming`'s work as jobs (a run, a decoding layout, a policy), run in worker processes.

Streaming decoding feeds one sentence at a time, mostly one token per forward, which keeps one core busy and
leaves more cores idle; `--jobs N` runs N jobs at once, each in its own process with its share of the cores
(N processes of one thread, not one process of N threads). Rows come back in the order the jobs were listed,
whatever order they finish in.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class EvalJob:
    run: Path
    layout: str
    wait_k: int | None  # None: offline
    pairs: int  # the first pairs of the run's test split


_loaded: dict[Path, tuple] = {}  # this process's model, kept between its jobs on the same run


def evaluate_job(job: EvalJob, progress: bool = True) -> list[dict]:
    """The job's rows (see `evaluation.evaluate`), each with its run folder."""
    from efficient_models.streaming.evaluation import evaluate, held_out_pairs, load_streaming_run, trained_name

    if job.run not in _loaded:
        _loaded.clear()  # one model in memory at a time
        _loaded[job.run] = load_streaming_run(job.run)
    config, model, tokenizer = _loaded[job.run]
    rows = evaluate(model, tokenizer, config, held_out_pairs(job.run, job.pairs), [job.wait_k], [job.layout],
                    model_name=f", {trained_name(config)}", progress=progress)
    return [{"run": str(job.run), **row} for row in rows]


def _use_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_jobs(jobs: Sequence[EvalJob], workers: int, on_rows: Callable[[list[dict]], None]) -> list[dict]:
    """Every job's rows in job order; `on_rows` gets the rows finished so far (in job order) after each job."""
    finished: dict[int, list[dict]] = {}

    def done(index: int, rows: list[dict]) -> list[dict]:
        finished[index] = rows
        so_far = [row for position in sorted(finished) for row in finished[position]]
        on_rows(so_far)
        return so_far

    so_far: list[dict] = []
    if workers == 1:
        for index, job in enumerate(jobs):
            so_far = done(index, evaluate_job(job))
        return so_far
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_use_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(evaluate_job, job, False): index for index, job in enumerate(jobs)}
        for future in tqdm(as_completed(futures), total=len(futures), desc="streaming evaluation", unit="job"):
            so_far = done(futures[future], future.result())
    return so_far
