"""E_D, input-stage direct fusion, on the LLaVA family: the listed vision layers concatenated along channels,
then the projector, whose first linear grows to take k * d_vision inputs.

Hugging Face's `LlavaModel` already does the concatenation when `config.vision_feature_layer` is a list, so
the fused model stays a plain `LlavaForConditionalGeneration`: every analysis, schedule and bench variant
runs on it unchanged. Whole-stage groups (averaged first) cannot be written as that list; they are refused.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from efficient_models.fusion.config import FUSED_MODEL_TYPE
from efficient_models.fusion.layer_sets import Group
from workbench.errors import InputError
from workbench.models.visual_input import read_vision_layers


def check_llava(model: PreTrainedModel) -> None:
    if model.config.model_type != FUSED_MODEL_TYPE:
        raise InputError(f"fusion is built for the LLaVA family; this model is a {model.config.model_type!r}")
    if not isinstance(model.config.vision_feature_layer, int):
        raise InputError(f"the model already reads vision layers {model.config.vision_feature_layer}; "
                         "fuse a model that reads one layer")


def fuse_at_input(model: PreTrainedModel, groups: list[Group]) -> PreTrainedModel:
    """Make `model` read `groups` (single layers, the base last), in place; it answers as before until trained.

    The new first linear takes [layer_1 | ... | base] features: its base block is the trained projector's
    weight and the other blocks start at zero, so the fused model equals the single-layer one at the start.
    """
    check_llava(model)
    averaged = [group for group in groups if not isinstance(group, int)]
    if averaged:
        raise InputError(f"input fusion takes single layers; {averaged[0]} is a whole stage (averaged groups "
                         "need mode 'internal' for now)")
    old = read_vision_layers(model, list(groups))
    wide = model.model.multi_modal_projector.linear_1
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, -old.in_features:] = old.weight  # the base is the last group
        if old.bias is not None:
            wide.bias.copy_(old.bias)
    return model
