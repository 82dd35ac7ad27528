"""The run store: atomic files, resume by batch, one writer at a time, and refusing folders of another run."""

import json
import os
import socket
import stat
import subprocess

import pandas as pd
import pytest
import torch

from analyses.runner import run_batches
from workbench.data.image_sets import ImageItem, ImageSet, resolve_image_set
from workbench.errors import FolderInUse, InputError
from workbench.files import LOCK_FILE, RunFolderLock
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


# --- one writer per run folder ---------------------------------------------------------


def write_lock(folder, pid: int, host: str | None = None) -> None:
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                "since": "2025-01-01T00:00:00+0000"}))


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_second_writer_is_refused_in_one_line_until_the_first_finishes(tmp_path):
    first = open_run(tmp_path / "run")
    with pytest.raises(FolderInUse, match=f"in use by process {os.getpid()} on .* since ") as refused:
        open_run(tmp_path / "run")
    assert "\n" not in str(refused.value) and "wait for it" in str(refused.value)
    assert RunStore.load(tmp_path / "run").status == "running"  # readers take no lock
    first.finish()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    open_run(tmp_path / "run").finish()


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(KeyboardInterrupt), open_run(tmp_path / "with") as store:
        run_batches(store, numbered_images(3), 2, "part", lambda items, pil: (_ for _ in ()).throw(KeyboardInterrupt),
                    "test")
    assert not (tmp_path / "with" / LOCK_FILE).exists()
    # As the analyses use it, without `with`: the store is dropped with the error, and its lock with it.
    with pytest.raises(KeyboardInterrupt):
        run_batches(open_run(tmp_path / "bare"), numbered_images(3), 2, "part",
                    lambda items, pil: (_ for _ in ()).throw(KeyboardInterrupt), "test")
    assert not (tmp_path / "bare" / LOCK_FILE).exists()


def test_a_lock_of_a_live_process_holds_and_a_dead_ones_is_taken_over(tmp_path, capsys):
    open_run(tmp_path / "run").close()
    other = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(tmp_path / "run", other.pid)
        with pytest.raises(InputError, match=f"in use by process {other.pid} .*delete .*{LOCK_FILE}"):
            open_run(tmp_path / "run")
    finally:
        other.kill()
        other.wait()
    write_lock(tmp_path / "run", other.pid)  # now dead
    open_run(tmp_path / "run").finish()
    assert f"locked by process {other.pid} (since 2025-01-01T00:00:00+0000), which is gone" in capsys.readouterr().err
    write_lock(tmp_path / "run", dead_pid(), host="another-machine")  # cannot be checked from here
    with pytest.raises(InputError, match="on another-machine"):
        open_run(tmp_path / "run")


def test_a_lock_released_late_leaves_the_lock_that_replaced_it(tmp_path):
    first = RunFolderLock(tmp_path)
    first.acquire()
    (tmp_path / LOCK_FILE).unlink()  # deleted by hand, as the refusal message suggests when a writer is gone
    with RunFolderLock(tmp_path):
        first.release()
        assert (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()


# --- folders left half-made --------------------------------------------------------------


def test_a_folder_whose_start_was_cut_short_is_started_afresh(tmp_path):
    folder = tmp_path / "run"
    (folder / "parts").mkdir(parents=True)  # what an interrupted start leaves (earlier versions: before the manifest)
    (folder / ".manifest.json.123.tmp").write_text("{")
    write_lock(folder, dead_pid())
    table, _ = run_batches(open_run(folder), numbered_images(3), 2, "part", step, "test")
    assert list(table["image_id"]) == ["img0", "img1", "img2"]
    assert json.loads((folder / "manifest.json").read_text())["status"] == "running"
    assert not list(folder.glob(".*.tmp"))


def test_parts_without_a_manifest_are_refused_with_how_to_start_over(tmp_path):
    folder = tmp_path / "run"
    run_batches(open_run(folder), numbered_images(3), 2, "part", step, "test")
    (folder / "manifest.json").unlink()
    with pytest.raises(InputError, match=f"holds parts/ but no manifest.json.*delete {folder} to start over") as error:
        open_run(folder)
    assert "\n" not in str(error.value)
    assert not (folder / LOCK_FILE).exists()


# --- file modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_results_and_parts_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        store = open_run(tmp_path / "run")
        store.write_part("part", 0, pd.DataFrame({"a": [1]}), {"x": torch.zeros(2)})
        store.write_tensors("x", {"x": torch.zeros(2)})
        store.write_table("t", pd.DataFrame({"a": [1]}))
        store.finish()
    finally:
        os.umask(previous)
    files = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert {path.suffix for path in files} == {".json", ".parquet", ".safetensors", ".done"}
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in files} == {path.name: mode for path in files}
