"""The fusion method's config: which vision layers to fuse (a named set or indices) and where (input or inside)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from efficient_models.fusion.layer_sets import Group, LayerSetName, named_groups, resolve_layer_set
from workbench.configs import MethodConfig
from workbench.errors import InputError

# Fusion is built on the LLaVA family, whose `vision_feature_layer` list already concatenates layers (input
# fusion) and whose projector sits where internal fusion's extra projectors copy it.
FUSED_MODEL_TYPE = "llava"


class FusionConfig(MethodConfig):
    """Fuse `layers` of the vision tower (indices into its `hidden_states`, 0 = embeddings) with the base layer.

    mode `input` (E_D): the layers' features are concatenated along channels before one wider projector.
    mode `internal` (I_D): each extra layer has its own projector, added at the image positions before the
    LLM layer at the same relative depth. `num_vision_layers`, when given, is the tower the indices are for.
    """

    method: Literal["fusion"] = "fusion"
    layers: LayerSetName | list[int | list[int]] = "stages"
    mode: Literal["input", "internal"] = "input"
    num_vision_layers: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _layers(self):
        if isinstance(self.layers, list) and not self.layers:
            raise ValueError("layers is empty: name a layer set or list at least one extra layer")
        if self.num_vision_layers is not None:
            try:  # the base is checked against the model when the fusion is built
                resolve_layer_set(self.layers, self.num_vision_layers, base=-1)
            except InputError as error:
                raise ValueError(str(error)) from None
        if self.mode == "input" and self.averages_layers():
            raise ValueError(f"layers {self.layers!r} average whole stages, which mode 'input' does not support "
                             "yet (HF's vision_feature_layer lists single layers); use single layers or mode "
                             "'internal'")
        return self

    def averages_layers(self) -> bool:
        """Whether some group is a whole stage averaged first (named sets are checked on any tower depth)."""
        groups: list[Group] = named_groups(self.layers, 8) if isinstance(self.layers, str) else self.layers
        return any(isinstance(group, list) and len(set(group)) > 1 for group in groups)
