"""Parity of the nnsight tracing layer with a plain forward pass, on both model families."""

import pytest
import torch

from tests.tiny_models import image_tokens_llava, llava_batch, qwen_batch
from workbench.tracing import CaptureSpec, capture

LLAVA_ROWS = [[1, 2, *image_tokens_llava(), 5, 6, 7], [1, *image_tokens_llava(), 9, *image_tokens_llava(), 8]]


@pytest.fixture(params=["llava", "qwen"])
def model_and_batch(request, llava, qwen):
    if request.param == "llava":
        return llava, llava_batch(LLAVA_ROWS, images_per_row=[1, 2])
    return qwen, qwen_batch([[3, 4, 5], [6]], grids=[(4, 4), (4, 6)])


def plain_forward(loaded, batch):
    with torch.no_grad():
        return loaded.model(**batch, output_hidden_states=True)


def test_hidden_states_equal_output_hidden_states(model_and_batch):
    loaded, batch = model_and_batch
    reference = plain_forward(loaded, batch)
    traced = capture(loaded, batch, CaptureSpec(embeddings=True, llm_layers="all", logits=True))
    last = loaded.adapter.num_llm_layers - 1
    torch.testing.assert_close(traced.embeddings, reference.hidden_states[0])
    for layer in range(last):
        torch.testing.assert_close(traced.hidden[layer], reference.hidden_states[layer + 1])
    # HF applies the final norm to its last hidden state; the capture keeps the raw residual.
    with torch.no_grad():
        torch.testing.assert_close(loaded.adapter.final_norm(traced.hidden[last]), reference.hidden_states[-1])
    torch.testing.assert_close(traced.logits, reference.logits)


def test_visual_only_capture_matches_masked_full_capture(model_and_batch):
    loaded, batch = model_and_batch
    full = capture(loaded, batch, CaptureSpec(llm_layers=[0, 1]))
    visual = capture(loaded, batch, CaptureSpec(llm_layers=[0, 1], tokens="visual"))
    for layer in (0, 1):
        assert visual.hidden[layer].shape == (int(full.visual_mask.sum()), full.hidden[layer].shape[-1])
        torch.testing.assert_close(visual.hidden[layer], full.hidden[layer][full.visual_mask])
        torch.testing.assert_close(visual.visual(layer), full.visual(layer))


def test_projector_output_is_what_the_llm_receives_at_visual_positions(model_and_batch):
    loaded, batch = model_and_batch
    traced = capture(loaded, batch, CaptureSpec(projector=True, embeddings=True))
    assert traced.projector.shape[0] == int(traced.visual_mask.sum())
    torch.testing.assert_close(traced.projector, traced.visual("embeddings"))


def test_only_requested_sites_are_kept(model_and_batch):
    loaded, batch = model_and_batch
    traced = capture(loaded, batch, CaptureSpec(vision_layers=[0], llm_layers=[1]))
    assert list(traced.vision) == [0] and list(traced.hidden) == [1]
    assert traced.projector is None and traced.logits is None and traced.embeddings is None
    assert not traced.attentions
    assert traced.hidden[1].device.type == "cpu"


def test_attention_probabilities_are_eager_and_restored(model_and_batch):
    loaded, batch = model_and_batch
    before = loaded.adapter.language_model.config._attn_implementation
    traced = capture(loaded, batch, CaptureSpec(attention_layers=[1], llm_layers=[1]))
    assert loaded.adapter.language_model.config._attn_implementation == before == "sdpa"
    probs = traced.attentions[1]
    batch_size, seq = batch["input_ids"].shape
    assert probs.shape[0] == batch_size and probs.shape[-2:] == (seq, seq)
    real_queries = traced.attention_mask.bool()
    row_sums = probs.sum(-1).permute(0, 2, 1)[real_queries]  # [real tokens, heads]
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums))
    future_keys = probs.triu(diagonal=1).permute(0, 2, 1, 3)[real_queries]
    assert torch.all(future_keys == 0), "real queries must not attend to later tokens"
    # Eager attention computes the same hidden states as SDPA (padding rows are undefined in both).
    sdpa = capture(loaded, batch, CaptureSpec(llm_layers=[1]))
    torch.testing.assert_close(traced.hidden[1][real_queries], sdpa.hidden[1][real_queries], atol=1e-5, rtol=1e-4)


def test_layouts_and_grids(llava, qwen):
    llava_capture = capture(llava, llava_batch(LLAVA_ROWS, [1, 2]), CaptureSpec(projector=True))
    assert llava_capture.grids == [(2, 2)] * 3
    assert [layout.sample for layout in llava_capture.layouts] == [0, 1, 1]
    # The second image of row 1 sits after one text token that follows the first image.
    assert llava_capture.layouts[2].positions.tolist() == [6, 7, 8, 9]
    assert llava_capture.per_image(llava_capture.projector, 2).shape == (2, 2, 32)
    torch.testing.assert_close(llava_capture.per_image(llava_capture.projector, 1).reshape(4, -1),
                               llava_capture.projector[4:8])

    qwen_capture = capture(qwen, qwen_batch([[3], [4, 5]], [(4, 4), (4, 6)]), CaptureSpec())
    assert qwen_capture.grids == [(2, 2), (2, 3)]


def test_vision_layers_are_the_towers_blocks(llava):
    batch = llava_batch(LLAVA_ROWS, [1, 2])
    traced = capture(llava, batch, CaptureSpec(vision_layers="all"))
    with torch.no_grad():
        tower = llava.adapter.vision_tower(batch["pixel_values"], output_hidden_states=True)
    for layer, states in traced.vision.items():
        torch.testing.assert_close(states, tower.hidden_states[layer + 1])


def test_out_of_range_layers_are_refused(llava):
    batch = llava_batch(LLAVA_ROWS, [1, 2])
    with pytest.raises(ValueError, match="out of range"):
        capture(llava, batch, CaptureSpec(llm_layers=[99]))
    negative = capture(llava, batch, CaptureSpec(llm_layers=[-1]))
    assert list(negative.hidden) == [llava.adapter.num_llm_layers - 1]
