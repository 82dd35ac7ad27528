"""Which visual tokens each LLM layer sees: late entry, pruning cuts, early exit, as one typed schedule.

A `TokenSchedule` describes the whole life of an image's visual tokens in the decoder:
- layers < `inject_layer` see text only (visual tokens enter, as raw projector outputs, at that layer);
- before layer l in `cuts`, the visual tokens are cut to `cuts[l]` (a fraction of the image's tokens);
- layers >= `exit_layer` see no visual tokens.
Two choices the published methods differ in:
- `ranking_layer`: a cut before layer l ranks the visual tokens by the attention of layer l itself
  ("cut": HiDrop, PyramidDrop) or of layer l-1, the last layer that ran ("previous": FastV);
- `positions`: every token keeps its rotary position in the full prompt, gaps left by removed tokens
  included ("persistent": FastV, HiDrop, EmbedLens; Qwen2-VL's tokens keep their 3-D ids), or each
  layer numbers its tokens 0..n-1 anew after a cut, and decoding continues from there ("renumbered":
  PyramidDrop; on Qwen2-VL the same number on all three axes, as text is numbered, so the image's
  tokens lose their grid positions).
Dense, late injection, HiDrop (stage lists or the concave parametric pyramid), FastV, PyramidDrop and
EmbedLens category removal are all schedules, so one engine (`engine.ScheduledLLM`) runs them and one
count (`keep_counts`) compares them. The methods build them from their configs (`efficient_models/<method>/`).
Layers are 0-indexed decoder layers, as in `workbench.configs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.errors import InputError
from workbench.flops import FlopsCount, ModelShapes, token_schedule_flops



@dataclass(frozen=True)
class TokenSchedule:
    num_layers: int
    inject_layer: int = 0
    exit_layer: int | None = None  # None: the visual tokens stay to the last layer
    cuts: dict[int, float] = field(default_factory=dict)  # layer -> fraction of the image's tokens kept from it on
    name: str = "custom"
    ranking_layer: Literal["cut", "previous"] = "cut"
    positions: Literal["persistent", "renumbered"] = "persistent"

    def __post_init__(self):
        if self.ranking_layer not in ("cut", "previous") or self.positions not in ("persistent", "renumbered"):
            raise InputError(f"schedule {self.name!r}: ranking_layer is 'cut' or 'previous' (got {self.ranking_layer!r}), "
                             f"positions 'persistent' or 'renumbered' (got {self.positions!r})")
        exit_layer = self.num_layers if self.exit_layer is None else self.exit_layer
        if not 0 <= self.inject_layer <= exit_layer <= self.num_layers:
            raise InputError(f"schedule {self.name!r}: need 0 <= inject ({self.inject_layer}) <= exit ({exit_layer}) "
                             f"<= {self.num_layers} layers")
        for layer, fraction in self.cuts.items():
            if not (self.inject_layer <= layer < exit_layer and 0 < fraction <= 1):
                raise InputError(f"schedule {self.name!r}: cut to {fraction} at layer {layer} is outside "
                                 f"layers {self.inject_layer}..{exit_layer - 1} or not a fraction in (0, 1]")
            if self.ranking_layer == "previous" and layer - 1 < self.inject_layer:
                raise InputError(f"schedule {self.name!r}: the cut at layer {layer} ranks by layer {layer - 1}, "
                                 f"which sees no visual tokens (they enter at layer {self.inject_layer})")
        fractions = [self.cuts[layer] for layer in sorted(self.cuts)]
        if fractions != sorted(fractions, reverse=True):
            raise InputError(f"schedule {self.name!r}: keep fractions {fractions} must not increase with depth")

    @property
    def last_visual_layer(self) -> int:
        """One past the last layer that sees visual tokens."""
        return self.num_layers if self.exit_layer is None else self.exit_layer

    def keep_counts(self, num_visual: int) -> list[int]:
        """Visual tokens of an image with `num_visual` tokens in each layer's input (at least 1 once entered)."""
        counts, kept = [], num_visual
        for layer in range(self.num_layers):
            if layer in self.cuts:
                kept = min(kept, max(1, round(num_visual * self.cuts[layer])))
            counts.append(kept if self.inject_layer <= layer < self.last_visual_layer else 0)
        return counts

    def average_visual_tokens(self, num_visual: int) -> float:
        """Visual tokens per layer, averaged over all layers: the budget HiDrop's "Tok48" names."""
        return sum(self.keep_counts(num_visual)) / self.num_layers

    def token_layer_fraction(self, num_visual: int) -> float:
        """Visual-token-layers as a fraction of dense (every token in every layer)."""
        return self.average_visual_tokens(num_visual) / num_visual

    def describe(self, num_visual: int) -> str:
        counts = self.keep_counts(num_visual)
        spans, start = [], 0
        for layer in range(1, self.num_layers + 1):
            if layer == self.num_layers or counts[layer] != counts[start]:
                spans.append(f"{start}-{layer - 1}:{counts[start]}" if layer - 1 > start else f"{start}:{counts[start]}")
                start = layer
        choices = [text for text, chosen in (("ranked by the previous layer", self.ranking_layer == "previous"),
                                             ("positions renumbered", self.positions == "renumbered")) if chosen]
        return (f"{self.name} [{' '.join(spans)}] avg {self.average_visual_tokens(num_visual):.1f}/layer"
                + "".join(f", {text}" for text in choices))


def dense(num_layers: int) -> TokenSchedule:
    return TokenSchedule(num_layers, name="dense")


def schedule_flops(schedule_of: Callable[[Any, int], TokenSchedule]) -> Callable[..., FlopsCount]:
    """The registry's FLOPs counter of a method whose config describes a token schedule:
    `schedule_of(config, visual tokens per image)`."""
    def count(config: Any, shapes: ModelShapes, text_tokens: int, answer_tokens: int = 1,
              decode_steps: int = 1) -> FlopsCount:
        num_visual = shapes.visual_tokens_per_image
        keep = schedule_of(config, num_visual).keep_counts(num_visual)
        return token_schedule_flops(shapes, text_tokens, keep, answer_tokens, decode_steps)

    return count
