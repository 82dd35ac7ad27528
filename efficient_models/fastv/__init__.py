"""FastV: after layer K-1, keep the visual tokens the last prompt token attends to most, for all later layers.

As published, the ranking is layer K-1's own attention (softmax probabilities, mean over heads, the
last prompt token's row), read FlashAttention-safely from layer K-1's input through its norm, q / k and
rotary (`TokenSchedule.ranking_layer = "previous"`); kept tokens keep their original positions.

Registers the `fastv` method (a config with K and the kept share, the published K=2 / 50% by default), the
`fastv` bench variant, and `fastv-matched`: FastV keeping as many visual tokens per layer on average as
a given hidrop config, to compare the two at the same budget. Training-free.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from efficient_models.registry import Method, Variant, count_flops, register
from efficient_models.token_schedule.schedule import TokenSchedule, schedule_flops
from workbench.configs import LayeredConfig
from workbench.errors import InputError
from workbench.flops import ModelShapes

FASTV_LAYER, FASTV_KEEP = 2, 0.5  # the published setting



class FastVConfig(LayeredConfig):
    method: Literal["fastv"] = "fastv"
    layer: int = Field(default=FASTV_LAYER, ge=1)  # K: the cut applies to layer K's input, ranked by layer K-1
    keep: float = Field(default=FASTV_KEEP, gt=0, le=1)

    @model_validator(mode="after")
    def _layers(self):
        self.check_layer(self.layer, "layer")
        return self


def fastv_schedule(config: FastVConfig, num_visual: int | None = None, name: str = "fastv") -> TokenSchedule:
    return TokenSchedule(config.num_llm_layers, cuts={config.layer: config.keep}, name=name, ranking_layer="previous")


def matched_config(num_layers: int, target_average: float, num_visual: int, layer: int = FASTV_LAYER) -> FastVConfig:
    """FastV with its keep fraction chosen so its average visual tokens per layer equal `target_average`."""
    after = num_layers - layer
    kept = (target_average * num_layers - layer * num_visual) / after
    if kept < 1:
        raise InputError(f"FastV cannot average {target_average:.1f} visual tokens per layer: its first {layer} "
                         f"layers alone average {layer * num_visual / num_layers:.1f}")
    return FastVConfig(num_llm_layers=num_layers, layer=layer, keep=min(1.0, kept / num_visual))


def _fastv(request):
    from efficient_models.token_schedule.scheduled_model import ScheduledModel

    depth = request.loaded.adapter.num_llm_layers
    config = request.configs.get("fastv") or FastVConfig(num_llm_layers=depth)
    return ScheduledModel(request.loaded, fastv_schedule(config), "fastv")


def _matched(request):
    from efficient_models.token_schedule.scheduled_model import ScheduledModel

    shapes = ModelShapes.of_model(request.loaded)
    target = count_flops(request.config("hidrop"), shapes, 1).average_visual_tokens
    config = matched_config(shapes.num_llm_layers, target, shapes.visual_tokens_per_image)
    return ScheduledModel(request.loaded, fastv_schedule(config, name="fastv-matched"), "fastv-matched")


register(Method(
    name="fastv", summary="after layer K-1 keep the most attended visual tokens (training-free)",
    config=FastVConfig, flops=schedule_flops(fastv_schedule),
    variants=(Variant("fastv", "FastV at its published K=2, keep 50% (or a fastv --config)", _fastv),
              Variant("fastv-matched", "FastV averaging as many visual tokens per layer as a hidrop config",
                      _matched, needs="config", of="hidrop")),
))
