"""The measures of `wb analyze vision-layers`, as plain functions over per-layer patch features.

Layers are indices into the vision tower's `hidden_states` (0 = embeddings .. N = last block), and
every function takes `features`: layer -> [num_patches, d], one row per patch token of the run.
- `probe_accuracies`: a linear probe per (layer, target), trained on some scenes, scored on the others;
- `norm_profile`: mean token norm per layer and the share of high-norm outlier tokens;
- `consecutive_similarity` / `split_stages`: linear CKA between neighbouring layers, and the stages it gives;
- `recommend_layers`: one layer per stage (its best mean probe accuracy) plus the model's base layer(s).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from analyses.probe import fit_probe

# target -> (patch kinds it is defined on, label column)
TARGETS = {"colour": ("object",), "shape": ("object",), "char": ("text",),
           "position": ("object", "text", "background")}
MIN_COVERAGE = 0.6  # a patch mostly covered by one thing; mixed patches have no single label
# An outlier is also far above the median in plain terms: where most tokens have near-equal norms (flat
# background in the embeddings) the robust z-score alone would flag tokens only slightly above them.
OUTLIER_MIN_RATIO = 2.0


def _sample(mask: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """`mask` thinned to at most `limit` True entries, at random but reproducibly."""
    chosen = np.flatnonzero(mask)
    if len(chosen) > limit:
        chosen = np.random.default_rng(seed).choice(chosen, limit, replace=False)
    thinned = np.zeros_like(mask)
    thinned[chosen] = True
    return thinned


def probe_accuracies(patches: pd.DataFrame, features: Mapping[int, torch.Tensor], train_images: set[str],
                     max_tokens: int = 4000, seed: int = 0) -> pd.DataFrame:
    """One row per (layer, target): test accuracy of a logistic-regression probe and the majority-class
    accuracy on the same test patches (NaN where too few labelled patches). The split is by scene (image),
    so a probe cannot pass by recognising a scene it trained on; `max_tokens` caps the patches per target."""
    train = patches["image_id"].isin(train_images).to_numpy()
    rows = []
    for target, kinds in TARGETS.items():
        labelled = (patches["kind"].isin(kinds) & (patches["coverage"] >= MIN_COVERAGE)).to_numpy()
        if target == "position":  # a patch's place needs no majority label
            labelled = np.ones(len(patches), dtype=bool)
        selected = _sample(labelled, max_tokens, seed)
        labels = patches.loc[selected, target].to_numpy()
        for layer, states in features.items():
            fitted = fit_probe(states[torch.from_numpy(selected)].float().numpy(), labels, train[selected])
            accuracy, majority = fitted if fitted is not None else (np.nan, np.nan)
            rows.append({"layer": layer, "target": target, "accuracy": accuracy, "majority": majority})
    return pd.DataFrame(rows)


def norm_profile(features: Mapping[int, torch.Tensor], outlier_z: float) -> pd.DataFrame:
    """Per layer: mean token norm, and the share of tokens whose robust z-score of log norm (median and
    scaled MAD over that layer's tokens) exceeds `outlier_z` and whose norm is `OUTLIER_MIN_RATIO` times the
    median at least: the few high-norm tokens that ViTs such as DINOv2 without registers use as scratch space."""
    rows = []
    for layer, states in features.items():
        log_norm = states.float().norm(dim=-1).clamp(min=1e-12).log()
        median = log_norm.median()
        spread = 1.4826 * (log_norm - median).abs().median()  # the MAD of a normal sample estimates its sigma
        z = (log_norm - median) / spread.clamp(min=1e-6)
        outliers = (z > outlier_z) & (log_norm - median > math.log(OUTLIER_MIN_RATIO))
        rows.append({"layer": layer, "mean_norm": float(log_norm.exp().mean()),
                     "outlier_share": float(outliers.float().mean())})
    return pd.DataFrame(rows)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) between two views [tokens, d_x] and [tokens, d_y] of the same tokens:
    1 when one is a rotation and scaling of the other, near 0 when unrelated."""
    x = (x - x.mean(0)).double()
    y = (y - y.mean(0)).double()
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp(min=1e-12))


def consecutive_similarity(features: Mapping[int, torch.Tensor], max_tokens: int = 2000,
                           seed: int = 0) -> list[float]:
    """CKA between layer l and l + 1 for each layer but the last, on the same random sample of tokens."""
    layers = sorted(features)
    count = len(features[layers[0]])
    sample = torch.from_numpy(_sample(np.ones(count, dtype=bool), max_tokens, seed))
    return [linear_cka(features[a][sample].float(), features[b][sample].float()) for a, b in zip(layers, layers[1:])]


def split_stages(similarity_to_next: Sequence[float], threshold: float) -> list[list[int]]:
    """Contiguous stages [first, last] of layers 0 .. len(similarity_to_next): a new stage starts at
    layer l + 1 whenever the similarity between l and l + 1 falls below `threshold`."""
    stages = [[0, 0]]
    for layer, similarity in enumerate(similarity_to_next):
        if similarity < threshold:
            stages.append([layer + 1, layer + 1])
        else:
            stages[-1][1] = layer + 1
    return stages


def recommend_layers(probes: pd.DataFrame, stages: Sequence[Sequence[int]], base_layers: Sequence[int]) -> list[int]:
    """In each stage the layer with the best mean probe accuracy (over targets; the earliest on ties),
    plus the base layers the model already feeds its projector, sorted."""
    mean_accuracy = probes.groupby("layer")["accuracy"].mean()
    chosen = set(base_layers)
    for first, last in stages:
        in_stage = mean_accuracy.loc[first:last].dropna()
        chosen.add(int(in_stage.idxmax()) if len(in_stage) else last)
    return sorted(chosen)


def best_layer_per_target(probes: pd.DataFrame) -> dict[str, dict]:
    """For each target: the layer whose probe scores best (the earliest on ties), with its accuracy and majority."""
    best = {}
    for target, rows in probes.dropna(subset=["accuracy"]).groupby("target"):
        top = rows.sort_values(["accuracy", "layer"], ascending=[False, True]).iloc[0]
        best[target] = {"layer": int(top["layer"]), "accuracy": float(top["accuracy"]),
                        "majority": float(top["majority"])}
    return best
