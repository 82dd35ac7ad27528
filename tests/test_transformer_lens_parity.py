"""Cross-check the tracing layer against TransformerLens's own implementation of the LLM.

Covered: the LLM decoder stack of a LLaVA model (Llama architecture: RMSNorm, rotary
position embeddings, grouped-query attention, gated SiLU MLP, final RMSNorm and the
unembedding). The input of decoder layer 0 that `capture` records (`embeddings`, visual
tokens already scattered in) is fed to a TransformerLens model holding the same weights,
and its residual stream after every block, its attention patterns and its logits must
equal `capture.hidden[l]`, `capture.attentions[l]` and `capture.logits`. Text positions of
`embeddings` are also checked against TransformerLens's token embedding.

Not covered: the vision tower and the projector (the visual rows of `embeddings` are taken
as given), padding and attention masks (every row has the same length), other
families (Qwen2-VL's M-RoPE), and dtypes other than float32.

TransformerLens 4 removed `HookedTransformer`; its own computation now lives in the
TL-native model built by `TransformerBridge.boot_native` from a hand-written config (no
Hugging Face code and no download involved). TL 4.3 ships no Hugging Face Llama ->
native weight conversion, so the mapping is written here. Native RoPE rotates adjacent
pairs (0,1), (2,3), ... while HF Llama rotates halves (i, i + d_head/2), so the rows of
each query/key head are reordered (the inverse of the permutation HF's
`convert_llama_weights_to_hf` applies); scores and everything downstream are unchanged.

The tiny model's default init (std 0.02) gives near-uniform attention, under which a wrong
RoPE layout or head grouping barely moves the residual stream; the LLM weights are
therefore redrawn at unit scale (and norm weights away from 1) so that every part of the
block leaves a mark far above the tolerance.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens", reason="transformer_lens is not installed")
TransformerBridge = pytest.importorskip(
    "transformer_lens.model_bridge", reason="transformer_lens >= 4 (TransformerBridge) is required"
).TransformerBridge
if not hasattr(TransformerBridge, "boot_native"):
    pytest.skip("this transformer_lens has no TL-native model (TransformerBridge.boot_native)", allow_module_level=True)
from transformer_lens import TransformerBridgeConfig  # noqa: E402

from tests.tiny_models import LLAVA_IMAGE_ID, image_tokens_llava, llava_batch, tiny_llava  # noqa: E402
from workbench.models.loading import LoadedModel  # noqa: E402
from workbench.tracing import CaptureSpec, capture  # noqa: E402

ATOL = 1e-4  # float32; observed differences are <= 5e-6 at residual magnitudes up to ~8
RTOL = 1e-4


def _redraw_llm_weights(model, seed: int = 1) -> None:
    """Unit-scale LLM weights so attention is sharp and every sub-layer matters."""
    generator = torch.Generator().manual_seed(seed)
    language_model = model.model.language_model
    params = [*language_model.named_parameters(), ("lm_head.weight", model.lm_head.weight)]
    with torch.no_grad():
        for name, param in params:
            if name.startswith("embed_tokens"):
                continue
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            else:
                scale = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                param.copy_(torch.randn(param.shape, generator=generator) * scale / param.shape[1] ** 0.5)


def _tl_config(text_config) -> TransformerBridgeConfig:
    d_head = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    rope = getattr(text_config, "rope_parameters", None) or {}
    assert rope.get("rope_type", "default") == "default", "only plain RoPE is mapped here"
    return TransformerBridgeConfig(
        d_model=text_config.hidden_size,
        d_head=d_head,
        n_layers=text_config.num_hidden_layers,
        n_ctx=text_config.max_position_embeddings,
        n_heads=text_config.num_attention_heads,
        n_key_value_heads=text_config.num_key_value_heads,
        d_mlp=text_config.intermediate_size,
        d_vocab=text_config.vocab_size,
        act_fn=text_config.hidden_act,  # "silu"
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=text_config.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=rope.get("rope_theta", getattr(text_config, "rope_theta", 10000.0)),
        init_weights=False,
    )


def _halves_to_adjacent_pairs(weight: torch.Tensor, heads: int, d_head: int) -> torch.Tensor:
    """Reorder each head's output rows from HF's half-split RoPE layout to adjacent pairs."""
    return weight.reshape(heads, 2, d_head // 2, -1).transpose(1, 2).reshape(weight.shape)


def _native_state_dict(model, bridge) -> dict[str, torch.Tensor]:
    """The Llava's language-model weights under the TL-native bridge's keys (biases zero)."""
    language_model, cfg = model.model.language_model, bridge.cfg
    mapped = {"embed.weight": language_model.embed_tokens.weight,
              "ln_final.weight": language_model.norm.weight,
              "unembed.weight": model.lm_head.weight}
    for index, layer in enumerate(language_model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        mapped |= {
            f"blocks.{index}.ln1.weight": layer.input_layernorm.weight,
            f"blocks.{index}.ln2.weight": layer.post_attention_layernorm.weight,
            f"blocks.{index}.attn.q.weight": _halves_to_adjacent_pairs(attn.q_proj.weight, cfg.n_heads, cfg.d_head),
            f"blocks.{index}.attn.k.weight": _halves_to_adjacent_pairs(
                attn.k_proj.weight, cfg.n_key_value_heads, cfg.d_head),
            f"blocks.{index}.attn.v.weight": attn.v_proj.weight,
            f"blocks.{index}.attn.o.weight": attn.o_proj.weight,
            f"blocks.{index}.mlp.gate.weight": mlp.gate_proj.weight,
            f"blocks.{index}.mlp.in.weight": mlp.up_proj.weight,
            f"blocks.{index}.mlp.out.weight": mlp.down_proj.weight,
        }
    expected = bridge.state_dict()
    assert not set(mapped) - set(expected), f"keys TL does not have: {sorted(set(mapped) - set(expected))}"
    unmapped = sorted(set(expected) - set(mapped))
    assert all(key.endswith(".bias") for key in unmapped), f"TL weights left unmapped: {unmapped}"
    state = {key: torch.zeros_like(expected[key]) for key in unmapped}
    state |= {key: value.detach().clone() for key, value in mapped.items()}
    return state


@pytest.fixture(scope="module")
def parity():
    model = tiny_llava(seed=0, num_layers=4)
    _redraw_llm_weights(model)
    loaded = LoadedModel.from_model(model)
    text = [[3, 17, 42], [8, 5, 61]]
    tail = [[11, 29, 7, 50], [19, 23, 2, 44]]
    rows = [head + image_tokens_llava() + rest for head, rest in zip(text, tail)]
    inputs = llava_batch(rows, images_per_row=[1, 1])
    assert bool(inputs["attention_mask"].all()), "this cross-check is for unpadded batches"
    residual = capture(loaded, inputs, CaptureSpec(embeddings=True, llm_layers="all", logits=True))
    patterns = capture(loaded, inputs, CaptureSpec(embeddings=True, attention_layers="all"))

    bridge = TransformerBridge.boot_native(_tl_config(model.config.text_config))
    bridge.load_state_dict(_native_state_dict(model, bridge), strict=True)
    bridge.eval()
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(residual.embeddings, start_at_layer=0)
        tl_embed = bridge.embed(residual.input_ids)
    return residual, patterns, logits, cache, tl_embed


def test_residual_stream_after_every_layer_matches_transformer_lens(parity):
    residual, _, _, cache, _ = parity
    layers = len(residual.hidden)
    tl_layers = sum(name.endswith(".hook_resid_post") for name in cache.keys())
    assert sorted(residual.hidden) == list(range(layers)) == list(range(tl_layers))
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], residual.embeddings)
    for layer in range(layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], residual.hidden[layer],
                                   atol=ATOL, rtol=RTOL, msg=lambda m, layer=layer: f"layer {layer}: {m}")
    # The check can tell layers apart: an off-by-one in the tracing layer would fail it.
    for layer in range(layers - 1):
        gap = (residual.hidden[layer + 1] - residual.hidden[layer]).abs().max().item()
        assert gap > 1e3 * ATOL, f"layers {layer} and {layer + 1} are too alike ({gap:.2e}) to tell apart"


def test_logits_match_transformer_lens(parity):
    residual, _, logits, _, _ = parity
    torch.testing.assert_close(logits, residual.logits, atol=ATOL, rtol=RTOL)
    assert residual.logits.std().item() > 1e3 * ATOL


def test_attention_patterns_match_transformer_lens(parity):
    residual, patterns, _, cache, _ = parity
    # The eager-attention trace saw the same residual stream as the SDPA one.
    torch.testing.assert_close(patterns.embeddings, residual.embeddings)
    assert sorted(patterns.attentions) == sorted(residual.hidden)
    for layer, probs in patterns.attentions.items():
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_pattern"], probs,
                                   atol=ATOL, rtol=RTOL, msg=lambda m, layer=layer: f"layer {layer}: {m}")
    # Sharp enough that a wrong RoPE layout or head grouping could not hide.
    assert min(probs[..., -1, :].max().item() for probs in patterns.attentions.values()) > 0.5


def test_embeddings_are_token_embeddings_with_visual_features_scattered_in(parity):
    residual, _, _, _, tl_embed = parity
    visual = residual.visual_mask
    assert visual.equal(residual.input_ids == LLAVA_IMAGE_ID) and int(visual.sum()) == 8
    torch.testing.assert_close(residual.embeddings[~visual], tl_embed[~visual])
    assert not torch.allclose(residual.embeddings[visual], tl_embed[visual], atol=1e-3)
