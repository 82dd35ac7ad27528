"""Changing how the LLM treats visual tokens, with positions kept, in eager and SDPA attention.

Token-set changes (late entry, early exit, removed tokens) are the scheduled engine's
(`efficient_models.token_schedule.engine`): each is checked against the plain Hugging Face model run on the
sequence it claims to be equivalent to. Hook interventions (skipped sublayers, cut attention edges)
are `workbench.hook_interventions`, checked at prefill and while generating with a KV cache. The random
controls of category removal (`analyses.vqa_conditions`) are checked at the end.
"""

import zlib

import numpy as np
import pytest
import torch

from analyses.vqa_conditions import random_tokens

from efficient_models.token_schedule.schedule import TokenSchedule
from efficient_models.token_schedule.engine import ScheduledLLM
from tests.tiny_models import LLAVA_IMAGE_ID, image_tokens_llava, llava_batch, tiny_llava
from workbench.errors import InputError
from workbench.hook_interventions import Intervention, intervene
from workbench.models.loading import LoadedModel

NUM_LAYERS = 4
ROWS = [[1, 5, *image_tokens_llava(), 7, 8, 9], [1, *image_tokens_llava(), 6, 7]]
CLOSE = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def loaded(request):
    return LoadedModel.from_model(tiny_llava(num_layers=NUM_LAYERS, attn_implementation=request.param))


@pytest.fixture
def batch():
    return llava_batch(ROWS, [1, 1])


def visual_of(batch):
    return batch["input_ids"] == LLAVA_IMAGE_ID


def real_of(batch):
    return batch["attention_mask"].bool()


def positions_of(batch):
    """The position ids the plain model gives the full (left-padded) prompt."""
    return (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)


def text_after_image(batch):
    visual = visual_of(batch)
    after = torch.zeros_like(visual)
    for row, mask in enumerate(visual):
        after[row, mask.nonzero().max() + 1:] = True
    return after


def other_pixels(batch):
    return batch | {"pixel_values": torch.randn_like(batch["pixel_values"]) * 3}


# --- the plain model, for reference ---------------------------------------------

def hidden_states(loaded, batch, intervention=None):
    def run():
        with torch.no_grad():
            return loaded.model(**batch, output_hidden_states=True).hidden_states

    if intervention is None:
        return run()
    with intervene(loaded, batch, intervention):
        return run()


def text_only_run(loaded, batch):
    """The plain model on the prompt with its visual tokens deleted, every text token at its original
    position (a gap where the image was): logits and per-layer states, scattered back to full length."""
    text = ~visual_of(batch)
    index = torch.arange(text.shape[1]).expand_as(text)[text].view(text.shape[0], -1)
    with torch.no_grad():
        output = loaded.model(input_ids=batch["input_ids"].gather(1, index),
                              attention_mask=batch["attention_mask"].gather(1, index),
                              position_ids=positions_of(batch).gather(1, index), output_hidden_states=True)

    def full(states):
        return states.new_zeros(*text.shape, states.shape[-1]).scatter(1, index[..., None].expand_as(states), states)

    return full(output.logits), [full(states) for states in output.hidden_states]


def masked_run(loaded, batch, hidden):
    """Logits of the plain model when no token attends to the `hidden` tokens, positions unchanged."""
    masked = batch | {"attention_mask": batch["attention_mask"] * ~hidden, "position_ids": positions_of(batch)}
    with torch.no_grad():
        return loaded.model(**masked).logits


# --- the engine -----------------------------------------------------------------

def scheduled(loaded, batch, removed=None, **schedule):
    """The engine's prefill: (logits, per-layer outputs), both [batch, seq, ...] (zeros: absent tokens)."""
    engine = ScheduledLLM(loaded.adapter, TokenSchedule(NUM_LAYERS, **schedule))
    with torch.no_grad():
        output = engine.forward(loaded.adapter.input_embeddings(batch), batch["input_ids"], batch["attention_mask"],
                                removed=removed, layer_outputs=True)
        return loaded.adapter.lm_head(output.hidden), output.layer_outputs


def generate(loaded, batch, removed=None, **schedule):
    engine = ScheduledLLM(loaded.adapter, TokenSchedule(NUM_LAYERS, **schedule))
    return engine.generate(batch, max_new_tokens=5, removed=removed)


def test_exit_at_layer_0_is_the_text_alone_at_its_original_positions(loaded, batch):
    text = real_of(batch) & ~visual_of(batch)
    logits, layers = scheduled(loaded, batch, exit_layer=0)
    reference_logits, reference_states = text_only_run(loaded, batch)
    torch.testing.assert_close(logits[text], reference_logits[text], **CLOSE)
    for layer in range(NUM_LAYERS - 1):  # the model's last hidden state is already normed
        torch.testing.assert_close(layers[layer][text], reference_states[layer + 1][text], **CLOSE)
    # and the image no longer matters to the text
    other_logits, _ = scheduled(loaded, other_pixels(batch), exit_layer=0)
    torch.testing.assert_close(other_logits[text], logits[text])


def test_exit_at_layer_hides_the_image_from_that_layer_on_only(loaded, batch):
    text, visual = text_after_image(batch), visual_of(batch)
    _, layers = scheduled(loaded, batch, exit_layer=2)
    plain = hidden_states(loaded, batch)
    # Layers 0 and 1 still read the image: their outputs equal the plain run's.
    for layer in (0, 1):
        torch.testing.assert_close(layers[layer][real_of(batch)], plain[layer + 1][real_of(batch)], **CLOSE)
    # From layer 2 on the visual tokens are gone, and the text no longer gets what layer 2 read from them.
    assert all(bool((layers[layer][visual] == 0).all()) for layer in (2, 3))
    assert not torch.allclose(layers[2][text], plain[3][text], atol=1e-4)


def test_late_injection_gives_the_text_alone_before_and_the_image_from_that_layer_on(loaded, batch):
    text, visual = text_after_image(batch), visual_of(batch)
    _, layers = scheduled(loaded, batch, inject_layer=2)
    _, text_only = text_only_run(loaded, batch)
    # Before layer 2 the visual tokens are absent and the text is exactly the text-only run.
    for layer in (0, 1):
        assert bool((layers[layer][visual] == 0).all())
        torch.testing.assert_close(layers[layer][text], text_only[layer + 1][text], **CLOSE)
    # From layer 2 on the text reads the image, and another image changes it only there.
    assert not torch.allclose(layers[2][text], text_only[3][text], atol=1e-4)
    _, other = scheduled(loaded, other_pixels(batch), inject_layer=2)
    torch.testing.assert_close(other[1][text], layers[1][text])
    assert not torch.allclose(other[2][text], layers[2][text], atol=1e-4)


def test_late_visual_tokens_enter_as_the_raw_projector_output(loaded, batch):
    # With layers 0-1 made the identity (no attention or MLP update), the plain model carries every token's
    # input embedding to layer 2 unchanged, so entering there as the projector output changes nothing.
    attention = loaded.adapter.language_model.config._attn_implementation
    identity = LoadedModel.from_model(tiny_llava(num_layers=NUM_LAYERS, attn_implementation=attention))
    with torch.no_grad():
        for layer in identity.adapter.llm_layers[:2]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    real = real_of(batch)
    logits, layers = scheduled(identity, batch, inject_layer=2)
    plain = hidden_states(identity, batch)
    torch.testing.assert_close(layers[2][real], plain[3][real], **CLOSE)
    with torch.no_grad():
        torch.testing.assert_close(logits[real], identity.model(**batch).logits[real], **CLOSE)


def test_removed_tokens_are_never_attended_and_positions_are_kept(loaded, batch):
    visual = visual_of(batch)
    # The first two visual tokens of each image never enter; the other two stay.
    removed = visual & (visual.cumsum(1) <= 2)
    kept = real_of(batch) & ~removed
    logits, _ = scheduled(loaded, batch, removed=removed)
    torch.testing.assert_close(logits[kept], masked_run(loaded, batch, removed)[kept], **CLOSE)
    # Removing them all leaves the text alone: the same as exiting before layer 0.
    text = real_of(batch) & ~visual
    without, _ = scheduled(loaded, batch, removed=visual)
    torch.testing.assert_close(without[text], scheduled(loaded, batch, exit_layer=0)[0][text], **CLOSE)


def test_removed_tokens_stay_out_while_generating_with_a_kv_cache(loaded, batch):
    visual = visual_of(batch)
    tokens = generate(loaded, batch, removed=visual)
    assert torch.equal(tokens, generate(loaded, other_pixels(batch), removed=visual))
    assert torch.equal(tokens, generate(loaded, batch, exit_layer=0))


# --- hook interventions ---------------------------------------------------------

def test_skipping_both_sublayers_leaves_visual_tokens_unchanged_there(loaded, batch):
    visual = visual_of(batch)
    skipped = hidden_states(loaded, batch, Intervention(skip_attention=frozenset({1}), skip_mlp=frozenset({1})))
    torch.testing.assert_close(skipped[2][visual], skipped[1][visual])
    plain = hidden_states(loaded, batch)
    assert not torch.allclose(plain[2][visual], plain[1][visual])
    # text tokens are still updated by layer 1
    text = text_after_image(batch)
    assert not torch.allclose(skipped[2][text], skipped[1][text])


def test_cutting_visual_to_visual_attention_isolates_each_visual_token_from_the_others(loaded, batch):
    visual = visual_of(batch)
    cut = Intervention(block_visual_to_visual=frozenset(range(NUM_LAYERS)))
    base = hidden_states(loaded, batch, cut)
    # Change only the first visual token's input embedding: with the cut, the other visual tokens
    # cannot notice; without it, they do.
    first = visual.int().argmax(1)

    def perturb_first_visual(module, args, output):
        output = output.clone()
        output[0, 0] += 5.0
        return output

    handle = loaded.adapter.projector.register_forward_hook(perturb_first_visual)
    try:
        perturbed = hidden_states(loaded, batch, cut)
        plain_perturbed = hidden_states(loaded, batch)
    finally:
        handle.remove()
    plain = hidden_states(loaded, batch)
    later_visual = visual.clone()
    later_visual[0, first[0]] = False
    later_visual[1] = False
    torch.testing.assert_close(perturbed[-1][later_visual], base[-1][later_visual])
    assert not torch.allclose(plain_perturbed[-1][later_visual], plain[-1][later_visual])


def test_cutting_text_to_visual_attention_everywhere_equals_the_text_alone(loaded, batch):
    text = real_of(batch) & ~visual_of(batch)
    blocked = hidden_states(loaded, batch, Intervention(block_text_to_visual=frozenset(range(NUM_LAYERS))))
    _, alone = scheduled(loaded, batch, exit_layer=0)
    for layer in range(NUM_LAYERS - 1):
        torch.testing.assert_close(blocked[layer + 1][text], alone[layer][text], **CLOSE)


def test_interventions_hold_while_generating_with_a_kv_cache(loaded, batch):
    blind = Intervention(block_text_to_visual=frozenset(range(NUM_LAYERS)))

    def generate_hooked(inputs):
        with intervene(loaded, inputs, blind):
            return loaded.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)

    assert torch.equal(generate_hooked(batch), generate_hooked(other_pixels(batch)))


def test_layers_outside_the_model_are_refused(loaded, batch):
    with pytest.raises(InputError, match="out of range"), \
            intervene(loaded, batch, Intervention(skip_mlp=frozenset({NUM_LAYERS}))):
        pass


# --- random controls --------------------------------------------------------------

def test_a_control_drawn_from_all_visual_tokens_is_the_draw_runs_made_before_alive_pools():
    drawn = random_tokens("scene-7", 5, np.ones(16, dtype=bool))
    before = np.random.default_rng(zlib.crc32(b"scene-7")).permutation(16)[:5]
    assert set(np.flatnonzero(drawn)) == set(before)
