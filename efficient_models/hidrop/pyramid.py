"""HiDrop's token schedule from its config, and the concave pyramid fitted to a token budget."""

from __future__ import annotations

from efficient_models.hidrop.config import HiDropConfig
from efficient_models.token_schedule.schedule import TokenSchedule
from workbench.errors import InputError

MIN_FRACTION = 1e-6


def concave_cuts(inject_layer: int, exit_layer: int, power: float) -> dict[int, float]:
    """keep(l) = (1 - (l - E) / (X - E)) ** p for every layer after E: a steep first cut, then a long thin tail."""
    span = exit_layer - inject_layer
    # Floored above zero so a steep power still leaves a valid fraction (`keep_counts` keeps at least 1 token).
    return {layer: max(MIN_FRACTION, (1 - (layer - inject_layer) / span) ** power)
            for layer in range(inject_layer + 1, exit_layer)}


def hidrop_schedule(config: HiDropConfig, num_visual: int | None = None) -> TokenSchedule:
    """The schedule the config describes (`keep_tokens` stages need the image's token count)."""
    if config.schedule == "concave":
        cuts = concave_cuts(config.inject_layer, config.exit_layer, config.schedule_power)
    else:
        cuts = {stage.start_layer: stage.fraction_of(num_visual) for stage in config.stages}
        cuts = {layer: fraction for layer, fraction in cuts.items() if fraction < 1}
    return TokenSchedule(config.num_llm_layers, config.inject_layer, config.exit_layer, cuts, name="hidrop")


def with_token_budget(config: HiDropConfig, budget: float, num_visual: int = 576) -> HiDropConfig:
    """The config's entry and exit layers with the concave power whose visual-token-layers are `budget` of dense.

    Found by bisection (the share falls as the power grows); `num_visual` only sets the rounding.
    """
    def share(power: float) -> float:
        candidate = config.model_copy(update={"schedule": "concave", "stages": [], "schedule_power": power})
        return hidrop_schedule(candidate).token_layer_fraction(num_visual)

    low, high = 1e-3, 1e3
    if not share(high) <= budget <= share(low):
        raise InputError(f"entry at layer {config.inject_layer} and exit at {config.exit_layer} allow "
                         f"{share(high):.1%}..{share(low):.1%} of dense visual-token-layers, not {budget:.1%}")
    for _ in range(60):
        middle = (low * high) ** 0.5
        low, high = (middle, high) if share(middle) > budget else (low, middle)
    return config.model_copy(update={"schedule": "concave", "stages": [], "schedule_power": round(high, 4)})
