"""Open images named by the user: a file path, `sample:NAME` for photos shipped in scikit-image /
scikit-learn, or `probe:SPLIT:INDEX` for a generated probe scene (whose ground truth is known).

Every failure (missing file, unreadable or corrupt image, unknown sample) raises `InputError`
with one line naming the source, so callers can report it and move on to the next image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from workbench.errors import InputError

SAMPLE_PREFIX = "sample:"
PROBE_PREFIX = "probe:"
MIN_IMAGE_SIDE = 2  # a 1x1 "image" cannot cover even one patch meaningfully


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
    from workbench.data.probe_scenes import SPLITS, generate_scene, scene_seed

    split, _, index = spec.partition(":")
    if split not in SPLITS or not index.isdigit():
        raise InputError(f"bad probe scene {spec!r}: write probe:SPLIT:INDEX with SPLIT one of {', '.join(SPLITS)}")
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
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f"cannot read image {path}: {error.__class__.__name__}: {str(error).splitlines()[0]}") from None
    return check_image_size(rgb, str(path))


def check_image_size(image: Image.Image, name: str) -> Image.Image:
    if min(image.size) < MIN_IMAGE_SIDE:
        raise InputError(f"image {name} is {image.width}x{image.height} px, too small to split into patches")
    return image
