"""`wb analyze vision-layers`: what each vision-tower layer knows about its patches, and which layers
to feed the projector (a layer set for the `fusion` method).

On probe scenes, every patch token of every tower layer (indices into the tower's `hidden_states`:
0 = embeddings .. N = last block) is read once; then, per layer (see `analyses.vision_layer_measures`):
- linear probes of the patch's colour, shape, text character and 3x3 position, split by scene,
  each beside the majority-class accuracy;
- the norm profile: mean token norm and the share of high-norm outlier tokens;
- CKA with the next layer. Stages: contiguous runs of layers where that similarity stays at or above
  `stage_similarity`; a drop below it starts a new stage.
The recommended layers are one per stage (its best mean probe accuracy) plus the base layer the model
already uses (`vision_feature_layer`, as a `hidden_states` index).

Outputs: `probes.parquet` (layer, target, accuracy, majority), `layers.parquet` (layer, mean_norm,
outlier_share, similarity_to_next, stage) and `summary.json` (recommended_layers, num_vision_layers,
base_layer, stages, best_layers, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image

from analyses.runner import run_batches
from analyses.vision_layer_measures import (
    best_layer_per_target,
    consecutive_similarity,
    norm_profile,
    probe_accuracies,
    recommend_layers,
    split_stages,
)
from workbench.data.image_sets import ImageItem, ImageSet
from workbench.data.probe_scenes import patch_labels
from workbench.errors import InputError
from workbench.models.loading import LoadedModel
from workbench.store import RunStore

THIRDS = (("top", "middle", "bottom"), ("left", "centre", "right"))


@dataclass(frozen=True)
class VisionLayersConfig:
    batch_size: int = 8
    train_fraction: float = 0.7
    stage_similarity: float = 0.85  # consecutive CKA below it starts a new stage
    outlier_z: float = 3.5
    probe_tokens: int = 4000  # per target, so that a large run's probes stay quick
    similarity_tokens: int = 2000
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.train_fraction < 1:
            raise InputError(f"train fraction must be between 0 and 1 (got {self.train_fraction})")
        if not 0 < self.stage_similarity <= 1:
            raise InputError(f"stage similarity must be in (0, 1] (got {self.stage_similarity})")


def require_probe_scenes(images: ImageSet) -> ImageSet:
    if not images.has_ground_truth:
        raise InputError(f"vision-layers needs probe scenes (probe:N), not {images.source!r}")
    return images


def check_supported(loaded: LoadedModel) -> None:
    if not loaded.adapter.tower_hidden_states:
        raise InputError(f"vision-layers reads the tower's per-layer hidden states, which the "
                         f"{loaded.model.config.model_type!r} vision tower does not return")


def base_layers(loaded: LoadedModel) -> list[int]:
    """The `hidden_states` indices the model feeds its projector (`vision_feature_layer`, an int or a list,
    negative counting from the end); the last layer in families whose config has no such key (Gemma 3)."""
    feature_layer = getattr(loaded.model.config, "vision_feature_layer", -1)
    count = loaded.adapter.num_vision_layers + 1
    return sorted({layer % count for layer in ([feature_layer] if isinstance(feature_layer, int) else feature_layer)})


@torch.no_grad()
def tower_hidden_states(loaded: LoadedModel, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The tower's `hidden_states` (N + 1 tensors [batch, seq, d]) for a batch of preprocessed images."""
    tower = loaded.adapter.vision_tower
    pixels = pixel_values.to(device=loaded.device, dtype=next(tower.parameters()).dtype)
    return list(tower(pixels, output_hidden_states=True).hidden_states)


def patch_grid(sequence_length: int) -> tuple[int, int]:
    """(prefix tokens, grid side): a square patch grid behind its CLS / register tokens (fewer of them
    than 2 * side + 1, as in every LLaVA tower)."""
    side = math.isqrt(sequence_length)
    return sequence_length - side * side, side


def _position(row: int, col: int, side: int) -> str:
    return f"{THIRDS[0][row * 3 // side]}-{THIRDS[1][col * 3 // side]}"


def vision_batch(loaded: LoadedModel, items: Sequence[ImageItem], images: Sequence[Image.Image]
                 ) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """One row per patch of each image (its ground truth and 3x3 cell) and every layer's patch tokens."""
    pixel_values = loaded.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    hidden = tower_hidden_states(loaded, pixel_values)
    prefix, side = patch_grid(hidden[0].shape[1])
    rows = []
    for item in items:
        for token, label in enumerate(patch_labels(item.scene(), side, side)):
            rows.append({"image_id": item.id, "token": token, "kind": label.kind, "coverage": label.coverage,
                         "colour": label.colour, "shape": label.shape, "char": label.char,
                         "position": _position(label.row, label.col, side)})
    tensors = {f"layer{layer}": states[:, prefix:].reshape(-1, states.shape[-1]).half().cpu()
               for layer, states in enumerate(hidden)}
    return pd.DataFrame(rows), tensors


def layer_table(features: dict[int, torch.Tensor], similarity: list[float], stages: list[list[int]],
                outlier_z: float) -> pd.DataFrame:
    table = norm_profile(features, outlier_z)
    table["similarity_to_next"] = similarity + [np.nan]  # the last layer has no next one
    table["stage"] = [next(index for index, (first, last) in enumerate(stages) if first <= layer <= last)
                      for layer in table["layer"]]
    return table


def analyze_vision_layers(loaded: LoadedModel, images: ImageSet, out: str,
                          config: VisionLayersConfig = VisionLayersConfig()) -> dict:
    require_probe_scenes(images)
    check_supported(loaded)
    store = RunStore.open(out, kind="vision-layers", model=loaded.name, data=images.source, config=asdict(config))
    patches, tensors = run_batches(store, images, config.batch_size, "patches",
                                   lambda items, pil: vision_batch(loaded, items, pil), "vision-tower features")
    features = {int(key.removeprefix("layer")): value for key, value in tensors.items()}
    features = dict(sorted(features.items()))
    image_ids = list(dict.fromkeys(patches["image_id"]))
    train_images = set(image_ids[:max(1, int(len(image_ids) * config.train_fraction))])
    probes = probe_accuracies(patches, features, train_images, config.probe_tokens, config.seed)
    similarity = consecutive_similarity(features, config.similarity_tokens, config.seed)
    stages = split_stages(similarity, config.stage_similarity)
    layers = layer_table(features, similarity, stages, config.outlier_z)
    base = base_layers(loaded)
    summary = {
        "recommended_layers": recommend_layers(probes, stages, base),
        "num_vision_layers": loaded.adapter.num_vision_layers,
        "base_layer": base[-1], "base_layers": base, "stages": stages,
        "best_layers": best_layer_per_target(probes),
        "num_images": len(image_ids), "train_images": len(train_images),
        "skipped_images": store.manifest["skipped_images"],
    }
    store.write_table("probes", probes)
    store.write_table("layers", layers)
    store.write_json("summary", summary)
    store.finish(num_vision_layers=loaded.adapter.num_vision_layers)
    return summary
