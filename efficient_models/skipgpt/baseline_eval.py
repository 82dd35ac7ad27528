"""`wb eval skipgpt --baselines`: the two baselines at the run's budget, on the same text, beside the run's rows.

- Static module pruning (ShortGPT-style block influence, measured on `INFLUENCE_BLOCKS` train blocks): as many
  modules removed for every token as the run skips on average (its realised share of modules).
- Mixture-of-Depths at capacity 1 - the run's target sparsity: its routers and causal predictors train on the
  run's train blocks for the router stage's steps, blocks per step, learning rate and seed, the model frozen as in
  SkipGPT's first stage (the run folder `<out>/mixture-of-depths`, resumable). Rows for top-k routing (the
  training routing, non-causal) and for the causal predictor (what decoding can use).
"""

from __future__ import annotations

from pathlib import Path

import torch

from efficient_models.skipgpt.baseline_measure import BaselineRow, mixture_of_depths_row, static_pruning_row
from efficient_models.skipgpt.baseline_mod_training import predictor_agreement, train_mixture_of_depths
from efficient_models.skipgpt.evaluation import EvalRow, SkipGPTRun
from efficient_models.skipgpt.mixture_of_depths import MixtureOfDepths
from efficient_models.skipgpt.static_pruning import lowest_influence, module_influence
from efficient_models.skipgpt.text_data import text_blocks
from efficient_models.skipgpt.training import SkipGPTRecipe

INFLUENCE_BLOCKS = 16


def _row(baseline: BaselineRow, attention: float, mlp: float) -> EvalRow:
    return EvalRow(baseline.name, baseline.perplexity, attention, mlp, baseline.fraction_skipped, baseline.seconds,
                   baseline.dense_seconds / baseline.seconds)


def baseline_rows(run: SkipGPTRun, recipe: SkipGPTRecipe, test: torch.Tensor, modules_skipped: float, out: Path,
                  batch_size: int, repeats: int) -> tuple[list[EvalRow], dict[str, float]]:
    """Rows for static pruning and Mixture-of-Depths (top-k, predictor), and the predictor's agreement with top-k
    on the test blocks."""
    train = text_blocks(run.tokenizer, "train", recipe.block_size, recipe.data_seed)[:recipe.train_blocks]
    influence = module_influence(run.dense, train[:INFLUENCE_BLOCKS], batch_size)
    removed = lowest_influence(influence, modules_skipped)
    layers = len(influence.attention)
    pruning = static_pruning_row(run.dense, influence, test, modules_skipped, batch_size, repeats)
    rows = [_row(pruning, sum(ref.kind == "attention" for ref in removed) / layers,
                 sum(ref.kind == "mlp" for ref in removed) / layers)]

    stage = recipe.routers.optimisation
    depth = MixtureOfDepths(run.dense, capacity=1 - run.config.sparsity)
    train_mixture_of_depths(depth, train, out / "mixture-of-depths", stage.steps, recipe.blocks_per_step,
                            stage.learning_rate, stage.seed)
    for routing in ("topk", "predictor"):
        row = mixture_of_depths_row(depth, test, routing, batch_size, repeats)
        rows.append(_row(row, row.fraction_skipped, row.fraction_skipped))  # a skipped layer skips both modules
    return rows, {"mixture_of_depths_predictor_agreement": predictor_agreement(depth, test, batch_size)}
