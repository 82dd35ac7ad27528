"""ViCA plus pruning (a kept share of the visual tokens in every cross-attention) and ViCA's FLOPs count, held to
what the model computes: every projection's FLOPs measured by hooks on the decoder's linear layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from efficient_models.vica import ViCAConfig
from efficient_models.vica.cost import kept_count, vica_flops
from efficient_models.vica.engine import ViCALLM
from tests.test_vica_model import CROSS, LAYERS, ROWS, batch, model, run, text_logits  # noqa: F401 (fixtures)
from tests.tiny_models import VOCAB, llava_batch
from workbench.flops import DecoderShape, ModelShapes, VisionShape, causal_pairs, linear_shapes
from workbench.models.adapter import adapter_for


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_the_kept_share_is_ranked_once_and_read_by_every_selected_layer(model, batch, keep):
    adapter = adapter_for(model)
    visual = adapter.visual_token_mask(batch["input_ids"])
    fast, masks = ViCALLM(adapter, CROSS, keep=keep), ViCALLM(adapter, CROSS, keep=keep, form="masks")
    output = run(fast, batch, use_cache=True)
    kept = output.kept[CROSS[0]]
    assert list(output.kept) == [CROSS[0]] and torch.equal(kept, run(masks, batch).kept[CROSS[0]])
    assert not (kept & ~visual).any()
    assert kept.sum(1).tolist() == [kept_count(int(count), keep) for count in visual.sum(1)]  # 1 and 2 images, none
    for layer in CROSS:  # each selected layer's cache holds the kept visual tokens and the text
        assert output.cache.key_valid[layer].sum(1).tolist() == \
               (kept.sum(1) + (~visual & batch["attention_mask"].bool()).sum(1)).tolist()
    # Keeping a share is reading only the tokens it keeps: the others given as `removed` answer the same.
    unpruned = ViCALLM(adapter, CROSS)
    torch.testing.assert_close(text_logits(fast, batch), text_logits(unpruned, batch, removed=visual & ~kept),
                               atol=1e-5, rtol=1e-4)
    assert not torch.allclose(text_logits(fast, batch), text_logits(unpruned, batch))


def test_keeping_everything_is_no_pruning(model, batch):
    adapter = adapter_for(model)
    torch.testing.assert_close(text_logits(ViCALLM(adapter, CROSS, keep=1.0), batch),
                               text_logits(ViCALLM(adapter, CROSS), batch))


def test_the_ranking_follows_the_query_rows(model, batch):
    """Training ranks by the token before each answer, generation by the last prompt token: other rows, other
    tokens kept (so the queries argument reaches the ranking)."""
    adapter = adapter_for(model)
    engine = ViCALLM(adapter, CROSS, keep=0.25)
    last = run(engine, batch).kept[CROSS[0]]
    queries = torch.zeros_like(last)
    queries[:, -3] = True
    earlier = run(engine, batch, queries=queries).kept[CROSS[0]]
    assert earlier.sum() == last.sum() and not torch.equal(earlier, last)


# --- the FLOPs count --------------------------------------------------------------------------

def shapes_of(model) -> ModelShapes:
    adapter = adapter_for(model)
    return ModelShapes(decoder=DecoderShape.from_config(model.config.text_config), num_llm_layers=LAYERS,
                       vision=VisionShape.from_config(model.config.vision_config),
                       projector_linears=linear_shapes(adapter.projector), vocab_size=VOCAB,
                       visual_tokens_per_image=4)


def linear_flops_per_layer(adapter, call) -> list[float]:
    """What `call()` spends in each decoder layer's linear layers (2 FLOPs per multiply-add), measured."""
    spent = [0.0] * adapter.num_llm_layers

    def hook(number):
        def count(module: nn.Linear, args, output):
            spent[number] += 2 * args[0].numel() // module.in_features * module.in_features * module.out_features
        return count

    handles = [linear.register_forward_hook(hook(number)) for number, layer in enumerate(adapter.llm_layers)
               for linear in layer.modules() if isinstance(linear, nn.Linear)]
    try:
        with torch.no_grad():
            call()
    finally:
        for handle in handles:
            handle.remove()
    return spent


@pytest.mark.parametrize("keep", [None, 0.5])
def test_the_count_is_what_the_model_computes(model, keep):
    """One prompt, 5 text and 4 visual tokens: per layer, the count's projections and MLP (its total less the
    attention products it counts) are the measured ones, at prefill, a decode step and a training forward."""
    adapter = adapter_for(model)
    single = llava_batch([ROWS[0]], [1])
    config = ViCAConfig(num_llm_layers=LAYERS, cross_attention_layers=CROSS, keep=keep)
    shapes, text, num_visual = shapes_of(model), 5, 4
    decoder = shapes.decoder
    count = vica_flops(config, shapes, text, answer_tokens=1, decode_steps=1)
    read = num_visual if keep is None else kept_count(num_visual, keep)
    scoring_q = decoder.q_projection_flops(1) if keep is not None else 0.0
    engine = ViCALLM(adapter, CROSS, keep=keep)
    embeddings = adapter.input_embeddings(single)

    state = {}
    prefill = linear_flops_per_layer(adapter, lambda: state.update(output=engine.forward(
        embeddings, single["input_ids"], single["attention_mask"], use_cache=True)))
    for layer in range(LAYERS):
        cross = decoder.attention_flops(text, read) * (layer in CROSS)
        attention = decoder.attention_pair_flops(causal_pairs(text)) + cross
        # the ranking's q projection runs in the layer's q_proj; the count has it under token scoring
        measured = prefill[layer] - scoring_q * (layer == CROSS[0])
        assert measured == pytest.approx(count.prefill.llm_layers[layer] - attention)
    assert count.prefill.token_scoring == pytest.approx(
        scoring_q + (2 * num_visual * decoder.heads * decoder.head_dim if keep else 0.0))

    step = adapter.embed_tokens(torch.tensor([[3]]))
    decode = linear_flops_per_layer(adapter, lambda: engine.decode(step, state["output"].cache))
    for layer in range(LAYERS):
        attention = decoder.attention_pair_flops(text + 1) + decoder.attention_flops(1, read) * (layer in CROSS)
        assert decode[layer] == pytest.approx(count.decode.llm_layers[layer] - attention)

    masks = ViCALLM(adapter, CROSS, keep=keep, form="masks")
    training = linear_flops_per_layer(adapter, lambda: masks.forward(embeddings, single["input_ids"],
                                                                     single["attention_mask"]))
    everything = text + num_visual
    for layer in range(LAYERS):
        attention = decoder.attention_pair_flops(causal_pairs(everything))
        # the masks form's ranking projects the image's keys once more at the first selected layer
        ranking = (scoring_q + decoder.kv_projection_flops(num_visual) / 2) * (layer == CROSS[0] and keep is not None)
        assert training[layer] - ranking == pytest.approx(count.training_step.llm_layers[layer] / 3 - attention)
    ranking = scoring_q + decoder.kv_projection_flops(num_visual) / 2 if keep is not None else 0.0
    assert count.training_step.token_scoring == pytest.approx(
        3 * (ranking + (2 * num_visual * decoder.heads * decoder.head_dim if keep else 0.0)))


def test_on_the_default_shapes_pruning_cuts_every_cross_attention_but_the_ranking_projects_all():
    """ViCA plus pruning at 5% (13 of 256 tokens): the first selected layer projects all 256 to rank them, the
    others only the 13; every selected layer's text reads 13; the ranking is one query row's q and logits."""
    from workbench.flops import DEFAULT_MODEL_SHAPES as shapes

    decoder, text = shapes.decoder, 40
    full = vica_flops(ViCAConfig(num_llm_layers=30, cross_attention_layers=[0, 8, 16]), shapes, text)
    pruned = vica_flops(ViCAConfig(num_llm_layers=30, cross_attention_layers=[0, 8, 16], keep=0.05), shapes, text)
    text_layer = full.prefill.llm_layers[1]
    assert pruned.prefill.llm_layers[1] == text_layer
    assert full.prefill.llm_layers[8] - text_layer == pytest.approx(
        decoder.kv_projection_flops(256) + decoder.attention_flops(text, 256))
    assert pruned.prefill.llm_layers[0] - text_layer == pytest.approx(
        decoder.kv_projection_flops(256) + decoder.attention_flops(text, 13))
    assert pruned.prefill.llm_layers[8] - text_layer == pytest.approx(
        decoder.kv_projection_flops(13) + decoder.attention_flops(text, 13))
    assert pruned.prefill.token_scoring == pytest.approx(decoder.q_projection_flops(1) + 2 * 256 * 9 * 64)
    assert pruned.decode.llm_layers[8] - full.decode.llm_layers[1] == pytest.approx(decoder.attention_flops(1, 13))
