"""Per-visual-token evidence from one traced forward: what the token categories are decided on.

For every visual token of a batch of images (one prompt per image) that is a patch-grid cell (`token` counts an
image's cells grid after grid, `grid` says which of its grids, `row` / `col` where in it; LLaVA-NeXT's row-end
tokens are cells of no grid and get no row), `token_evidence` measures:
- `topk_ids` / `topk_cos`: its nearest vocabulary embeddings (cosine) as the LLM receives it;
- `input_norm`: its norm at the LLM input (projector output);
- `vision_norm`: the norm of the vision features it is made from (projector input);
- `llm_norm`: its largest norm over the LLM's early layers (where massive activations appear);
- `llm_peak`: its largest `massive_activation` (peak coordinate / RMS) over the same layers;
- `sketch`: a 64-dim random projection of its direction (`sketch`), to compare it with the data;
- `attention_received`: mean attention it draws from the text after the image, over heads and
  a few layers;
- for probe scenes, the ground truth of its patch (kind, shape, colour, character).
It also returns, per nearest vocabulary id, the sum of the unit vectors of the tokens for which
that id is the top-1 neighbour: enough to measure across a whole image set how alike those
tokens are (cross-image consistency) without keeping every token's vector.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from workbench.data.image_sets import ImageItem
from workbench.data.probe_scenes import patch_labels
from workbench.inspection import vocabulary_neighbours
from workbench.models.inputs import build_inputs
from workbench.models.loading import LoadedModel
from workbench.tracing import Capture, CaptureSpec, capture

ANALYSIS_PROMPT = "Describe the image."
SKETCH_DIM = 64


@dataclass(frozen=True)
class EvidenceLayers:
    """Which LLM layers the norm and attention evidence is read from (0-indexed)."""

    norm_layers: list[int]
    attention_layers: list[int]

    @classmethod
    def for_depth(cls, num_layers: int) -> EvidenceLayers:
        # Massive activations form within the first few layers; attention sinks are clearest
        # once they have formed, so attention is read a little deeper.
        early = max(1, num_layers // 4)
        return cls(list(range(early)), sorted({min(early, num_layers - 1), num_layers // 2}))


def _attention_received(traced: Capture) -> torch.Tensor:
    """[num_visual_tokens]: mean attention from each row's post-image text to its visual tokens."""
    received = []
    after_image = traced.after_image_mask
    for sample in range(traced.input_ids.shape[0]):
        visual, queries = traced.visual_mask[sample], after_image[sample]
        per_layer = [traced.attentions[layer][sample].float().mean(0)[queries][:, visual].mean(0)
                     for layer in sorted(traced.attentions)]
        received.append(torch.stack(per_layer).mean(0))
    return torch.cat(received)


def massive_activation(states: torch.Tensor) -> torch.Tensor:
    """Largest coordinate over the root-mean-square coordinate: ~3-4 for a spread-out vector, tens to
    hundreds for the few-dimension massive activations of attention sinks."""
    return states.abs().amax(-1) / states.pow(2).mean(-1).sqrt().clamp(min=1e-12)


@functools.cache
def _sketch_projection(dim: int) -> torch.Tensor:
    return torch.randn(dim, SKETCH_DIM, generator=torch.Generator().manual_seed(0)) / SKETCH_DIM ** 0.5


def sketch(vectors: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of each token's direction to `SKETCH_DIM` dims: cosines between
    tokens survive (Johnson-Lindenstrauss), so a run can compare every token with the dataset's mean
    direction without keeping full vectors."""
    return (F.normalize(vectors.float(), dim=-1) @ _sketch_projection(vectors.shape[-1])).half()


def _ground_truth(item: ImageItem, rows: int, cols: int) -> list[dict]:
    if item.scene is None:
        return [{} for _ in range(rows * cols)]
    return [{"patch_kind": label.kind, "patch_shape": label.shape, "patch_colour": label.colour,
             "patch_char": label.char, "patch_coverage": label.coverage}
            for label in patch_labels(item.scene(), rows, cols)]


def evidence_spec(layers: EvidenceLayers) -> CaptureSpec:
    return CaptureSpec(projector_input=True, embeddings=True, llm_layers=layers.norm_layers, tokens="visual",
                       attention_layers=layers.attention_layers)


def token_evidence(loaded: LoadedModel, items: Sequence[ImageItem], images: Sequence[Image.Image], topk: int,
                   layers: EvidenceLayers, prompt: str = ANALYSIS_PROMPT
                   ) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """One row per visual token of `images` (see the module docstring) and the top-1 group sums."""
    inputs = build_inputs(loaded.processor, images, [prompt] * len(images), device=loaded.device)
    return evidence_from_capture(loaded, capture(loaded, inputs, evidence_spec(layers)), items, topk, layers)


def evidence_from_capture(loaded: LoadedModel, traced: Capture, items: Sequence[ImageItem], topk: int,
                          layers: EvidenceLayers) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """`token_evidence` from a capture that holds at least what `evidence_spec(layers)` asks for."""
    # One row per grid cell, grid after grid: visual tokens in no grid (LLaVA-NeXT's row ends) get none.
    cells = torch.cat([traced.visual_indices(layout) for layout in traced.layouts])
    vectors = traced.visual("embeddings")[cells]
    cos, ids = vocabulary_neighbours(loaded, vectors, topk)
    early = [vectors.float()] + [traced.visual(layer)[cells].float() for layer in layers.norm_layers]
    columns = {
        "input_norm": vectors.float().norm(dim=-1),
        "vision_norm": traced.projector_input[cells].float().norm(dim=-1),
        "llm_norm": torch.stack([states.norm(dim=-1) for states in early]).amax(0),
        "llm_peak": torch.stack([massive_activation(states) for states in early]).amax(0),
        "attention_received": _attention_received(traced)[cells],
    }
    sketches = sketch(vectors)
    tokenizer = loaded.processor.tokenizer
    rows, flat = [], 0
    grids_done, tokens_done = [0] * len(items), [0] * len(items)  # per image, over its grids so far
    for layout in traced.layouts:
        item = items[layout.image]
        truths = _ground_truth(item, layout.rows, layout.cols)  # every grid covers the whole image
        for cell in range(layout.num_tokens):
            row = {"image_id": item.id, "token": tokens_done[layout.image] + cell, "grid": grids_done[layout.image],
                   "row": cell // layout.cols, "col": cell % layout.cols}
            row |= {name: float(values[flat]) for name, values in columns.items()}
            row["topk_ids"] = ids[flat].tolist()
            row["topk_tokens"] = [tokenizer.decode([token_id]) for token_id in ids[flat].tolist()]
            row["topk_cos"] = [round(float(value), 5) for value in cos[flat]]
            row["sketch"] = sketches[flat].tolist()
            rows.append(row | truths[cell])
            flat += 1
        grids_done[layout.image] += 1
        tokens_done[layout.image] += layout.num_tokens
    top1 = ids[:, 0]
    group_ids, group_index = top1.unique(return_inverse=True)
    sums = torch.zeros(len(group_ids), vectors.shape[-1]).index_add_(0, group_index, F.normalize(vectors.float(), dim=-1))
    counts = torch.bincount(group_index, minlength=len(group_ids))
    return pd.DataFrame(rows), {"group_ids": group_ids, "group_sums": sums, "group_counts": counts}
