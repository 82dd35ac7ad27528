"""ViCA's decoder on tiny LLaVA and Qwen2-VL models: the fast form equals the masks form, cached generation equals
uncached, a padded batch (rows with different numbers of images, at different places) equals one row at a time,
and the exact sense in which ViCA reduces to the dense model."""

from __future__ import annotations

import pytest
import torch

from efficient_models.vica.engine import ViCALLM
from tests.test_mrope_schedules import single_rows as qwen_single_rows
from tests.tiny_models import image_tokens_llava, llava_batch, qwen_batch, tiny_llava, tiny_qwen2_vl
from workbench.errors import InputError
from workbench.models.adapter import adapter_for

LAYERS = 6
CROSS = [1, 3, 4]
IMAGE = image_tokens_llava()
# Row 0: one image after a two-token prefix; row 1: two images with text between them; row 2: no image at all.
# Different lengths, so rows 0 and 2 are left-padded.
ROWS = [[1, 5] + IMAGE + [7, 8, 9], [1] + IMAGE + [7, 9] + IMAGE + [10, 11, 12, 13], [1, 5, 6, 7]]
IMAGES = [1, 2, 0]
MODES = [dict(freeze_prefix=True), dict(freeze_prefix=False), dict(freeze_prefix=True, keep=0.5),
         dict(freeze_prefix=False, keep=0.25)]
MODE_IDS = ["frozen-prefix", "attending-prefix", "frozen-keep-half", "attending-keep-quarter"]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(num_layers=LAYERS)


@pytest.fixture(scope="module")
def batch():
    return llava_batch(ROWS, IMAGES)


def single_rows(batch):
    """Each row of the left-padded batch on its own, without its padding, with its own images' pixels."""
    first = 0
    for row, images in enumerate(IMAGES):
        start = int((batch["attention_mask"][row] == 0).sum())
        single = {"input_ids": batch["input_ids"][row:row + 1, start:],
                  "attention_mask": batch["attention_mask"][row:row + 1, start:]}
        yield single | ({"pixel_values": batch["pixel_values"][first:first + images]} if images else {})
        first += images


def run(engine: ViCALLM, batch, **options):
    adapter = engine.adapter
    with torch.no_grad():
        return engine.forward(adapter.input_embeddings(batch), batch["input_ids"], batch["attention_mask"],
                              positions=adapter.position_ids(batch), **options)


def text_logits(engine: ViCALLM, batch, **options) -> torch.Tensor:
    output = run(engine, batch, **options)
    return engine.adapter.lm_head(output.hidden[output.present & batch["attention_mask"].bool()])


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_fast_form_equals_masks_form(model, batch, mode):
    adapter = adapter_for(model)
    fast, masks = ViCALLM(adapter, CROSS, **mode), ViCALLM(adapter, CROSS, form="masks", **mode)
    torch.testing.assert_close(text_logits(fast, batch), text_logits(masks, batch), atol=1e-5, rtol=1e-4)
    assert torch.equal(fast.generate(batch, 6), masks.generate(batch, 6))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("form", ["fast", "masks"])
def test_cached_generation_equals_uncached(model, batch, mode, form):
    engine = ViCALLM(adapter_for(model), CROSS, form=form, **mode)
    assert torch.equal(engine.generate(batch, 6), engine.generate(batch, 6, use_cache=False))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_padded_batch_equals_one_by_one(model, batch, mode):
    engine = ViCALLM(adapter_for(model), CROSS, **mode)
    together, logits = engine.generate(batch, 6), text_logits(engine, batch)
    alone_logits = []
    for row, single in enumerate(single_rows(batch)):
        alone = engine.generate(single, 6)
        assert torch.equal(together[row, :alone.shape[1]], alone[0])
        alone_logits.append(text_logits(engine, single))
    torch.testing.assert_close(logits, torch.cat(alone_logits), atol=1e-5, rtol=1e-4)


def test_the_cache_holds_visual_keys_only_at_the_selected_layers(model, batch):
    engine = ViCALLM(adapter_for(model), CROSS)
    output = run(engine, batch, use_cache=True)
    text_width = int((~engine.adapter.visual_token_mask(batch["input_ids"])).sum(1).max())
    lengths = [layer.keys.shape[2] for layer in output.cache.kv.layers]
    assert lengths == [text_width + 8 * (layer in CROSS) for layer in range(LAYERS)]  # row 1's 8 visual tokens


def test_all_layers_selected_with_the_visual_updates_restored_is_the_dense_model(model, batch):
    """Every layer selected, freeze_prefix off, the visual tokens given back their own attention and FFN: the
    masks form is the HF model, its logits at every real token (visual ones included) and its greedy answers."""
    engine = ViCALLM(adapter_for(model), range(LAYERS), freeze_prefix=False, form="masks", visual_updates=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**batch).logits
    torch.testing.assert_close(engine.adapter.lm_head(run(engine, batch).hidden)[real], expected[real],
                               atol=1e-5, rtol=1e-4)
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(engine.generate(batch, 6), generated)


def test_with_frozen_visual_tokens_the_dense_model_is_reached_in_one_layer_only(batch):
    """Frozen visual tokens are what dense gives layer 0, so a one-layer model with its layer selected and the
    prefix attending is the dense model at every text token, in both forms; in a deeper model it is not."""
    one_layer = tiny_llava(num_layers=1)
    adapter = adapter_for(one_layer)
    text = batch["attention_mask"].bool() & ~adapter.visual_token_mask(batch["input_ids"])
    with torch.no_grad():
        expected = one_layer(**batch).logits[text]
    for form in ("fast", "masks"):
        engine = ViCALLM(adapter, [0], freeze_prefix=False, form=form)
        torch.testing.assert_close(adapter.lm_head(run(engine, batch).hidden[text]), expected, atol=1e-5, rtol=1e-4)

    deeper = tiny_llava(num_layers=2)
    adapter = adapter_for(deeper)
    with torch.no_grad():
        dense = deeper(**batch).logits[text]
    vica = adapter.lm_head(run(ViCALLM(adapter, [0, 1], freeze_prefix=False), batch).hidden[text])
    assert (vica - dense).abs().max() > 1e-3


def test_text_before_the_first_selected_layer_never_sees_the_image(model, batch):
    engine = ViCALLM(adapter_for(model), CROSS)
    other = {**batch, "pixel_values": batch["pixel_values"] + 1.0}
    before, after = run(engine, batch, layer_outputs=True), run(engine, other, layer_outputs=True)
    assert torch.equal(before.layer_outputs[CROSS[0] - 1], after.layer_outputs[CROSS[0] - 1])
    assert not torch.allclose(before.layer_outputs[CROSS[0]], after.layer_outputs[CROSS[0]])


def test_a_frozen_prefix_gets_no_attention(model):
    """With freeze_prefix, a prefix token's state is its own (FFN only): changing the token before it changes
    nothing; with the prefix attending it does. Tokens after the image attend either way."""
    rows = [[1, 5, 6] + IMAGE + [7, 8], [2, 5, 6] + IMAGE + [7, 8]]  # they differ in the first token only
    batch = llava_batch(rows, [1, 1])
    batch["pixel_values"][1] = batch["pixel_values"][0]
    for freeze in (True, False):
        hidden = run(ViCALLM(adapter_for(model), CROSS, freeze_prefix=freeze), batch).hidden
        assert torch.allclose(hidden[0, 1:3], hidden[1, 1:3]) == freeze
        assert not torch.allclose(hidden[0, -2:], hidden[1, -2:])


def test_removed_visual_tokens_are_never_read_and_may_differ_per_row(model, batch):
    adapter = adapter_for(model)
    visual = adapter.visual_token_mask(batch["input_ids"])
    removed = torch.zeros_like(visual)
    removed[0, visual[0].nonzero()[:1, 0]] = True
    removed[1, visual[1].nonzero()[2:7, 0]] = True
    fast, masks = ViCALLM(adapter, CROSS), ViCALLM(adapter, CROSS, form="masks")
    torch.testing.assert_close(text_logits(fast, batch, removed=removed), text_logits(masks, batch, removed=removed),
                               atol=1e-5, rtol=1e-4)
    assert not torch.allclose(text_logits(fast, batch, removed=removed), text_logits(fast, batch))
    output = run(fast, batch, removed=removed, use_cache=True)
    assert [int(valid.sum()) for valid in output.cache.key_valid[CROSS[0]][:2]] == \
           [int((~visual[row] & batch["attention_mask"][row].bool()).sum() + (visual[row] & ~removed[row]).sum())
            for row in range(2)]
    assert torch.equal(fast.generate(batch, 5, removed=removed), masks.generate(batch, 5, removed=removed))


@pytest.mark.parametrize("mode", MODES[:3], ids=MODE_IDS[:3])
def test_qwen2_vl_multi_axis_positions(mode):
    model = tiny_qwen2_vl(num_layers=4)
    batch = qwen_batch([[3, 4, 5], [6, 7, 8, 9, 10, 11]], [(4, 8), (4, 4)])  # 8 and 4 visual tokens
    adapter = adapter_for(model)
    fast, masks = ViCALLM(adapter, [0, 2], **mode), ViCALLM(adapter, [0, 2], form="masks", **mode)
    torch.testing.assert_close(text_logits(fast, batch), text_logits(masks, batch), atol=1e-5, rtol=1e-4)
    together = fast.generate(batch, 5)
    assert torch.equal(together, fast.generate(batch, 5, use_cache=False))
    for row, single in enumerate(qwen_single_rows(batch)):
        alone = fast.generate(single, 5)
        assert torch.equal(together[row, :alone.shape[1]], alone[0])


def test_eager_attention_gives_the_same_answers(batch):
    sdpa, eager = tiny_llava(num_layers=LAYERS), tiny_llava(num_layers=LAYERS, attn_implementation="eager")
    for mode in MODES[:3]:
        assert torch.equal(ViCALLM(adapter_for(sdpa), CROSS, **mode).generate(batch, 5),
                           ViCALLM(adapter_for(eager), CROSS, **mode).generate(batch, 5))


def test_both_forms_give_the_same_gradients(model, batch):
    """The masks form trains; the fast form's gradients are the same, through the LLM and the projector."""
    adapter = adapter_for(model)
    weights = {"k": adapter.llm_layers[CROSS[0]].self_attn.k_proj.weight,
               "q": adapter.llm_layers[0].self_attn.q_proj.weight, "projector": next(adapter.projector.parameters())}

    def gradients(form: str) -> dict[str, torch.Tensor]:
        engine = ViCALLM(adapter, CROSS, form=form)
        for weight in weights.values():
            weight.grad = None
        with torch.enable_grad():
            output = engine.forward(adapter.input_embeddings(batch), batch["input_ids"], batch["attention_mask"])
            output.hidden[output.present].pow(2).sum().backward()
        return {name: weight.grad.clone() for name, weight in weights.items()}

    model.requires_grad_(True)
    try:
        fast, masks = gradients("fast"), gradients("masks")
    finally:
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    for name in weights:
        assert fast[name].abs().max() > 0
        torch.testing.assert_close(fast[name], masks[name], atol=1e-5, rtol=1e-4)


def test_bad_settings_are_refused_in_one_line(model):
    adapter = adapter_for(model)
    with pytest.raises(InputError, match="not within 0..5"):
        ViCALLM(adapter, [2, LAYERS])
    with pytest.raises(InputError, match="only form='masks'"):
        ViCALLM(adapter, CROSS, visual_updates=True)
