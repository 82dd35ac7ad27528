"""Interventions on visual tokens: each one changes exactly what it says, with positions kept,
in eager and SDPA attention, at prefill and while generating with a KV cache."""

import pytest
import torch

from tests.tiny_models import image_tokens_llava, llava_batch, tiny_llava
from workbench.errors import InputError
from workbench.interventions import Intervention, intervene
from workbench.models.loading import LoadedModel

ROWS = [[1, 5, *image_tokens_llava(), 7, 8, 9], [1, *image_tokens_llava(), 6, 7]]


def hidden_states(loaded, batch, intervention=None):
    def run():
        with torch.no_grad():
            return loaded.model(**batch, output_hidden_states=True).hidden_states

    if intervention is None:
        return run()
    with intervene(loaded, batch, intervention):
        return run()


def other_pixels(batch):
    return batch | {"pixel_values": torch.randn_like(batch["pixel_values"]) * 3}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def loaded(request):
    return LoadedModel.from_model(tiny_llava(num_layers=4, attn_implementation=request.param))


def text_after_image(batch):
    visual = batch["input_ids"] == 95
    after = torch.zeros_like(visual)
    for row, mask in enumerate(visual):
        after[row, mask.nonzero().max() + 1:] = True
    return after


def test_removing_every_visual_token_equals_masking_them_with_positions_kept(loaded):
    batch = llava_batch(ROWS, [1, 1])
    visual = batch["input_ids"] == 95
    removed = hidden_states(loaded, batch, Intervention(removed=visual))
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    masked = batch | {"attention_mask": batch["attention_mask"] * ~visual, "position_ids": position_ids}
    reference = hidden_states(loaded, masked)
    text = text_after_image(batch)
    torch.testing.assert_close(removed[-1][text], reference[-1][text], atol=1e-5, rtol=1e-4)
    # and the image no longer matters to the text
    changed = hidden_states(loaded, other_pixels(batch), Intervention(removed=visual))
    torch.testing.assert_close(changed[-1][text], removed[-1][text], atol=1e-5, rtol=1e-4)


def test_exit_at_layer_hides_the_image_from_that_layer_on_only(loaded):
    batch = llava_batch(ROWS, [1, 1])
    text = text_after_image(batch)
    exit_2 = hidden_states(loaded, batch, Intervention(exit_layer=2))
    exit_2_other = hidden_states(loaded, other_pixels(batch), Intervention(exit_layer=2))
    plain = hidden_states(loaded, batch)
    # Layers 0 and 1 still read the image: their outputs equal the plain run's.
    torch.testing.assert_close(exit_2[2][text], plain[2][text])
    # Another image changes the text at layers < 2 as usual ...
    assert not torch.allclose(exit_2_other[2][text], exit_2[2][text])


def test_late_injection_hides_visual_tokens_before_and_restarts_them_from_the_projector(loaded):
    batch = llava_batch(ROWS, [1, 1])
    visual = batch["input_ids"] == 95
    text = text_after_image(batch)
    injected = hidden_states(loaded, batch, Intervention(inject_layer=2))
    blind = hidden_states(loaded, batch, Intervention(exit_layer=0))
    # Before layer 2 the text is as if there were no image; from layer 2 on it reads the image.
    torch.testing.assert_close(injected[2][text], blind[2][text], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(injected[3][text], blind[3][text], atol=1e-4)

    # Whatever layers 0-1 do to the visual tokens is discarded: they re-enter as the raw projector output.
    def scramble_visual(module, args, output):
        output = output.clone()
        output[visual] = torch.randn_like(output[visual]) * 10
        return output

    handle = loaded.adapter.llm_layers[1].register_forward_hook(scramble_visual)
    try:
        scrambled = hidden_states(loaded, batch, Intervention(inject_layer=2))
    finally:
        handle.remove()
    torch.testing.assert_close(scrambled[-1][text], injected[-1][text], atol=1e-5, rtol=1e-4)


def test_skipping_both_sublayers_leaves_visual_tokens_unchanged_there(loaded):
    batch = llava_batch(ROWS, [1, 1])
    visual = batch["input_ids"] == 95
    skipped = hidden_states(loaded, batch, Intervention(skip_attention=frozenset({1}), skip_mlp=frozenset({1})))
    torch.testing.assert_close(skipped[2][visual], skipped[1][visual])
    plain = hidden_states(loaded, batch)
    assert not torch.allclose(plain[2][visual], plain[1][visual])
    # text tokens are still updated by layer 1
    text = text_after_image(batch)
    assert not torch.allclose(skipped[2][text], skipped[1][text])


def test_cutting_visual_to_visual_attention_isolates_each_visual_token_from_the_others(loaded):
    batch = llava_batch(ROWS, [1, 1])
    visual = batch["input_ids"] == 95
    every_layer = frozenset(range(4))
    cut = Intervention(block_visual_to_visual=every_layer)
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


def test_interventions_hold_while_generating_with_a_kv_cache(loaded):
    batch = llava_batch(ROWS, [1, 1])
    visual = batch["input_ids"] == 95

    def generate(inputs):
        with intervene(loaded, inputs, Intervention(removed=visual)):
            return loaded.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)

    assert torch.equal(generate(batch), generate(other_pixels(batch)))


def test_layers_outside_the_model_are_refused(loaded):
    batch = llava_batch(ROWS, [1, 1])
    with pytest.raises(InputError, match="out of range"):
        with intervene(loaded, batch, Intervention(skip_mlp=frozenset({9}))):
            pass
