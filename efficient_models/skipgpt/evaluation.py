"""SkipGPT's evaluation: perplexity on the test split for dense and a trained run, the realised sparsity of its
routing, and the wall-clock of its real-skipping forward against dense on the same inputs.

Realised sparsity is measured, not the target: the share of (layer, real token) pairs whose gate skips, for
attention and for the MLP, over every test block (argmax routing). Timing prefills the same first test blocks,
one per forward, once to warm up, then `repeats` rounds in which the models take turns, and keeps each one's
median; "gated" is how the reference runs the routed model (every module for every token, times its gate),
which computes the same as real skipping.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from efficient_models.registry import run_config
from efficient_models.skipgpt.config import SkipGPTConfig
from efficient_models.skipgpt.perplexity import perplexity
from efficient_models.skipgpt.routed_lm import RoutedLM
from efficient_models.skipgpt.training import ROUTERS_FILE, load_routers
from workbench.errors import InputError
from workbench.models.causal_lm import load_causal_lm

POSITION_BINS = 4  # quarters of a block: early to late tokens


@dataclass
class EvalRow:
    model: str
    perplexity: float
    attention_skipped: float  # share of (layer, real token) pairs that skip attention
    mlp_skipped: float
    modules_skipped: float  # both together
    forward_seconds: float  # median wall-clock of prefilling the timing blocks, one by one
    speedup: float  # dense seconds / these seconds


@dataclass
class SkipGPTRun:
    config: SkipGPTConfig
    dense: torch.nn.Module  # the model as loaded, without the run's LoRA
    routed: RoutedLM  # the run's routers on the model with its LoRA merged in
    tokenizer: object


def load_skipgpt_run(run: Path, model: str | None = None) -> SkipGPTRun:
    """A finished run: its config, the dense model, and the routed model (routers, LoRA merged when trained)."""
    config = run_config(run, "skipgpt")
    if not (run / ROUTERS_FILE).is_file():
        raise InputError(f"{run} has no {ROUTERS_FILE}: the run has not finished")
    dense, tokenizer = load_causal_lm(model or config.model)
    tuned = copy.deepcopy(dense)
    if (run / "lora").is_dir():
        from peft import PeftModel

        # Merged, so the routed forward pays for no adapter matmuls: it is timed against dense as deployed.
        tuned = PeftModel.from_pretrained(tuned, run / "lora").merge_and_unload()
    routed = RoutedLM(tuned, config.router_reduction).eval()
    load_routers(run / ROUTERS_FILE, routed)
    return SkipGPTRun(config, dense.eval(), routed, tokenizer)


def interleaved_medians(forwards: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall-clock of each forward after one warm-up round; the forwards take turns in every round, so
    a slow spell of a shared machine falls on all of them alike (synchronised on a GPU)."""
    def timed(forward) -> float:
        started = time.perf_counter()
        forward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for forward in forwards.values():
        timed(forward)
    rounds = [{name: timed(forward) for name, forward in forwards.items()} for _ in range(repeats)]
    return {name: statistics.median(times[name] for times in rounds) for name in forwards}


class SkipCounter:
    """Wraps the routed model as perplexity's logits function and counts skipped (layer, real token) pairs,
    in all, per layer and by position (`POSITION_BINS` equal bins of the block), for attention and the MLP."""

    def __init__(self, routed: RoutedLM) -> None:
        self.routed = routed
        layers = routed.num_layers
        self.skipped = {"attention": torch.zeros(layers, POSITION_BINS), "mlp": torch.zeros(layers, POSITION_BINS)}
        self.real = torch.zeros(POSITION_BINS)  # real tokens per position bin (each seen by every layer)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        output = self.routed(input_ids.to(self.routed.model.device), skip=True)
        real = output.real.cpu()
        bins = torch.arange(real.shape[1]) * POSITION_BINS // real.shape[1]
        self.real += torch.zeros(POSITION_BINS).index_add(0, bins, real.sum(0).float())
        for module, gates in (("attention", output.attention_gates), ("mlp", output.mlp_gates)):
            for layer, gate in enumerate(gates):
                skipped = (real & ~gate.bool().cpu()).sum(0).float()
                self.skipped[module][layer] += torch.zeros(POSITION_BINS).index_add(0, bins, skipped)
        return output.logits

    def share(self, module: str) -> float:
        """The share of (layer, real token) pairs that skip `module`."""
        return float(self.skipped[module].sum() / (self.real.sum() * self.routed.num_layers))

    def routing(self) -> dict[str, list]:
        """Where compute goes: skip shares per layer and by position bin, for attention and the MLP."""
        return {f"{module}_skipped_{by}": [round(float(value), 4) for value in shares]
                for module, counts in self.skipped.items()
                for by, shares in (("by_layer", counts.sum(1) / self.real.sum()),
                                   ("by_position", counts.sum(0) / (self.real * self.routed.num_layers)))}


@torch.no_grad()
def evaluate(run: SkipGPTRun, blocks: torch.Tensor, batch_size: int, timing_blocks: int, repeats: int, label: str
             ) -> tuple[list[EvalRow], dict[str, list]]:
    """Rows for dense, the run routed as the reference computes it (gated) and with real skipping; and where
    the routed model skips (`SkipCounter.routing`)."""
    device = run.routed.model.device
    # One block per forward, as a prompt is prefilled: in a padded batch the pack is as wide as the row that
    # runs the most tokens, so a batch saves only what its busiest row saves.
    timing = [block[None].to(device) for block in blocks[:timing_blocks]]
    dense_ppl = perplexity(lambda ids: run.dense(ids.to(device)).logits, blocks, batch_size, progress=True)
    counter = SkipCounter(run.routed)
    routed_ppl = perplexity(counter, blocks, batch_size, progress=True)
    seconds = interleaved_medians({"dense": lambda: [run.dense(ids) for ids in timing],
                                   "gated": lambda: [run.routed(ids) for ids in timing],
                                   "skip": lambda: [run.routed(ids, skip=True) for ids in timing]}, repeats)
    dense_seconds, gated_seconds, skip_seconds = seconds["dense"], seconds["gated"], seconds["skip"]
    attention, mlp = counter.share("attention"), counter.share("mlp")
    both = (attention + mlp) / 2
    rows = [EvalRow("dense", dense_ppl, 0.0, 0.0, 0.0, dense_seconds, 1.0),
            EvalRow(f"{label}, gated (reference)", routed_ppl, attention, mlp, both, gated_seconds,
                    dense_seconds / gated_seconds),
            EvalRow(f"{label}, real skipping", routed_ppl, attention, mlp, both, skip_seconds,
                    dense_seconds / skip_seconds)]
    return rows, counter.routing()


def rows_json(rows: list[EvalRow]) -> list[dict]:
    return [asdict(row) for row in rows]
