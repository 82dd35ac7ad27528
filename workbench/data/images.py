"""Open images named by the user: a file path, `sample:NAME` for photos shipped in scikit-image /
scikit-learn, or `probe:SPLIT:INDEX` for a generated probe scene (whose ground truth is known).

Every failure (missing file, unreadable or corrupt image, unknown sample) raises `InputError`
with one line naming the source, so callers can report it and move on to the next image.

`to_rgb` is the one conversion from whatever a file holds to the 8-bit RGB the processors expect
(the CLI and the app's uploads both use it): 16- and 32-bit integer and float images are scaled, not
clipped; transparency is composited over `ALPHA_BACKGROUND`; palette, CMYK and bilevel images are
converted; an animation gives its first frame; the EXIF orientation is applied, so photos stand upright.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from workbench.errors import InputError

SAMPLE_PREFIX = "sample:"
PROBE_PREFIX = "probe:"
MIN_IMAGE_SIDE = 2  # a 1x1 "image" cannot cover even one patch meaningfully
ALPHA_BACKGROUND = (255, 255, 255)  # what transparent pixels show: white, as viewers show them on a page
SIXTEEN_BIT_MAX = 65535


def _scaled_to_8_bits(image: Image.Image) -> Image.Image:
    """A grayscale image of 16-bit or 32-bit integers or floats as 8-bit "L", its range mapped, not clipped.

    Integers up to 65535 are read as 16-bit (PNG's 16-bit grayscale opens as "I;16" or "I"); floats in
    [0, 1] as fractions; anything else by its own maximum."""
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max(initial=0.0))
    if image.mode == "F":
        scale = 1.0 if top <= 1.0 else top
    else:
        scale = SIXTEEN_BIT_MAX if top <= SIXTEEN_BIT_MAX else top
    return Image.fromarray(np.clip(np.rint(values / max(scale, 1e-12) * 255), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """8-bit RGB of the image's first frame, however it is stored (see the module docstring)."""
    image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        return _scaled_to_8_bits(image).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image.convert("RGB")


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(file_name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(file_name)

    return load


SAMPLES: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
}


def sample_names() -> list[str]:
    return sorted(SAMPLES)


def load_sample(name: str) -> Image.Image:
    try:
        loader = SAMPLES[name]
    except KeyError:
        raise InputError(f"unknown sample {name!r}; choose one of: {', '.join(sample_names())}") from None
    return Image.fromarray(loader()).convert("RGB")


def load_probe_scene_image(spec: str) -> Image.Image:
    """`SPLIT:INDEX`, e.g. `test:3`: the probe scene with that index in that split."""
    from workbench.data.probe_scenes import SEEDS_PER_SPLIT, SPLITS, generate_scene, scene_seed

    split, _, index = spec.partition(":")
    if split not in SPLITS or not index.isdigit():
        raise InputError(f"bad probe scene {spec!r}: write probe:SPLIT:INDEX with SPLIT one of {', '.join(SPLITS)}")
    if int(index) >= SEEDS_PER_SPLIT:
        raise InputError(f"probe scene {spec!r} does not exist: each split has scenes 0-{SEEDS_PER_SPLIT - 1:,}")
    return generate_scene(scene_seed(split, int(index))).image.convert("RGB")


def load_image(source: str | Path) -> Image.Image:
    """An RGB image from a path, `sample:NAME` or `probe:SPLIT:INDEX`."""
    text = str(source)
    if text.startswith(SAMPLE_PREFIX):
        return load_sample(text[len(SAMPLE_PREFIX) :])
    if text.startswith(PROBE_PREFIX):
        return load_probe_scene_image(text[len(PROBE_PREFIX) :])
    path = Path(text)
    if not path.is_file():
        raise InputError(f"image not found: {path} (give a file path or sample:NAME)")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncated files fail here and not deep in the processor
            rgb = to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f"cannot read image {path}: {error.__class__.__name__}: {str(error).splitlines()[0]}") from None
    return check_image_size(rgb, str(path))


def check_image_size(image: Image.Image, name: str) -> Image.Image:
    if min(image.size) < MIN_IMAGE_SIDE:
        raise InputError(f"image {name} is {image.width}x{image.height} px, too small to split into patches")
    return image
