"""Image sources: packaged sample photos, files, and one-line errors for bad images."""

import numpy as np
import pytest
from PIL import Image

from workbench.data.images import load_image, sample_names
from workbench.errors import InputError


@pytest.mark.parametrize("name", sample_names())
def test_every_sample_photo_loads_as_rgb(name):
    image = load_image(f"sample:{name}")
    assert image.mode == "RGB" and min(image.size) >= 200
    assert np.asarray(image).std() > 10  # a real photo, not a blank


def test_file_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "x.png")), pixels)


def test_grey_and_alpha_images_become_rgb(tmp_path):
    Image.new("LA", (8, 8)).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "image not found"),
        (lambda p: p.write_text("hello, not an image"), "cannot read image"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "cannot read image"),
        (lambda p: Image.new("RGB", (1, 1)).save(p, format="PNG"), "too small"),
    ],
    ids=["missing", "text-file", "corrupt-png", "one-pixel"],
)
def test_bad_images_raise_one_line_input_errors(tmp_path, make, message):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(InputError, match=message) as error:
        load_image(path)
    assert "\n" not in str(error.value)


def test_truncated_png_is_caught_at_load(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read image"):
        load_image(tmp_path / "cut.png")


def test_unknown_sample_lists_the_choices():
    with pytest.raises(InputError, match="astronaut"):
        load_image("sample:nope")


def test_probe_scene_source_is_the_generated_scene():
    from workbench.data.probe_scenes import generate_scene, scene_seed

    expected = generate_scene(scene_seed("test", 3)).image.convert("RGB")
    np.testing.assert_array_equal(np.asarray(load_image("probe:test:3")), np.asarray(expected))
    with pytest.raises(InputError, match="probe:SPLIT:INDEX"):
        load_image("probe:nosuchsplit:1")
