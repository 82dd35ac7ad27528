"""Adapter for the LLaVA family (`LlavaForConditionalGeneration`), the embedded default included.

LLaVA feeds every image as one square grid of patch tokens (the CLS token dropped by the
"default" feature-select strategy), so an image's grid is the square root of its token count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from workbench.models.adapter import ArchitectureAdapter, NonTextRows, register_adapter


@register_adapter
class LlavaAdapter(ArchitectureAdapter):
    model_classes = {"llava": "LlavaForConditionalGeneration"}
    vision_tower_path = "model.vision_tower"
    projector_path = "model.multi_modal_projector"
    language_model_path = "model.language_model"

    def image_grids(self, inputs: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
        num_images = int(inputs["pixel_values"].shape[0])
        num_tokens = int(self.visual_token_mask(inputs["input_ids"]).sum())
        if num_images == 0 or num_tokens % num_images:
            raise ValueError(f"{num_tokens} image tokens cannot be split evenly over {num_images} images")
        side = math.isqrt(num_tokens // num_images)
        if side * side != num_tokens // num_images:
            raise ValueError(f"{num_tokens // num_images} visual tokens per image is not a square grid")
        return [(side, side)] * num_images

    def non_text_vocabulary_rows(self, tokenizer: Any) -> NonTextRows:
        """Every row from the text model's base vocabulary (`tokenizer.vocab_size`) on. The llava-hf
        conversion appended rows after it: the added `<image>` and `<pad>` tokens, then padding to a
        multiple of 64 that no token maps to, all filled near the mean embedding, so they would be
        hubs near every visual token (ids 32000-32063 on llava-1.5)."""
        base = tokenizer.vocab_size
        return NonTextRows(range(base, self.embed_tokens.weight.shape[0]),
                           f"appended after the base vocabulary of {base} ids: added tokens such as the image "
                           f"token, and padding")

    def input_embeddings(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The LLM's input embeddings [batch, seq, d]: token embeddings, projector outputs at the image tokens."""
        embeddings = self.embed_tokens(inputs["input_ids"])
        if "pixel_values" not in inputs:
            return embeddings
        config = self.model.config
        features = self.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(embeddings.dtype), image_sizes=inputs.get("image_sizes"),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy, return_dict=True).pooler_output
        features = torch.cat(list(features)).to(embeddings.dtype)
        visual = self.visual_token_mask(inputs["input_ids"])
        if int(visual.sum()) != features.shape[0]:
            raise ValueError(f"{int(visual.sum())} image tokens in the prompt but {features.shape[0]} image features")
        return embeddings.masked_scatter(visual[..., None], features)
