"""What the app computes for one image, as plain functions a script can call too (no Streamlit here).

- `explain_image`: one traced forward -> every visual token's evidence and category (sink / dead /
  alive, by a tokens run's `TokenRule`), its hidden state after every LLM layer (for the logit
  lens), the image as the model saw it, and the model's answer to the prompt;
- `logit_lens`: one token's norm and top vocabulary tokens (final norm + LM head) after each layer;
- `attention_by_layer`: the attention the text after the image pays each visual token, per layer;
- `model_fingerprint`: a short hash of the weights that decide token categories, so a cached rule
  made with other weights (e.g. before `wb train default --install`) is not reused.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from analyses.token_evidence import EvidenceLayers, evidence_from_capture, evidence_spec
from analyses.tokens import TokenRule
from workbench.data.image_sets import ImageItem
from workbench.models.inputs import build_inputs, check_fits_context
from workbench.models.loading import LoadedModel
from workbench.tracing import Capture, CaptureSpec, capture

TOPK = 5  # nearest vocabulary tokens kept per visual token (the rule reads its own top-k of these)
MAX_NEW_TOKENS = 40


@dataclass
class ImageReport:
    """Everything the explorer shows for one (model, image, prompt)."""

    tokens: pd.DataFrame  # one row per visual token: evidence, category, sink_source, reason, ground truth
    rows: int
    cols: int
    view: Image.Image  # the image as the model saw it (resized / cropped), for the overlay
    hidden: torch.Tensor  # [num_llm_layers, num_visual_tokens, d]: state after each decoder layer
    answer: str
    prompt: str

    @property
    def num_layers(self) -> int:
        return self.hidden.shape[0]

    def fractions(self) -> dict[str, float]:
        shares = self.tokens["category"].value_counts(normalize=True)
        return {category: float(shares.get(category, 0.0)) for category in ("sink", "dead", "alive")}


def model_view(processor: Any, inputs: Any, image: Image.Image, grid: tuple[int, int]) -> Image.Image:
    """The picture the patches were cut from: `pixel_values` de-normalised where it is a plain
    [batch, 3, H, W] tensor (LLaVA family); otherwise the image resized to the grid's aspect ratio."""
    pixels = inputs.get("pixel_values")
    image_processor = getattr(processor, "image_processor", None)
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    if pixels is not None and pixels.ndim == 4 and pixels.shape[1] == 3 and mean is not None and std is not None:
        array = pixels[0].float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        array = (array.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array)
    rows, cols = grid
    width = 448
    return image.resize((width, max(1, round(width * rows / cols))))


def explain_image(loaded: LoadedModel, rule: TokenRule, image: Image.Image, prompt: str, item: ImageItem,
                  max_new_tokens: int = MAX_NEW_TOKENS) -> ImageReport:
    """Categories, evidence, per-layer states and the answer for one image (see the module docstring)."""
    num_layers = loaded.adapter.num_llm_layers
    layers = EvidenceLayers.for_depth(num_layers)
    inputs = build_inputs(loaded.processor, [image], [prompt], device=loaded.device)
    check_fits_context(inputs, loaded.context_length, max_new_tokens)
    base = evidence_spec(layers)
    spec = CaptureSpec(projector_input=True, embeddings=True, llm_layers="all", tokens="visual",
                       attention_layers=base.attention_layers)
    traced = capture(loaded, inputs, spec)
    evidence, _ = evidence_from_capture(loaded, traced, [item], max(TOPK, rule.topk), layers)
    table = pd.concat([evidence, rule.classify(evidence)], axis=1)
    # The page draws one grid over the image: the first (LLaVA-NeXT's whole-image grid before its tile grid).
    first = traced.layouts[0]
    table = table[table["grid"] == 0].reset_index(drop=True)
    rows, cols = first.rows, first.cols
    hidden = torch.stack([traced.visual(layer)[traced.visual_indices(first)] for layer in range(num_layers)])
    answer = loaded.generate_text(inputs, max_new_tokens)[0]
    return ImageReport(tokens=table, rows=rows, cols=cols, view=model_view(loaded.processor, inputs, image, (rows, cols)),
                       hidden=hidden, answer=answer, prompt=prompt)


def logit_lens(loaded: LoadedModel, states: torch.Tensor, topk: int = 5) -> pd.DataFrame:
    """One row per layer for one token's states [num_layers, d]: its norm and the top-k tokens (with
    probabilities) of final norm + LM head applied to the state after that layer."""
    adapter = loaded.adapter
    with torch.no_grad():
        states = states.to(loaded.device, adapter.lm_head.weight.dtype)
        probs = adapter.lm_head(adapter.final_norm(states)).float().softmax(-1)
        top = probs.topk(topk, dim=-1)
    tokenizer = loaded.processor.tokenizer
    rows = []
    for layer in range(states.shape[0]):
        ids = top.indices[layer].tolist()
        rows.append({"layer": layer, "norm": float(states[layer].float().norm()),
                     "top_tokens": [tokenizer.decode([token_id]) for token_id in ids],
                     "top_probs": [round(float(p), 4) for p in top.values[layer]]})
    return pd.DataFrame(rows)


def _post_image_queries(traced: Capture, sample: int = 0) -> torch.Tensor:
    visual = traced.visual_mask[sample]
    after = torch.zeros_like(visual)
    after[visual.nonzero().max() + 1:] = True
    return after & traced.attention_mask[sample].bool()


def attention_by_layer(loaded: LoadedModel, image: Image.Image, prompt: str) -> tuple[np.ndarray, tuple[int, int]]:
    """[num_llm_layers, num_visual_tokens]: attention from the text after the image to each visual token,
    averaged over heads and text queries (a row's sum is the share of attention the image gets)."""
    inputs = build_inputs(loaded.processor, [image], [prompt], device=loaded.device)
    check_fits_context(inputs, loaded.context_length)
    traced = capture(loaded, inputs, CaptureSpec(attention_layers="all", tokens="visual"))
    queries, visual = _post_image_queries(traced), traced.visual_mask[0]
    received = [traced.attentions[layer][0].float().mean(0)[queries][:, visual].mean(0)
                for layer in sorted(traced.attentions)]
    return torch.stack(received).numpy(), traced.grids[0]


def model_fingerprint(loaded: LoadedModel) -> str:
    """Hash of the projector and the first decoder layer: what a trained projector or a merged LoRA changes."""
    digest = hashlib.sha1(loaded.name.encode())
    modules = [loaded.adapter.projector, loaded.adapter.llm_layers[0]]
    with torch.no_grad():
        for module in modules:
            for name, parameter in sorted(module.state_dict().items()):
                digest.update(name.encode())
                digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def safe_name(name: str) -> str:
    """A model name or path as one folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"
