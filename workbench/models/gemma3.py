"""Adapter for Gemma 3 (`Gemma3ForConditionalGeneration`).

Gemma 3 resizes every image to its SigLIP tower's square size (896 px: 64 x 64 patches, no CLS token) and its
projector average-pools the patch grid down to `mm_tokens_per_image` tokens (4 x 4 patches each: a 16 x 16 grid
of 256), so an image is one square grid, a run of image soft tokens between `<start_of_image>` and
`<end_of_image>` (no visual tokens). Pan-and-scan, off unless a processor call asks for it, adds crops after the
image, one grid each; they count as images of their own here.

Its LLM does not run under token schedules: an image's tokens attend to each other both ways (the processor's
`token_type_ids`), and its layers alternate sliding-window and global attention, each kind with its own rotary
table, none of which the schedule engine builds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from workbench.flops import VisionShape
from workbench.models.adapter import ArchitectureAdapter, register_adapter


@register_adapter
class Gemma3Adapter(ArchitectureAdapter):
    model_classes = {
        "gemma3": "Gemma3ForConditionalGeneration",
    }
    # `token_schedules` stays False: the engine builds neither its two-way image attention nor its rotary tables.
    vision_tower_path = "model.vision_tower"
    projector_path = "model.multi_modal_projector"
    language_model_path = "model.language_model"

    def image_grids(self, inputs: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
        """One square grid of `mm_tokens_per_image` tokens per image in `pixel_values` (pan-and-scan crops included)."""
        per_image = self.model.config.mm_tokens_per_image
        images = int(inputs["pixel_values"].shape[0])
        tokens = int(self.visual_token_mask(inputs["input_ids"]).sum())
        if tokens != images * per_image:
            raise ValueError(f"{tokens} image tokens in the prompt but {images} images of {per_image} tokens")
        side = math.isqrt(per_image)
        return [(side, side)] * images

    def flatten_projector_input(self, features: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # The projector averages each pool x pool block of patches into one token (row-major over the pooled grid):
        # a token's input is its block's patch features, concatenated row by row.
        pool, side = self.projector.kernel_size, self.projector.tokens_per_side
        blocks = features.reshape(-1, side, pool, side, pool, features.shape[-1]).transpose(2, 3)
        return blocks.reshape(-1, pool * pool * features.shape[-1])

    def vision_shape(self, image_size: tuple[int, int] | None) -> tuple[VisionShape, int]:
        """SigLIP on the processor's square images, and the tokens its projector pools them to."""
        vision = VisionShape.from_config(self.model.config.vision_config, image_size)
        return vision, self.model.config.mm_tokens_per_image
