"""Prefill, decode and training FLOPs of a LLaVA-family model, counted from its matrix shapes.

A multiply-add is 2 FLOPs. Only matrix products are counted (projections, MLPs, attention scores and
weighted sums, the patch convolution, the LM head); norms, activations, softmax, rotary embeddings and
biases are elementwise and small beside them. A prefill of one prompt with one image costs
- vision tower: the patch convolution, then per ViT layer the q/k/v/o projections and the MLP over the
  patch tokens (+ CLS) and attention of every token to every token;
- projector: each of its `nn.Linear` layers over the image's visual tokens;
- each LLM decoder layer: projections and MLP over the tokens in that layer's input (text + the visual
  tokens the schedule keeps there) and attention over the query-key pairs it computes, n(n+1)/2 for
  causal attention over n tokens;
- token scoring before each cut (`efficient_models.token_schedule.scoring`): q for the query rows, k for every
  token, and the query rows' attention logits;
- the LM head on the last token only (the one that predicts the first answer token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image
from torch import nn

from workbench.errors import InputError


@dataclass(frozen=True)
class DecoderShape:
    """The matrix shapes of one decoder layer (Llama-style: grouped k/v heads, gated or plain MLP)."""

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

    def q_projection_flops(self, tokens: float) -> float:
        return 2 * tokens * self.hidden * self.heads * self.head_dim

    def kv_projection_flops(self, tokens: float) -> float:
        return 2 * tokens * 2 * self.hidden * self.kv_heads * self.head_dim

    def linear_flops(self, tokens: float) -> float:
        """q, k, v, o projections and the MLP over `tokens` tokens: linear in the tokens."""
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        output = 2 * tokens * self.heads * self.head_dim * self.hidden
        return self.q_projection_flops(tokens) + self.kv_projection_flops(tokens) + output + 2 * tokens * mlp

    def attention_pair_flops(self, pairs: float) -> float:
        """Scores (q.k) and weighted sum (p.v) of `pairs` query-key pairs, over all heads."""
        return 2 * 2 * pairs * self.heads * self.head_dim

    def attention_flops(self, queries: float, keys: float) -> float:
        """Every one of `queries` queries attending to every one of `keys` keys."""
        return self.attention_pair_flops(queries * keys)

    def layer_flops(self, tokens: float, attended_pairs: float | None = None) -> float:
        """One layer over `tokens` tokens; `attended_pairs` query-key pairs (default: every query with every key)."""
        pairs = tokens * tokens if attended_pairs is None else attended_pairs
        return self.linear_flops(tokens) + self.attention_pair_flops(pairs)

    def token_scoring_flops(self, queries: int, tokens: int) -> float:
        """`query_attention_scores`: q for the query rows, k for all tokens, and the query rows' logits."""
        keys = 2 * tokens * self.hidden * self.kv_heads * self.head_dim
        logits = 2 * queries * tokens * self.heads * self.head_dim
        return self.q_projection_flops(queries) + keys + logits


# SmolLM2-135M, the default model's language model: used when no model is loaded.
SMOLLM2_135M = DecoderShape(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64)


def causal_pairs(tokens: int) -> int:
    """Query-key pairs of causal attention over `tokens` tokens: query i sees keys 0..i."""
    return tokens * (tokens + 1) // 2


@dataclass(frozen=True)
class VisionShape:
    """A ViT vision tower (CLIP, SigLIP, DINOv2) on images of one size."""

    hidden: int
    intermediate: int
    layers: int
    patches: int
    patch_size: int
    channels: int
    class_token: bool
    gated_mlp: bool = False
    tiles: int = 1  # tower passes per image: anyres families encode each tile (and a base image) on its own

    @classmethod
    def from_config(cls, config: Any, image_size: tuple[int, int] | None = None) -> VisionShape:
        """`image_size` (height, width): the pixels the processor feeds, which may differ from the config's
        (the default model's DINOv2 config says 518, its processor crops 224)."""
        height, width = image_size or (config.image_size, config.image_size)
        hidden = config.hidden_size
        gated = bool(getattr(config, "use_swiglu_ffn", False))
        if gated:  # DINOv2's SwiGLU: two thirds of the MLP ratio, rounded up to a multiple of 8
            intermediate = (int(hidden * config.mlp_ratio * 2 / 3) + 7) // 8 * 8
        else:
            intermediate = getattr(config, "intermediate_size", None) or int(hidden * config.mlp_ratio)
        return cls(hidden=hidden, intermediate=intermediate, layers=config.num_hidden_layers,
                   patches=(height // config.patch_size) * (width // config.patch_size), patch_size=config.patch_size,
                   channels=getattr(config, "num_channels", 3),
                   class_token=config.model_type != "siglip_vision_model", gated_mlp=gated)

    @property
    def tokens(self) -> int:
        return self.patches + int(self.class_token)

    def flops(self) -> float:
        """One image through the patch convolution and every layer (all run, whichever layer LLaVA reads), once
        per tile."""
        patch_conv = 2 * self.patches * self.channels * self.patch_size ** 2 * self.hidden
        projections = 2 * self.tokens * 4 * self.hidden * self.hidden
        mlp = 2 * self.tokens * (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        attention = 2 * 2 * self.tokens * self.tokens * self.hidden
        return self.tiles * (patch_conv + self.layers * (projections + mlp + attention))


def batch_image_size(batch: Mapping[str, Any], processor: Any) -> tuple[int, int] | None:
    """(height, width) of the first image's pixels in a batch `processor` made: the last two dims of
    [images, channels, height, width] pixels, or, for Qwen2-VL's flattened patches, the patch grid of
    `image_grid_thw` times the processor's patch size; None when neither is there."""
    if "image_grid_thw" in batch:
        _, rows, cols = batch["image_grid_thw"][0].tolist()
        patch = processor.image_processor.patch_size
        return rows * patch, cols * patch
    pixels = batch["pixel_values"]
    return tuple(pixels.shape[-2:]) if pixels.dim() == 4 else None


# The image counts are made on (height, width): a small square, as the processor resizes or tiles it.
PROBE_IMAGE_SIZE = (64, 64)


def processed_image_size(processor: Any) -> tuple[int, int] | None:
    """(height, width) of the pixels `processor` makes of a `PROBE_IMAGE_SIZE` image, or None without one."""
    if processor is None or getattr(processor, "image_processor", None) is None:
        return None
    probe = Image.new("RGB", PROBE_IMAGE_SIZE[::-1])  # PIL takes (width, height)
    return batch_image_size(processor.image_processor([probe], return_tensors="pt"), processor)


def linear_shapes(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """(in, out) features of every `nn.Linear` inside `module`, in module order."""
    return tuple((linear.in_features, linear.out_features) for linear in module.modules()
                 if isinstance(linear, nn.Linear))


@dataclass(frozen=True)
class ModelShapes:
    """Everything a FLOPs count needs from a model, so counts can also be made without one."""

    decoder: DecoderShape
    num_llm_layers: int
    vision: VisionShape
    projector_linears: tuple[tuple[int, int], ...]
    vocab_size: int
    visual_tokens_per_image: int

    @classmethod
    def of_model(cls, loaded: Any, image_size: tuple[int, int] | None = None) -> ModelShapes:
        """The shapes of a `LoadedModel` fed images of `image_size` (height, width), its adapter saying those of its
        vision tower; by default the size its processor makes (the default model's processor crops 224 px, its
        vision config says 518)."""
        vision, visual_tokens = loaded.adapter.vision_shape(image_size or processed_image_size(loaded.processor))
        return cls(decoder=DecoderShape.of_model(loaded), num_llm_layers=loaded.adapter.num_llm_layers, vision=vision,
                   projector_linears=linear_shapes(loaded.adapter.projector),
                   vocab_size=loaded.model.config.get_text_config().vocab_size, visual_tokens_per_image=visual_tokens)


# The embedded default model (DINOv2-small at 224 px -> 256 patches, 2-layer projector, SmolLM2-135M with an
# added image token): what counts use when no model is loaded. A test checks it against the loaded model.
DEFAULT_MODEL_SHAPES = ModelShapes(
    decoder=SMOLLM2_135M, num_llm_layers=30,
    vision=VisionShape(hidden=384, intermediate=1536, layers=12, patches=256, patch_size=14, channels=3,
                       class_token=True),
    projector_linears=((384, 576), (576, 576)), vocab_size=49153, visual_tokens_per_image=256)


@dataclass
class FlopsBreakdown:
    """FLOPs of one prompt's prefill, by part."""

    vision: float
    projector: float
    llm_layers: list[float]  # per decoder layer, token scoring excluded
    token_scoring: float  # ranking the visual tokens before the cuts
    lm_head: float
    total: float = field(init=False)

    def __post_init__(self):
        self.total = self.vision + self.projector + sum(self.llm_layers) + self.token_scoring + self.lm_head

    @property
    def llm(self) -> float:
        return sum(self.llm_layers) + self.token_scoring

    @classmethod
    def mean(cls, breakdowns: Sequence[FlopsBreakdown]) -> FlopsBreakdown:
        """Part by part, the mean of several prompts' breakdowns."""
        count = len(breakdowns)
        return cls(vision=sum(b.vision for b in breakdowns) / count,
                   projector=sum(b.projector for b in breakdowns) / count,
                   llm_layers=[sum(layer) / count for layer in zip(*(b.llm_layers for b in breakdowns))],
                   token_scoring=sum(b.token_scoring for b in breakdowns) / count,
                   lm_head=sum(b.lm_head for b in breakdowns) / count)

    def to_dict(self) -> dict:
        return asdict(self)


def shapes_of(model: Any) -> ModelShapes:
    return model if isinstance(model, ModelShapes) else ModelShapes.of_model(model)


def check_layers(shapes: ModelShapes, visual_per_layer: Sequence[int]) -> None:
    if len(visual_per_layer) != shapes.num_llm_layers:
        raise InputError(f"{len(visual_per_layer)} visual-token counts for a {shapes.num_llm_layers}-layer LLM; "
                         "give one count per decoder layer")


def scored_layers(visual_per_layer: Sequence[int], num_visual: int) -> dict[int, int]:
    """Layer -> visual tokens present before its cut, for every layer whose cut ranks tokens.

    As in `ScheduledLLM.forward`: a layer keeping fewer (but some) visual tokens than its input holds
    scores them; the input holds the previous layer's tokens, or all of the image's where they enter.
    Dropping them all (the exit) needs no ranking.
    """
    scored = {}
    for layer, kept in enumerate(visual_per_layer):
        present = visual_per_layer[layer - 1] if layer and visual_per_layer[layer - 1] else num_visual
        if 0 < kept < present:
            scored[layer] = present
    return scored


def prefill_flops(model: Any, text_tokens: int, visual_per_layer: Sequence[int], images: int = 1,
                  scoring_queries: int = 1, lm_head_tokens: int = 1) -> FlopsBreakdown:
    """FLOPs of one prompt's prefill: `text_tokens` text tokens, `images` images whose visual tokens are
    `visual_per_layer[l]` in decoder layer l's input (a `TokenSchedule.keep_counts`, times `images`).

    `model`: a `LoadedModel` (whose images are the vision config's size) or `ModelShapes`.
    `scoring_queries`: rows whose attention ranks the visual tokens (the last token at inference).
    `lm_head_tokens`: positions whose logits are computed (1 for generation; the answer tokens in training).
    """
    shapes = shapes_of(model)
    check_layers(shapes, visual_per_layer)
    decoder = shapes.decoder
    num_visual = shapes.visual_tokens_per_image * images
    layers = [decoder.layer_flops(text_tokens + kept, causal_pairs(text_tokens + kept)) for kept in visual_per_layer]
    scoring = sum(decoder.token_scoring_flops(scoring_queries, text_tokens + present)
                  for present in scored_layers(visual_per_layer, num_visual).values())
    projector = sum(2 * num_visual * inputs * outputs for inputs, outputs in shapes.projector_linears)
    return FlopsBreakdown(vision=images * shapes.vision.flops(), projector=projector, llm_layers=layers,
                          token_scoring=scoring, lm_head=2 * lm_head_tokens * decoder.hidden * shapes.vocab_size)


def decode_flops(model: Any, text_tokens: int, visual_per_layer: Sequence[int], steps: int) -> FlopsBreakdown:
    """FLOPs of `steps` greedy decode steps after that prefill: one new token per step through every layer,
    attending to the layer's cached tokens (its prefill token set) and the tokens decoded so far, then the LM head."""
    shapes = shapes_of(model)
    check_layers(shapes, visual_per_layer)
    decoder = shapes.decoder
    layers = [steps * decoder.linear_flops(1)
              + decoder.attention_pair_flops(steps * (text_tokens + kept) + causal_pairs(steps))
              for kept in visual_per_layer]
    return FlopsBreakdown(vision=0.0, projector=0.0, llm_layers=layers, token_scoring=0.0,
                          lm_head=steps * 2 * decoder.hidden * shapes.vocab_size)


def training_step_flops(forward: FlopsBreakdown) -> FlopsBreakdown:
    """Forward and backward of a step that trains the projector and LLM over a frozen vision tower:
    the backward of a matrix product costs twice its forward (gradients of its input and of its weight)."""
    return FlopsBreakdown(vision=forward.vision, projector=3 * forward.projector,
                          llm_layers=[3 * layer for layer in forward.llm_layers],
                          token_scoring=3 * forward.token_scoring, lm_head=3 * forward.lm_head)


@dataclass
class FlopsCount:
    """What one prompt with one image costs a model variant: the visual tokens in each decoder layer's input
    and, split by part, the prefill, `decode_steps` greedy decode steps after it, and a training step on the
    prompt with `answer_tokens` supervised tokens (the LM head only where a label is)."""

    visual_tokens_per_layer: list[float]
    prefill: FlopsBreakdown
    decode: FlopsBreakdown
    training_step: FlopsBreakdown

    @property
    def average_visual_tokens(self) -> float:
        return sum(self.visual_tokens_per_layer) / len(self.visual_tokens_per_layer)

    def to_dict(self) -> dict:
        return asdict(self)


def token_schedule_flops(model: Any, text_tokens: int, visual_per_layer: Sequence[int], answer_tokens: int = 1,
                         decode_steps: int = 1) -> FlopsCount:
    """The count of a model whose decoder layer l sees `visual_per_layer[l]` visual tokens (a token schedule:
    dense, late injection, pruning, early exit), ranked before each cut by one query row."""
    return FlopsCount(visual_tokens_per_layer=[float(kept) for kept in visual_per_layer],
                      prefill=prefill_flops(model, text_tokens, visual_per_layer),
                      decode=decode_flops(model, text_tokens, visual_per_layer, decode_steps),
                      training_step=training_step_flops(prefill_flops(model, text_tokens, visual_per_layer,
                                                                      lm_head_tokens=answer_tokens)))
