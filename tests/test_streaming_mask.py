"""Group position ids, word segmentation, and the training mask against a hand-computed case."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from efficient_models.streaming.batch import IGNORE, batch_example, collate, streaming_example
from efficient_models.streaming.groups import SourceGroup, WordBoundaries, target_position_ids, target_words
from efficient_models.streaming.mask import streaming_visibility, visible_units
from workbench.errors import InputError

PIECES = ["<s>", "Ġthe", "cat", ".", "Ġ.", "le", ",", "chat", "▁chien", "Ċ"]


def test_source_units_and_group_positions():
    source = SourceGroup.build(prompt=[9, 9], words=[[1], [2, 3]], end=[8])
    assert source.units == [0, 0, 1, 2, 2, 3]
    assert source.position_ids() == [0, 1, 2, 3, 4, 5]
    assert (source.num_units, source.num_words) == (4, 2)
    assert source.tokens_of_units(2) == 3
    assert target_position_ids(3) == [0, 1, 2] and target_position_ids(3, offset=4) == [4, 5, 6]
    with pytest.raises(InputError):
        SourceGroup.build(prompt=[9], words=[[1], []], end=[8])


def test_word_boundaries_from_token_strings():
    boundaries = WordBoundaries.from_pieces(PIECES)
    assert boundaries.starts_word(2, 1) and boundaries.starts_word(2, 8) and boundaries.starts_word(2, 9)
    assert not boundaries.starts_word(1, 2)  # "cat" continues "Ġthe"
    assert not boundaries.starts_word(2, 3)  # "." ends the word it follows
    assert boundaries.starts_word(3, 5)  # "le" right after "." starts a word
    assert not boundaries.starts_word(3, 6)  # "," after "." is still punctuation
    assert boundaries.starts_word(2, 4)  # "Ġ." is led by a space
    assert target_words(prefix=[0, 0], content=[1, 2, 3, 5, 7, 8], end=[0], boundaries=boundaries) == \
        [0, 0, 1, 1, 1, 2, 2, 3, 4]


# Source: prompt (2 tokens, unit 0), word 1 (1 token), word 2 (2 tokens), end (1 token): 4 units.
# Target: prefix (word 0), "a b" (word 1), "c" (word 2), end (word 3).
# k = 1: word j sees units < min(1 + max(j, 1), 4): words 0, 1 -> 2; word 2 -> 3; word 3 -> 4. Shifted by one
# token: prefix -> 2, a -> 2, b (predicts c) -> 3, c (predicts end) -> 4, end -> 4.
HAND_MASK = """
1.....|.....
11....|.....
111...|.....
1111..|.....
11111.|.....
111111|.....
111...|1....
111...|11...
11111.|111..
111111|1111.
111111|11111
"""


def _rows(text):
    return [[char == "1" for char in line.replace("|", "")] for line in text.strip().splitlines()]


def test_the_training_mask_matches_a_hand_computed_case():
    source_units = [0, 0, 1, 2, 2, 3]
    words = [0, 1, 1, 2, 3]
    visible = visible_units(words, wait_k=1, total_units=4)
    assert visible == [2, 2, 3, 4, 4]
    expected = torch.tensor(_rows(HAND_MASK))
    assert torch.equal(streaming_visibility(source_units, visible), expected)


def test_wait_k_visibility_saturates_at_the_whole_source():
    assert visible_units([0, 1, 2, 3], wait_k=3, total_units=5) == [4, 5, 5, 5]
    assert visible_units([0, 0, 1, 1, 2], wait_k=2, total_units=9, ends=False) == [3, 3, 3, 4, 4]


def test_the_end_token_is_predicted_from_the_whole_source():
    assert visible_units([0, 0, 1, 1, 2], wait_k=2, total_units=9) == [3, 3, 3, 9, 9]


def test_an_example_has_group_positions_and_labels_on_the_target_only():
    source = SourceGroup.build([9, 9], [[1], [2, 3]], [8])
    example = streaming_example(source, [5, 6, 7, 4], [0, 1, 2, 3], wait_k=2, target_offset=3)
    assert example.input_ids == [9, 9, 1, 2, 3, 8, 5, 6, 7, 4]
    assert example.position_ids == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6]
    assert example.labels == [IGNORE] * 6 + [5, 6, 7, 4]


def test_the_batch_layout_has_contiguous_positions_and_a_causal_mask():
    source = SourceGroup.build([9, 9], [[1], [2, 3]], [8])
    example = batch_example(source, [5, 6, 7, 4])
    assert example.position_ids == list(range(10))
    assert torch.equal(example.allowed, torch.ones(10, 10, dtype=torch.bool).tril())
    assert example.labels == [IGNORE] * 6 + [5, 6, 7, 4]


def test_a_padded_batch_gives_each_example_its_own_logits():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64)).eval()
    long = streaming_example(SourceGroup.build([9, 9], [[1], [2, 3], [4]], [8]), [5, 6, 7, 4], [0, 1, 2, 3], 1)
    short = streaming_example(SourceGroup.build([9], [[1]], [8]), [5, 6], [0, 1], 1)
    batch = collate([long, short], model.dtype, pad_id=0)
    assert not torch.isnan(model(**batch).logits).any()
    alone = model(**collate([short], model.dtype, pad_id=0)).logits[0]
    together = model(**batch).logits[1, :len(short.input_ids)]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(batch["labels"][1, len(short.input_ids):], torch.full((6,), IGNORE))
