"""FastV and PyramidDrop against literal re-implementations of their reference code (tiny LLaVA, batch 1).

The literal loop below is what the references do, written plainly: run the decoder layers one by one
with eager attention on a shrinking sequence; at a cut, rank the image tokens by the head-mean
attention probabilities of the last token (FastV: the probabilities layer K-1 produced; PyramidDrop:
those of the cut layer on its input), keep the top ones and the text; FastV keeps original positions,
PyramidDrop renumbers 0..n-1 and decodes each layer from its own length. Our engine must select the
same tokens and produce the same logits, at prefill and at each decode step.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from efficient_models.fastv import FastVConfig, fastv_schedule
from efficient_models.pdrop import PyramidDropConfig, pdrop_schedule
from efficient_models.token_schedule.engine import ScheduledLLM
from tests.tiny_models import LLAVA_IMAGE_ID, llava_batch, tiny_llava
from workbench.errors import InputError
from workbench.models.adapter import adapter_for

LAYERS, IMAGE_SIZE = 6, 56  # 56 px / 14 px patches: 16 visual tokens
PROMPT = [1, 5] + [LLAVA_IMAGE_ID] * 16 + [7, 8, 9, 10]
FASTV = fastv_schedule(FastVConfig(num_llm_layers=LAYERS, layer=2, keep=0.5))
PDROP = pdrop_schedule(PyramidDropConfig(num_llm_layers=LAYERS, layers=[2, 3, 4], ratio=0.5))


@pytest.fixture(scope="module")
def model():
    model = tiny_llava(num_layers=LAYERS, attn_implementation="eager", image_size=IMAGE_SIZE)
    with torch.no_grad():  # sharper attention than at random init, so that rankings have no near-ties
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model


@pytest.fixture(scope="module")
def batch():
    return llava_batch([PROMPT], [1], image_size=IMAGE_SIZE)


def causal_mask(length: int) -> torch.Tensor:
    return torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]


def attention_probabilities(adapter, layer, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[1, heads, n, n]: the eager softmax probabilities `layer` computes on `hidden`."""
    rotary = adapter.language_model.rotary_emb(hidden, positions[None])
    _, weights = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=rotary,
                                 attention_mask=causal_mask(hidden.shape[1]))
    return weights


def literal_prefill(adapter, batch, cuts: dict[int, float], ranking: str, renumber: bool):
    """The reference loop: (kept image indices per cut, last-token logits, cache, next position per layer)."""
    ids = batch["input_ids"][0]
    hidden = adapter.input_embeddings(batch)
    index = torch.arange(len(ids))  # original indices of the current sequence
    num_visual = int((ids == LLAVA_IMAGE_ID).sum())
    cache, kept, next_positions, previous = DynamicCache(), {}, [], None
    for number, layer in enumerate(adapter.llm_layers):
        positions = torch.arange(len(index)) if renumber else index
        if number in cuts:
            attention = previous if ranking == "previous" else attention_probabilities(adapter, layer, hidden, positions)
            last_row = attention.mean(1)[0, -1]
            image = ids[index] == LLAVA_IMAGE_ID
            top = last_row[image].topk(round(num_visual * cuts[number])).indices
            keep = ~image
            keep[image.nonzero()[:, 0][top]] = True
            hidden, index = hidden[:, keep], index[keep]
            kept[number] = sorted(index[ids[index] == LLAVA_IMAGE_ID].tolist())
            positions = torch.arange(len(index)) if renumber else index
        previous = attention_probabilities(adapter, layer, hidden, positions)
        hidden = layer(hidden, attention_mask=causal_mask(hidden.shape[1]), past_key_values=cache, use_cache=True,
                       position_embeddings=adapter.language_model.rotary_emb(hidden, positions[None]))
        next_positions.append(len(index) if renumber else len(ids))
    return kept, adapter.lm_head(adapter.language_model.norm(hidden)[:, -1]), cache, next_positions


def literal_decode(adapter, token: torch.Tensor, cache: DynamicCache, next_positions: list[int]) -> torch.Tensor:
    """One reference decode step: each layer places the new token at its own next position."""
    hidden = adapter.embed_tokens(token.view(1, 1))
    for number, layer in enumerate(adapter.llm_layers):
        rotary = adapter.language_model.rotary_emb(hidden, torch.tensor([[next_positions[number]]]))
        hidden = layer(hidden, attention_mask=None, past_key_values=cache, use_cache=True, position_embeddings=rotary)
        next_positions[number] += 1
    return adapter.lm_head(adapter.language_model.norm(hidden)[:, -1])


def engine_kept(output) -> dict[int, list[int]]:
    return {layer: mask[0].nonzero()[:, 0].tolist() for layer, mask in output.kept.items()}


def assert_matches_reference(model, batch, schedule, ranking: str, renumber: bool, steps: int = 3) -> None:
    adapter = adapter_for(model)
    engine = ScheduledLLM(adapter, schedule)
    with torch.no_grad():
        kept, logits, cache, next_positions = literal_prefill(adapter, batch, schedule.cuts, ranking, renumber)
        output = engine.forward(adapter.input_embeddings(batch), batch["input_ids"], use_cache=True)
        assert engine_kept(output) == kept
        ours = adapter.lm_head(output.hidden[:, -1])
        torch.testing.assert_close(ours, logits, atol=1e-5, rtol=1e-4)
        token = logits.argmax(-1)
        for _ in range(steps):
            logits = literal_decode(adapter, token, cache, next_positions)
            ours = adapter.lm_head(engine.decode(adapter.embed_tokens(token.view(1, 1)), output.cache)[:, -1])
            torch.testing.assert_close(ours, logits, atol=1e-5, rtol=1e-4)
            token = logits.argmax(-1)


def test_fastv_ranks_by_layer_k_minus_1s_own_attention_and_keeps_original_positions(model, batch):
    assert_matches_reference(model, batch, FASTV, ranking="previous", renumber=False)


def test_pyramiddrop_ranks_at_the_cut_layer_renumbers_positions_and_decodes_each_layer_from_its_length(model, batch):
    assert_matches_reference(model, batch, PDROP, ranking="cut", renumber=True)


def test_the_literal_loop_tells_ranking_layers_and_position_schemes_apart(model, batch):
    """The parity checks above could fail: on this model the other choices select or compute differently."""
    adapter = adapter_for(model)
    with torch.no_grad():
        by_previous = literal_prefill(adapter, batch, FASTV.cuts, "previous", renumber=False)
        by_cut = literal_prefill(adapter, batch, FASTV.cuts, "cut", renumber=False)
        renumbered = literal_prefill(adapter, batch, PDROP.cuts, "cut", renumber=True)
        persistent = literal_prefill(adapter, batch, PDROP.cuts, "cut", renumber=False)
    assert by_previous[0] != by_cut[0]
    assert not torch.allclose(renumbered[1], persistent[1], atol=1e-4)


def test_pyramiddrop_published_layers_are_8_16_24_as_written_and_need_25_layers():
    assert pdrop_schedule(PyramidDropConfig(num_llm_layers=30)).cuts == {8: 0.5, 16: 0.25, 24: 0.125}
    assert pdrop_schedule(PyramidDropConfig(num_llm_layers=30, positions="persistent")).positions == "persistent"
    with pytest.raises(InputError, match="need an LLM of more than 24 layers; this one has 24"):
        PyramidDropConfig(num_llm_layers=24)


def test_fastv_needs_a_layer_before_its_cut():
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        FastVConfig(num_llm_layers=LAYERS, layer=0)
