"""Idefics3 / SmolVLM and Gemma 3 folders as users have them, loaded through `load_model`: tiny random models of the
real classes saved with `save_pretrained`, processor files as the hub has them. Each lays out its visual tokens as
one grid per tile (Idefics3: tiles then the global image; Gemma 3: one per image), traces like its plain forward,
and runs `wb inspect` and `wb analyze tokens`. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlamaConfig,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from analyses.vision_layers import base_layers, tower_hidden_states
from efficient_models.bench.variants import build_variants
from tests.test_checkpoint_folders import CHAT_TEMPLATE, EOS_ID, edit_json, word_tokenizer
from tests.tiny_models import PAD_ID, VOCAB
from workbench.models.inputs import build_inputs
from workbench.models.loading import load_model
from workbench.tracing import CaptureSpec, capture

TILE = 32  # px, the towers' image size: 8 px patches, a 4x4 patch grid
LAYERS = 4  # FastV's K=2 needs more than 2
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=TILE,
              patch_size=8)
# Idefics3's markers and image token, ids 88-95; tiles of up to 2 x 2.
ROW_COL = ["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>"]
IDEFICS3_SPECIAL = ["<fake_token_around_image>", "<global-img>", *ROW_COL, "<end_of_utterance>", "<image>"]
IDEFICS3_ID = {token: VOCAB - len(IDEFICS3_SPECIAL) + index for index, token in enumerate(IDEFICS3_SPECIAL)}
GEMMA3_SPECIAL = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
BOI_ID, EOI_ID, SOFT_ID = VOCAB - 3, VOCAB - 2, VOCAB - 1


def save_processor_files(folder: Path, special: list[str], placeholder: str, image_processor, hub_type: str,
                         processor_config: dict | None) -> None:
    """Tokenizer, image processor under its hub class name (the PIL one must be found for it), chat template and,
    when given, processor_config.json."""
    word_tokenizer(special).save_pretrained(folder)
    image_processor.save_pretrained(folder)
    edit_json(folder / "preprocessor_config.json", lambda config: config.update(image_processor_type=hub_type))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("{{ image }}", placeholder))
    if processor_config is not None:
        (folder / "processor_config.json").write_text(json.dumps(processor_config))


# --- Idefics3 / SmolVLM ------------------------------------------------------------------------------------

def idefics3_folder(folder: Path, model_type: str, split: bool = True) -> Path:
    """SmolVLM-256M's kind of folder (`idefics3`, a processor config without `image_seq_len`) or SmolVLM2's
    (`smolvlm`, processor_config.json naming SmolVLMProcessor). Images up to 64 px split into 32 px tiles."""
    torch.manual_seed(0)
    config_class, model_class, processor_class = {
        "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil),
        "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil)}[model_type]
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD_ID, bos_token_id=1,
                       eos_token_id=EOS_ID, max_position_embeddings=256)
    config = config_class(text_config=text, vision_config=VISION, image_token_id=IDEFICS3_ID["<image>"],
                          scale_factor=2, pad_token_id=PAD_ID)  # its default, 128002, is past this vocabulary
    model_class(config).eval().save_pretrained(folder)
    image_processor = processor_class(size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE},
                                      do_image_splitting=split)
    hub_type = "Idefics3ImageProcessor" if model_type == "idefics3" else "SmolVLMImageProcessor"
    processor_config = {"processor_class": "SmolVLMProcessor", "image_seq_len": 4} if model_type == "smolvlm" else None
    save_processor_files(folder, IDEFICS3_SPECIAL, "<image>", image_processor, hub_type, processor_config)
    return folder


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def smolvlm(request, tmp_path_factory):
    return load_model(str(idefics3_folder(tmp_path_factory.mktemp(request.param), request.param)), device="cpu")


def tiled_batch(loaded):
    """A 64 px square (2 x 2 tiles and the global image: 5 grids) and a 64 x 32 px image (1 x 2 tiles: 3 grids)."""
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 32), "blue")]
    return build_inputs(loaded.processor, images, ["What is it?", "Colour?"])


def test_a_smolvlm_folder_gives_a_grid_per_tile_and_the_global_image(smolvlm):
    assert type(smolvlm.processor).__name__ == "Idefics3Processor"  # SmolVLM's own needs num2words and video
    assert type(smolvlm.processor.image_processor).__name__.endswith("ImageProcessorPil")
    assert smolvlm.processor.image_seq_len == 4  # 4x4 patches, pixel shuffle by 2: a 2x2 grid per tile
    inputs = tiled_batch(smolvlm)
    adapter = smolvlm.adapter
    assert adapter.visual_token_mask(inputs["input_ids"]).sum(1).tolist() == [20, 12]
    assert adapter.image_grids(inputs) == [(2, 2)] * 8
    layouts = adapter.image_layouts(inputs)
    assert [(layout.sample, layout.image) for layout in layouts] == [(0, 0)] * 5 + [(1, 1)] * 3
    # Each grid is one run of image tokens behind its marker: the tiles row by row, then the global image.
    markers = [int(inputs["input_ids"][layout.sample, layout.positions[0] - 1]) for layout in layouts]
    assert markers == [IDEFICS3_ID[token] for token in [*ROW_COL, "<global-img>", *ROW_COL[:2], "<global-img>"]]
    assert all(layout.positions.diff().eq(1).all() for layout in layouts)
    with torch.no_grad():
        features = smolvlm.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True,
                                                    pixel_attention_mask=inputs["pixel_attention_mask"])
        assert sum(len(row) for row in features.pooler_output) == 32
        logits = smolvlm.model(**inputs).logits
        ours = smolvlm.model(inputs_embeds=adapter.input_embeddings(inputs),
                             attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(ours, logits)


def test_a_smolvlm_trace_is_its_plain_forward(smolvlm):
    inputs = tiled_batch(smolvlm)
    with torch.no_grad():
        reference = smolvlm.model(**inputs).logits
    traced = capture(smolvlm, inputs, CaptureSpec(projector_input=True, projector=True, embeddings=True,
                                                  llm_layers="all", logits=True))
    torch.testing.assert_close(traced.logits, reference)
    assert traced.grids == [(2, 2)] * 8
    torch.testing.assert_close(traced.projector, traced.visual("embeddings"))
    # A token's projector input is its 2x2 block of patch features, in the order the connector folds them.
    assert traced.projector_input.shape == (32, 4 * VISION["hidden_size"])
    with torch.no_grad():
        projected = smolvlm.adapter.projector.modality_projection(traced.projector_input)
    torch.testing.assert_close(projected, traced.projector)


def test_the_token_schedule_engine_answers_a_smolvlm_folder_as_generate_does(tmp_path, monkeypatch):
    monkeypatch.setattr("workbench.models.loading.default_device", lambda: "cpu")
    dense, fastv = build_variants(["dense", "fastv"], str(idefics3_folder(tmp_path / "smolvlm", "smolvlm")))
    inputs = build_inputs(dense.loaded.processor, [Image.new("RGB", (64, 64), "green")] * 2, ["What?", "Where?"])
    assert dense.generate_text(inputs, max_new_tokens=3) == dense.loaded.generate_text(inputs, max_new_tokens=3)
    assert len(fastv.generate_text(inputs, max_new_tokens=3)) == 2


def test_wb_inspect_and_tokens_run_on_an_unsplit_smolvlm_folder(tmp_path, run_wb):
    """Inspect and the tokens analysis read one grid per image; a folder that does not split images gives that."""
    folder = str(idefics3_folder(tmp_path / "smolvlm", "idefics3", split=False))
    code, out, err = run_wb("inspect", "sample:astronaut", "--model", folder, "--json", "--max-new-tokens", "2")
    assert code == 0, err
    report = json.loads(out)
    assert report["num_visual_tokens"] == 4 and report["grid"] == [2, 2]
    assert_tokens_run(run_wb, folder, tmp_path / "tokens")


def assert_tokens_run(run_wb, folder: str, out: Path) -> None:
    """`wb analyze tokens` on two probe scenes in one batch: a row per visual token of each, with its cell."""
    code, _, err = run_wb("analyze", "tokens", "--images", "probe:test:2", "--model", folder, "--batch-size", "2",
                          "--out", str(out))
    assert code == 0, err
    table = pd.read_parquet(out / "tokens.parquet")
    assert len(table) == 8 and table["image_id"].nunique() == 2
    assert sorted(zip(table["row"], table["col"])) == sorted([(r, c) for r in range(2) for c in range(2)] * 2)
    assert json.loads((out / "summary.json").read_text())["num_tokens"] == 8


# --- Gemma 3 --------------------------------------------------------------------------------------------------

def gemma3_folder(folder: Path) -> Path:
    """A Gemma 3 folder: SigLIP at 32 px (4x4 patches) pooled to 4 tokens, the special tokens named in the
    tokenizer config, Gemma3Processor in processor_config.json."""
    torch.manual_seed(0)
    text = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                            pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=EOS_ID)
    config = Gemma3Config(text_config=text, vision_config=SiglipVisionConfig(**VISION), mm_tokens_per_image=4,
                          boi_token_index=BOI_ID, eoi_token_index=EOI_ID, image_token_index=SOFT_ID)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # initialised to zeros, which would make every image the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    model.save_pretrained(folder)
    save_processor_files(folder, list(GEMMA3_SPECIAL.values()), GEMMA3_SPECIAL["boi_token"],
                         Gemma3ImageProcessorPil(size={"height": TILE, "width": TILE}), "Gemma3ImageProcessor",
                         {"processor_class": "Gemma3Processor", "image_seq_length": 4})
    edit_json(folder / "tokenizer_config.json", lambda config: config.update(extra_special_tokens=GEMMA3_SPECIAL))
    return folder


@pytest.fixture(scope="module")
def gemma3_path(tmp_path_factory) -> str:
    return str(gemma3_folder(tmp_path_factory.mktemp("gemma3")))


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    return load_model(gemma3_path, device="cpu")


def test_a_gemma3_folder_gives_one_pooled_grid_per_image(gemma3):
    assert type(gemma3.processor).__name__ == "Gemma3Processor"
    assert type(gemma3.processor.image_processor).__name__ == "Gemma3ImageProcessorPil"
    images = [Image.new("RGB", (80, 60), "red"), Image.new("RGB", (40, 40), "blue")]
    inputs = build_inputs(gemma3.processor, images, ["What is it?", "Colour?"])
    adapter = gemma3.adapter
    assert adapter.visual_token_mask(inputs["input_ids"]).sum(1).tolist() == [4, 4]
    assert adapter.image_grids(inputs) == [(2, 2), (2, 2)]
    layouts = adapter.image_layouts(inputs)
    assert [(layout.sample, layout.image) for layout in layouts] == [(0, 0), (1, 1)]
    for layout in layouts:  # between the image markers, which are no visual tokens
        row = inputs["input_ids"][layout.sample]
        assert (int(row[layout.positions[0] - 1]), int(row[layout.positions[-1] + 1])) == (BOI_ID, EOI_ID)
    # Pan-and-scan (asked for at call time) adds crops of a wide image, a grid each: the image and 3 crops.
    prompt = gemma3.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Wide?"}]}], tokenize=False)
    wide = gemma3.processor(images=[[Image.new("RGB", (96, 32), "green")]], text=[prompt], return_tensors="pt",
                            do_pan_and_scan=True, pan_and_scan_min_crop_size=8)
    assert adapter.image_grids(wide) == [(2, 2)] * 4
    with torch.no_grad():
        assert torch.isfinite(gemma3.model(**wide).logits).all()


def test_a_gemma3_trace_is_its_plain_forward(gemma3):
    inputs = build_inputs(gemma3.processor, [Image.new("RGB", (64, 48), "red")] * 2, ["What?", "Where is it?"])
    with torch.no_grad():
        reference = gemma3.model(**inputs).logits  # image tokens attending both ways (token_type_ids)
    traced = capture(gemma3, inputs, CaptureSpec(projector_input=True, projector=True, embeddings=True,
                                                 llm_layers="all", logits=True))
    torch.testing.assert_close(traced.logits, reference)
    torch.testing.assert_close(traced.projector, traced.visual("embeddings"))
    # A token's projector input is its 2x2 block of patches; the projector averages them, norms and projects.
    hidden = VISION["hidden_size"]
    assert traced.projector_input.shape == (8, 4 * hidden)
    projector = gemma3.adapter.projector
    with torch.no_grad():
        pooled = projector.mm_soft_emb_norm(traced.projector_input.view(8, 4, hidden).mean(1))
    torch.testing.assert_close(pooled @ projector.mm_input_projection_weight, traced.projector)


def test_gemma3_declares_what_the_engine_and_vision_layers_can_use(gemma3):
    assert not gemma3.adapter.token_schedules  # bidirectional image attention, per-layer-type rotary
    pixel_values = gemma3.processor.image_processor([Image.new("RGB", (50, 40), "red")], return_tensors="pt")[
        "pixel_values"]
    hidden = tower_hidden_states(gemma3, pixel_values)
    assert len(hidden) == gemma3.adapter.num_vision_layers + 1 and hidden[0].shape[1] == 16  # 4x4, no CLS
    assert base_layers(gemma3) == [gemma3.adapter.num_vision_layers]


def test_wb_inspect_and_tokens_run_on_a_gemma3_folder(gemma3_path, tmp_path, run_wb):
    code, out, err = run_wb("inspect", "sample:astronaut", "--model", gemma3_path, "--json", "--max-new-tokens", "2")
    assert code == 0, err
    report = json.loads(out)
    assert report["num_visual_tokens"] == 4 and report["grid"] == [2, 2]
    assert_tokens_run(run_wb, gemma3_path, tmp_path / "tokens")
