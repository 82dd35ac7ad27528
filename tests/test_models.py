"""Architecture adapters, model loading and its one-line errors, on tiny models built here."""

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from tests.tiny_models import LLAVA_IMAGE_ID, QWEN_IMAGE_ID, image_tokens_llava, llava_batch, tiny_llava
from workbench.errors import InputError, ModelLoadError
from workbench.models.adapter import adapter_for, supported_model_types
from workbench.models.inputs import format_prompt
from workbench.models.loading import load_model


def test_llava_adapter_names_the_real_modules(llava):
    adapter, model = llava.adapter, llava.model
    assert adapter.vision_tower is model.model.vision_tower
    assert adapter.vision_layers is model.model.vision_tower.encoder.layers and adapter.num_vision_layers == 2
    assert adapter.projector is model.model.multi_modal_projector
    assert adapter.llm_layers is model.model.language_model.layers and adapter.num_llm_layers == 4
    assert adapter.embed_tokens is model.model.language_model.embed_tokens
    assert adapter.final_norm is model.model.language_model.norm
    assert adapter.lm_head is model.lm_head and adapter.lm_head_path == "lm_head"
    assert adapter.image_token_id == LLAVA_IMAGE_ID


def test_qwen_adapter_names_the_real_modules(qwen):
    adapter, model = qwen.adapter, qwen.model
    assert adapter.vision_layers is model.model.visual.blocks
    assert adapter.projector is model.model.visual.merger
    assert adapter.llm_layers is model.model.language_model.layers
    assert adapter.image_token_id == QWEN_IMAGE_ID


def test_visual_mask_comes_from_the_image_token_with_padding(llava):
    batch = llava_batch([[1, *image_tokens_llava(), 5], [1, 2, 3, *image_tokens_llava(), 5]], [1, 1])
    mask = llava.adapter.visual_token_mask(batch["input_ids"])
    assert mask.sum(1).tolist() == [4, 4]
    assert mask[0].nonzero().flatten().tolist() == [3, 4, 5, 6]  # shifted right by two pad tokens
    assert mask[1].nonzero().flatten().tolist() == [3, 4, 5, 6]


def test_image_layouts_refuse_token_counts_that_do_not_fit(llava):
    batch = llava_batch([[1, *image_tokens_llava(), LLAVA_IMAGE_ID, 5]], [1])  # 5 tokens for one 2x2 image
    with pytest.raises(ValueError, match="square grid"):
        llava.adapter.image_layouts(batch)


def test_supported_families():
    assert {"llava", "qwen2_vl", "qwen2_5_vl"} <= set(supported_model_types())


def test_unknown_model_names_fail_with_one_line():
    with pytest.raises(ModelLoadError, match="no such folder") as missing:
        load_model("/definitely/not/a/model")
    with pytest.raises(ModelLoadError, match="cannot load model 'no-such-org/no-such-model'") as offline:
        load_model("no-such-org/no-such-model")
    for error in (missing, offline):
        assert "\n" not in str(error.value)


def test_text_only_and_imageless_models_are_refused(tmp_path):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelLoadError, match="unsupported architecture model_type='llama'"):
        load_model(str(tmp_path / "llama"))

    model = tiny_llava(num_layers=1)
    model.config.image_token_id = 500  # beyond the vocabulary of 96: no such token
    model.config.save_pretrained(tmp_path / "imageless")
    with pytest.raises(ModelLoadError, match="has no image token"):
        load_model(str(tmp_path / "imageless"))
    with pytest.raises(ModelLoadError, match="has no image token"):
        adapter_for(model)


def test_model_folder_without_processor_is_a_clear_error(tmp_path):
    tiny_llava(num_layers=1).save_pretrained(tmp_path / "tiny")
    with pytest.raises(ModelLoadError, match="cannot load model") as error:
        load_model(str(tmp_path / "tiny"), device="cpu")
    assert "\n" not in str(error.value)


class _Processor:
    image_token = "<image>"

    def __init__(self, chat_template=None):
        self.chat_template = chat_template

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        (content,) = [m["content"] for m in messages]
        return "USER: " + "".join("<image>" if c["type"] == "image" else c["text"] for c in content) + " ASSISTANT:"


def test_prompt_placeholder_rules():
    assert format_prompt(_Processor(), "look <image> here") == "look <image> here"
    assert format_prompt(_Processor(chat_template="x"), "What is it?") == "USER: <image>What is it? ASSISTANT:"
    with pytest.raises(InputError, match="no image placeholder '<image>'"):
        format_prompt(_Processor(), "What is it?")


def test_cli_reports_bad_input_in_one_line(tmp_path, run_wb):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for image, expected in [(str(tmp_path / "missing.png"), "image not found"), (str(corrupt), "cannot read image")]:
        code, _, stderr = run_wb("inspect", image)
        assert code == 2
        assert stderr.startswith("error: ") and expected in stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
