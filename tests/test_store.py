"""The run store: atomic files, resume by batch, and refusing folders of another run."""

import json

import pandas as pd
import pytest
import torch

from analyses.runner import run_batches
from workbench.data.image_sets import ImageItem, ImageSet, resolve_image_set
from workbench.errors import InputError
from workbench.store import SCHEMA_VERSION, RunStore


def open_run(folder, **overrides):
    identity = {"kind": "tokens", "model": "m", "data": "probe:4", "config": {"topk": 3}} | overrides
    return RunStore.open(folder, **identity)


def test_tables_tensors_and_json_round_trip_without_leftover_temporary_files(tmp_path):
    store = open_run(tmp_path / "run")
    table = pd.DataFrame({"a": [1, 2], "ids": [[1, 2], [3, 4]]})
    store.write_table("t", table)
    store.write_tensors("x", {"w": torch.arange(6.0).reshape(2, 3)})
    store.write_json("summary", {"alive": 0.5})
    read = store.read_table("t")
    assert read["a"].tolist() == [1, 2] and read["ids"].map(list).tolist() == [[1, 2], [3, 4]]
    assert torch.equal(store.read_tensors("x")["w"], torch.arange(6.0).reshape(2, 3))
    assert store.read_json("summary") == {"alive": 0.5}
    assert not [path for path in (tmp_path / "run").rglob("*") if path.name.endswith(".tmp")]


def test_a_folder_of_another_model_config_or_schema_is_refused(tmp_path):
    open_run(tmp_path / "run")
    with pytest.raises(InputError, match="another model"):
        open_run(tmp_path / "run", model="other")
    with pytest.raises(InputError, match="another config"):
        open_run(tmp_path / "run", config={"topk": 5})
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest | {"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(InputError, match="schema version"):
        open_run(tmp_path / "run")
    with pytest.raises(InputError, match="schema version"):
        RunStore.load(tmp_path / "run")


def test_a_non_empty_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        open_run(tmp_path / "run")


def numbered_images(count: int) -> ImageSet:
    from PIL import Image

    return ImageSet("test", [ImageItem(f"img{i}", lambda i=i: Image.new("RGB", (4, 4), (i, 0, 0)))
                             for i in range(count)])


def step(items, images):
    return (pd.DataFrame({"image_id": [item.id for item in items], "red": [image.getpixel((0, 0))[0] for image in images]}),
            {"red": torch.tensor([float(image.getpixel((0, 0))[0]) for image in images])})


def test_an_interrupted_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    images = numbered_images(7)
    calls = []

    def interrupted(items, pil):
        calls.append(items[0].id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(items, pil)

    with pytest.raises(KeyboardInterrupt):
        run_batches(open_run(tmp_path / "a"), images, 2, "part", interrupted, "test")
    calls.clear()
    resumed, resumed_tensors = run_batches(open_run(tmp_path / "a"), images, 2, "part",
                                           lambda items, pil: calls.append(items[0].id) or step(items, pil), "test")
    assert calls == ["img4", "img6"]  # the two finished batches were not computed again
    fresh, fresh_tensors = run_batches(open_run(tmp_path / "b"), images, 2, "part", step, "test")
    assert resumed.equals(fresh)
    assert torch.equal(resumed_tensors["red"], fresh_tensors["red"])


def test_unreadable_images_are_skipped_listed_and_the_run_goes_on(tmp_path):
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "good.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    store = open_run(tmp_path / "run", data=str(tmp_path / "images"))
    table, _ = run_batches(store, resolve_image_set(str(tmp_path / "images")), 4, "part", step, "test")
    assert list(table["image_id"]) == ["good.png"]
    skipped = json.loads((tmp_path / "run" / "manifest.json").read_text())["skipped_images"]
    assert list(skipped) == ["broken.png"] and "cannot read image" in skipped["broken.png"]


def test_image_sets_explain_bad_sources(tmp_path):
    with pytest.raises(InputError, match="no image files"):
        resolve_image_set(str(tmp_path))
    with pytest.raises(InputError, match="not probe:N"):
        resolve_image_set(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="bad image set"):
        resolve_image_set("probe:many")
    probe = resolve_image_set("probe:test:2")
    assert [item.id for item in probe.items] == ["probe:test:0", "probe:test:1"] and probe.has_ground_truth
