"""The export page's estimate: visual tokens per LLM layer under an exported config, and the prefill FLOPs it saves.

Decoder layers only, from `workbench.flops.DecoderShape`, with every query attending to every key
(`layer_flops` without causal halving): an estimate to compare schedules by, not the count `wb bench`
makes. The baseline keeps all N visual tokens in every layer. Injection and HiDrop configs are token
schedules (`efficient_models.schedule.from_config`); a pruning config keeps its categories' measured
share everywhere; ViCA's visual tokens skip every layer, and at its cross-attention layers the layer's
own k/v projections run over the N visual tokens and the T text queries attend to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from efficient_models.schedule import from_config
from workbench.configs import HiDropConfig, InjectionConfig, PruneConfig, ViCAConfig
from workbench.flops import SMOLLM2_135M, DecoderShape

__all__ = ["SMOLLM2_135M", "DecoderShape", "FlopsEstimate", "estimate_flops", "visual_tokens_per_layer"]

Schedule = PruneConfig | InjectionConfig | HiDropConfig | ViCAConfig


def visual_tokens_per_layer(config: Schedule, num_visual: int) -> list[float]:
    """How many visual tokens are in each decoder layer's input (ViCA: none; they skip the layers)."""
    if isinstance(config, (InjectionConfig, HiDropConfig)):
        return [float(count) for count in from_config(config, num_visual).keep_counts(num_visual)]
    if isinstance(config, PruneConfig):
        kept = sum(config.measured_fractions.get(category, 0.0) for category in config.keep_categories)
        return [num_visual * kept] * config.num_llm_layers
    if isinstance(config, ViCAConfig):
        return [0.0] * config.num_llm_layers
    raise TypeError(f"no token schedule for {type(config).__name__}")


@dataclass(frozen=True)
class FlopsEstimate:
    baseline: float  # all visual tokens in every layer
    schedule: float
    average_visual_tokens: float  # per layer, in the layers' inputs

    @property
    def saving(self) -> float:
        """Fraction of the baseline's prefill FLOPs that the schedule does not spend."""
        return 1 - self.schedule / self.baseline


def estimate_flops(config: Schedule, shape: DecoderShape, num_visual: int, num_text: int) -> FlopsEstimate:
    per_layer = visual_tokens_per_layer(config, num_visual)
    baseline = config.num_llm_layers * shape.layer_flops(num_text + num_visual)
    schedule = sum(shape.layer_flops(num_text + visual) for visual in per_layer)
    if isinstance(config, ViCAConfig):
        cross = shape.kv_projection_flops(num_visual) + shape.attention_flops(num_text, num_visual)
        schedule += len(config.cross_attention_layers) * cross
    return FlopsEstimate(baseline, schedule, sum(per_layer) / len(per_layer))
