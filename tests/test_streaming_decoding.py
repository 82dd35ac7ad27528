"""Streaming decoding with two KV caches equals one full forward with the training mask and group positions."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from efficient_models.streaming import ablation
from efficient_models.streaming.batch import IGNORE, collate, interleaved_example, streaming_example
from efficient_models.streaming.decoding import StreamingPolicy, stream_translate
from efficient_models.streaming.groups import SourceGroup, WordBoundaries, target_words
from efficient_models.streaming.mask import visible_units
from efficient_models.streaming.streams import LAYOUTS
from efficient_models.streaming.two_caches import ComputeCount, KVStore, forward_new_tokens

VOCAB = 64
END = 63
PREFIX = [6, 7]
SOURCE = SourceGroup.build(prompt=[1, 2, 3], words=[[10, 11], [12], [13, 14, 15], [16], [17], [18, 19]], end=[4, 5])


def tiny_model(attention: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64)
    config._attn_implementation = attention
    model = LlamaForCausalLM(config).eval()
    model.generation_config.do_sample = True  # decoding must stay greedy whatever the checkpoint asks
    return model


def boundaries() -> WordBoundaries:
    space_led = torch.zeros(VOCAB, dtype=torch.bool)
    space_led[20:50:2] = True
    punctuation = torch.zeros(VOCAB, dtype=torch.bool)
    punctuation[50:55] = True
    return WordBoundaries(space_led, punctuation)


@pytest.mark.parametrize(("wait_k", "offset", "attention"), [(1, 0, "sdpa"), (2, 0, "eager"), (3, 5, "sdpa")])
def test_two_cache_decoding_equals_the_training_forward(wait_k, offset, attention):
    model = tiny_model(attention)
    policy = StreamingPolicy(wait_k=wait_k, target_offset=offset, max_lag_words=3)
    result = stream_translate(model, SOURCE, PREFIX, END, boundaries(), policy)
    fed = len(result.target) - 1  # every target token but the last was fed to the model
    assert len(result.logits) == len(result.visible) == fed
    assert fed > 5 and result.units_read == SOURCE.num_units

    # Greedy: each token is the argmax of the logits of the token before it, among the tokens that start a
    # word where it starts one (a word decided to end before a READ starts a new one after it).
    for index in range(len(PREFIX), len(result.target)):
        previous, token, logits = result.target[index - 1], result.target[index], result.logits[index - 1]
        if index > len(PREFIX) and (token == END or boundaries().starts_word(previous, token)):
            word_starts = boundaries().word_starts_after(previous)
            word_starts[END] = True
            logits = logits.masked_fill(~word_starts, float("-inf"))
        assert token == int(logits.argmax())

    # Decoding saw exactly the mask training builds from the target's words under wait-k.
    ended = result.target[-1] == END
    content = result.target[len(PREFIX):len(result.target) - ended]
    words = target_words(PREFIX, content, [END] if ended else [], boundaries())
    assert result.visible == visible_units(words, wait_k, SOURCE.num_units, ends=ended)[:-1]

    # And the logits of one forward over [source; target] with that mask and group positions are the same.
    example = streaming_example(SOURCE, result.target, words, wait_k, target_offset=offset)
    logits = model(**collate([example], model.dtype, pad_id=0)).logits[0]
    start = len(SOURCE.ids)
    torch.testing.assert_close(logits[start:start + fed], torch.stack(result.logits), atol=1e-5, rtol=1e-5)


class NeverEnds(torch.nn.Module):
    """The model, with the end token's logit at -inf: it writes until a limit stops it."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.device, self.dtype = model.device, model.dtype

    def forward(self, **inputs):
        output = self.model(**inputs)
        output.logits[..., END] = float("-inf")
        return output


def test_delays_follow_wait_k_and_decoding_halts_past_the_source():
    model = NeverEnds(tiny_model("sdpa"))
    result = stream_translate(model, SOURCE, PREFIX, END, boundaries(), StreamingPolicy(wait_k=2, max_lag_words=3))
    words = SOURCE.num_words
    assert result.delays == [min(2 + j, words) for j in range(len(result.delays))]
    assert len(result.delays) == words + 3 + 1  # the model never ends; it is stopped one word past the lag


def test_a_write_ends_after_its_token_limit():
    model = NeverEnds(tiny_model("sdpa"))
    no_boundaries = WordBoundaries(torch.zeros(VOCAB, dtype=torch.bool), torch.zeros(VOCAB, dtype=torch.bool))
    result = stream_translate(model, SOURCE, PREFIX, END, no_boundaries,
                              StreamingPolicy(wait_k=1, max_tokens_per_write=3, max_lag_words=0))
    generated = len(result.target) - len(PREFIX)
    assert len(result.delays) == SOURCE.num_words + 1
    assert generated == 3 * SOURCE.num_words + 1


def test_interleaved_decoding_equals_one_causal_forward_in_arrival_order():
    model = tiny_model("sdpa")
    result = stream_translate(model, SOURCE, PREFIX, END, boundaries(), StreamingPolicy(wait_k=2, max_lag_words=2),
                              layout="interleaved")
    tokens = [token for token, _ in result.arrival_order]
    target_rows = [index for index, (_, is_target) in enumerate(result.arrival_order) if is_target]
    # Source words arrive between target words: the layout really interleaves.
    assert any(not is_target for _, is_target in result.arrival_order[target_rows[0]:])
    assert [tokens[row] for row in target_rows] == result.target[:-1]
    logits = model(input_ids=torch.tensor([tokens])).logits[0]  # positions 0.., plain causal mask
    torch.testing.assert_close(logits[target_rows], torch.stack(result.logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wait_k", [1, 3])
def test_the_interleaved_training_example_is_what_interleaved_decoding_feeds_and_predicts(wait_k):
    model = tiny_model("sdpa")
    result = stream_translate(model, SOURCE, PREFIX, END, boundaries(),
                              StreamingPolicy(wait_k=wait_k, max_lag_words=2), layout="interleaved")
    ended = result.target[-1] == END
    content = result.target[len(PREFIX):len(result.target) - ended]
    words = target_words(PREFIX, content, [END] if ended else [], boundaries())
    example = interleaved_example(SOURCE, result.target, words, wait_k, ends=ended)
    # The same tokens in the same order (the last target token is never fed), contiguous positions.
    assert example.input_ids[:-1] == [token for token, _ in result.arrival_order]
    assert example.position_ids == list(range(len(example.input_ids)))
    target_rows = [index for index, (_, is_target) in enumerate(result.arrival_order) if is_target]
    # Each label sits right after the row that predicts it, even where a source token comes next.
    labelled = [row for row, label in enumerate(example.labels) if label != IGNORE]
    assert labelled[1:] == [row + 1 for row in target_rows]
    assert [example.labels[row] for row in labelled] == result.target
    assert any(example.input_ids[row] != result.target[index + 1]
               for index, row in enumerate(labelled[1:]))  # some label is not the token at its own row
    logits = model(**collate([example], model.dtype, pad_id=0)).logits[0]
    torch.testing.assert_close(logits[target_rows], torch.stack(result.logits), atol=1e-5, rtol=1e-5)


def test_reencoding_offline_is_plain_greedy_decoding_of_the_batch_layout():
    model = tiny_model("sdpa")
    offline = StreamingPolicy(wait_k=10**9, max_lag_words=2)
    result = stream_translate(model, SOURCE, PREFIX, END, boundaries(), offline, layout="reencode")
    generated = result.target[len(PREFIX):]
    tokens = [*SOURCE.ids, *PREFIX]
    for _ in generated:
        tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    assert tokens[len(SOURCE.ids) + len(PREFIX):] == generated


def test_reencoding_keeps_the_unchanged_prefix_and_equals_encoding_afresh():
    model = tiny_model("sdpa")
    result = stream_translate(model, SOURCE, PREFIX, END, boundaries(), StreamingPolicy(wait_k=1, max_lag_words=2),
                              layout="reencode")
    last = SOURCE.num_units - 1
    assert len(set(result.visible)) > 2  # several READs between WRITEs
    for index, (logits, units) in enumerate(zip(result.logits, result.visible, strict=True)):
        batch_source = [token for token, unit in zip(SOURCE.ids, SOURCE.units, strict=True)
                        if unit < min(units, last) or unit == last]
        tokens = [*batch_source, *result.target[:index + 1]]
        torch.testing.assert_close(logits, model(input_ids=torch.tensor([tokens])).logits[0, -1],
                                   atol=1e-5, rtol=1e-5)


def test_reencoding_recomputes_the_target_and_group_positions_do_not():
    model = tiny_model("sdpa")
    policy = StreamingPolicy(wait_k=1, max_lag_words=2)
    group = stream_translate(model, SOURCE, PREFIX, END, boundaries(), policy)
    reencoded = stream_translate(model, SOURCE, PREFIX, END, boundaries(), policy, layout="reencode")
    # Group positions run each source token once and each target token at most twice (a take-back per word).
    assert group.compute.tokens <= len(SOURCE.ids) + 2 * len(group.target)
    assert reencoded.compute.tokens > 2 * group.compute.tokens


def _same_decode(first, second):
    assert first.target == second.target
    torch.testing.assert_close(torch.stack(first.logits), torch.stack(second.logits), atol=1e-5, rtol=1e-5)


def test_the_ablation_without_fixes_is_interleaved_and_with_input_and_positions_fixed_is_group():
    model = tiny_model("sdpa")
    policy = StreamingPolicy(wait_k=2, target_offset=3, max_lag_words=2)

    def decode(layout):
        return stream_translate(model, SOURCE, PREFIX, END, boundaries(), policy, layout=layout)

    _same_decode(decode("fix-none"), decode("interleaved"))
    both = ablation.ReplayStream(model, SOURCE, 3, ablation.Fixes(input_attention=True, positions=True))
    layouts = {**LAYOUTS, "input+positions": lambda *args: both}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("efficient_models.streaming.decoding.LAYOUTS", layouts)
        _same_decode(decode("input+positions"), decode("group"))


def test_fixing_output_attention_lets_earlier_target_tokens_see_later_source():
    allowed, positions = ablation.arrival_mask_and_positions([False, True, False, True], ablation.Fixes(
        output_attention=True))
    assert allowed.int().tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert positions == [0, 1, 2, 3]
    allowed, positions = ablation.arrival_mask_and_positions([False, True, False, True], ablation.Fixes(
        input_attention=True, positions=True), target_offset=5)
    assert allowed.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]]
    assert positions == [0, 5, 1, 6]


@pytest.mark.parametrize("layout", ["fix-none", "fix-input", "fix-output", "fix-positions"])
def test_the_ablation_cache_gives_what_a_replay_from_scratch_gives(layout):
    model = tiny_model("sdpa")
    fixes = {"fix-none": ablation.Fixes(), "fix-input": ablation.Fixes(input_attention=True),
             "fix-output": ablation.Fixes(output_attention=True), "fix-positions": ablation.Fixes(positions=True)}
    result = stream_translate(model, SOURCE, PREFIX, END, boundaries(),
                              StreamingPolicy(wait_k=1, target_offset=3, max_lag_words=2), layout=layout)
    target_rows = [row for row, (_, is_target) in enumerate(result.arrival_order) if is_target]
    assert any(not is_target for _, is_target in result.arrival_order[target_rows[0]:])  # READs between WRITEs
    expected = []
    for row in target_rows:  # when a target token was fed, the stream held exactly the tokens before it
        seen = result.arrival_order[:row + 1]
        allowed, positions = ablation.arrival_mask_and_positions([kind for _, kind in seen], fixes[layout], 3)
        logits, _ = forward_new_tokens(model, [token for token, _ in seen], positions, [],
                                       torch.ones(len(seen), 0, dtype=torch.bool), among_new=allowed)
        expected.append(logits[-1])
    torch.testing.assert_close(torch.stack(result.logits), torch.stack(expected), atol=1e-5, rtol=1e-5)
    uncached = len(result.arrival_order) * len(target_rows)
    assert result.compute.tokens < uncached / 2  # cached, where a replay from scratch runs everything each WRITE


def test_a_forward_counts_its_tokens_and_the_pairs_its_mask_allows():
    model, count = tiny_model("sdpa"), ComputeCount()
    context = KVStore()
    _, fresh = forward_new_tokens(model, [1, 2], [0, 1], [context], torch.ones(2, 0, dtype=torch.bool), count=count)
    context.append(fresh)
    sees = torch.tensor([[True, False], [True, True], [False, True]])
    forward_new_tokens(model, [3, 4, 5], [2, 3, 4], [context], sees, count=count)
    # 2 tokens, causal: 3 pairs; then 3 tokens: 4 context pairs + 6 causal pairs among them.
    assert (count.tokens, count.attended_pairs) == (5, 3 + 4 + 6)
