"""Tests for the probe-scene generator: determinism, exact labels, QA truth, balance, files."""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache

import numpy as np
import pytest

from workbench.data.probe_scenes import (
    COLOURS,
    POSITIONS,
    QUESTION_TYPES,
    SEEDS_PER_SPLIT,
    SHAPES,
    SPLITS,
    TEXT_CODE,
    TEXT_COLOUR,
    TEXT_HALO,
    Background,
    ProbeScene,
    compose_scene,
    generate_scene,
    iter_split,
    label_map,
    load_probe_scenes,
    make_object,
    make_text,
    patch_labels,
    position_phrase,
    scene_seed,
    split_of_seed,
    write_probe_scenes,
)

PHRASE_TO_POSITION = {position_phrase(position): position for position in POSITIONS}


@lru_cache(maxsize=1)
def train_scenes() -> tuple[ProbeScene, ...]:
    return tuple(iter_split("train", 200))


def pixels(scene: ProbeScene) -> np.ndarray:
    return np.asarray(scene.image, dtype=np.int16)


# --- determinism and splits ---------------------------------------------------

def test_same_seed_gives_identical_pixels_and_records():
    seed = scene_seed("val", 17)
    first, second = generate_scene(seed), generate_scene(seed)
    assert np.array_equal(pixels(first), pixels(second))
    assert first.to_record() == second.to_record()
    assert first.split == "val"


def test_different_seeds_give_different_scenes():
    a, b = generate_scene(scene_seed("train", 0)), generate_scene(scene_seed("train", 1))
    assert not np.array_equal(pixels(a), pixels(b))


def test_splits_never_share_seeds():
    seeds = {split: {scene_seed(split, i) for i in (0, 1, 999, SEEDS_PER_SPLIT - 1)} for split in SPLITS}
    for split, split_seeds in seeds.items():
        assert {split_of_seed(seed) for seed in split_seeds} == {split}
    assert max(seeds["train"]) < min(seeds["val"]) and max(seeds["val"]) < min(seeds["test"])
    with pytest.raises(ValueError):
        scene_seed("train", SEEDS_PER_SPLIT)  # would spill into the validation range
    with pytest.raises(ValueError):
        scene_seed("train", -1)
    assert [scene.seed for scene in iter_split("test", 3, start=5)] == [scene_seed("test", i) for i in (5, 6, 7)]


# --- per-pixel and per-patch ground truth ---------------------------------------

def test_label_map_agrees_with_pixels_and_boxes():
    for scene in train_scenes()[:30]:
        image, labels = pixels(scene), label_map(scene)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            is_colour = np.all(image[y0:y1, x0:x1] == COLOURS[obj.colour], axis=-1)
            assert np.array_equal(labels[y0:y1, x0:x1] == 1 + obj.id, is_colour)
            ys, xs = np.nonzero(labels == 1 + obj.id)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box
        is_ink = np.all(image == TEXT_COLOUR, axis=-1)
        is_text = labels >= TEXT_CODE
        assert not np.any(is_ink & ~is_text)
        if scene.text is None:
            assert not is_text.any()
            continue
        for index, (x0, y0, x1, y1) in enumerate(scene.text.char_boxes):
            char_ink = is_ink & (labels == TEXT_CODE + index)
            ys, xs = np.nonzero(char_ink)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            ys, xs = np.nonzero(labels == TEXT_CODE + index)  # ink plus a thin halo
            assert xs.min() >= x0 - TEXT_HALO and xs.max() < x1 + TEXT_HALO
            assert ys.min() >= y0 - TEXT_HALO and ys.max() < y1 + TEXT_HALO


def test_patch_labels_agree_with_drawn_pixels():
    grid = 16  # 14 px patches at 224
    checked = Counter()
    for scene in train_scenes()[:40]:
        image = pixels(scene)
        background = np.array(scene.background.colour)
        labels = patch_labels(scene, grid, grid)
        assert len(labels) == grid * grid
        for label in labels:
            patch = image[label.row * 14:(label.row + 1) * 14, label.col * 14:(label.col + 1) * 14].reshape(-1, 3)
            if label.kind == "object":
                colour = np.array(COLOURS[label.colour])
                exact = np.all(patch == colour, axis=1).sum()
                assert exact >= round(label.coverage * len(patch))
                # The mean can only drift from the object's colour by what the uncovered pixels contribute.
                assert np.abs(patch.mean(axis=0) - colour).max() <= (1 - label.coverage) * 255 + 1e-6
                assert scene.objects[label.object_id].shape == label.shape
            elif label.kind == "text":
                assert label.char in scene.text.string
                # A character owns its ink plus a thin halo, so the patch holds some, not mostly, ink.
                assert np.all(patch == TEXT_COLOUR, axis=1).sum() > 0
                assert patch.mean() < np.mean(background) - 10
            else:
                assert label.object_id == -1 and label.char == ""
                if label.coverage == 1.0:
                    assert np.abs(patch.mean(axis=0) - background).max() < 16
                    assert patch.min() > 150  # no dark text or saturated shape pixels
            checked[label.kind] += 1
    assert checked["object"] > 100 and checked["text"] > 10 and checked["background"] > 1000


def test_planted_scene_gets_expected_labels():
    square = make_object(0, "square", "red", "large", row=1, col=1)
    assert square.box == (86, 86, 136, 136)  # 50 px square centred on the middle cell, px 74..149
    scene = compose_scene([square], make_text("A", row=2, col=2), Background("plain", (220, 220, 220), 0))
    assert scene.image.getpixel((112, 112)) == COLOURS["red"]
    labels = {(label.row, label.col): label for label in patch_labels(scene, 16, 16)}
    for cell in [(7, 7), (7, 8), (8, 7), (8, 8)]:  # patches spanning px 98..126
        assert (labels[cell].kind, labels[cell].shape, labels[cell].colour, labels[cell].coverage) == \
            ("object", "square", "red", 1.0)
    assert (labels[0, 0].kind, labels[0, 0].coverage) == ("background", 1.0)
    assert labels[5, 5].kind == "background"  # px 70..84 lies outside the square
    text_patches = [label for label in labels.values() if label.kind == "text"]
    assert text_patches and all(label.char == "A" and label.row >= 10 and label.col >= 10 for label in text_patches)
    assert scene.caption == 'a large red square in the center and the text "A" at the bottom right.'
    assert len(patch_labels(scene, 7, 5)) == 35  # grids need not divide the image


# --- questions and answers ------------------------------------------------------

def matching(scene: ProbeScene, **attributes: str):
    return [obj for obj in scene.objects if all(getattr(obj, key) == value for key, value in attributes.items())]


def check_answer(scene: ProbeScene, question: str, answer: str, kind: str) -> None:
    """Re-derive the answer from the objects, asserting the question names exactly one target."""
    plural_to_shape = {shape + ("es" if shape.endswith("s") else "s"): shape for shape in SHAPES}
    if kind == "count":
        if question == "How many shapes are there?":
            assert answer == str(len(scene.objects))
        elif m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
            assert answer == str(len(matching(scene, colour=m[1])))
        else:
            m = re.fullmatch(r"How many (\w+) are there\?", question)
            assert answer == str(len(matching(scene, shape=plural_to_shape[m[1]])))
    elif kind == "exists":
        if question == "Is there any text?":
            assert answer == ("yes" if scene.text else "no")
        else:
            m = re.fullmatch(r"Is there an? (\w+) (\w+)\?", question)
            assert answer == ("yes" if matching(scene, colour=m[1], shape=m[2]) else "no")
    elif kind == "colour":
        m = re.fullmatch(r"What colour is the (\w+)( (?:in|on|at) the [\w ]+)?\?", question)
        where = {"position": PHRASE_TO_POSITION[m[2].strip()]} if m[2] else {}
        (target,) = matching(scene, shape=m[1], **where)
        assert answer == target.colour
    elif kind == "shape":
        if m := re.fullmatch(r"What is the shape of the (\w+) object\?", question):
            (target,) = matching(scene, colour=m[1])
        else:
            m = re.fullmatch(r"What shape is ((?:in|on|at) the [\w ]+)\?", question)
            (target,) = matching(scene, position=PHRASE_TO_POSITION[m[1]])
        assert answer == target.shape
    elif kind == "position":
        if question == "Where is the text?":
            assert answer == scene.text.position
        else:
            m = re.fullmatch(r"Where is the (\w+) (\w+)\?", question)
            (target,) = matching(scene, colour=m[1], shape=m[2])
            assert answer == target.position
    else:
        assert kind == "text" and question == "What does the text say?" and answer == scene.text.string


def test_answers_follow_from_the_objects():
    for scene in train_scenes()[:100]:
        for pair in scene.qa:
            check_answer(scene, pair.question, pair.answer, pair.type)
        assert ("How many shapes are there?", str(len(scene.objects))) in [(p.question, p.answer) for p in scene.qa]


def test_caption_mentions_every_item_once():
    for scene in train_scenes()[:50]:
        for obj in scene.objects:
            assert f"{obj.size} {obj.colour} {obj.shape} {position_phrase(obj.position)}" in scene.caption
        if scene.text is not None:
            assert f'the text "{scene.text.string}"' in scene.caption
        assert len(re.findall(r"\ban? (?:small|large) ", scene.caption)) == len(scene.objects)


# --- distribution -----------------------------------------------------------------

def test_distribution_covers_everything_and_is_balanced():
    scenes = train_scenes()
    objects = [obj for scene in scenes for obj in scene.objects]
    assert {obj.shape for obj in objects} == set(SHAPES)
    assert {obj.colour for obj in objects} == set(COLOURS)
    assert {obj.position for obj in objects} == set(POSITIONS)
    assert {obj.size for obj in objects} == {"small", "large"}
    assert {len(scene.objects) for scene in scenes} == {1, 2, 3, 4}
    assert {scene.background.kind for scene in scenes} == {"plain", "noise", "stripes"}
    assert 0.3 < np.mean([scene.text is not None for scene in scenes]) < 0.7
    pairs = [pair for scene in scenes for pair in scene.qa]
    assert {pair.type for pair in pairs} == set(QUESTION_TYPES)
    yes_share = np.mean([pair.answer == "yes" for pair in pairs if pair.type == "exists"])
    assert 0.3 <= yes_share <= 0.7
    count_answers = Counter(pair.answer for pair in pairs if pair.type == "count")
    assert set(count_answers) == {"0", "1", "2", "3", "4"}


# --- files --------------------------------------------------------------------------

def test_write_probe_scenes_round_trips(tmp_path):
    jsonl_path = write_probe_scenes(tmp_path / "scenes", n=5, seed=7, split="val")
    assert sorted(p.name for p in jsonl_path.parent.glob("*.png")) == [f"{i:04d}.png" for i in range(5)]
    records = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert len(records) == 5
    loaded = load_probe_scenes(jsonl_path)
    for number, (record, scene) in enumerate(zip(records, loaded)):
        original = generate_scene(scene_seed("val", 7 + number))
        assert record["file"] == f"{number:04d}.png" and record["seed"] == original.seed
        assert json.loads(json.dumps(scene.to_record())) == {k: v for k, v in record.items() if k != "file"}
        assert np.array_equal(pixels(scene), pixels(original))
        # The record alone is enough to re-render the exact pixels.
        assert np.array_equal(pixels(ProbeScene.from_record(record)), pixels(original))
