"""On-policy sampling on a tiny random Llama with a character tokenizer: G samples per prompt, the cap,
finished flags, pure temperature sampling, and the shrinking budget."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from efficient_models.onpolicy_sft.sampling import BudgetSchedule, cut_at_stop, encode_prompt, sample_responses

CHARACTERS = [chr(code) for code in range(32, 127)] + ["\n"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus <pad>=0, <eos>=1 and <unk>=2; no chat template."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{char: 3 + i for i, char in enumerate(CHARACTERS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(CHARACTERS) + 3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def test_budget_schedule_is_linear_and_clamped():
    schedule = BudgetSchedule(start=400, end=100, steps=4)
    assert [schedule.at(step) for step in range(6)] == [400, 300, 200, 100, 100, 100]
    assert BudgetSchedule(start=64).at(10) == 64
    with pytest.raises(ValueError):
        BudgetSchedule(start=0)


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 1, 0, 0], {1}) == ((5, 6, 1), True)
    assert cut_at_stop([5, 6, 7], {1}) == ((5, 6, 7), False)
    assert cut_at_stop([9, 2, 1], {2, 1}) == ((9, 2), True)


def test_samples_per_prompt_cap_and_finished_flags():
    tokenizer, model = char_tokenizer(), tiny_lm()
    prompts = [encode_prompt(tokenizer, text) for text in ["2+2=", "a longer prompt: 7*3="]]
    torch.manual_seed(0)
    samples = sample_responses(model, tokenizer, prompts, samples_per_prompt=3, max_new_tokens=12, prompts_per_batch=1)
    assert [sample.prompt_index for sample in samples] == [0, 0, 0, 1, 1, 1]
    for sample in samples:
        assert 1 <= sample.num_tokens <= 12
        assert sample.finished == (sample.response_ids[-1] == tokenizer.eos_token_id)
        assert sample.finished or sample.num_tokens == 12  # an unfinished response used the whole cap
        assert tokenizer.eos_token_id not in sample.response_ids[:-1]
        assert sample.text == tokenizer.decode(sample.response_ids, skip_special_tokens=True)
    assert model.training is False


def test_sampling_is_seeded():
    tokenizer, model = char_tokenizer(), tiny_lm()
    prompts = [encode_prompt(tokenizer, "x"), encode_prompt(tokenizer, "yyyy")]
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append([s.response_ids for s in sample_responses(model, tokenizer, prompts, 2, max_new_tokens=8)])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_sampling_is_pure_temperature_one_without_top_k():
    """With all logits equal, T=1 sampling draws from the whole vocabulary; top-k 50 would draw from 50 tokens."""
    tokenizer, model = char_tokenizer(), tiny_lm()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    torch.manual_seed(0)
    samples = sample_responses(model, tokenizer, [encode_prompt(tokenizer, "q")], 16, max_new_tokens=40)
    distinct = {token for sample in samples for token in sample.response_ids}
    assert len(distinct) > 70  # of 99 tokens, from ~300 uniform draws (top-k 50 would cap this at 50)
    finished = [sample.finished for sample in samples]
    assert any(finished) and not all(finished)  # eos is one of 99 tokens: some stop within 40, some do not


def test_model_in_training_mode_is_restored():
    tokenizer, model = char_tokenizer(), tiny_lm()
    model.train()
    sample_responses(model, tokenizer, [encode_prompt(tokenizer, "q")], 1, max_new_tokens=2)
    assert model.training


def test_bad_sampling_settings_are_refused():
    tokenizer, model = char_tokenizer(), tiny_lm()
    with pytest.raises(ValueError, match="temperature"):
        sample_responses(model, tokenizer, [[5]], 1, max_new_tokens=4, temperature=0)
