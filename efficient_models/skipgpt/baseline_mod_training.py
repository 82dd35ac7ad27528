"""Training the Mixture-of-Depths baseline's routers and predictors on SkipGPT's train blocks, with the house loop.

The language model stays frozen (as in SkipGPT's first stage); routers and predictors train together
under top-k routing. The loss is the next-token cross-entropy plus the predictors' BCE against top-k
membership, over every layer and token (blocks hold no padding). `predictor_agreement` then says how
often the causal predictor makes the top-k decision on held-out blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from efficient_models.skipgpt.mixture_of_depths import MixtureOfDepths
from workbench.errors import InputError
from workbench.training.loop import MicroBatch, TrainingRecord, open_run, train
from workbench.training.optimisation import Optimisation

STAGE = "routers"


class DepthTrainingLoss(nn.Module):
    """Cross-entropy of the top-k routed model plus the predictors' BCE on top-k membership."""

    def __init__(self, depth: MixtureOfDepths):
        super().__init__()
        self.depth = depth

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        output = self.depth(input_ids, routing="topk")
        logits = output.logits[:, :-1].float()
        language = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        membership = nn.functional.binary_cross_entropy_with_logits(output.predictor_logits.float(),
                                                                    output.ran.float())
        return language + membership


def train_mixture_of_depths(depth: MixtureOfDepths, blocks: torch.Tensor, run_dir: Path, steps: int,
                            batch_size: int = 8, learning_rate: float = 2e-3, seed: int = 0) -> TrainingRecord:
    """Train `depth`'s routers and predictors on `blocks` for `steps` steps of `batch_size` random blocks; a finished
    run in `run_dir` only has its weights restored. The model is frozen; `depth` is left in eval mode."""
    if steps < 1 or batch_size < 1 or len(blocks) == 0:
        raise InputError(f"training needs steps >= 1, batch_size >= 1 and some blocks (got {steps}, {batch_size}, "
                         f"{len(blocks)})")
    depth.model.requires_grad_(False)
    parameters = {f"routers.{name}": value for name, value in depth.routers.named_parameters()}
    parameters |= {f"predictors.{name}": value for name, value in depth.predictors.named_parameters()}
    optimisation = Optimisation(steps=steps, learning_rate=learning_rate, warmup_steps=max(1, steps // 10),
                                final_learning_rate_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0,
                                precision="fp32", checkpoint_every=max(1, steps // 4), seed=seed)
    rng = np.random.default_rng(seed)
    size = min(batch_size, len(blocks))
    plan = [[MicroBatch({"input_ids": blocks[torch.as_tensor(rng.choice(len(blocks), size, replace=False))]})]
            for _ in range(steps)]
    settings = json.dumps({"capacity": depth.capacity, "blocks": list(blocks.shape), "steps": steps,
                           "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed}, indent=1)
    with open_run(Path(run_dir), {"mixture_of_depths.json": settings}, resume=True):
        record = train(DepthTrainingLoss(depth), parameters, plan, optimisation, Path(run_dir), stage=STAGE,
                       seed_entropy=(seed,), description="mixture-of-depths routers")
    depth.eval()
    return record


@torch.no_grad()
def predictor_agreement(depth: MixtureOfDepths, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Share of (layer, token) decisions of `blocks` where the causal predictor agrees with top-k routing."""
    agree, total = 0, 0
    for start in range(0, len(blocks), batch_size):
        output = depth(blocks[start:start + batch_size], routing="topk")
        agree += int(((output.predictor_logits > 0) == output.ran).sum())
        total += output.ran.numel()
    return agree / total
