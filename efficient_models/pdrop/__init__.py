"""PyramidDrop: at 1/4, 1/2 and 3/4 of the depth keep ratio, ratio^2, ratio^3 of the visual tokens.

Registers the `pdrop` method (a config with the cut layers and ratio; by default the published layers
8, 16, 24 of 32 at the same relative depth, ratio 0.5), its bench variant and FLOPs count.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from efficient_models.registry import Method, Variant, register
from efficient_models.token_schedule.schedule import TokenSchedule, schedule_flops
from workbench.configs import LayeredConfig

REFERENCE_DEPTH = 32  # LLaVA-1.5-7B, where the published layers are given
PDROP_LAYERS, PDROP_RATIO = (8, 16, 24), 0.5


def scaled_layer(layer: int, num_layers: int) -> int:
    """A layer index of the 32-layer reference model at the same relative depth of this model."""
    return min(num_layers - 1, max(1, round(layer * num_layers / REFERENCE_DEPTH)))



class PyramidDropConfig(LayeredConfig):
    method: Literal["pdrop"] = "pdrop"
    layers: list[int] | None = None  # None: the published layers at the same relative depth
    ratio: float = Field(default=PDROP_RATIO, gt=0, lt=1)

    @model_validator(mode="after")
    def _layers(self):
        for layer in self.layers or ():
            self.check_layer(layer, "cut layer")
        if self.layers is not None and self.layers != sorted(set(self.layers)):
            raise ValueError(f"cut layers {self.layers} must be increasing and distinct")
        return self

    def cut_layers(self) -> list[int]:
        return self.layers or [scaled_layer(layer, self.num_llm_layers) for layer in PDROP_LAYERS]


def pdrop_schedule(config: PyramidDropConfig, num_visual: int | None = None) -> TokenSchedule:
    cuts = {layer: config.ratio ** (stage + 1) for stage, layer in enumerate(config.cut_layers())}
    return TokenSchedule(config.num_llm_layers, cuts=cuts, name="pdrop")


def _pdrop(request):
    from efficient_models.token_schedule.scheduled_model import ScheduledModel

    config = request.configs.get("pdrop") or PyramidDropConfig(num_llm_layers=request.loaded.adapter.num_llm_layers)
    return ScheduledModel(request.loaded, pdrop_schedule(config), "pdrop")


register(Method(
    name="pdrop", summary="PyramidDrop: halve the visual tokens at 1/4, 1/2 and 3/4 of the depth",
    config=PyramidDropConfig, flops=schedule_flops(pdrop_schedule),
    variants=(Variant("pdrop", "PyramidDrop at its published settings scaled to depth (or a pdrop --config)",
                      _pdrop),),
))
