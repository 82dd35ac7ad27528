"""Adapter for the Qwen2-VL family (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Qwen2-VL keeps each image's aspect ratio: the processor reports its patch grid in
`image_grid_thw` (frames, rows, cols), and the vision merger fuses each
`spatial_merge_size` x `spatial_merge_size` block of patches into one LLM token. The merger
is the projector; it sits inside the vision tower.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

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
    flat_positions = False  # M-RoPE: (time, height, width) positions per token
    tower_hidden_states = False  # its tower's forward(hidden_states, grid_thw) returns no per-layer states

    def image_grids(self, inputs: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
        merge = self.model.config.vision_config.spatial_merge_size
        return [(int(h) // merge, int(w) // merge) for _, h, w in inputs["image_grid_thw"].tolist()]

    def flatten_projector_input(self, features: torch.Tensor) -> torch.Tensor:
        # The merger fuses each run of merge x merge consecutive patch features into one token.
        merge = self.model.config.vision_config.spatial_merge_size
        return features.reshape(-1, features.shape[-1] * merge * merge)
