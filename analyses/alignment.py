"""`wb analyze alignment`: which LLM layer's hidden states alive visual tokens already look like.

Injecting visual tokens at layer L means they enter the residual stream where the text's
states are those entering layer L (the input embeddings for L = 0, else the output of layer
L - 1). For each L this compares alive visual tokens as the projector emits them with the text
states entering L:
- `separability`: held-out accuracy of a logistic regression telling the two sets apart
  (a classifier two-sample test; 0.5 = indistinguishable, 1 = trivially separable);
- `log10_norm_ratio`: log10(mean visual norm / mean text norm) (0 = same scale);
- `centroid_cos`: cosine between the two sets' means.
And one view of the visual tokens themselves, through the LLM:
- `logit_lens_hit` (probe scenes): the fraction of alive object tokens whose colour or shape word is
  among the top-5 logit-lens tokens of their state after layer l (final norm + LM head).
The recommended injection layer is the least separable one; ties go to the best norm match.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from analyses.runner import run_batches
from analyses.token_evidence import ANALYSIS_PROMPT, EvidenceLayers, evidence_from_capture
from analyses.tokens import TokenRule, token_rule
from workbench.data.image_sets import ImageItem, ImageSet
from workbench.models.inputs import build_inputs
from workbench.models.loading import LoadedModel
from workbench.store import RunStore
from workbench.tracing import CaptureSpec, capture

LOGIT_LENS_TOP = 5


@dataclass(frozen=True)
class AlignmentConfig:
    batch_size: int = 8
    tokens_per_image: int = 8  # alive visual and text tokens kept per image (fixed seed)
    prompt: str = ANALYSIS_PROMPT
    seed: int = 0


def _sample(indices: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return indices[torch.randperm(len(indices), generator=generator)[:count]]


def _word_ids(tokenizer, words: set[str]) -> dict[str, set[int]]:
    """Single-token ids of each word, with and without a leading space."""
    ids = {}
    for word in words:
        variants = set()
        for form in (word, " " + word):
            encoded = tokenizer.encode(form, add_special_tokens=False)
            if len(encoded) == 1:
                variants.add(encoded[0])
        ids[word] = variants
    return ids


def alignment_batch(loaded: LoadedModel, rule: TokenRule, items: Sequence[ImageItem], images: Sequence[Image.Image],
                    config: AlignmentConfig) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Sampled alive visual tokens (projector output), text states entering every layer, logit-lens hits."""
    layers = EvidenceLayers.for_depth(loaded.adapter.num_llm_layers)
    inputs = build_inputs(loaded.processor, images, [config.prompt] * len(images), device=loaded.device)
    spec = CaptureSpec(projector_input=True, embeddings=True, llm_layers="all",
                       attention_layers=layers.attention_layers)
    traced = capture(loaded, inputs, spec)
    evidence, _ = evidence_from_capture(loaded, traced, items, rule.topk, layers)
    alive = torch.tensor((rule.classify(evidence)["category"] == "alive").to_numpy())
    # Seeded by the batch's first image, so a resumed run samples exactly what an uninterrupted one did.
    generator = torch.Generator().manual_seed(config.seed * 100_003 + zlib.crc32(items[0].id.encode()))
    num_layers = loaded.adapter.num_llm_layers
    # State entering layer L: embeddings for L = 0, else the output of layer L - 1.
    entering = [traced.embeddings] + [traced.hidden[layer] for layer in range(num_layers - 1)]
    visual_rows, text_rows, lens_rows = [], [], []
    head_norm, head = loaded.adapter.final_norm, loaded.adapter.lm_head
    words = set(evidence.get("patch_colour", ())) | set(evidence.get("patch_shape", ()))
    word_ids = _word_ids(loaded.processor.tokenizer, words - {"", None})
    start = 0
    for layout in traced.layouts:  # one per grid: evidence has a row per grid cell, in this order
        count = layout.num_tokens
        alive_here = alive[start:start + count].nonzero().flatten()
        chosen = _sample(alive_here, config.tokens_per_image, generator)
        positions = layout.positions[chosen]
        visual_rows.append(traced.embeddings[layout.sample, positions].float())
        text_positions = _sample(traced.text_mask[layout.sample].nonzero().flatten(), config.tokens_per_image,
                                 generator)
        text_rows.append(torch.stack([states[layout.sample, text_positions].float() for states in entering], 1))
        if "patch_kind" in evidence:
            truth = evidence.iloc[start:start + count]
            objects = [index for index in alive_here.tolist() if truth["patch_kind"].iat[index] == "object"]
            if objects:
                object_positions = layout.positions[objects]
                targets = [word_ids.get(truth["patch_colour"].iat[i], set()) | word_ids.get(truth["patch_shape"].iat[i], set())
                           for i in objects]
                with torch.no_grad():
                    for layer in range(num_layers):
                        states = traced.hidden[layer][layout.sample, object_positions].to(loaded.device)
                        top = head(head_norm(states)).topk(LOGIT_LENS_TOP, dim=-1).indices.cpu().tolist()
                        hits = [bool(set(ids) & target) for ids, target in zip(top, targets)]
                        lens_rows.append({"image_id": items[layout.image].id, "layer": layer, "tokens": len(hits),
                                          "hits": sum(hits)})
        start += count
    tensors = {"visual": torch.cat(visual_rows).half(), "text": torch.cat(text_rows).half()}
    return pd.DataFrame(lens_rows or [{"image_id": items[0].id, "layer": -1, "tokens": 0, "hits": 0}]), tensors


def separability(visual: np.ndarray, text: np.ndarray, seed: int) -> float:
    """Held-out accuracy of a linear classifier between equal-size samples of the two sets."""
    count = min(len(visual), len(text))
    rng = np.random.default_rng(seed)
    features = np.concatenate([visual[rng.permutation(len(visual))[:count]], text[rng.permutation(len(text))[:count]]])
    labels = np.repeat([1, 0], count)
    train_x, test_x, train_y, test_y = train_test_split(features, labels, test_size=0.3, random_state=seed,
                                                        stratify=labels)
    scaler = StandardScaler().fit(train_x)  # one scale for both sets: norm differences stay visible
    classifier = LogisticRegression(max_iter=1000).fit(scaler.transform(train_x), train_y)
    return float(classifier.score(scaler.transform(test_x), test_y))


def alignment_curves(visual: torch.Tensor, text: torch.Tensor, seed: int) -> pd.DataFrame:
    """One row per injection layer L with the measures of the module docstring."""
    visual = visual.float()
    rows = []
    for layer in range(text.shape[1]):
        states = text[:, layer].float()
        rows.append({
            "layer": layer,
            "separability": separability(visual.numpy(), states.numpy(), seed),
            "log10_norm_ratio": float(torch.log10(visual.norm(dim=-1).mean() / states.norm(dim=-1).mean())),
            "centroid_cos": float(F.cosine_similarity(visual.mean(0), states.mean(0), dim=0)),
        })
    return pd.DataFrame(rows)


def analyze_alignment(loaded: LoadedModel, images: ImageSet, out: str, config: AlignmentConfig = AlignmentConfig(),
                      tokens_run: str | None = None) -> dict:
    store = RunStore.open(out, kind="alignment", model=loaded.name, data=images.source,
                          config=asdict(config) | {"tokens_run": tokens_run})
    rule = token_rule(loaded, images, out, tokens_run)
    lens, tensors = run_batches(
        store, images, config.batch_size, "alignment",
        lambda items, pil: alignment_batch(loaded, rule, items, pil, config),
        "layer alignment")
    curves = alignment_curves(tensors["visual"], tensors["text"], config.seed)
    lens = lens[lens["layer"] >= 0]
    if len(lens):
        hits = lens.groupby("layer")[["tokens", "hits"]].sum()
        curves["logit_lens_hit"] = (hits["hits"] / hits["tokens"]).reindex(curves["layer"]).to_numpy()
    store.write_table("layers", curves)
    # Least separable first; among equally separable layers (a linear probe often separates them all),
    # the one whose norm scale matches best.
    best = curves.assign(scale_gap=curves["log10_norm_ratio"].abs()).sort_values(
        ["separability", "scale_gap", "layer"]).iloc[0]
    summary = {
        "num_images": int(len(images) - len(store.manifest["skipped_images"])),
        "alive_tokens_sampled": int(tensors["visual"].shape[0]),
        "recommended_injection_layer": int(best["layer"]),
        "separability_at_recommended": float(best["separability"]),
        "separability_at_0": float(curves["separability"].iloc[0]),
        "skipped_images": store.manifest["skipped_images"],
    }
    store.write_json("summary", summary)
    store.finish(num_llm_layers=loaded.adapter.num_llm_layers)
    return summary
