"""Which visual tokens each LLM layer sees: late entry, pruning cuts, early exit, as one typed schedule.

A `TokenSchedule` describes the whole life of an image's visual tokens in the decoder:
- layers < `inject_layer` see text only (visual tokens enter, as raw projector outputs, at that layer);
- before layer l in `cuts`, the visual tokens are cut to `cuts[l]` (a fraction of the image's tokens);
- layers >= `exit_layer` see no visual tokens.
Dense, late injection, HiDrop (stage lists or the concave parametric pyramid), FastV and PyramidDrop
are all schedules, so one engine (`scheduled_llm`) runs them and one count (`keep_counts`) compares
them. Layers are 0-indexed decoder layers, as in `workbench.configs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workbench.configs import HiDropConfig, InjectionConfig
from workbench.errors import InputError

# The baselines' published settings, on LLaVA-1.5-7B's 32 layers.
REFERENCE_DEPTH = 32
FASTV_LAYER, FASTV_KEEP = 2, 0.5
PDROP_LAYERS, PDROP_RATIO = (8, 16, 24), 0.5
MIN_FRACTION = 1e-6


@dataclass(frozen=True)
class TokenSchedule:
    num_layers: int
    inject_layer: int = 0
    exit_layer: int | None = None  # None: the visual tokens stay to the last layer
    cuts: dict[int, float] = field(default_factory=dict)  # layer -> fraction of the image's tokens kept from it on
    name: str = "custom"

    def __post_init__(self):
        exit_layer = self.num_layers if self.exit_layer is None else self.exit_layer
        if not 0 <= self.inject_layer <= exit_layer <= self.num_layers:
            raise InputError(f"schedule {self.name!r}: need 0 <= inject ({self.inject_layer}) <= exit ({exit_layer}) "
                             f"<= {self.num_layers} layers")
        for layer, fraction in self.cuts.items():
            if not (self.inject_layer <= layer < exit_layer and 0 < fraction <= 1):
                raise InputError(f"schedule {self.name!r}: cut to {fraction} at layer {layer} is outside "
                                 f"layers {self.inject_layer}..{exit_layer - 1} or not a fraction in (0, 1]")
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
        return f"{self.name} [{' '.join(spans)}] avg {self.average_visual_tokens(num_visual):.1f}/layer"


def dense(num_layers: int) -> TokenSchedule:
    return TokenSchedule(num_layers, name="dense")


def concave_cuts(inject_layer: int, exit_layer: int, power: float) -> dict[int, float]:
    """keep(l) = (1 - (l - E) / (X - E)) ** p for every layer after E: a steep first cut, then a long thin tail."""
    span = exit_layer - inject_layer
    # Floored above zero so a steep power still leaves a valid fraction (`keep_counts` keeps at least 1 token).
    return {layer: max(MIN_FRACTION, (1 - (layer - inject_layer) / span) ** power)
            for layer in range(inject_layer + 1, exit_layer)}


def from_config(config: HiDropConfig | InjectionConfig, num_visual: int | None = None) -> TokenSchedule:
    """The schedule an exported config describes (`keep_tokens` stages need the image's token count)."""
    if isinstance(config, InjectionConfig):
        return TokenSchedule(config.num_llm_layers, inject_layer=config.inject_layer, name="injection")
    if config.schedule == "concave":
        cuts = concave_cuts(config.inject_layer, config.exit_layer, config.schedule_power)
    else:
        cuts = {stage.start_layer: stage.fraction_of(num_visual) for stage in config.stages}
        cuts = {layer: fraction for layer, fraction in cuts.items() if fraction < 1}
    return TokenSchedule(config.num_llm_layers, config.inject_layer, config.exit_layer, cuts, name="hidrop")


def scaled_layer(layer: int, num_layers: int) -> int:
    """A layer index of the 32-layer reference model at the same relative depth of this model."""
    return min(num_layers - 1, max(1, round(layer * num_layers / REFERENCE_DEPTH)))


def fastv(num_layers: int, layer: int = FASTV_LAYER, keep: float = FASTV_KEEP) -> TokenSchedule:
    """FastV: after layer K-1, keep the top `keep` of the visual tokens for all later layers."""
    return TokenSchedule(num_layers, cuts={layer: keep}, name="fastv")


def pyramid_drop(num_layers: int, ratio: float = PDROP_RATIO) -> TokenSchedule:
    """PyramidDrop: after 1/4, 1/2 and 3/4 of the depth keep ratio, ratio^2, ratio^3 of the visual tokens."""
    layers = [scaled_layer(layer, num_layers) for layer in PDROP_LAYERS]
    return TokenSchedule(num_layers, cuts={layer: ratio ** (stage + 1) for stage, layer in enumerate(layers)},
                         name="pdrop")


def fastv_matched(num_layers: int, target_average: float, num_visual: int, layer: int = FASTV_LAYER) -> TokenSchedule:
    """FastV with its keep fraction chosen so its average visual tokens per layer equal `target_average`."""
    after = num_layers - layer
    kept = (target_average * num_layers - layer * num_visual) / after
    if kept < 1:
        raise InputError(f"FastV cannot average {target_average:.1f} visual tokens per layer: its first {layer} "
                         f"layers alone average {layer * num_visual / num_layers:.1f}")
    return TokenSchedule(num_layers, cuts={layer: min(1.0, kept / num_visual)}, name="fastv-matched")


def with_token_budget(config: HiDropConfig, budget: float, num_visual: int = 576) -> HiDropConfig:
    """The config's entry and exit layers with the concave power whose visual-token-layers are `budget` of dense.

    Found by bisection (the share falls as the power grows); `num_visual` only sets the rounding.
    """
    def share(power: float) -> float:
        candidate = config.model_copy(update={"schedule": "concave", "stages": [], "schedule_power": power})
        return from_config(candidate).token_layer_fraction(num_visual)

    low, high = 1e-3, 1e3
    if not share(high) <= budget <= share(low):
        raise InputError(f"entry at layer {config.inject_layer} and exit at {config.exit_layer} allow "
                         f"{share(high):.1%}..{share(low):.1%} of dense visual-token-layers, not {budget:.1%}")
    for _ in range(60):
        middle = (low * high) ** 0.5
        low, high = (middle, high) if share(middle) > budget else (low, middle)
    return config.model_copy(update={"schedule": "concave", "stages": [], "schedule_power": round(high, 4)})
