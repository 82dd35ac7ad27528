"""Adapter for the Qwen2-VL family (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Qwen2-VL keeps each image's aspect ratio: the processor reports its patch grid in
`image_grid_thw` (frames, rows, cols), and the vision merger fuses each
`spatial_merge_size` x `spatial_merge_size` block of patches into one LLM token. The merger
is the projector; it sits inside the vision tower. Its rotary is multi-axis (M-RoPE): every token
has a (time, height, width) position id, text counting on all three axes and an image's tokens taking
their grid row and column, which `position_ids` gives as the model computes it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from workbench.errors import InputError
from workbench.flops import VisionShape, linear_shapes
from workbench.models.adapter import ArchitectureAdapter, register_adapter


@register_adapter
class Qwen2VLAdapter(ArchitectureAdapter):
    model_classes = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    vision_tower_path = "model.visual"
    projector_path = "model.visual.merger"
    language_model_path = "model.language_model"
    token_schedules = True
    tower_hidden_states = False  # its tower's forward(hidden_states, grid_thw) returns no per-layer states

    @property
    def merge(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def image_grids(self, inputs: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
        return [(int(h) // self.merge, int(w) // self.merge) for _, h, w in inputs["image_grid_thw"].tolist()]

    def flatten_projector_input(self, features: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # The merger fuses each run of merge x merge consecutive patch features into one token.
        return features.reshape(-1, features.shape[-1] * self.merge * self.merge)

    def input_embeddings(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        embeddings = self.embed_tokens(inputs["input_ids"])
        if "pixel_values" not in inputs:
            return embeddings
        features = self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                       return_dict=True).pooler_output
        return self.scatter_image_features(embeddings, inputs["input_ids"], torch.cat(features))

    def position_ids(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[3, batch, seq]: the (time, height, width) ids of the model's own `get_rope_index` (padding at 0). The
        image tokens are found from `input_ids`, so ids follow a prompt that grew by decoded tokens."""
        input_ids = inputs["input_ids"]
        visual = self.visual_token_mask(input_ids)
        if bool(visual.any()) and inputs.get("image_grid_thw") is None:
            raise InputError("Qwen2-VL's rotary positions need the processor's image_grid_thw beside input_ids")
        positions, _ = self.model.model.get_rope_index(input_ids, mm_token_type_ids=visual.int(),
                                                       image_grid_thw=inputs.get("image_grid_thw"),
                                                       attention_mask=inputs.get("attention_mask"))
        return positions

    def vision_shape(self, image_size: tuple[int, int] | None) -> tuple[VisionShape, int]:
        """A ViT over patches of two frames (an image is repeated), no CLS token, its MLP read from the first block
        (Qwen2.5-VL's is gated); one LLM token per merge x merge patches. Qwen2.5-VL's windowed blocks are
        counted as full attention."""
        if image_size is None:
            raise InputError("Qwen2-VL keeps each image's size: its FLOPs need the processed image's height and width")
        config = self.model.config.vision_config
        mlp = linear_shapes(self.vision_layers[0].mlp)
        patch = config.patch_size
        patches = (image_size[0] // patch) * (image_size[1] // patch)
        vision = VisionShape(hidden=mlp[0][0], intermediate=mlp[0][1], layers=len(self.vision_layers), patches=patches,
                             patch_size=patch, channels=config.in_channels * config.temporal_patch_size,
                             class_token=False, gated_mlp=len(mlp) == 3)
        return vision, patches // self.merge ** 2
