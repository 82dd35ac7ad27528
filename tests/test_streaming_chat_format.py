"""A chat tokenizer's template cut into the streaming groups, and the config's one-line errors."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from efficient_models import registry
from efficient_models.streaming.chat_format import ChatFormat
from efficient_models.streaming.task import make_splits
from workbench.errors import InputError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE learnt on the task's sentences, with a ChatML template (as SmolLM2's)."""
    train, _ = make_splits(seed=0, train_size=300, test_size=10)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text for pair in train for text in (pair.source, pair.target)],
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def test_the_template_gives_the_prompt_source_end_prefix_and_end_token():
    tokenizer = tiny_tokenizer()
    chat = ChatFormat.from_tokenizer(tokenizer, instruction="Translate:\n")
    assert tokenizer.decode(chat.prompt) == "<|im_start|>user\nTranslate:\n"
    assert tokenizer.decode(chat.source_end) == "<|im_end|>\n"
    assert tokenizer.decode(chat.prefix) == "<|im_start|>assistant\n"
    assert chat.end_token == tokenizer.convert_tokens_to_ids("<|im_end|>")

    source = chat.source_group(tokenizer, ["my", "new", "tree."])
    assert source.num_words == 3 and source.units[0] == 0 and source.units[-1] == 4
    assert tokenizer.decode(source.ids) == "<|im_start|>user\nTranslate:\nmy new tree.<|im_end|>\n"

    target, words = chat.target(tokenizer, "mon arbre nouveau.")
    assert tokenizer.decode(target) == "<|im_start|>assistant\nmon arbre nouveau.<|im_end|>"
    # The words the tokens fall in are the text's words: prefix 0, "mon" 1, "arbre" 2, "nouveau." 3, end 4.
    spelled = {}
    for token, word in zip(target, words, strict=True):
        spelled[word] = spelled.get(word, "") + tokenizer.decode([token])
    assert [spelled[word].strip() for word in (1, 2, 3)] == ["mon", "arbre", "nouveau."]
    assert words[:len(chat.prefix)] == [0] * len(chat.prefix) and words[-1] == 4


def test_a_tokenizer_without_a_chat_template_is_one_line():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        ChatFormat.from_tokenizer(tokenizer)
    with pytest.raises(InputError, match="no words"):
        ChatFormat.from_tokenizer(tiny_tokenizer()).source_group(tiny_tokenizer(), [])


def test_the_method_is_registered_with_a_validated_config():
    config = registry.parse_config({"method": "streaming", "wait_k": 5, "target_offset": 2}, "test")
    assert (config.wait_k, config.target_offset, config.max_tokens_per_write, config.max_lag_words) == (5, 2, 50, 100)
    with pytest.raises(InputError, match="wait_k"):
        registry.parse_config({"method": "streaming", "wait_k": 0}, "test")
    with pytest.raises(InputError, match="wait: Extra"):
        registry.parse_config({"method": "streaming", "wait": 3}, "test")
