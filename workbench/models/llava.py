"""Adapter for the LLaVA family (`LlavaForConditionalGeneration`), the embedded default included.

LLaVA feeds every image as one square grid of patch tokens (the CLS token dropped by the
"default" feature-select strategy), so an image's grid is the square root of its token count.
Older llava-hf processor configs do not say how many tokens that is; `complete_processor`
counts it on the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from PIL import Image

from workbench.models.adapter import ArchitectureAdapter, NonTextRows, register_adapter


@register_adapter
class LlavaAdapter(ArchitectureAdapter):
    model_classes = {"llava": "LlavaForConditionalGeneration"}
    vision_tower_path = "model.vision_tower"
    projector_path = "model.multi_modal_projector"
    language_model_path = "model.language_model"
    token_schedules = True
    # What the family's `get_image_features` reads from a batch besides the pixel values.
    image_feature_inputs: ClassVar[tuple[str, ...]] = ("image_sizes",)

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

    def complete_processor(self, processor: Any) -> None:
        """Make the processor expand `<image>` into as many tokens as the model makes features. Older llava-hf
        processor configs lack `patch_size`, `vision_feature_select_strategy` or `num_additional_image_tokens`
        (the tower's CLS token, which the "default" strategy then drops), and without them the processor
        counts 15 tokens for a 4x4 grid. All three are set from the model: the extra tokens by counting what the
        tower makes of one blank image, since only the tower knows whether it has a CLS token."""
        config = self.model.config
        tile, patch = self.blank_tile(processor), config.vision_config.patch_size
        grid = (tile.shape[-2] // patch) * (tile.shape[-1] // patch)
        processor.patch_size = patch
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
        processor.num_additional_image_tokens = self.tower_tokens(tile) - grid

    def blank_tile(self, processor: Any) -> torch.Tensor:
        """One blank image as the processor prepares it, [1, 3, H, W] (the first tile where it makes several)."""
        side = self.model.config.vision_config.image_size
        pixel_values = processor.image_processor(images=Image.new("RGB", (side, side)),
                                                 return_tensors="pt")["pixel_values"]
        return pixel_values.reshape(-1, *pixel_values.shape[-3:])[:1]  # LLaVA-NeXT's are [images, tiles, 3, H, W]

    def tower_tokens(self, tile: torch.Tensor) -> int:
        """How many tokens the vision tower makes of a [1, 3, H, W] image: its patches and any CLS token."""
        with torch.no_grad():
            output = self.vision_tower(tile.to(self.model.device, self.embed_tokens.weight.dtype))
        return output.last_hidden_state.shape[1]

    def image_features(self, pixel_values: torch.Tensor, **image_inputs: torch.Tensor) -> list[torch.Tensor]:
        """Projector outputs [tokens, d] per image, selected as the model's config says."""
        config = self.model.config
        return list(self.model.get_image_features(
            pixel_values=pixel_values.to(self.embed_tokens.weight.dtype), **image_inputs,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy, return_dict=True).pooler_output)

    def input_embeddings(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The LLM's input embeddings [batch, seq, d]: token embeddings, projector outputs at the image tokens."""
        embeddings = self.embed_tokens(inputs["input_ids"])
        if "pixel_values" not in inputs:
            return embeddings
        image_inputs = {key: inputs[key] for key in self.image_feature_inputs if key in inputs}
        features = self.image_features(inputs["pixel_values"], **image_inputs)
        return self.scatter_image_features(embeddings, inputs["input_ids"], torch.cat(features))
