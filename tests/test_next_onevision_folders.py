"""LLaVA-NeXT and LLaVA-OneVision folders as users have them, loaded through `load_model`: tiny random models of the
real classes saved with `save_pretrained`, with processor configs of today and older ones that leave out how to
count tokens. Anyres tiling gives an image two grids (the whole image, then its tiles) and a row-end token after
each tile row; the layout must match what the model scatters, a trace must match the plain forward, and
`wb inspect` and `wb analyze tokens` must run. Nothing is downloaded.

Tiles are 56 px (4x4 patches of 14 px); the processors tile at 56 x 112, 112 x 56 or 112 x 112 (height x width):
- a 112 x 28 px image (width x height) is tiled at 56 x 112 (1x2 tiles, 4x8 patches), then unpadded to 2x8;
- a square image is tiled at 112 x 112 (2x2 tiles, 8x8 patches), which OneVision, allowed one tile's worth of
  patches here (`vision_aspect_ratio="anyres_max_1"`), downsamples to 4x4.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from efficient_models.token_schedule import schedule as schedules
from efficient_models.token_schedule.engine import ScheduledLLM
from efficient_models.token_schedule.scheduled_model import visual_tokens_per_image
from tests.test_checkpoint_folders import CHAT_TEMPLATE, EOS_ID, processor_without, word_tokenizer
from tests.tiny_models import LLAVA_IMAGE_ID, PAD_ID, VOCAB
from workbench.data.image_sets import resolve_image_set
from workbench.errors import InputError
from workbench.flops import PROBE_IMAGE_SIZE, ModelShapes
from workbench.data.probe_scenes import patch_labels
from workbench.models.inputs import build_inputs
from workbench.models.loading import load_model
from workbench.tracing import CaptureSpec, capture

TILE = 56
PINPOINTS = [[56, 112], [112, 56], [112, 112]]
ONEVISION_ASPECT = "anyres_max_1"
VIDEO_ID = LLAVA_IMAGE_ID - 1  # OneVision's tokenizer adds <video> before <image>
IMAGES = [Image.new("RGB", (112, 28), "red"), Image.new("RGB", (112, 112), "blue")]  # PIL sizes are (width, height)
EXPECTED = {  # per model type: the grids of IMAGES, their visual tokens (cells + row ends), tiles per image
    "llava_next": {"grids": [(4, 4), (2, 8), (4, 4), (8, 8)], "tokens": [16 + 16 + 2, 16 + 64 + 8], "tiles": [3, 5]},
    "llava_onevision": {"grids": [(4, 4), (2, 8), (4, 4), (4, 4)], "tokens": [16 + 16 + 2, 16 + 16 + 4],
                        "tiles": [3, 5]},
}
VINTAGES = ["llava-next", "llava-next-old-processor", "llava-onevision-hub", "llava-onevision-old-processor"]


# --- building folders ----------------------------------------------------------------------------------

def tiny_text_config(config_class):
    return config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                        max_position_embeddings=256)


def save_llava_next(folder: Path, old_processor: bool) -> Path:
    """CLIP tower (a CLS token, dropped by the "default" strategy) + Llama, and today's processor_config.json;
    the old one lacks the patch size, the strategy and the CLS count, as llava-hf's first NeXT folders did."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TILE, patch_size=14)
    config = LlavaNextConfig(vision_config=vision, text_config=tiny_text_config(LlamaConfig),
                             image_token_index=LLAVA_IMAGE_ID, vision_feature_layer=-1,
                             vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS)
    LlavaNextForConditionalGeneration(config).save_pretrained(folder)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                                 image_grid_pinpoints=PINPOINTS)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=word_tokenizer(["<image>"]), patch_size=14,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=CHAT_TEMPLATE.replace("{{ image }}", "<image>")).save_pretrained(folder)
    if old_processor:
        processor_without(folder, "patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")
    return folder


def save_llava_onevision(folder: Path, old_processor: bool) -> Path:
    """SigLIP tower (no CLS, "full" strategy) + Qwen2, saved as the hub's llava-onevision folders are: tokenizer,
    image and video processor configs, and a processor_config.json with the token count; the old one has none of
    what the processor counts tokens with (so its default downsampling limit differs from the model's)."""
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                image_size=TILE, patch_size=14, vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=tiny_text_config(Qwen2Config),
                                  image_token_index=LLAVA_IMAGE_ID, video_token_index=VIDEO_ID, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
                                  vision_aspect_ratio=ONEVISION_ASPECT)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(folder)
    word_tokenizer(["<video>", "<image>"]).save_pretrained(folder)
    LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                    image_grid_pinpoints=PINPOINTS).save_pretrained(folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": TILE, "width": TILE}}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("{{ image }}", "<image>"))
    counts = {} if old_processor else {"num_image_tokens": 16, "vision_feature_select_strategy": "full",
                                       "vision_aspect_ratio": ONEVISION_ASPECT}
    (folder / "processor_config.json").write_text(json.dumps(
        {"processor_class": "LlavaOnevisionProcessor", "image_token": "<image>", "video_token": "<video>"} | counts))
    return folder


@pytest.fixture(scope="module", params=VINTAGES)
def folder(request, tmp_path_factory) -> Path:
    save = save_llava_next if request.param.startswith("llava-next") else save_llava_onevision
    return save(tmp_path_factory.mktemp(request.param), old_processor=request.param.endswith("old-processor"))


@pytest.fixture(scope="module")
def loaded(folder):
    return load_model(str(folder), device="cpu")


@pytest.fixture(scope="module")
def inputs(loaded):
    return build_inputs(loaded.processor, IMAGES, ["What is it?", "And this?"])


def expected(loaded) -> dict:
    return EXPECTED[loaded.model.config.model_type]


def model_type_of(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["model_type"]


def square_image_grids(folder: Path) -> tuple[list[int], list[int]]:
    """The whole-image and tile grids of a square image (IMAGES[1], the astronaut, the probe scenes)."""
    return tuple(list(grid) for grid in EXPECTED[model_type_of(folder)]["grids"][2:])


# --- layout ----------------------------------------------------------------------------------------------

def test_the_folder_loads_without_torchvision(loaded):
    assert importlib.util.find_spec("torchvision") is None  # the point: the install has none
    assert type(loaded.processor.image_processor).__name__.endswith("ImageProcessorPil")
    assert not hasattr(loaded.processor, "video_processor")


def test_each_image_has_a_whole_image_grid_then_a_tile_grid(loaded, inputs):
    adapter = loaded.adapter
    mask = adapter.visual_token_mask(inputs["input_ids"])
    assert mask.sum(1).tolist() == expected(loaded)["tokens"]
    assert adapter.tiles_per_image(inputs) == expected(loaded)["tiles"]
    assert adapter.image_grids(inputs) == expected(loaded)["grids"]
    layouts = adapter.image_layouts(inputs)
    assert [(layout.image, layout.sample) for layout in layouts] == [(0, 0), (0, 0), (1, 1), (1, 1)]
    for image, count in enumerate(expected(loaded)["tokens"]):
        base, tiles = layouts[2 * image : 2 * image + 2]
        visual = mask[image].nonzero().flatten()
        # The whole-image grid comes first; each tile row is followed by one row-end token.
        assert base.positions.tolist() == visual[:16].tolist()
        grid = tiles.positions.view(tiles.rows, tiles.cols)
        assert (grid.diff(dim=1) == 1).all()  # a row's cells are consecutive tokens
        assert (grid[1:, 0] - grid[:-1, -1] == 2).all() and visual[-1] == grid[-1, -1] + 1  # one row end after each
        assert count == base.num_tokens + tiles.num_tokens + tiles.rows
    # As many visual tokens as the model makes image features, which it scatters into them.
    with torch.no_grad():
        output = loaded.model(**inputs)
    assert output.image_hidden_states.shape[0] == int(mask.sum())
    assert output.logits.shape == (*inputs["input_ids"].shape, VOCAB) and torch.isfinite(output.logits).all()


# --- tracing ---------------------------------------------------------------------------------------------

def test_the_trace_matches_the_plain_forward(loaded, inputs):
    with torch.no_grad():
        reference = loaded.model(**inputs, output_hidden_states=True)
    traced = capture(loaded, inputs, CaptureSpec(projector_input=True, projector=True, embeddings=True,
                                                 llm_layers="all", logits=True))
    torch.testing.assert_close(traced.logits, reference.logits)
    torch.testing.assert_close(traced.embeddings, reference.hidden_states[0])
    for layer in range(loaded.adapter.num_llm_layers - 1):
        torch.testing.assert_close(traced.hidden[layer], reference.hidden_states[layer + 1])
    # The workbench's own input embeddings are what the model builds.
    with torch.no_grad():
        ours = loaded.model(inputs_embeds=loaded.adapter.input_embeddings(inputs),
                            attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(ours, reference.logits)


def test_the_projector_is_packed_as_the_llm_receives_it(loaded, inputs):
    traced = capture(loaded, inputs, CaptureSpec(projector_input=True, projector=True, embeddings=True))
    num_visual = int(traced.visual_mask.sum())
    assert traced.projector_input.shape[0] == traced.projector.shape[0] == num_visual
    torch.testing.assert_close(traced.projector, traced.visual("embeddings"))
    cells = torch.cat([traced.visual_indices(layout) for layout in traced.layouts])
    row_ends = torch.ones(num_visual, dtype=torch.bool)
    row_ends[cells] = False
    assert int(row_ends.sum()) == sum(layout.rows for layout in traced.layouts[1::2])
    # Row ends hold the model's image_newline and come from no vision feature; no cell holds it.
    newline = loaded.model.model.image_newline.detach()
    torch.testing.assert_close(traced.projector[row_ends], newline.expand(int(row_ends.sum()), -1))
    assert (traced.projector_input[row_ends] == 0).all()
    assert ((traced.projector[cells] - newline).abs().amax(-1) > 0).all()
    # A grid's slice is its cells, row-major.
    tiles = traced.layouts[1]
    torch.testing.assert_close(traced.per_image(traced.projector, 1),
                               traced.embeddings[tiles.sample, tiles.positions].view(tiles.rows, tiles.cols, -1))


# --- commands --------------------------------------------------------------------------------------------

def test_wb_inspect_reports_both_grids(folder, run_wb):
    code, out, err = run_wb("inspect", "sample:astronaut", "--model", str(folder), "--json", "--max-new-tokens", "2")
    assert code == 0, err
    report = json.loads(out)
    base, tiles = square_image_grids(folder)
    assert report["grids"] == [base, tiles] and report["grid"] == base  # astronaut is square, as IMAGES[1]
    assert report["non_grid_tokens"] == tiles[0]
    assert report["num_visual_tokens"] == base[0] * base[1] + tiles[0] * tiles[1] + tiles[0]
    first, last = report["nearest_tokens"][0], report["nearest_tokens"][-1]
    assert (first["grid"], first["row"], first["col"]) == (0, 0, 0)
    assert (last["grid"], last["row"], last["col"]) == (1, tiles[0] - 1, tiles[1] - 1)


def test_wb_analyze_tokens_has_a_row_per_grid_cell(folder, run_wb, tmp_path):
    code, out, err = run_wb("analyze", "tokens", "--images", "probe:test:2", "--model", str(folder),
                            "--out", str(tmp_path / "tokens"), "--json")
    assert code == 0, err
    base, tiles = square_image_grids(folder)  # probe scenes are square too
    cells = base[0] * base[1] + tiles[0] * tiles[1]
    table = pd.read_parquet(tmp_path / "tokens" / "tokens.parquet")
    assert json.loads(out)["num_tokens"] == len(table) == 2 * cells
    for _, image in table.groupby("image_id"):
        assert image["token"].tolist() == list(range(cells))
        for grid, (rows, cols) in enumerate((base, tiles)):
            part = image[image["grid"] == grid]
            assert list(zip(part["row"], part["col"])) == [(r, c) for r in range(rows) for c in range(cols)]
    # Each grid covers the whole image, so each cell has its patch's ground truth at that grid's resolution.
    for item in resolve_image_set("probe:test:2").items:
        image = table[table["image_id"] == item.id]
        for grid, (rows, cols) in enumerate((base, tiles)):
            kinds = [label.kind for label in patch_labels(item.scene(), rows, cols)]
            assert image[image["grid"] == grid]["patch_kind"].tolist() == kinds
    assert set(table["category"]) <= {"sink", "dead", "alive"}


def test_vision_layers_refuses_tiled_images_in_one_line(folder, run_wb, tmp_path):
    code, _, err = run_wb("analyze", "vision-layers", "--images", "probe:test:2", "--model", str(folder),
                          "--out", str(tmp_path / "layers"))
    # Loading prints progress bars first; the refusal is one line.
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "vision-layers" in errors[0] and model_type_of(folder) in errors[0]


# --- token schedules -------------------------------------------------------------------------------------

def test_counts_are_made_on_the_probe_image_as_the_processor_tiles_it(loaded):
    shapes = ModelShapes.of_model(loaded)
    probe = {"image_sizes": torch.tensor([PROBE_IMAGE_SIZE])}
    assert shapes.visual_tokens_per_image == visual_tokens_per_image(loaded)
    assert shapes.vision.tiles == loaded.adapter.tiles_per_image(probe)[0] > 1
    one_tile = dataclasses.replace(shapes.vision, tiles=1)
    assert shapes.vision.flops() == shapes.vision.tiles * one_tile.flops()


def test_the_engine_answers_as_generate_does_and_refuses_rows_of_different_counts(loaded, inputs):
    engine = ScheduledLLM(loaded.adapter, schedules.dense(loaded.adapter.num_llm_layers))
    single = build_inputs(loaded.processor, IMAGES[1:], ["What is it?"])
    answer = loaded.model.generate(**single, max_new_tokens=4, do_sample=False)[:, single["input_ids"].shape[1]:]
    assert torch.equal(engine.generate(single, 4), answer)
    counts = expected(loaded)["tokens"]
    with pytest.raises(InputError, match=re.escape(f"different numbers of visual tokens ({counts})")):
        engine.generate(inputs, 4)
