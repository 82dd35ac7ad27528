"""One table row per SkipGPT baseline: perplexity on test blocks, realised skip share, forward time against dense.

The share skipped is of (token, module) pairs: static pruning removes the same modules for every token;
Mixture-of-Depths skips both modules of a layer for the tokens that do not run it (its realised share,
counted on the perplexity pass). Times are the median wall-clock seconds of one forward pass over the
first `batch_size` test blocks, the baseline and the dense model taking turns on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from efficient_models.skipgpt.evaluation import interleaved_medians
from efficient_models.skipgpt.mixture_of_depths import MixtureOfDepths, Routing
from efficient_models.skipgpt.perplexity import perplexity
from efficient_models.skipgpt.static_pruning import ModuleInfluence, lowest_influence, removed_modules
from workbench.errors import InputError


@dataclass
class BaselineRow:
    """A baseline at one compute budget, measured against the dense model in the same run."""

    name: str
    fraction_skipped: float
    perplexity: float
    seconds: float
    dense_seconds: float


def check_measurement(test_blocks: torch.Tensor, batch_size: int, repeats: int) -> None:
    """A one-line `InputError` unless there are test blocks, and the batch size and repeats are positive."""
    if test_blocks.dim() != 2 or len(test_blocks) == 0 or batch_size < 1 or repeats < 1:
        raise InputError(f"measuring needs (blocks, tokens) test blocks, batch_size >= 1 and repeats >= 1 "
                         f"(got {tuple(test_blocks.shape)}, {batch_size}, {repeats})")


@torch.no_grad()
def paired_seconds(method: Callable[[], object], dense: Callable[[], object], repeats: int = 3) -> tuple[float, float]:
    """Median seconds of `method()` and of `dense()`, taking turns `repeats` times after one warm-up."""
    seconds = interleaved_medians({"method": method, "dense": dense}, repeats)
    return seconds["method"], seconds["dense"]


def static_pruning_row(model: PreTrainedModel, influence: ModuleInfluence, test_blocks: torch.Tensor,
                       fraction: float, batch_size: int = 8, repeats: int = 3) -> BaselineRow:
    """`model` with the `fraction` of modules of lowest `influence` (from train blocks) removed."""
    check_measurement(test_blocks, batch_size, repeats)
    removed = lowest_influence(influence, fraction)

    def logits_of(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, use_cache=False).logits

    def pruned_forward():
        with removed_modules(model, removed):
            return logits_of(test_blocks[:batch_size])

    with removed_modules(model, removed):
        value = perplexity(logits_of, test_blocks, batch_size)
    seconds, dense_seconds = paired_seconds(pruned_forward, lambda: logits_of(test_blocks[:batch_size]), repeats)
    modules = len(influence.attention) + len(influence.mlp)
    return BaselineRow("static-pruning", len(removed) / modules, value, seconds, dense_seconds)


def mixture_of_depths_row(depth: MixtureOfDepths, test_blocks: torch.Tensor, routing: Routing = "predictor",
                          batch_size: int = 8, repeats: int = 3) -> BaselineRow:
    """`depth` (trained) routing by `routing`: "topk" (non-causal, the training routing) or "predictor" (causal)."""
    check_measurement(test_blocks, batch_size, repeats)
    ran, decisions = 0, 0

    def logits_of(input_ids: torch.Tensor) -> torch.Tensor:
        nonlocal ran, decisions
        output = depth(input_ids, routing=routing)
        ran, decisions = ran + int(output.ran.sum()), decisions + output.ran.numel()
        return output.logits

    value = perplexity(logits_of, test_blocks, batch_size)
    skipped = 1 - ran / decisions
    timing = test_blocks[:batch_size]
    seconds, dense_seconds = paired_seconds(lambda: depth(timing, routing=routing),
                                            lambda: depth.model(input_ids=timing, use_cache=False), repeats)
    return BaselineRow(f"mixture-of-depths-{routing}", skipped, value, seconds, dense_seconds)
