"""Adapter for LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's anyres tiles and layout.

Two differences from LLaVA-NeXT, both inside the model's own packing, which the NeXT adapter reads the layout
from: a tile grid larger than `vision_aspect_ratio` allows ("anyres_max_9": nine tiles' worth of patches) is
downsampled (bilinear) before its row ends are added, and a prompt with several images gets each image untiled,
as its base grid and one row-end token. Its processor states the tokens per tile (`num_image_tokens`) rather
than a patch size; `complete_processor` sets it from the tower.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from workbench.models.adapter import ArchitectureAdapter, register_adapter
from workbench.models.llava_next import LlavaNextAdapter


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_classes = {"llava_onevision": "LlavaOnevisionForConditionalGeneration"}
    image_feature_inputs = ("image_sizes", "batch_num_images")
    # Its Qwen2 tokenizer's added tokens (<|im_start|>, <|im_end|>, ...) are text the model was trained on, unlike
    # the rows llava-hf appended to Llama vocabularies: only rows past the tokenizer are no text.
    non_text_vocabulary_rows = ArchitectureAdapter.non_text_vocabulary_rows

    def tiles_per_image(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """As LLaVA-NeXT, but one tile (the base) for each image of a prompt that has several."""
        images_per_prompt = inputs.get("batch_num_images")
        if images_per_prompt is None:  # the model then tiles every image
            return super().tiles_per_image(inputs)
        alone = [int(count) == 1 for count in torch.as_tensor(images_per_prompt).tolist() for _ in range(int(count))]
        return [tiles if tiled else 1 for tiles, tiled in zip(super().tiles_per_image(inputs), alone)]

    def pack_images(self, per_image: list[torch.Tensor], image_sizes: torch.Tensor,
                    row_end: torch.Tensor) -> list[torch.Tensor]:
        packed, _ = self.model.model.pack_image_features(per_image, image_sizes, image_newline=row_end,
                                                         vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        return packed

    def complete_processor(self, processor: Any) -> None:
        """Set from the model what the processor counts tokens with: the tokens the tower makes of one tile, the
        feature selection (which may drop a CLS token), the downsampling limit and the tiling resolutions."""
        config = self.model.config
        processor.num_image_tokens = self.tower_tokens(self.blank_tile(processor))
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
        processor.vision_aspect_ratio = config.vision_aspect_ratio
        self.match_tiling(processor)
