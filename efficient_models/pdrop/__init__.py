"""PyramidDrop: before layers 8, 16 and 24 keep ratio, ratio^2, ratio^3 of the visual tokens.

As published (the `pdrop` variant and the config's defaults): the layers [8, 16, 24] as written for
the 32-layer LLaVA-1.5-7B, on any model; the visual tokens ranked by the last instruction token's
attention at the cut layer itself; after each cut the sequence's positions renumbered 0..n-1, and
decoding continued from each layer's own length. A model of 24 layers or fewer has no layer 24, so
the published setting is refused there, naming the two ways on (a config with `layers`, or
`pdrop-persistent`).

`pdrop-persistent` is ours: the cut layers at the same relative depth of the model, and every token
keeping its position in the full prompt, as HiDrop keeps it. Beside `pdrop` on the bench it measures
what persistent positions buy.

Registers the `pdrop` method (config, FLOPs count) and both bench variants.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from efficient_models.registry import Method, Variant, register
from efficient_models.token_schedule.schedule import TokenSchedule, schedule_flops
from workbench.configs import LayeredConfig
from workbench.errors import InputError

REFERENCE_DEPTH = 32  # LLaVA-1.5-7B, where the published layers are given
PDROP_LAYERS, PDROP_RATIO = (8, 16, 24), 0.5


def scaled_layer(layer: int, num_layers: int) -> int:
    """A layer index of the 32-layer reference model at the same relative depth of this model."""
    return min(num_layers - 1, max(1, round(layer * num_layers / REFERENCE_DEPTH)))


def scaled_layers(num_layers: int) -> list[int]:
    return [scaled_layer(layer, num_layers) for layer in PDROP_LAYERS]


def check_published_depth(num_layers: int) -> None:
    if num_layers <= max(PDROP_LAYERS):
        scaled = ", ".join(map(str, scaled_layers(num_layers)))
        raise InputError(f"PyramidDrop's published cut layers {list(PDROP_LAYERS)} need an LLM of more than "
                         f"{max(PDROP_LAYERS)} layers; this one has {num_layers}: give `layers` in a pdrop config "
                         f"(e.g. [{scaled}], the same relative depth) or bench pdrop-persistent")


class PyramidDropConfig(LayeredConfig):
    method: Literal["pdrop"] = "pdrop"
    layers: list[int] = Field(default_factory=lambda: list(PDROP_LAYERS))  # cut before these layers
    ratio: float = Field(default=PDROP_RATIO, gt=0, lt=1)
    positions: Literal["renumbered", "persistent"] = "renumbered"  # renumbered: as published

    @model_validator(mode="after")
    def _layers(self):
        if self.layers == list(PDROP_LAYERS):
            check_published_depth(self.num_llm_layers)
        for layer in self.layers:
            self.check_layer(layer, "cut layer")
        if not self.layers or self.layers != sorted(set(self.layers)) or self.layers[0] < 1:
            raise ValueError(f"cut layers {self.layers} must be at least one, increasing, distinct and >= 1")
        return self


def pdrop_schedule(config: PyramidDropConfig, num_visual: int | None = None, name: str = "pdrop") -> TokenSchedule:
    cuts = {layer: config.ratio ** (stage + 1) for stage, layer in enumerate(config.layers)}
    return TokenSchedule(config.num_llm_layers, cuts=cuts, name=name, positions=config.positions)


def _pdrop(request):
    from efficient_models.token_schedule.scheduled_model import ScheduledModel

    config = request.configs.get("pdrop")
    if config is None:
        depth = request.loaded.adapter.num_llm_layers
        check_published_depth(depth)
        config = PyramidDropConfig(num_llm_layers=depth)
    return ScheduledModel(request.loaded, pdrop_schedule(config), "pdrop")


def _persistent(request):
    """A given pdrop config with persistent positions, or the published setting scaled to depth."""
    from efficient_models.token_schedule.scheduled_model import ScheduledModel

    depth = request.loaded.adapter.num_llm_layers
    given = request.configs.get("pdrop")
    config = (given.model_copy(update={"positions": "persistent"}) if given is not None else
              PyramidDropConfig(num_llm_layers=depth, layers=scaled_layers(depth), positions="persistent"))
    return ScheduledModel(request.loaded, pdrop_schedule(config, name="pdrop-persistent"), "pdrop-persistent")


register(Method(
    name="pdrop", summary="PyramidDrop: halve the visual tokens before layers 8, 16 and 24, renumbering positions",
    config=PyramidDropConfig, flops=schedule_flops(pdrop_schedule),
    variants=(Variant("pdrop", "PyramidDrop as published: layers 8, 16, 24, ratio 0.5, positions renumbered "
                               "(or a pdrop --config)", _pdrop),
              Variant("pdrop-persistent", "PyramidDrop with persistent positions, cut layers scaled to the "
                                          "model's depth (or a pdrop --config's)", _persistent)),
))
