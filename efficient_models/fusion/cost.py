"""Fusion's FLOPs count: the dense model's, with the projector work fusion adds.

The vision tower runs every layer whichever it reads, so its cost does not change. E_D widens the
projector's first linear to k * d_vision inputs; I_D runs one more projector per extra layer (the adds and
stage averages are elementwise, uncounted as in `workbench.flops`). Decoder layers see the same tokens.
"""

from __future__ import annotations

import dataclasses

from efficient_models.fusion.config import FusionConfig
from efficient_models.fusion.layer_sets import resolve_layer_set
from workbench.flops import FlopsCount, ModelShapes, token_schedule_flops

DEFAULT_BASE = -1  # the layer LLaVA-family models and the default model read (shapes do not carry it)


def fused_shapes(config: FusionConfig, shapes: ModelShapes) -> ModelShapes:
    """`shapes` with the projector linears the fusion runs."""
    groups = len(resolve_layer_set(config.layers, shapes.vision.layers, DEFAULT_BASE))
    linears = shapes.projector_linears
    if config.mode == "input":
        (inputs, outputs), *rest = linears
        fused = ((inputs * groups, outputs), *rest)
    else:
        fused = linears * groups
    return dataclasses.replace(shapes, projector_linears=fused)


def fusion_flops(config: FusionConfig, shapes: ModelShapes, text_tokens: int, answer_tokens: int = 1,
                 decode_steps: int = 1) -> FlopsCount:
    fused = fused_shapes(config, shapes)
    return token_schedule_flops(fused, text_tokens, [shapes.visual_tokens_per_image] * shapes.num_llm_layers,
                                answer_tokens, decode_steps)
