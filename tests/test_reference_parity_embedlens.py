"""EmbedLens token groups, random controls and vocabulary rows as the reference (a LLaVA-1.5 fork) has them.

The reference takes each visual token's top-3 nearest vocabulary ids and hard-coded anchor ids per role
(ViT sink, LLM sink, dead). A token is in every group whose anchor is among its top-3, so groups overlap;
"remove dead" removes every token carrying the dead id, "remove sink" every token carrying either sink id;
the matched random control draws from the alive complement. Each test pins one of these on a hand-built
case, next to our exclusive categories where they differ.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from analyses.interventions import control_name, control_pool
from analyses.tokens import Anchor, TokenRule, summarise
from analyses.vqa_conditions import TokenCategories, removal_mask
from tests.tiny_models import VOCAB, image_tokens_llava, llava_batch, tiny_llava
from workbench.inspection import vocabulary_neighbours
from workbench.models.loading import LoadedModel

VIT_SINK, LLM_SINKS, DEAD = 10, (20, 21), 30  # two LLM-sink ids, as `--sink-llm 20,21` gives them
NAN = float("nan")
RULE = TokenRule("embedlens", 3, [Anchor(VIT_SINK, "v", "sink_vit", NAN, NAN, NAN),
                                  *(Anchor(i, "l", "sink_llm", NAN, NAN, NAN) for i in LLM_SINKS),
                                  Anchor(DEAD, "d", "dead", NAN, NAN, NAN)])
TOPK = [[10, 30, 1],  # the ViT-sink id and the dead id
        [20, 2, 3],  # the first LLM-sink id
        [4, 10, 21],  # the ViT-sink id and the second LLM-sink id
        [5, 6, 30],  # the dead id, third
        [1, 2, 3],  # no anchor
        [1, 2, 3, 30]]  # the dead id, but fourth: outside the top-3


def categories_of(topk_by_image: dict[str, list[list[int]]], groups: str = "reference") -> TokenCategories:
    return TokenCategories({image_id: RULE.decide(pd.DataFrame({"topk_ids": topk}))
                            for image_id, topk in topk_by_image.items()}, groups)


def test_embedlens_groups_overlap_a_token_is_in_every_group_whose_anchor_is_in_its_top3():
    groups = RULE.groups(pd.DataFrame({"topk_ids": TOPK}))
    assert groups["in_sink_vit"].tolist() == [True, False, True, False, False, False]
    assert groups["in_sink_llm"].tolist() == [False, True, True, False, False, False]
    assert groups["in_sink"].tolist() == [True, True, True, False, False, False]
    assert groups["in_dead"].tolist() == [True, False, False, True, False, False]
    assert groups["in_alive"].tolist() == [False, False, False, False, True, True]
    # Our exclusive label puts the first token in one category only (ViT sink before dead).
    assert RULE.classify(pd.DataFrame({"topk_ids": TOPK}))["category"].tolist() == [
        "sink", "sink", "sink", "dead", "alive", "alive"]


def test_embedlens_group_fractions_count_a_token_in_each_of_its_groups():
    evidence = pd.DataFrame({"image_id": "a", "topk_ids": TOPK})
    summary = summarise(pd.concat([evidence, RULE.decide(evidence)], axis=1), RULE)
    assert summary["group_fractions"] == pytest.approx(
        {"sink": 3 / 6, "sink_vit": 2 / 6, "sink_llm": 2 / 6, "dead": 2 / 6, "alive": 2 / 6})
    assert sum(summary["group_fractions"][c] for c in ("sink", "dead", "alive")) > 1
    assert summary["fractions"] == pytest.approx({"sink": 3 / 6, "dead": 1 / 6, "alive": 2 / 6})


@pytest.fixture(scope="module")
def llava():
    return LoadedModel.from_model(tiny_llava())


def removed_per_image(loaded, categories, removed, random_from=None) -> dict[str, list[bool]]:
    """What `removal` takes out of a batch of images "a" and "b" (4 visual tokens each), per image."""
    batch = llava_batch([[1, *image_tokens_llava(), 7], [1, *image_tokens_llava(), 8]], [1, 1])
    mask = removal_mask(loaded, categories, removed, random_from, batch, ["a", "b"])
    return {image_id: mask[layout.sample, layout.positions].tolist()
            for image_id, layout in zip("ab", loaded.adapter.image_layouts(batch))}


def test_embedlens_remove_sink_removes_tokens_of_either_sink_id(llava):
    categories = categories_of({"a": [[10, 1, 2], [20, 1, 2], [1, 2, 3], [21, 4, 5]],
                                "b": [[1, 2, 3], [4, 5, 6], [30, 1, 2], [1, 21, 10]]})
    assert removed_per_image(llava, categories, ("sink",)) == {"a": [True, True, False, True],
                                                               "b": [False, False, False, True]}


def test_embedlens_remove_dead_removes_every_token_carrying_the_dead_id(llava):
    topk = {"a": [[10, 30, 1], [30, 1, 2], [1, 2, 3], [20, 4, 30]], "b": [[1, 2, 3]] * 4}
    assert removed_per_image(llava, categories_of(topk), ("dead",)) == {"a": [True, True, False, True],
                                                                        "b": [False] * 4}
    # Our exclusive categories, still available, leave the dead tokens that are also sinks in.
    assert removed_per_image(llava, categories_of(topk, "exclusive"), ("dead",)) == {"a": [False, True, False, False],
                                                                                     "b": [False] * 4}


def sixteen_tokens(num_sink: int, num_dead: int) -> list[list[int]]:
    """One image: `num_sink` tokens near the ViT-sink id, `num_dead` near the dead id, the rest alive."""
    return [[VIT_SINK, 1, 2]] * num_sink + [[DEAD, 1, 2]] * num_dead + [[1, 2, 3]] * (16 - num_sink - num_dead)


def test_embedlens_random_control_draws_from_the_alive_complement():
    categories = categories_of({f"image{i}": sixteen_tokens(2, 4) for i in range(30)})
    for image_id in categories.by_image:
        alive = categories.members(image_id, "alive")
        for category, size in (("sink", 2), ("dead", 4)):
            drawn = categories.removed(image_id, (category,), random_from="alive")
            assert drawn.sum() == size and not (drawn & ~alive).any()


def test_embedlens_random_control_takes_the_whole_alive_pool_and_random_others_when_it_is_short():
    categories = categories_of({"a": sixteen_tokens(0, 13)})
    alive = categories.members("a", "alive")
    drawn = categories.removed("a", ("dead",), random_from="alive")
    assert drawn.sum() == 13 and (drawn & alive).sum() == 3
    assert categories.control_shortfall(("dead",), "alive") == {"images": 1, "tokens": 10}


def test_embedlens_random_control_of_remove_alive_draws_from_all_visual_tokens():
    # From the alive tokens, as many as the alive tokens would be the condition itself.
    assert control_pool("alive", "alive") == "all" and control_pool("sink", "alive") == "alive"
    assert control_name("dead", "alive") == "remove random (from alive), as many as dead"
    categories = categories_of({f"image{i}": sixteen_tokens(2, 4) for i in range(10)})
    drawn = [categories.removed(image_id, ("alive",), random_from="all") for image_id in categories.by_image]
    assert all(mask.sum() == 10 for mask in drawn)
    assert any((mask & ~categories.members(image_id, "alive")).any()
               for mask, image_id in zip(drawn, categories.by_image))


BASE_WORDS = 90  # text tokens 0-89; the conversion added <image> 90 and <pad> 91, then rows 92-95 of padding


def llava_hf_like() -> LoadedModel:
    """A tiny LLaVA whose embedding matrix (96 rows) runs past its tokenizer's base vocabulary the way the
    llava-hf conversion left it: added tokens and padding rows, all near the mean embedding."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(BASE_WORDS)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0")
    tokenizer.add_tokens(["<image>", "<pad>"], special_tokens=True)
    model = tiny_llava(image_token_id=BASE_WORDS)
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        mean = embeddings[:BASE_WORDS].mean(0)
        noise = torch.randn(VOCAB - BASE_WORDS, embeddings.shape[1]) * mean.norm() / embeddings.shape[1] ** 0.5
        embeddings[BASE_WORDS:] = mean + 0.1 * noise
    return LoadedModel.from_model(model, processor=type("Processor", (), {"tokenizer": tokenizer})())


def test_embedlens_llava_hf_padding_rows_are_never_neighbours():
    loaded = llava_hf_like()
    assert (loaded.processor.tokenizer.vocab_size, len(loaded.processor.tokenizer)) == (BASE_WORDS, BASE_WORDS + 2)
    assert loaded.adapter.non_text_vocabulary_rows(loaded.processor.tokenizer).rows == range(BASE_WORDS, VOCAB)
    embeddings = loaded.adapter.embed_tokens.weight.detach()
    # Visual vectors equal to a padding row (no token maps to it), the added <pad> row, and the mean embedding.
    planted = torch.stack([embeddings[94], embeddings[BASE_WORDS + 1], embeddings[:BASE_WORDS].mean(0)])
    _, ids = vocabulary_neighbours(loaded, planted, 3)
    assert (ids < BASE_WORDS).all(), ids
