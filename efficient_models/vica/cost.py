"""ViCA's FLOPs count, as its two forms compute (`efficient_models.vica.engine`).

Prefill and decode are the fast form's: every decoder layer runs on the text tokens only; at each selected
layer the k / v projections run over the visual tokens it reads (input norm aside, which counts nothing) and the
text queries attend to them: the prompt's queries at prefill (every text token, as the count does not know
where the image sits), each decoded token after it. With `keep`, the first selected layer projects all the
image's tokens, ranks them by one query row (its q projection and logits: token scoring) and every selected
layer reads the kept ones. Training is the masks form, which runs every token through every layer, so a
training step costs what dense's does (plus the ranking, which projects the image's keys once more).
"""

from __future__ import annotations

from workbench.flops import (
    FlopsBreakdown,
    FlopsCount,
    ModelShapes,
    decode_flops,
    prefill_flops,
    training_step_flops,
)


def kept_count(candidates: int, keep: float) -> int:
    """Visual tokens a row with `candidates` of them keeps: the share `keep`, at least one (none of none)."""
    return min(candidates, max(1, round(candidates * keep)))


def read_tokens(config, num_visual: int) -> dict[int, int]:
    """Selected layer -> the visual tokens its cross-attention reads."""
    kept = num_visual if config.keep is None else kept_count(num_visual, config.keep)
    return {layer: kept for layer in config.cross_attention_layers}


def projected_tokens(config, num_visual: int) -> dict[int, int]:
    """Selected layer -> the visual tokens its k / v projections run over (all of them where the ranking is)."""
    read = read_tokens(config, num_visual)
    if config.keep is not None:
        read[config.cross_attention_layers[0]] = num_visual
    return read


def scoring_flops(config, shapes: ModelShapes) -> float:
    """The ranking's q projection of one query row and its logits over the image's visual tokens."""
    if config.keep is None:
        return 0.0
    decoder = shapes.decoder
    return decoder.q_projection_flops(1) + 2 * shapes.visual_tokens_per_image * decoder.heads * decoder.head_dim


def with_cross(config, shapes: ModelShapes, breakdown: FlopsBreakdown, queries: int, projections: bool
               ) -> FlopsBreakdown:
    """`breakdown` of the text tokens alone, plus each selected layer's cross-attention from `queries` queries."""
    decoder, num_visual = shapes.decoder, shapes.visual_tokens_per_image
    layers = list(breakdown.llm_layers)
    for layer, read in read_tokens(config, num_visual).items():
        layers[layer] += decoder.attention_flops(queries, read)
    if projections:
        for layer, projected in projected_tokens(config, num_visual).items():
            layers[layer] += decoder.kv_projection_flops(projected)
    scoring = breakdown.token_scoring + (scoring_flops(config, shapes) if projections else 0.0)
    return FlopsBreakdown(breakdown.vision, breakdown.projector, layers, scoring, breakdown.lm_head)


def vica_flops(config, shapes: ModelShapes, text_tokens: int, answer_tokens: int = 1,
               decode_steps: int = 1) -> FlopsCount:
    """The registry's count of one prompt with one image (see the module docstring)."""
    text_only = [0] * shapes.num_llm_layers
    # The projector runs over the visual tokens although no decoder layer's input holds them.
    prefill = with_cross(config, shapes, prefill_flops(shapes, text_tokens, text_only), text_tokens, projections=True)
    decode = with_cross(config, shapes, decode_flops(shapes, text_tokens, text_only, decode_steps), decode_steps,
                        projections=False)
    dense = prefill_flops(shapes, text_tokens, [shapes.visual_tokens_per_image] * shapes.num_llm_layers,
                          lm_head_tokens=answer_tokens)
    # Its ranking projects the image's keys once more: the layers hold no visual K/V of their own to rank by.
    ranking = scoring_flops(config, shapes) + (shapes.decoder.kv_projection_flops(shapes.visual_tokens_per_image) / 2
                                               if config.keep is not None else 0.0)
    masks_form = FlopsBreakdown(dense.vision, dense.projector, dense.llm_layers, ranking, dense.lm_head)
    return FlopsCount(visual_tokens_per_layer=[0.0] * shapes.num_llm_layers, prefill=prefill, decode=decode,
                      training_step=training_step_flops(masks_form))
