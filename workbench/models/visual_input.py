"""What a LLaVA-family model's projector reads: which vision-tower layers, from images of which size.

`LlavaModel` concatenates the listed `hidden_states` along channels when `config.vision_feature_layer` is a
list, so reading several layers is a config value plus a first projector linear k times as wide. The image
size is the processor's: a smaller image gives fewer, coarser visual tokens (DINOv2 interpolates its
position embeddings). A projector file records both (`visual_input_metadata`), so a loader rebuilds the
model and processor that fit it before loading it (`apply_visual_input`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from workbench.errors import InputError

FeatureLayer = int | list[int]
LAYERS_KEY, IMAGE_SIZE_KEY = "vision_feature_layer", "image_size"


@dataclass(frozen=True)
class VisualInput:
    layers: FeatureLayer | None  # None: as the model is
    image_size: int | None  # square side in pixels; None: as the processor is


def read_vision_layers(model: PreTrainedModel, layers: FeatureLayer) -> nn.Linear:
    """Make `model` read `layers` (a `hidden_states` index or a list of them), in place; return the projector's
    previous first linear. The new first linear takes [layer_1 | ... | layer_k] features, freshly initialised:
    callers that keep what a trained projector knew copy blocks of the old one into it."""
    layer_list = layers if isinstance(layers, list) else [layers]
    projector = model.model.multi_modal_projector
    old = projector.linear_1
    in_features = model.config.vision_config.hidden_size * len(layer_list)
    projector.linear_1 = nn.Linear(in_features, old.out_features, bias=old.bias is not None,
                                   device=old.weight.device, dtype=old.weight.dtype)
    model.config.vision_feature_layer = layers  # LlavaModel reads it (shared config object) at every call
    return old


def image_size(processor: Any) -> int:
    return processor.image_processor.crop_size["height"]


def set_image_size(model: PreTrainedModel, processor: Any, side: int) -> None:
    """Resize and crop images to `side` px squares; the processor then expands `<image>` into as many tokens as
    the tower makes patches, and the model's config says the same."""
    patch = model.config.vision_config.patch_size
    if side % patch:
        raise InputError(f"image size {side} is not a multiple of the vision tower's patch size {patch}")
    processor.image_processor.size = {"shortest_edge": side}
    processor.image_processor.crop_size = {"height": side, "width": side}
    model.config.image_seq_length = (side // patch) ** 2


def visual_input_metadata(model: PreTrainedModel, processor: Any) -> dict[str, str]:
    """What a saved projector records about its input."""
    return {LAYERS_KEY: json.dumps(model.config.vision_feature_layer), IMAGE_SIZE_KEY: str(image_size(processor))}


def visual_input_from_metadata(metadata: dict[str, str] | None) -> VisualInput:
    """The input a projector file was trained on; files saved before it was recorded say nothing."""
    metadata = metadata or {}
    layers = json.loads(metadata[LAYERS_KEY]) if LAYERS_KEY in metadata else None
    side = int(metadata[IMAGE_SIZE_KEY]) if IMAGE_SIZE_KEY in metadata else None
    return VisualInput(layers, side)


def apply_visual_input(model: PreTrainedModel, processor: Any, visual_input: VisualInput) -> None:
    """Make `model` and `processor` read what a projector was trained on (a fresh first linear if the layers
    change: the projector's weights are loaded next)."""
    if visual_input.layers is not None and visual_input.layers != model.config.vision_feature_layer:
        read_vision_layers(model, visual_input.layers)
    if visual_input.image_size is not None and visual_input.image_size != image_size(processor):
        set_image_size(model, processor, visual_input.image_size)
