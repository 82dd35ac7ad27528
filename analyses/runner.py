"""Run a per-batch analysis step over an image set, resumably, with progress.

`run_batches` cuts the image set into fixed batches, skips the batches a previous attempt of the
same run already finished (see `workbench.store`), records unreadable images in the manifest,
and returns every batch's table (and tensors) concatenated in image order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from workbench.data.image_sets import ImageItem, ImageSet, load_batch
from workbench.errors import InputError
from workbench.store import RunStore

BatchStep = Callable[[Sequence[ImageItem], Sequence[Image.Image]], tuple[pd.DataFrame, dict[str, torch.Tensor]]]


def run_batches(store: RunStore, images: ImageSet, batch_size: int, part: str, step: BatchStep,
                description: str) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Apply `step` to every batch of readable images; resume-safe; results in image order."""
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1 (got {batch_size})")
    starts = range(0, len(images.items), batch_size)
    tables: list[pd.DataFrame] = []
    tensors: dict[str, list[torch.Tensor]] = {}
    with tqdm(total=len(images.items), desc=description, unit="image", leave=False) as progress:
        for index, start in enumerate(starts):
            batch = images.items[start:start + batch_size]
            if not store.has_part(part, index):
                good, pil_images, skipped = load_batch(batch)
                store.record_skipped(skipped)
                table, batch_tensors = step(good, pil_images) if good else (pd.DataFrame(), {})
                store.write_part(part, index, table, batch_tensors)
            table, batch_tensors = store.read_part(part, index)
            tables.append(table)
            for key, value in batch_tensors.items():
                tensors.setdefault(key, []).append(value)
            progress.update(len(batch))
    readable = [table for table in tables if len(table)]
    if not readable:
        raise InputError(f"none of the {len(images.items)} images of {images.source!r} could be read "
                         f"(see skipped_images in {store.folder / 'manifest.json'})")
    return pd.concat(readable, ignore_index=True), {key: torch.cat(values) for key, values in tensors.items()}

