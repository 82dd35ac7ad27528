"""The counted FLOPs of `workbench.flops` against hand counts from the tiny LLaVA's matrices and torch's counter."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from efficient_models.fastv import FastVConfig, fastv_schedule
from efficient_models.token_schedule import schedule as schedules
from efficient_models.token_schedule.engine import ScheduledLLM
from tests.tiny_models import image_tokens_llava, llava_batch, tiny_llava
from workbench.errors import InputError
from workbench.flops import (
    DEFAULT_MODEL_SHAPES,
    token_schedule_flops,
    DecoderShape,
    ModelShapes,
    causal_pairs,
    decode_flops,
    prefill_flops,
    training_step_flops,
)
from workbench.models.loading import LoadedModel

TEXT = [1, 2, 3, 4, 5, 6]  # with the image's 4 tokens: 10 tokens per prompt
LAYERS = 4


@pytest.fixture(scope="module")
def loaded():
    return LoadedModel.from_model(tiny_llava(num_layers=LAYERS))


def linear_flops_of(module: nn.Module, tokens: int) -> int:
    """2 x in x out per token for every nn.Linear in `module`: the hand count from the weights themselves."""
    return sum(2 * tokens * linear.in_features * linear.out_features
               for linear in module.modules() if isinstance(linear, nn.Linear))


def test_shapes_are_read_from_the_tiny_llava(loaded):
    shapes = ModelShapes.of_model(loaded)
    assert shapes.decoder == DecoderShape(hidden=32, intermediate=64, heads=4, kv_heads=2, head_dim=8)
    assert shapes.vision.tokens == 5 and shapes.visual_tokens_per_image == 4  # 2x2 patches + CLS, CLS dropped
    assert shapes.projector_linears == ((24, 32), (32, 32))
    assert ModelShapes.of_model(loaded, image_size=(56, 28)).vision.patches == 8


def test_a_decoder_layer_counts_its_matrices_and_causal_attention(loaded):
    tokens = len(TEXT) + 4
    counted = prefill_flops(loaded, len(TEXT), [4] * LAYERS)
    layer = loaded.adapter.llm_layers[0]
    # q, o: 32x32; k, v: 32x16 (2 kv heads of 8); gate, up: 32x64, down: 64x32; 4 heads x 8 dims attend.
    by_hand = 2 * tokens * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64) + 2 * 2 * causal_pairs(tokens) * 4 * 8
    assert linear_flops_of(layer, tokens) + 2 * 2 * causal_pairs(tokens) * 32 == by_hand
    assert counted.llm_layers == [by_hand] * LAYERS
    assert counted.lm_head == 2 * 32 * 96  # the last token only
    assert counted.total == pytest.approx(counted.vision + counted.projector + LAYERS * by_hand + counted.lm_head)


def test_vision_and_projector_counts_match_their_weights(loaded):
    counted = prefill_flops(loaded, len(TEXT), [4] * LAYERS, images=2)
    tower = loaded.adapter.vision_tower
    patch_conv = 2 * 4 * tower.embeddings.patch_embedding.weight.numel()  # 4 patches per image
    per_image = patch_conv + sum(linear_flops_of(layer, 5) + 2 * 2 * 5 * 5 * 24 for layer in loaded.adapter.vision_layers)
    assert counted.vision == 2 * per_image
    assert counted.projector == 2 * 4 * (2 * 24 * 32 + 2 * 32 * 32)  # 2 images x 4 tokens through both Linears
    assert counted.projector == linear_flops_of(loaded.adapter.projector, 8)


def test_linear_flops_double_with_the_tokens_and_attention_grows_faster():
    shape = DecoderShape(hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4)
    assert shape.linear_flops(20) == 2 * shape.linear_flops(10)
    assert shape.layer_flops(20, causal_pairs(20)) > 2 * shape.layer_flops(10, causal_pairs(10))


def test_a_schedule_with_fewer_tokens_counts_fewer_flops_including_its_scoring(loaded):
    dense = prefill_flops(loaded, len(TEXT), schedules.dense(LAYERS).keep_counts(4))
    fastv = prefill_flops(loaded, len(TEXT), fastv_schedule(FastVConfig(num_llm_layers=LAYERS, layer=1, keep=0.5)).keep_counts(4))
    assert fastv.total < dense.total and fastv.vision == dense.vision and fastv.projector == dense.projector
    assert fastv.llm_layers[0] == dense.llm_layers[0] and fastv.llm_layers[1] < dense.llm_layers[1]
    # Ranking before the cut at layer 1: q of the last token, k of all 10 tokens, 1 x 10 logits per head.
    assert dense.token_scoring == 0
    assert fastv.token_scoring == 2 * 32 * 32 + 2 * 10 * 32 * 16 + 2 * 10 * 4 * 8
    late_exit = schedules.TokenSchedule(LAYERS, inject_layer=1, exit_layer=3)
    assert prefill_flops(loaded, len(TEXT), late_exit.keep_counts(4)).token_scoring == 0  # entry and exit rank nothing


@pytest.mark.parametrize("schedule", [schedules.dense(LAYERS), fastv_schedule(FastVConfig(num_llm_layers=LAYERS, layer=1, keep=0.5)),
                                      schedules.TokenSchedule(LAYERS, 1, 3, {2: 0.25})], ids=lambda s: s.name)
def test_matrix_products_equal_what_torch_counts_in_a_real_prefill(loaded, schedule):
    """Every matmul, linear and convolution torch runs in the engine's prefill, against the count without its
    attention (torch's counter has no formula for the CPU attention kernel, and would not halve it if causal)."""
    inputs = llava_batch([TEXT[:2] + image_tokens_llava() + TEXT[2:]], [1])
    engine = ScheduledLLM(loaded.adapter, schedule)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output = engine.forward(loaded.adapter.input_embeddings(inputs), inputs["input_ids"], use_cache=True)
        loaded.adapter.lm_head(output.hidden[:, -1])
    products = {"aten.mm", "aten.addmm", "aten.bmm", "aten.convolution"}
    measured = sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if str(op) in products)
    counted = prefill_flops(loaded, len(TEXT), schedule.keep_counts(4))
    decoder = ModelShapes.of_model(loaded).decoder
    attention = (loaded.adapter.num_vision_layers * 2 * 2 * 5 * 5 * 24
                 + sum(decoder.attention_pair_flops(causal_pairs(len(TEXT) + kept)) for kept in schedule.keep_counts(4)))
    assert measured == counted.total - attention


def test_decode_and_training_counts(loaded):
    keep = fastv_schedule(FastVConfig(num_llm_layers=LAYERS, layer=1, keep=0.5)).keep_counts(4)
    decoder = ModelShapes.of_model(loaded).decoder
    one_step = LAYERS * decoder.linear_flops(1) + 2 * 32 * 96 + sum(
        decoder.attention_pair_flops(len(TEXT) + kept + 1) for kept in keep)
    assert decode_flops(loaded, len(TEXT), keep, steps=1).total == one_step
    assert decode_flops(loaded, len(TEXT), keep, steps=3).total > 3 * one_step  # later steps attend to more keys
    assert decode_flops(loaded, len(TEXT), keep, steps=1).vision == 0  # the image was encoded at prefill
    forward = prefill_flops(loaded, len(TEXT), keep, lm_head_tokens=2)
    training = training_step_flops(forward)
    assert training.total == pytest.approx(forward.vision + 3 * (forward.total - forward.vision))
    assert training.vision == forward.vision and training.llm_layers == [3 * layer for layer in forward.llm_layers]
    count = token_schedule_flops(loaded, len(TEXT), keep, answer_tokens=2, decode_steps=3)
    assert count.prefill == prefill_flops(loaded, len(TEXT), keep)
    assert count.decode == decode_flops(loaded, len(TEXT), keep, steps=3) and count.training_step == training
    assert count.average_visual_tokens == sum(keep) / LAYERS


def test_the_default_model_shapes_constant_is_the_default_models(default_model):
    # The images are the size the processor makes (224 px: 256 visual tokens), not the vision config's 518 px.
    assert ModelShapes.of_model(default_model) == DEFAULT_MODEL_SHAPES


def test_one_count_per_layer_is_required(loaded):
    with pytest.raises(InputError, match="one count per decoder layer"):
        prefill_flops(loaded, len(TEXT), [4] * (LAYERS - 1))
