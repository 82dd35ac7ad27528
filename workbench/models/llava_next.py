"""Adapter for LLaVA-NeXT (`LlavaNextForConditionalGeneration`): LLaVA with anyres tiles.

The processor resizes each image to the best fit among `image_grid_pinpoints`, cuts it into tiles of the tower's
input size and adds a base tile, the whole image squashed into one. The model lays an image's visual tokens out
as two patch grids, each over the whole image: the base tile's, then the tiles' patches joined into one grid and
cropped of the padding the resize added, with an `image_newline` token after each of its rows. Those row-end
tokens are visual tokens (image-token positions that the model fills) but cells of no grid.

The layout is read off the model's own `pack_image_features`, fed token indices instead of features, so it is
what the model scatters; the traced projector is packed the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from workbench.flops import PROBE_IMAGE_SIZE, VisionShape
from workbench.models.adapter import ImageTokens, register_adapter
from workbench.models.llava import LlavaAdapter

ROW_END = -1.0  # what a row-end token holds in a packed map of token indices (which are never negative)


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    model_classes = {"llava_next": "LlavaNextForConditionalGeneration"}
    # Its pixel values are [images, tiles, 3, H, W]: the tower reads tiles, while vision-layers feeds it images.
    tower_hidden_states = False

    @property
    def tile_side(self) -> int:
        """Patches per side of one tile (the base tile too), as the model's packing assumes."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def tiles_per_image(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """How many tiles, the base tile included, the tower reads of each image (as the model counts them)."""
        config = self.model.config
        return [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                for size in inputs["image_sizes"]]

    def pack(self, tile_features: torch.Tensor, inputs: Mapping[str, torch.Tensor],
             row_end: torch.Tensor) -> list[torch.Tensor]:
        """Per-tile features [tiles, tile_side ** 2, d] packed by the model into each image's visual tokens
        [tokens, d], `row_end` [d] at the row ends."""
        return self.pack_images(list(tile_features.split(self.tiles_per_image(inputs))), inputs["image_sizes"],
                                row_end)

    def pack_images(self, per_image: list[torch.Tensor], image_sizes: torch.Tensor,
                    row_end: torch.Tensor) -> list[torch.Tensor]:
        """The model's `pack_image_features` (the family's signature)."""
        packed, _ = self.model.model.pack_image_features(per_image, image_sizes,
                                                         self.model.config.vision_feature_select_strategy,
                                                         image_newline=row_end)
        return packed

    def image_tokens(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageTokens]:
        """Each image: the base tile's grid, then the tile grid, whose row-end tokens are no cells. An image the
        processor did not tile (LLaVA-OneVision's several images per prompt) has the base grid and one row end."""
        side, tiles = self.tile_side, sum(self.tiles_per_image(inputs))
        indices = torch.arange(tiles * side * side, dtype=torch.float64).view(tiles, side * side, 1)
        images = []
        for packed in self.pack(indices, inputs, row_end=torch.tensor([ROW_END], dtype=torch.float64)):
            is_cell = packed[:, 0] != ROW_END
            rows, tile_cells = int((~is_cell).sum()), int(is_cell.sum()) - side * side
            if tile_cells and (not rows or tile_cells % rows):
                raise ValueError(f"{tile_cells} tile tokens do not split into {rows} rows")
            tile_grid = ((rows, tile_cells // rows),) if tile_cells else ()
            images.append(ImageTokens(((side, side), *tile_grid), is_cell))
        return images

    def image_grids(self, inputs: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
        return [grid for image in self.image_tokens(inputs) for grid in image.grids]

    def flatten_projector_input(self, features: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The tower's per-tile features packed as the projector's output is; a row-end token is made of no vision
        feature, so it gets zeros."""
        return torch.cat(self.pack(features, inputs, row_end=features.new_zeros(features.shape[-1])))

    def flatten_projector_output(self, output: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The projector's per-tile output packed with `image_newline` at the row ends: what the LLM receives."""
        return torch.cat(self.pack(output, inputs, row_end=self.model.model.image_newline))

    def vision_shape(self, image_size: tuple[int, int] | None) -> tuple[VisionShape, int]:
        """The tower on one tile (`image_size`: the processed tile), run once per tile of a `PROBE_IMAGE_SIZE` image
        (the size every count is made on), and the visual tokens that image packs into, row ends included."""
        tile, _ = super().vision_shape(image_size)
        probe = {"image_sizes": torch.tensor([PROBE_IMAGE_SIZE])}
        (tokens,) = self.image_tokens(probe)
        return dataclasses.replace(tile, tiles=self.tiles_per_image(probe)[0]), tokens.num_tokens

    def complete_processor(self, processor: Any) -> None:
        """As LLaVA's, and the processor tiles at the model's resolutions: each counts an image's tile grid from
        its own copy of `image_grid_pinpoints`, and they must agree."""
        super().complete_processor(processor)
        self.match_tiling(processor)

    def match_tiling(self, processor: Any) -> None:
        processor.image_processor.image_grid_pinpoints = self.model.config.image_grid_pinpoints
