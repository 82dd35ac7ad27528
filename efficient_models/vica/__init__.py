"""ViCA: visual tokens skip every self-attention and FFN; text reads them by cross-attention at a few layers.

Registers the `vica` method's config (cross-attention layers, from a similarity run) and its FLOPs count.
The model itself is not built yet, so ViCA has no bench variant or training entry.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from efficient_models.registry import Method, register
from workbench.configs import LayeredConfig
from workbench.errors import InputError

CROSS_ATTENTION_LAYERS = 3  # how many layers an export picks


class ViCAConfig(LayeredConfig):
    """Visual tokens skip the LLM's blocks; text reads them by cross-attention at these layers."""

    method: Literal["vica"] = "vica"
    cross_attention_layers: list[int] = Field(min_length=1)

    @model_validator(mode="after")
    def _layers(self):
        for layer in self.cross_attention_layers:
            self.check_layer(layer, "cross-attention layer")
        if self.cross_attention_layers != sorted(set(self.cross_attention_layers)):
            raise ValueError(f"cross-attention layers {self.cross_attention_layers} must be increasing and distinct")
        return self


def _flops(config: ViCAConfig, shapes, text_tokens, answer_tokens=1, decode_steps=1):
    """No visual token in any layer's input; at each cross-attention layer the layer's own k/v projections run
    over the N visual tokens and the text queries (the prompt, then each decoded token) attend to them."""
    from workbench.flops import FlopsBreakdown, FlopsCount, decode_flops, prefill_flops, training_step_flops

    decoder, visual = shapes.decoder, shapes.visual_tokens_per_image
    text_only = [0] * shapes.num_llm_layers

    def with_cross(breakdown: FlopsBreakdown, queries: int, projections: bool) -> FlopsBreakdown:
        layers = list(breakdown.llm_layers)
        for layer in config.cross_attention_layers:
            layers[layer] += decoder.attention_flops(queries, visual)
            layers[layer] += decoder.kv_projection_flops(visual) if projections else 0.0
        return FlopsBreakdown(breakdown.vision, breakdown.projector, layers, breakdown.token_scoring, breakdown.lm_head)

    # The projector runs over the visual tokens although no decoder layer's input holds them.
    return FlopsCount(
        visual_tokens_per_layer=[0.0] * shapes.num_llm_layers,
        prefill=with_cross(prefill_flops(shapes, text_tokens, text_only), text_tokens, projections=True),
        decode=with_cross(decode_flops(shapes, text_tokens, text_only, decode_steps), decode_steps, projections=False),
        training_step=training_step_flops(with_cross(
            prefill_flops(shapes, text_tokens, text_only, lm_head_tokens=answer_tokens), text_tokens, projections=True)))


def _from_run(store) -> dict:
    """The layers where the text gains most from the image: the largest steps of the vision-effect curve."""
    if store.manifest["kind"] != "similarity":
        raise InputError(f"--method vica needs a similarity run; {store.folder} is a {store.manifest['kind']!r} run")
    curves = store.read_table("layers")
    steps = curves["vision_effect"].diff().fillna(curves["vision_effect"])
    layers = sorted(int(layer) for layer in curves.loc[steps.nlargest(CROSS_ATTENTION_LAYERS).index, "layer"])
    return {"cross_attention_layers": layers}


register(Method(name="vica", summary="visual tokens skip the layers; text cross-attends at a few layers",
                config=ViCAConfig, flops=_flops, from_run=_from_run, run_kinds=("similarity",)))
