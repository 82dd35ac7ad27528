"""ViCA: visual tokens skip every self-attention and FFN; text reads them by cross-attention at a few layers.

Registers the `vica` method: its config (cross-attention layers, from a similarity run; prefix freezing; an
optional share of visual tokens kept, ViCA plus pruning), its FLOPs count (`cost.py`), `wb train vica`
(projector + LoRA with ViCA active, `training.py`) and two bench variants: `vica`, a trained run, and
`vica-dropin`, a config on the dense weights. The model is `engine.py` (`model.py` makes it a bench variant).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from efficient_models.registry import Method, Variant, register
from efficient_models.token_schedule.finetune_command import finetune_command
from efficient_models.vica.cost import vica_flops
from workbench.configs import LayeredConfig

# An export picks the share of layers the reference's 7B model cross-attends at: 8 of 32.
REFERENCE_SHARE = 8 / 32


class ViCAConfig(LayeredConfig):
    """Visual tokens skip the LLM's blocks; text reads them by cross-attention at these layers."""

    method: Literal["vica"] = "vica"
    cross_attention_layers: list[int] = Field(min_length=1)
    # The reference's 7B model: text tokens before the image end get no attention update (no query rows) in any
    # layer; they still run the FFN and later tokens read their K/V.
    freeze_prefix: bool = True
    # ViCA plus pruning: the share of each image's visual tokens every cross-attention reads, ranked at the first
    # selected layer by the attention of the last prompt token (in training, the token before each answer).
    # None: all of them.
    keep: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _layers(self):
        for layer in self.cross_attention_layers:
            self.check_layer(layer, "cross-attention layer")
        if self.cross_attention_layers != sorted(set(self.cross_attention_layers)):
            raise ValueError(f"cross-attention layers {self.cross_attention_layers} must be increasing and distinct")
        return self


def _from_run(store) -> dict:
    """The layers a vica-layers run measures as most needed (its text->visual cut raises the answer loss most),
    or, from a similarity run, the largest steps of the image's effect on the text (a cheaper proxy)."""
    from efficient_models.vica.layer_choice import layers_from_run

    layers = len(store.read_table("layers"))
    return {"cross_attention_layers": layers_from_run(store, math.ceil(layers * REFERENCE_SHARE))}


def _trained(request):
    from efficient_models.vica.model import load_vica_run

    return load_vica_run(request.run("vica"), request.load_fresh())


def _dropin(request):
    from efficient_models.vica.model import ViCAModel

    return ViCAModel.of(request.loaded, request.config("vica"), name="vica-dropin")


def _check_run(run_dir):
    from efficient_models.vica.model import check_vica_run

    return check_vica_run(run_dir)


register(Method(
    name="vica", summary="visual tokens skip the layers; text cross-attends at a few layers",
    config=ViCAConfig, flops=vica_flops, from_run=_from_run, run_kinds=("vica-layers", "similarity"), check_run=_check_run,
    # What the token-schedule engine needs (input embeddings and rotary positions built outside the model) is
    # what ViCA's decoder, built on it, needs; each such family's decoder has Llama-style k / v projections.
    runs_on=lambda adapter: adapter.token_schedules,
    train=finetune_command("vica", ViCAConfig, "efficient_models.vica.training",
                           "Fine-tune the default model (projector + LoRA) with ViCA's cross-attention active."),
    variants=(Variant("vica", "a trained `wb train vica` run", _trained, needs="run", of="vica"),
              Variant("vica-dropin", "a vica config on the dense weights, untrained", _dropin,
                      needs="config", of="vica")),
))
