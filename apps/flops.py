"""Visual tokens per LLM layer under an exported schedule, and the estimated prefill FLOPs it saves.

An estimate from shapes, not a measurement. A decoder layer over S tokens costs (multiply-add = 2 FLOPs)
- projections, linear in S: 2 S (d·h·hd [q] + 2 d·kv·hd [k, v] + h·hd·d [o]);
- MLP, linear in S: 2 S · m · d · d_ff (m = 3 for a gated MLP as in Llama / Qwen, else 2);
- attention, quadratic in S: 2 · 2 · S² · h · hd (scores and weighted sum; dense, no causal halving).
The baseline keeps all N visual tokens in every layer; a schedule keeps `visual_tokens_per_layer`.
ViCA's visual tokens skip every layer; at its cross-attention layers the layer's own k/v
projections run over the N visual tokens and the T text queries attend to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench.configs import HiDropConfig, InjectionConfig, PruneConfig, ViCAConfig


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, text_config: Any, gated_mlp: bool = True) -> DecoderShape:
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(hidden=text_config.hidden_size, intermediate=text_config.intermediate_size, heads=heads,
                   kv_heads=getattr(text_config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   gated_mlp=gated_mlp)

    @classmethod
    def of_model(cls, loaded: Any) -> DecoderShape:
        """The shape of a `LoadedModel`'s language model (gated when its MLP has a gate projection)."""
        layer = loaded.adapter.llm_layers[0]
        return cls.from_config(loaded.adapter.language_model.config, gated_mlp=hasattr(layer.mlp, "gate_proj"))

    def kv_projection_flops(self, tokens: float) -> float:
        return 2 * tokens * 2 * self.hidden * self.kv_heads * self.head_dim

    def linear_flops(self, tokens: float) -> float:
        q_and_o = 2 * self.hidden * self.heads * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return 2 * tokens * (q_and_o + mlp) + self.kv_projection_flops(tokens)

    def attention_flops(self, queries: float, keys: float) -> float:
        return 2 * 2 * queries * keys * self.heads * self.head_dim

    def layer_flops(self, tokens: float) -> float:
        return self.linear_flops(tokens) + self.attention_flops(tokens, tokens)


# SmolLM2-135M, the default model's language model: used when no model is loaded.
SMOLLM2_135M = DecoderShape(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64)

Schedule = PruneConfig | InjectionConfig | HiDropConfig | ViCAConfig


def keep_fraction_at(config: HiDropConfig, layer: int) -> float:
    """HiDrop: the keep fraction of the last stage starting at or before `layer` (1 before the first)."""
    fraction = 1.0
    for stage in config.stages:
        if stage.start_layer <= layer:
            fraction = stage.keep_fraction
    return fraction


def visual_tokens_per_layer(config: Schedule, num_visual: int) -> list[float]:
    """How many visual tokens are in each decoder layer's input (ViCA: none; they skip the layers)."""
    layers = range(config.num_llm_layers)
    if isinstance(config, PruneConfig):
        kept = sum(config.measured_fractions.get(category, 0.0) for category in config.keep_categories)
        return [num_visual * kept for _ in layers]
    if isinstance(config, InjectionConfig):
        return [float(num_visual) if layer >= config.inject_layer else 0.0 for layer in layers]
    if isinstance(config, HiDropConfig):
        return [num_visual * keep_fraction_at(config, layer) if config.inject_layer <= layer < config.exit_layer
                else 0.0 for layer in layers]
    if isinstance(config, ViCAConfig):
        return [0.0 for _ in layers]
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
