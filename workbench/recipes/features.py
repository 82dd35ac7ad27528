"""The frozen vision tower's output for a run's training scenes, computed once and cached beside the run.

The cache (float16 safetensors + the scenes' texts as JSONL) is keyed by the split, the scene count and
a fingerprint of the vision tower, so a cache from another model or recipe is recomputed, not reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors.torch import safe_open, save_file
from tqdm.auto import tqdm

from workbench.data.probe_scenes import QAPair, iter_split, scene_seed
from workbench.models.adapter import ArchitectureAdapter
from workbench.recipes.checkpoints import RunPaths
from workbench.recipes.config import RecipeConfig

TRAIN_SPLIT = "train"


def projector_inputs(adapter: ArchitectureAdapter, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the projector consumes for these images, captured at its input inside `get_image_features`."""
    captured: list[torch.Tensor] = []
    hook = adapter.projector.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    config = adapter.model.config
    try:
        with torch.no_grad():
            adapter.model.get_image_features(pixel_values=pixel_values,
                                             vision_feature_layer=config.vision_feature_layer,
                                             vision_feature_select_strategy=config.vision_feature_select_strategy)
    finally:
        hook.remove()
    return captured[0]


def vision_fingerprint(adapter: ArchitectureAdapter) -> str:
    """Identifies the frozen vision tower and feature selection, so a cache from another model is not reused."""
    digest = hashlib.sha256()
    config = adapter.model.config
    digest.update(f"{config.vision_feature_layer}/{config.vision_feature_select_strategy}".encode())
    for name, tensor in adapter.vision_tower.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class SceneText:
    """What a cached scene is trained on; its pixels live on only as cached features."""

    seed: int
    caption: str
    qa: list[QAPair]


def feature_metadata(config: RecipeConfig, fingerprint: str) -> dict[str, str]:
    return {"split": TRAIN_SPLIT, "first_seed": str(scene_seed(TRAIN_SPLIT, 0)), "scenes": str(config.train_scenes),
            "vision": fingerprint}


def read_cached_features(paths: RunPaths, metadata: dict[str, str]) -> tuple[list[SceneText], torch.Tensor] | None:
    if not (paths.features.is_file() and paths.scenes.is_file()):
        return None
    with safe_open(paths.features, framework="pt") as cache:
        if cache.metadata() != metadata:
            return None
        features = cache.get_tensor("features")
    scenes = [SceneText(record["seed"], record["caption"], [QAPair(**pair) for pair in record["qa"]])
              for record in map(json.loads, paths.scenes.read_text().splitlines())]
    return scenes, features


def extract_features(adapter: ArchitectureAdapter, processor: Any, config: RecipeConfig, paths: RunPaths,
                     metadata: dict[str, str], device: torch.device) -> None:
    """Render the run's scenes, run the vision tower once over them and cache its output (float16) with the texts."""
    scenes = iter_split(TRAIN_SPLIT, config.train_scenes)
    chunks: list[torch.Tensor] = []
    texts: list[str] = []
    with tqdm(total=config.train_scenes, desc="vision features", unit="scene") as progress:
        while len(texts) < config.train_scenes:
            batch = [next(scenes) for _ in range(min(config.feature_batch_size, config.train_scenes - len(texts)))]
            pixel_values = processor.image_processor([scene.image for scene in batch], return_tensors="pt")
            chunks.append(projector_inputs(adapter, pixel_values["pixel_values"].to(device)).half().cpu())
            texts += [json.dumps({"seed": scene.seed, "caption": scene.caption,
                                  "qa": [asdict(pair) for pair in scene.qa]}) for scene in batch]
            progress.update(len(batch))
    paths.scenes.write_text("\n".join(texts) + "\n")
    save_file({"features": torch.cat(chunks)}, paths.features, metadata=metadata)


def prepare_features(adapter: ArchitectureAdapter, processor: Any, config: RecipeConfig, paths: RunPaths,
                     device: torch.device) -> tuple[list[SceneText], torch.Tensor, float]:
    """Cached scene texts and features (computed first if the cache is missing or stale), and seconds spent."""
    started = time.perf_counter()
    metadata = feature_metadata(config, vision_fingerprint(adapter))
    cached = read_cached_features(paths, metadata)
    if cached is None:
        extract_features(adapter, processor, config, paths, metadata, device)
        cached = read_cached_features(paths, metadata)  # train on what the cache holds, resumed or not
    scenes, features = cached
    return scenes, features, time.perf_counter() - started
