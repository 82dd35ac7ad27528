"""Probe scenes: seeded procedural images with exact, machine-checkable ground truth.

A probe scene places 1-4 coloured shapes and at most one short text item in
distinct cells of a 3x3 layout on a light background. Each scene carries its
objects, text, caption and question/answer pairs, and `patch_labels` says
what covers each patch of any patch grid. The scenes serve three purposes:
they train a small VLM's projector (captions, QA), give per-patch targets
for the linear probes of the patch-compression benchmark, and are the
exact-match accuracy benchmark every efficient model is judged on.

Seeds are split into disjoint train / val / test ranges (`scene_seed`), and
the same seed always yields the same pixels and the same ground truth.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from workbench.data.render import (
    BACKGROUND_KINDS,
    RGB,
    Box,
    background_pixels,
    cell_center,
    centred_text_origin,
    dilate,
    fit_font_size,
    glyph_masks,
    mask_box,
    shape_mask,
)

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Saturated hues only: white/grey would vanish into the light backgrounds and
# black would be confused with the dark text.
COLOURS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 205, 20),
    "green": (40, 160, 60),
    "cyan": (20, 185, 205),
    "blue": (35, 75, 215),
    "purple": (135, 55, 185),
    "pink": (240, 110, 185),
}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
QUESTION_TYPES = ("colour", "shape", "count", "position", "text", "exists")
SIZES = {"small": 0.42, "large": 0.78}  # object extent as a fraction of a cell
SPLITS = ("train", "val", "test")
SEEDS_PER_SPLIT = 100_000_000
IMAGE_SIZE = 224

MAX_OBJECTS = 4
TEXT_PROBABILITY = 0.5
MAX_TEXT_LENGTH = 4
TEXT_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I/1 or O/0 look-alikes
TEXT_COLOUR: RGB = (20, 20, 20)
CELL_EDGE_MARGIN = 3  # px kept free at cell borders so neighbouring items never touch
QA_STREAM = 1  # QA sampling gets its own random stream so planted scenes are seeded too

# Label-map codes: background, 1 + object id, or TEXT_CODE + character index.
BACKGROUND_CODE = 0
TEXT_CODE = 16
TEXT_HALO = 2  # px; thin enough that a patch won by a character still shows its ink


def position_name(row: int, col: int) -> str:
    return POSITIONS[row * 3 + col]


def position_phrase(position: str) -> str:
    """'in the center', 'on the left', 'at the top right', ..."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


@dataclass(frozen=True)
class SceneObject:
    id: int
    shape: str
    colour: str
    size: str
    row: int
    col: int
    center: tuple[int, int]
    extent: int  # nominal diameter in px
    box: Box  # tight pixel box (x0, y0, x1, y1), exclusive ends

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class TextItem:
    string: str
    row: int
    col: int
    origin: tuple[int, int]  # Pillow drawing origin of the first character
    font_size: int
    box: Box
    char_boxes: tuple[Box, ...]

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class Background:
    kind: str  # one of render.BACKGROUND_KINDS
    colour: RGB
    texture_seed: int


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    type: str  # one of QUESTION_TYPES


@dataclass(frozen=True)
class PatchLabel:
    row: int
    col: int
    kind: str  # "object", "text" or "background"
    object_id: int  # -1 unless kind == "object"
    shape: str
    colour: str
    char: str
    coverage: float  # fraction of the patch's pixels carrying the majority label


@dataclass
class ProbeScene:
    image: Image.Image
    objects: list[SceneObject]
    text: TextItem | None
    background: Background
    caption: str
    qa: list[QAPair]
    seed: int
    split: str

    @property
    def image_size(self) -> int:
        return self.image.size[0]

    def to_record(self) -> dict[str, Any]:
        """JSON-serialisable ground truth; `from_record` rebuilds the scene, image included."""
        return {
            "seed": self.seed,
            "split": self.split,
            "image_size": self.image_size,
            "objects": [asdict(obj) | {"position": obj.position} for obj in self.objects],
            "text": None if self.text is None else asdict(self.text) | {"position": self.text.position},
            "background": asdict(self.background),
            "caption": self.caption,
            "qa": [asdict(pair) for pair in self.qa],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], image: Image.Image | None = None) -> ProbeScene:
        """Inverse of `to_record`; without `image` the pixels are re-rendered from the record."""
        objects = [_object_from_dict(item) for item in record["objects"]]
        text = None if record["text"] is None else _text_from_dict(record["text"])
        background = Background(record["background"]["kind"], tuple(record["background"]["colour"]),
                                record["background"]["texture_seed"])
        if image is None:
            image = render_image(objects, text, background, record["image_size"])
        qa = [QAPair(**pair) for pair in record["qa"]]
        return cls(image, objects, text, background, record["caption"], qa, record["seed"], record["split"])


def _object_from_dict(item: dict[str, Any]) -> SceneObject:
    return SceneObject(item["id"], item["shape"], item["colour"], item["size"], item["row"], item["col"],
                       tuple(item["center"]), item["extent"], tuple(item["box"]))


def _text_from_dict(item: dict[str, Any]) -> TextItem:
    return TextItem(item["string"], item["row"], item["col"], tuple(item["origin"]), item["font_size"],
                    tuple(item["box"]), tuple(tuple(box) for box in item["char_boxes"]))


# --- building scenes -------------------------------------------------------

def make_object(object_id: int, shape: str, colour: str, size: str, row: int, col: int,
                image_size: int = IMAGE_SIZE, offset: tuple[int, int] = (0, 0)) -> SceneObject:
    """An object in cell (row, col), nudged by `offset` px from the cell centre."""
    extent = round(SIZES[size] * (image_size // 3))
    cx, cy = cell_center(row, col, image_size)
    center = (cx + offset[0], cy + offset[1])
    box = mask_box(shape_mask(shape, center, extent, image_size))
    return SceneObject(object_id, shape, colour, size, row, col, center, extent, box)


def make_text(string: str, row: int, col: int, image_size: int = IMAGE_SIZE) -> TextItem:
    """A text item centred in cell (row, col), as large as fits the cell."""
    cell = image_size // 3
    font_size = fit_font_size(string, max_width=int(cell * 0.9), max_height=int(cell * 0.45))
    origin = centred_text_origin(string, font_size, cell_center(row, col, image_size))
    char_boxes = tuple(mask_box(mask) for mask in glyph_masks(string, origin, font_size, image_size))
    box = (min(b[0] for b in char_boxes), min(b[1] for b in char_boxes),
           max(b[2] for b in char_boxes), max(b[3] for b in char_boxes))
    return TextItem(string, row, col, origin, font_size, box, char_boxes)


def _object_mask(obj: SceneObject, image_size: int) -> np.ndarray:
    return shape_mask(obj.shape, obj.center, obj.extent, image_size)


def render_image(objects: list[SceneObject], text: TextItem | None, background: Background,
                 image_size: int = IMAGE_SIZE) -> Image.Image:
    pixels = background_pixels(background.kind, background.colour, background.texture_seed, image_size)
    for obj in objects:
        pixels[_object_mask(obj, image_size)] = COLOURS[obj.colour]
    if text is not None:
        for mask in glyph_masks(text.string, text.origin, text.font_size, image_size):
            pixels[mask] = TEXT_COLOUR
    return Image.fromarray(pixels, "RGB")


def label_map(scene: ProbeScene) -> np.ndarray:
    """(H, W) uint8 map of label codes (see BACKGROUND_CODE / TEXT_CODE).

    Objects own exactly their painted pixels. A character owns its ink plus a
    TEXT_HALO px ring of background around it: thin glyph strokes alone rarely
    fill half a patch, so ink-only labels would almost never let text win a
    patch's majority vote, while the thin ring keeps text patches inked.
    """
    labels = np.full((scene.image_size, scene.image_size), BACKGROUND_CODE, dtype=np.uint8)
    for obj in scene.objects:
        labels[_object_mask(obj, scene.image_size)] = 1 + obj.id
    if scene.text is not None:
        ink = glyph_masks(scene.text.string, scene.text.origin, scene.text.font_size, scene.image_size)
        for index, mask in enumerate(ink):
            labels[mask] = TEXT_CODE + index
        for index, mask in enumerate(ink):  # halos claim only what is still background
            labels[dilate(mask, TEXT_HALO) & (labels == BACKGROUND_CODE)] = TEXT_CODE + index
    return labels


def compose_scene(objects: list[SceneObject], text: TextItem | None, background: Background,
                  seed: int = 0, split: str = "custom", image_size: int = IMAGE_SIZE) -> ProbeScene:
    """Render a scene from explicit parts (used by the generator and for planted test scenes)."""
    image = render_image(objects, text, background, image_size)
    qa = ask_questions(objects, text, np.random.default_rng([QA_STREAM, seed]))
    return ProbeScene(image, objects, text, background, describe(objects, text), qa, seed, split)


def generate_scene(seed: int, image_size: int = IMAGE_SIZE) -> ProbeScene:
    rng = np.random.default_rng(seed)
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    has_text = bool(rng.random() < TEXT_PROBABILITY)
    cells = [int(cell) for cell in rng.choice(9, size=n_objects + has_text, replace=False)]
    objects = [_sample_object(rng, object_id, cell, image_size)
               for object_id, cell in enumerate(sorted(cells[:n_objects]))]  # ids in reading order
    text = _sample_text(rng, cells[n_objects], image_size) if has_text else None
    return compose_scene(objects, text, _sample_background(rng, seed), seed, split_of_seed(seed), image_size)


def _sample_object(rng: np.random.Generator, object_id: int, cell: int, image_size: int) -> SceneObject:
    size = str(rng.choice(list(SIZES)))
    slack = max(0, (image_size // 3 - round(SIZES[size] * (image_size // 3))) // 2 - CELL_EDGE_MARGIN)
    offset = tuple(int(v) for v in rng.integers(-slack, slack + 1, size=2))
    row, col = divmod(cell, 3)
    return make_object(object_id, str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), size,
                       row, col, image_size, offset)


def _sample_text(rng: np.random.Generator, cell: int, image_size: int) -> TextItem:
    length = int(rng.integers(1, MAX_TEXT_LENGTH + 1))
    string = "".join(rng.choice(list(TEXT_ALPHABET), size=length))
    return make_text(string, *divmod(cell, 3), image_size)


def _sample_background(rng: np.random.Generator, seed: int) -> Background:
    grey = int(rng.integers(196, 233))
    colour = tuple(int(np.clip(grey + tint, 0, 255)) for tint in rng.integers(-6, 7, size=3))
    return Background(str(rng.choice(BACKGROUND_KINDS)), colour, seed)


# --- language: caption and questions ----------------------------------------

def _join(phrases: list[str]) -> str:
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + ", and " + phrases[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def describe(objects: list[SceneObject], text: TextItem | None) -> str:
    """Caption listing every item in reading order."""
    items = [((obj.row, obj.col), f"{_article(obj.size)} {obj.size} {obj.colour} {obj.shape} "
                                  f"{position_phrase(obj.position)}") for obj in objects]
    if text is not None:
        items.append(((text.row, text.col), f'the text "{text.string}" {position_phrase(text.position)}'))
    return _join([phrase for _, phrase in sorted(items)]) + "."


def ask_questions(objects: list[SceneObject], text: TextItem | None, rng: np.random.Generator) -> list[QAPair]:
    """All question types that are unambiguous for this scene."""
    return [*_colour_questions(objects), *_shape_questions(objects), *_count_questions(objects, rng),
            *_position_questions(objects, text), *_text_questions(text), *_exists_questions(objects, text, rng)]


def _colour_questions(objects: list[SceneObject]) -> list[QAPair]:
    shape_counts = Counter(obj.shape for obj in objects)
    questions = []
    for obj in objects:
        # A repeated shape is singled out by its cell instead.
        where = "" if shape_counts[obj.shape] == 1 else " " + position_phrase(obj.position)
        questions.append(QAPair(f"What colour is the {obj.shape}{where}?", obj.colour, "colour"))
    return questions


def _shape_questions(objects: list[SceneObject]) -> list[QAPair]:
    colour_counts = Counter(obj.colour for obj in objects)
    questions = [QAPair(f"What shape is {position_phrase(obj.position)}?", obj.shape, "shape") for obj in objects]
    questions += [QAPair(f"What is the shape of the {obj.colour} object?", obj.shape, "shape")
                  for obj in objects if colour_counts[obj.colour] == 1]
    return questions


def _pick(rng: np.random.Generator, present: list[str], universe: Iterable[str]) -> str:
    """Half the time something present, otherwise anything, so counts of zero occur too."""
    pool = sorted(set(present)) if rng.random() < 0.5 else list(universe)
    return str(rng.choice(pool))


def _count_questions(objects: list[SceneObject], rng: np.random.Generator) -> list[QAPair]:
    shape = _pick(rng, [obj.shape for obj in objects], SHAPES)
    colour = _pick(rng, [obj.colour for obj in objects], COLOURS)
    return [
        QAPair("How many shapes are there?", str(len(objects)), "count"),
        QAPair(f"How many {_plural(shape)} are there?", str(sum(o.shape == shape for o in objects)), "count"),
        QAPair(f"How many {colour} shapes are there?", str(sum(o.colour == colour for o in objects)), "count"),
    ]


def _position_questions(objects: list[SceneObject], text: TextItem | None) -> list[QAPair]:
    combo_counts = Counter((obj.colour, obj.shape) for obj in objects)
    questions = [QAPair(f"Where is the {obj.colour} {obj.shape}?", obj.position, "position")
                 for obj in objects if combo_counts[obj.colour, obj.shape] == 1]
    if text is not None:
        questions.append(QAPair("Where is the text?", text.position, "position"))
    return questions


def _text_questions(text: TextItem | None) -> list[QAPair]:
    return [] if text is None else [QAPair("What does the text say?", text.string, "text")]


def _exists_questions(objects: list[SceneObject], text: TextItem | None,
                      rng: np.random.Generator) -> list[QAPair]:
    """One 'no' per 'yes'; half the 'no's are near misses sharing a colour or shape."""
    present = sorted({(obj.colour, obj.shape) for obj in objects})
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    near_misses = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    negatives: list[tuple[str, str]] = []
    for _ in present:
        pool = [combo for combo in (near_misses if rng.random() < 0.5 else absent) if combo not in negatives]
        negatives.append(pool[int(rng.integers(len(pool)))])
    questions = [QAPair(f"Is there {_article(c)} {c} {s}?", answer, "exists")
                 for combos, answer in ((present, "yes"), (negatives, "no")) for c, s in combos]
    questions.append(QAPair("Is there any text?", "no" if text is None else "yes", "exists"))
    return [questions[i] for i in rng.permutation(len(questions))]  # no yes-first ordering to exploit


# --- per-patch ground truth ---------------------------------------------------

def patch_labels(scene: ProbeScene, rows: int, cols: int) -> list[PatchLabel]:
    """Majority label of each patch of a rows x cols grid, row-major."""
    labels = label_map(scene)
    size = scene.image_size
    objects = {1 + obj.id: obj for obj in scene.objects}
    result = []
    for r in range(rows):
        for c in range(cols):
            patch = labels[r * size // rows:(r + 1) * size // rows, c * size // cols:(c + 1) * size // cols]
            counts = np.bincount(patch.ravel())
            code = int(counts.argmax())  # ties go to the lowest code, i.e. background first
            coverage = float(counts[code] / patch.size)
            if code == BACKGROUND_CODE:
                result.append(PatchLabel(r, c, "background", -1, "", "", "", coverage))
            elif code in objects:
                obj = objects[code]
                result.append(PatchLabel(r, c, "object", obj.id, obj.shape, obj.colour, "", coverage))
            else:
                char = scene.text.string[code - TEXT_CODE]
                result.append(PatchLabel(r, c, "text", -1, "", "", char, coverage))
    return result


# --- splits and files -------------------------------------------------------

def scene_seed(split: str, index: int) -> int:
    """Seed of scene `index` of `split`; each split owns a disjoint block of seeds."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < SEEDS_PER_SPLIT:
        raise ValueError(f"index {index} outside [0, {SEEDS_PER_SPLIT})")
    return SPLITS.index(split) * SEEDS_PER_SPLIT + index


def split_of_seed(seed: int) -> str:
    if not 0 <= seed < len(SPLITS) * SEEDS_PER_SPLIT:
        raise ValueError(f"seed {seed} belongs to no split")
    return SPLITS[seed // SEEDS_PER_SPLIT]


def iter_split(split: str, n: int, start: int = 0, image_size: int = IMAGE_SIZE) -> Iterator[ProbeScene]:
    for index in range(start, start + n):
        yield generate_scene(scene_seed(split, index), image_size)


def write_probe_scenes(out_dir: str | Path, n: int, seed: int = 0, split: str = "train") -> Path:
    """Write scenes `seed` .. `seed + n - 1` of `split` as NNNN.png plus scenes.jsonl; return the jsonl path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl_path = out_dir / "scenes.jsonl"
    with jsonl_path.open("w") as jsonl:
        for number, scene in enumerate(iter_split(split, n, start=seed)):
            file_name = f"{number:04d}.png"
            scene.image.save(out_dir / file_name)
            jsonl.write(json.dumps({"file": file_name} | scene.to_record()) + "\n")
    return jsonl_path


def load_probe_scenes(jsonl_path: str | Path) -> list[ProbeScene]:
    """Read back what `write_probe_scenes` wrote, images from their PNG files."""
    jsonl_path = Path(jsonl_path)
    scenes = []
    for line in jsonl_path.read_text().splitlines():
        record = json.loads(line)
        with Image.open(jsonl_path.parent / record["file"]) as image:
            scenes.append(ProbeScene.from_record(record, image.convert("RGB")))
    return scenes
