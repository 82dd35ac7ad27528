"""Sets of images for batch analyses: `probe:N`, `probe:SPLIT:N`, `samples`, or a folder.

- `probe:N` is the first N scenes of the validation split (the test split stays untouched for
  the VQA benchmark); `probe:SPLIT:N` names the split. Items carry their scene, so analyses
  can use the ground truth (patch labels, questions).
- `samples` is the photos shipped in scikit-image / scikit-learn (`sample:NAME`).
- A folder is every image file directly in it, sorted by name.

Images are opened lazily, one batch at a time. An item that cannot be read raises `InputError`
when loaded; `load_batch` returns the good images and the reasons for the others, so a batch run
can record them and go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from workbench.data.images import load_image, sample_names
from workbench.data.probe_scenes import SEEDS_PER_SPLIT, SPLITS, ProbeScene, generate_scene, scene_seed
from workbench.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_PROBE_SPLIT = "val"


@dataclass(frozen=True)
class ImageItem:
    id: str  # stable name of the image within its set, e.g. "probe:val:3" or the file name
    load: Callable[[], Image.Image]
    scene: Callable[[], ProbeScene] | None = None  # ground truth, for probe scenes


@dataclass(frozen=True)
class ImageSet:
    source: str
    items: Sequence[ImageItem]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_ground_truth(self) -> bool:
        # Every probe scene has its ground truth; asking each of a long probe set's items would make them all.
        return isinstance(self.items, ProbeItems) or all(item.scene is not None for item in self.items)


def _probe_item(split: str, index: int) -> ImageItem:
    seed = scene_seed(split, index)
    return ImageItem(f"probe:{split}:{index}", lambda: generate_scene(seed).image.convert("RGB"),
                     lambda: generate_scene(seed))


class ProbeItems(Sequence[ImageItem]):
    """The first `count` scenes of a split, each item made when asked for (a big N costs no memory)."""

    def __init__(self, split: str, count: int):
        self.split, self.count = split, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [_probe_item(self.split, i) for i in range(self.count)[index]]
        return _probe_item(self.split, range(self.count)[index])


def _probe_set(spec: str) -> ProbeItems:
    split, _, count = spec.rpartition(":")
    split = split or DEFAULT_PROBE_SPLIT
    if split not in SPLITS or not count.isdigit() or int(count) < 1:
        raise InputError(f"bad image set 'probe:{spec}': write probe:N or probe:SPLIT:N (N >= 1, SPLIT one of "
                         f"{', '.join(SPLITS)})")
    if int(count) > SEEDS_PER_SPLIT:
        raise InputError(f"image set 'probe:{spec}' asks for more scenes than the split has ({SEEDS_PER_SPLIT:,})")
    return ProbeItems(split, int(count))


def _folder_set(folder: Path) -> list[ImageItem]:
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not files:
        raise InputError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return [ImageItem(path.name, lambda path=path: load_image(path)) for path in files]


def resolve_image_set(source: str) -> ImageSet:
    """The images named by `source` (see the module docstring); errors name the source."""
    if source.startswith("probe:"):
        return ImageSet(source, _probe_set(source.removeprefix("probe:")))
    if source == "samples":
        return ImageSet(source, [ImageItem(f"sample:{name}", lambda name=name: load_image(f"sample:{name}"))
                                 for name in sample_names()])
    folder = Path(source)
    if folder.is_dir():
        return ImageSet(source, _folder_set(folder))
    raise InputError(f"image set {source!r} is not probe:N, probe:SPLIT:N, samples, or an existing folder")


def load_batch(items: Sequence[ImageItem]) -> tuple[list[ImageItem], list[Image.Image], dict[str, str]]:
    """The readable items of a batch with their images, and {id: reason} for the others."""
    good, images, skipped = [], [], {}
    for item in items:
        try:
            images.append(item.load())
        except InputError as error:
            skipped[item.id] = str(error)
            continue
        good.append(item)
    return good, images, skipped
