"""Adapter for Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`).

Both cut an image into tiles of the tower's size, row by row, and add the whole image shrunk to one tile, the
global image, last; an image no larger than a tile is the global image alone. The tower (SigLIP, no CLS
token) encodes each tile on its own, and the connector's pixel shuffle folds each `scale_factor` x
`scale_factor` block of patches into one LLM token: every tile, and the global image, is one square grid of
(patches per side / scale_factor) tokens a side (8 x 8 on SmolVLM-256M: 512 px tiles, 16 px patches, scale 4),
in a run of `<image>` tokens of its own. Marker tokens between the runs are no visual tokens:
`<fake_token_around_image>` with `<row_r_col_c>` before each tile, `<global-img>` before the global image.
SmolVLM is Idefics3 with video added; for images the two lay out tokens the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from workbench.flops import VisionShape
from workbench.models.adapter import ArchitectureAdapter, ImageTokens, register_adapter


@register_adapter
class Idefics3Adapter(ArchitectureAdapter):
    model_classes = {
        "idefics3": "Idefics3ForConditionalGeneration",
        "smolvlm": "SmolVLMForConditionalGeneration",
    }
    vision_tower_path = "model.vision_model"
    projector_path = "model.connector"
    language_model_path = "model.text_model"
    token_schedules = True  # a Llama decoder, one rotary position per token; `input_embeddings` builds its input
    # The processor gives each prompt a stack of tiles, [batch, tiles, 3, H, W] padded with blank tiles, which the
    # tower does not take; and the model reads only the tower's last layer (no `vision_feature_layer`).
    tower_hidden_states = False

    @property
    def grid_side(self) -> int:
        """Tokens a side of one tile's grid: the tower's patches a side over the pixel shuffle's scale."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size // self.model.config.scale_factor

    def complete_processor(self, processor: Any) -> None:
        """Expand `<image>` into as many tokens per tile as the connector makes; a processor config without
        `image_seq_len` counts Idefics3-8B's 169."""
        processor.image_seq_len = self.grid_side ** 2

    def image_tokens(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageTokens]:
        """Each image's grids, in token order: its tiles row by row, then its global image. Every run of image tokens
        is one grid; an image ends with the run after the global-image marker, which is the token before the last
        run of every row (rows end with an image's global image)."""
        input_ids = inputs["input_ids"]
        side = self.grid_side
        images = []
        for ids, visual in zip(input_ids, self.visual_token_mask(input_ids)):
            positions = visual.nonzero().flatten()
            runs = torch.tensor_split(positions, (positions.diff() > 1).nonzero().flatten().add(1).tolist())
            if any(len(run) != side * side for run in runs if len(run)):
                raise ValueError(f"a run of image tokens is not one {side}x{side} tile grid")
            markers = [int(ids[run[0] - 1]) for run in runs if len(run)]
            grids = 0
            for marker in markers:
                grids += 1
                if marker == markers[-1]:
                    images.append(ImageTokens(grids=((side, side),) * grids))
                    grids = 0
        tiles = (inputs["pixel_values"].flatten(2) != 0).any(-1).sum() if "pixel_values" in inputs else None
        if tiles is not None and int(tiles) != sum(len(image.grids) for image in images):
            raise ValueError(f"{sum(len(image.grids) for image in images)} tile grids in input_ids but "
                             f"{int(tiles)} tiles in pixel_values")
        return images

    def image_grids(self, inputs: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
        return [grid for image in self.image_tokens(inputs) for grid in image.grids]

    def flatten_projector_input(self, features: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # The pixel shuffle concatenates each scale x scale block of patch features into one token's input.
        shuffled = self.projector.pixel_shuffle(features, self.projector.scale_factor)
        return shuffled.reshape(-1, shuffled.shape[-1])

    def input_embeddings(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the connector's outputs at the image tokens, tile by tile."""
        embeddings = self.embed_tokens(inputs["input_ids"])
        if "pixel_values" not in inputs:
            return embeddings
        tiles = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True,
                                                    pixel_attention_mask=inputs.get("pixel_attention_mask"))
        return self.scatter_image_features(embeddings, inputs["input_ids"], torch.cat(tiles.pooler_output))

    def vision_shape(self, image_size: tuple[int, int] | None) -> tuple[VisionShape, int]:
        """The tower on one tile (always its config's size, whatever the image's) and the tokens one tile gives; a
        split image runs it once per tile and once more for its global image."""
        vision = VisionShape.from_config(self.model.config.vision_config)
        return dataclasses.replace(vision, class_token=False), self.grid_side ** 2
