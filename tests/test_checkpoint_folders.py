"""Model folders as users have them, loaded through `load_model`: tiny random models of the real classes saved
with `save_pretrained`, then edited back to older vintages (llava-hf configs without `generation_config.json`,
processor configs without `num_additional_image_tokens`, with a CLS token in the tower or not; Qwen2-VL and
Qwen2.5-VL folders, whose processors come with a video processor that needs torchvision). Each must load, lay
out its visual tokens right and run, the old LLaVA ones through the bench's dense and FastV variants; what
cannot load says why in one line. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from efficient_models.bench.variants import build_variants
from tests.tiny_models import LLAVA_IMAGE_ID, PAD_ID, QWEN_IMAGE_ID, VOCAB, tiny_llava, tiny_qwen2_vl
from workbench.errors import ModelLoadError
from workbench.models.inputs import build_inputs
from workbench.models.loading import load_model

LLAVA_SIDE = 56  # 56 px over 14 px patches: a 4x4 grid, 16 visual tokens (15 when a CLS token is miscounted)
LLAVA_LAYERS = 4  # FastV's published K=2 needs more than 2
EOS_ID = 2
# Turn by turn, each answer closed by the end-of-sequence word, as the bench's training sequences need.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}{{ image }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{% if m['role'] == 'assistant' %}</s>{% endif %}\n{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
QWEN_SPECIAL = ["<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]  # ids 92-95
QWEN_MAX_PIXELS = 112 * 112  # 8x8 patches at most: 16 tokens after the 2x2 merge


# --- building folders ----------------------------------------------------------------------------------

def word_tokenizer(special: list[str]) -> PreTrainedTokenizerFast:
    """Words w0, w1, ... (</s> at EOS_ID) then `special` as added tokens, VOCAB ids in all (so `special` ends at
    VOCAB - 1)."""
    vocabulary = {f"w{i}": i for i in range(VOCAB - len(special))} | {"</s>": EOS_ID}
    words = Tokenizer(models.WordLevel({word: i for word, i in vocabulary.items() if word != f"w{EOS_ID}"},
                                       unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", pad_token=f"w{PAD_ID}",
                                        eos_token="</s>")
    tokenizer.add_tokens(special, special_tokens=True)
    return tokenizer


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def llava_with_siglip() -> LlavaForConditionalGeneration:
    """A LLaVA whose tower has no CLS token (SigLIP), so every patch is a visual token ("full" strategy)."""
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LLAVA_LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD_ID, max_position_embeddings=128)
    vision = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                image_size=LLAVA_SIDE, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE_ID,
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    return LlavaForConditionalGeneration(config).eval()


def save_llava(folder: Path, model: LlavaForConditionalGeneration) -> Path:
    """The folder as today's transformers saves model and processor (one processor_config.json)."""
    model.save_pretrained(folder)
    extra_tokens = int(model.config.vision_feature_select_strategy == "default")  # CLIP's CLS, then dropped
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": LLAVA_SIDE},
                                              crop_size={"height": LLAVA_SIDE, "width": LLAVA_SIDE}),
        tokenizer=word_tokenizer(["<image>"]), patch_size=14, num_additional_image_tokens=extra_tokens,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE.replace("{{ image }}", "<image>"),
    ).save_pretrained(folder)
    return folder


def llava_hf_vintage(folder: Path) -> None:
    """As the llava-hf conversions (transformers 4.36+) left their folders: no generation_config.json, and the
    text config without its special token ids (the pad id only at the top level)."""
    (folder / "generation_config.json").unlink()

    def to_llava_hf(config: dict) -> None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            config["text_config"].pop(key, None)
        config["pad_token_id"] = PAD_ID
    edit_json(folder / "config.json", to_llava_hf)


def processor_without(folder: Path, *keys: str) -> None:
    edit_json(folder / "processor_config.json", lambda config: [config.pop(key) for key in keys])


def llava_folder(tmp_path: Path, vintage: str) -> Path:
    model = llava_with_siglip() if vintage == "siglip-no-extra-tokens-key" else tiny_llava(
        num_layers=LLAVA_LAYERS, image_size=LLAVA_SIDE)
    folder = save_llava(tmp_path / vintage, model)
    if vintage == "llava-hf-no-generation-config":
        llava_hf_vintage(folder)
    elif vintage in ("no-extra-tokens-key", "siglip-no-extra-tokens-key"):
        processor_without(folder, "num_additional_image_tokens")
    elif vintage == "no-patch-size-or-strategy":
        processor_without(folder, "num_additional_image_tokens", "patch_size", "vision_feature_select_strategy")
    return folder


def tiny_qwen2_5_vl() -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL vision (2 blocks, windowed, 14 px patches, 2x2 merge) + Qwen2 decoder with M-RoPE."""
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [1, 1, 2]}, pad_token_id=PAD_ID, eos_token_id=EOS_ID),
        image_token_id=QWEN_IMAGE_ID, vision_start_token_id=QWEN_IMAGE_ID + 1, vision_end_token_id=QWEN_IMAGE_ID + 2,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def flatten_text_config(config: dict) -> None:
    text = config.pop("text_config")
    config.update({key: value for key, value in text.items() if key not in config})


def qwen_folder(tmp_path: Path, vintage: str) -> Path:
    """A Qwen folder as the hub has them: an image processor config and tokenizer files (the Qwen2-VL
    releases, their model config flat or nested), or today's processor_config.json, which also holds a video
    processor."""
    folder = tmp_path / vintage
    (tiny_qwen2_5_vl() if vintage.startswith("qwen2.5") else tiny_qwen2_vl()).save_pretrained(folder)
    word_tokenizer(QWEN_SPECIAL).save_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=QWEN_MAX_PIXELS, patch_size=14,
                                               temporal_patch_size=2, merge_size=2)
    (folder / "chat_template.jinja").write_text(
        CHAT_TEMPLATE.replace("{{ image }}", "<|vision_start|><|image_pad|><|vision_end|>"))
    if vintage.endswith("flat-config"):  # the Qwen2-VL releases: the text model's keys at the top level
        edit_json(folder / "config.json", flatten_text_config)
    if vintage.endswith("processor-config"):
        video = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "merge_size": 2}
        (folder / "processor_config.json").write_text(json.dumps(
            {"image_processor": image_processor.to_dict(), "video_processor": video,
             "processor_class": "Qwen2VLProcessor"}))
    else:
        image_processor.save_pretrained(folder)
    return folder


# --- LLaVA -----------------------------------------------------------------------------------------------

LLAVA_VINTAGES = ["current", "llava-hf-no-generation-config", "no-extra-tokens-key", "no-patch-size-or-strategy",
                  "siglip-no-extra-tokens-key"]


@pytest.mark.parametrize("vintage", LLAVA_VINTAGES)
def test_a_llava_folder_of_any_vintage_gives_one_square_grid_per_image(tmp_path, vintage):
    loaded = load_model(str(llava_folder(tmp_path, vintage)), device="cpu")
    inputs = build_inputs(loaded.processor, [Image.new("RGB", (80, 60), "red")] * 2, ["What is it?", "Colour?"])
    assert loaded.adapter.visual_token_mask(inputs["input_ids"]).sum(1).tolist() == [16, 16]
    assert loaded.adapter.image_grids(inputs) == [(4, 4), (4, 4)]
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, VOCAB) and torch.isfinite(logits).all()
    # The workbench's own input embeddings are what the model itself builds.
    with torch.no_grad():
        ours = loaded.model(inputs_embeds=loaded.adapter.input_embeddings(inputs),
                            attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(ours, logits)


def test_a_llava_hf_folder_without_generation_config_takes_its_token_ids_from_the_model_config(tmp_path):
    folder = llava_folder(tmp_path, "llava-hf-no-generation-config")
    generation = load_model(str(folder), device="cpu").model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, EOS_ID, PAD_ID)


@pytest.mark.parametrize("vintage", ["llava-hf-no-generation-config", "no-extra-tokens-key"])
def test_bench_dense_and_fastv_answer_on_old_llava_folders(tmp_path, monkeypatch, vintage):
    """What `wb bench --variants dense,fastv --model FOLDER` builds and runs: each variant generates."""
    folder = llava_folder(tmp_path, vintage)
    monkeypatch.setattr("workbench.models.loading.default_device", lambda: "cpu")
    dense, fastv = build_variants(["dense", "fastv"], str(folder))
    inputs = build_inputs(dense.loaded.processor, [Image.new("RGB", (64, 64), "blue")] * 2, ["What?", "Where is it?"])
    # Dense through the schedule engine answers as transformers' own generate does; FastV answers too.
    assert dense.generate_text(inputs, max_new_tokens=3) == dense.loaded.generate_text(inputs, max_new_tokens=3)
    assert len(fastv.generate_text(inputs, max_new_tokens=3)) == 2
    assert fastv.schedule.cuts == {2: 0.5}


def test_wb_bench_dense_fastv_runs_on_a_llava_hf_folder(tmp_path, run_wb, monkeypatch):
    """The command that died with `Could not infer dtype of NoneType` on such a folder, end to end."""
    monkeypatch.setattr("workbench.models.loading.default_device", lambda: "cpu")
    folder = llava_folder(tmp_path, "llava-hf-no-generation-config")
    code, _, err = run_wb("bench", "--variants", "dense,fastv", "--model", str(folder), "--n", "2", "--batch-size",
                          "2", "--repeats", "1", "--decode-steps", "2", "--out", str(tmp_path / "bench"))
    assert code == 0, err
    variants = json.loads((tmp_path / "bench" / "bench.json").read_text())["variants"]
    assert [(v["name"], v["visual_tokens_per_layer"]) for v in variants] == [
        ("dense", [16, 16, 16, 16]), ("fastv", [16, 16, 8, 8])]


# --- Qwen2-VL and Qwen2.5-VL -----------------------------------------------------------------------------

QWEN_VINTAGES = ["qwen2-vl-hub", "qwen2-vl-hub-flat-config", "qwen2-vl-processor-config", "qwen2.5-vl-hub",
                 "qwen2.5-vl-hub-flat-config", "qwen2.5-vl-processor-config"]


@pytest.mark.parametrize("vintage", QWEN_VINTAGES)
def test_a_qwen_folder_loads_without_torchvision_and_keeps_the_aspect_ratio(tmp_path, vintage):
    assert importlib.util.find_spec("torchvision") is None  # the point of the test: the install has none
    loaded = load_model(str(qwen_folder(tmp_path, vintage)), device="cpu")
    assert not hasattr(loaded.processor, "video_processor")
    assert type(loaded.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    # 112 x 56 px: 8 x 4 patches, 4 x 2 tokens after the 2x2 merge; a second, square image gives 4 x 4.
    images = [Image.new("RGB", (56, 112), "green"), Image.new("RGB", (112, 112), "blue")]
    inputs = build_inputs(loaded.processor, images, ["What is it?", "And this?"])
    assert loaded.adapter.image_grids(inputs) == [(4, 2), (4, 4)]
    assert loaded.adapter.visual_token_mask(inputs["input_ids"]).sum(1).tolist() == [8, 16]
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, VOCAB) and torch.isfinite(logits).all()


def test_wb_inspect_reads_a_qwen_folder(tmp_path, run_wb):
    code, out, err = run_wb("inspect", "sample:astronaut", "--model", str(qwen_folder(tmp_path, "qwen2-vl-hub")),
                            "--json", "--max-new-tokens", "2")
    assert code == 0, err
    report = json.loads(out)
    assert report["num_visual_tokens"] == 16 and report["grid"] == [4, 4]


# --- load errors: one line, naming what is missing -------------------------------------------------------

def fail_with(error: Exception):
    def raising(*args, **kwargs):
        raise error
    return raising


def torchvision_import_error() -> ImportError:
    """The ImportError transformers itself raises for a class that needs torchvision (it starts with a newline)."""
    from transformers.utils import requires_backends

    with pytest.raises(ImportError) as caught:
        requires_backends(Qwen2VLImageProcessorPil, ["torchvision"])
    return caught.value


@pytest.mark.parametrize("make_error, names", [
    (torchvision_import_error, "Torchvision"),
    (lambda: ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece"), "'sentencepiece'"),
    (lambda: ImportError("cannot import name 'descriptor'", name="google.protobuf"),
     "missing package 'google.protobuf'"),
], ids=["transformers-backend", "module-not-found", "import-error-with-name"])
def test_an_import_error_while_loading_is_one_line_naming_the_package(tmp_path, monkeypatch, make_error, names):
    folder = qwen_folder(tmp_path, "qwen2-vl-hub")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", fail_with(make_error()))
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(folder), device="cpu")
    message = str(caught.value)
    assert "\n" not in message and names in message
    assert message.split(": ", 1)[1].strip()  # a reason follows the folder's name


def test_a_folder_without_tokenizer_files_says_so_in_one_line(tmp_path):
    folder = llava_folder(tmp_path, "current")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(folder), device="cpu")
    message = str(caught.value)
    assert "\n" not in message and "tokenizer" in message.split(": ", 1)[1]
