"""The tracing layer: capture exactly what an analysis asks for from one forward pass, via nnsight.

An analysis states its needs as a `CaptureSpec` (vision-tower layers, projector output, LLM
hidden states at chosen layers for all or only visual tokens, attention probabilities,
logits). `capture` runs one traced forward and returns a `Capture`: only the requested
sites, moved to CPU as they are produced, together with the visual-token mask and each
image's patch grid so that tokens can be drawn back onto their image.

Conventions (0-indexed layers):
- `hidden[l]` is the residual stream *after* decoder layer l (HF's `hidden_states[l + 1]`,
  except that HF applies the final norm to its last entry);
- `embeddings` is the input of decoder layer 0 (visual tokens already in place);
- `attentions[l]` is [batch, heads, query, key] from layer l, computed with eager
  attention only while a trace asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import nnsight
import torch

from workbench.models.adapter import ImageLayout, resolve
from workbench.models.loading import LoadedModel

TokenSelection = Literal["all", "visual"]


@dataclass(frozen=True)
class CaptureSpec:
    """What to keep from a forward pass. Layer lists are 0-indexed; "all" means every layer."""

    vision_layers: Sequence[int] | Literal["all"] = ()
    projector_input: bool = False
    projector: bool = False
    embeddings: bool = False
    llm_layers: Sequence[int] | Literal["all"] = ()
    tokens: TokenSelection = "all"
    attention_layers: Sequence[int] | Literal["all"] = ()
    logits: bool = False

    def resolve_layers(self, requested: Sequence[int] | str, count: int, what: str) -> list[int]:
        layers = range(count) if requested == "all" else [layer % count if layer < 0 else layer for layer in requested]
        bad = [layer for layer in layers if not 0 <= layer < count]
        if bad:
            raise ValueError(f"{what} {bad} out of range: the model has {count} (0-indexed)")
        return sorted(set(layers))


@dataclass
class Capture:
    """What one traced forward produced, on CPU, plus where the visual tokens are."""

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    visual_mask: torch.Tensor  # [batch, seq] bool
    layouts: list[ImageLayout]  # one per patch grid (per image in most families), in input order
    tokens: TokenSelection
    vision: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> block output as the tower emits it
    projector_input: torch.Tensor | None = None  # [num_visual_tokens, d_in]: the features each token is made from
    projector: torch.Tensor | None = None  # [num_visual_tokens, d_llm], in visual_mask order
    embeddings: torch.Tensor | None = None  # [batch, seq, d] or [num_visual_tokens, d]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> like `embeddings`
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [batch, heads, q, k]
    logits: torch.Tensor | None = None  # [batch, seq, vocab]

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [(layout.rows, layout.cols) for layout in self.layouts]

    @property
    def text_mask(self) -> torch.Tensor:
        """Real (non-padding) tokens that are not visual."""
        return self.attention_mask.bool() & ~self.visual_mask

    @property
    def after_image_mask(self) -> torch.Tensor:
        """Real tokens after each row's last visual token: the text that can read the image."""
        positions = torch.arange(self.input_ids.shape[1])
        last_visual = torch.where(self.visual_mask, positions, -1).amax(1, keepdim=True)
        return (positions > last_visual) & self.attention_mask.bool()

    def visual(self, layer: int | Literal["embeddings"]) -> torch.Tensor:
        """Visual tokens of a captured layer as [num_visual_tokens, d], whatever `tokens` was."""
        states = self.embeddings if layer == "embeddings" else self.hidden[layer]
        return states if self.tokens == "visual" else states[self.visual_mask]

    def visual_indices(self, layout: ImageLayout) -> torch.Tensor:
        """Where one grid's cells sit, row-major, in a [num_visual_tokens, ...] tensor (visual_mask order). A
        running offset over the grids where every visual token is a grid cell; LLaVA-NeXT's row-end tokens are
        visual tokens between the cells of its tile grid."""
        rank = self.visual_mask.flatten().cumsum(0).view(self.visual_mask.shape) - 1
        return rank[layout.sample, layout.positions.cpu()]

    def per_image(self, visual_states: torch.Tensor, grid: int) -> torch.Tensor:
        """One grid's slice of a [num_visual_tokens, ...] tensor, shaped [rows, cols, ...]; `grid` indexes
        `layouts` (an image's, where it has one grid)."""
        layout = self.layouts[grid]
        return visual_states[self.visual_indices(layout)].reshape(layout.rows, layout.cols, *visual_states.shape[1:])


@contextmanager
def eager_attention(loaded: LoadedModel, needed: bool) -> Iterator[None]:
    """Switch the LLM to eager attention (the only kind that returns probabilities) while needed."""
    language_model = loaded.adapter.language_model
    previous = language_model.config._attn_implementation
    if needed and previous != "eager":
        language_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if language_model.config._attn_implementation != previous:
            language_model.set_attn_implementation(previous)


def _first(output):
    """Module outputs are a tensor or a tuple led by one, depending on the class."""
    return output[0] if isinstance(output, tuple) else output


def capture(loaded: LoadedModel, inputs: Mapping[str, torch.Tensor], spec: CaptureSpec) -> Capture:
    """Run one traced forward over a prepared batch and keep only what `spec` asks for."""
    adapter = loaded.adapter
    vision_layers = spec.resolve_layers(spec.vision_layers, adapter.num_vision_layers, "vision layers")
    llm_layers = spec.resolve_layers(spec.llm_layers, adapter.num_llm_layers, "LLM layers")
    attention_layers = spec.resolve_layers(spec.attention_layers, adapter.num_llm_layers, "attention layers")
    input_ids = inputs["input_ids"]
    visual_mask = adapter.visual_token_mask(input_ids)
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    result = Capture(
        input_ids=input_ids.cpu(),
        attention_mask=attention_mask.cpu(),
        visual_mask=visual_mask.cpu(),
        layouts=adapter.image_layouts(inputs),
        tokens=spec.tokens,
    )

    def keep(states: torch.Tensor) -> torch.Tensor:
        return (states[visual_mask] if spec.tokens == "visual" else states).detach().cpu()

    envoy = loaded.nnsight
    llm_layer_envoys = resolve(envoy, adapter.llm_layers_path)
    # The last LLM layer anything is read from; nothing after it needs to run.
    last_needed = max([*llm_layers, *attention_layers, -1])
    with eager_attention(loaded, bool(attention_layers)), torch.no_grad():
        with envoy.trace(**inputs) as tracer:
            # Sites are read in forward order: nnsight refuses to go back.
            vision_envoys = resolve(envoy, adapter.vision_layers_path)
            for layer in vision_layers:
                result.vision[layer] = nnsight.save(_first(vision_envoys[layer].output).detach().cpu())
            if spec.projector_input:
                features = resolve(envoy, adapter.projector_path).input
                result.projector_input = nnsight.save(adapter.flatten_projector_input(features, inputs).detach().cpu())
            if spec.projector:
                projected = resolve(envoy, adapter.projector_path).output
                result.projector = nnsight.save(adapter.flatten_projector_output(projected, inputs).detach().cpu())
            if spec.embeddings:
                result.embeddings = nnsight.save(keep(llm_layer_envoys[0].input))
            for layer in range(last_needed + 1):
                if layer in attention_layers:
                    result.attentions[layer] = nnsight.save(llm_layer_envoys[layer].self_attn.output[1].detach().cpu())
                if layer in llm_layers:
                    result.hidden[layer] = nnsight.save(keep(_first(llm_layer_envoys[layer].output)))
            if spec.logits:
                result.logits = nnsight.save(resolve(envoy, adapter.lm_head_path).output.detach().cpu())
            else:
                tracer.stop()
    return result

