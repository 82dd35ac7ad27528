"""Image sources: packaged sample photos, files, and one-line errors for bad images."""

from pathlib import Path

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


def _saved(tmp_path, image: Image.Image, name: str, **options) -> Path:
    path = tmp_path / name
    image.save(path, **options)
    return path


def test_a_16_bit_png_is_scaled_not_whitened(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    rgb = np.asarray(load_image(_saved(tmp_path, Image.fromarray(ramp), "ramp16.png")))
    assert rgb.shape == (64, 64, 3) and abs(rgb.mean() - 127.5) < 1.5  # clipped to 8 bits it was 254
    assert rgb.min() == 0 and rgb.max() == 255


def test_float_images_in_zero_one_are_scaled(tmp_path):
    half = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F")
    assert np.asarray(load_image(_saved(tmp_path, half, "half.tiff"))).mean() == pytest.approx(128, abs=1)


def test_transparency_is_composited_over_white(tmp_path):
    clear_red = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    half_red = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    assert np.asarray(load_image(_saved(tmp_path, clear_red, "clear.png")))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(_saved(tmp_path, half_red, "half.png")))[0, 0].tolist() == [255, 127, 127]
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    path = _saved(tmp_path, palette, "palette.png", transparency=0)
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 255, 255]  # transparent black shows the background


def test_cmyk_palette_and_bilevel_images_become_rgb(tmp_path):
    cyan = np.asarray(load_image(_saved(tmp_path, Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "cyan.jpg")))
    assert cyan[0, 0, 0] < 30 and cyan[0, 0, 1] > 220 and cyan[0, 0, 2] > 220
    palette = Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert np.asarray(load_image(_saved(tmp_path, palette, "p.png")))[0, 0].tolist() == [10, 200, 30]
    assert np.asarray(load_image(_saved(tmp_path, Image.new("1", (8, 8), 1), "one.png")))[0, 0].tolist() == [255] * 3


def test_an_animation_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    first = np.asarray(load_image(path))[0, 0]
    assert first[0] > 200 and first[2] < 50


def test_exif_orientation_stands_the_photo_upright(tmp_path):
    wide = Image.new("RGB", (16, 8))
    exif = wide.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    path = _saved(tmp_path, wide, "turned.jpg", exif=exif)
    assert load_image(path).size == (8, 16)


def test_uploads_use_the_same_conversion():
    from io import BytesIO

    from apps.uploads import image_from_upload

    buffer = BytesIO()
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(buffer, format="PNG")
    assert np.asarray(image_from_upload("grey16.png", buffer.getvalue())).mean() == pytest.approx(128, abs=1)
