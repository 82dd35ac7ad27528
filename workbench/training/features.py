"""The frozen vision tower's output for a run's training scenes, computed once and cached beside the run.

The cache (float16 safetensors + the scenes' texts and object counts as JSONL) is keyed by the split, the
scene count, a fingerprint of the vision tower and its feature layers, the image size and any extra tower
layers kept (a method that adds what it reads of them inside the LLM, such as internal fusion, needs them), so
a cache from another model or recipe is recomputed, not reused. `FeatureScale` standardises the cached
features per channel.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import safe_open, save_file
from torch import nn
from tqdm.auto import tqdm

from workbench.data.probe_scenes import QAPair, iter_split, scene_seed
from workbench.files import write_atomically, write_text_atomically
from workbench.models.adapter import ArchitectureAdapter

TRAIN_SPLIT = "train"
FEATURES_FILE, SCENES_FILE = "features.safetensors", "scenes.jsonl"
SECONDS_KEY = "seconds"  # metadata: how long the extraction took (not part of the cache key)


def projector_inputs(adapter: ArchitectureAdapter, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the projector consumes for these images, captured at its input inside `get_image_features`."""
    return tower_outputs(adapter, pixel_values)[0]


def tower_outputs(adapter: ArchitectureAdapter, pixel_values: torch.Tensor,
                  extra_layers: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The projector's input for these images and, from the same pass, the vision tower's `hidden_states[l]`
    (the output of layer l - 1, every token) for each of `extra_layers`."""
    captured: list[torch.Tensor] = []
    layers: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(module, args, output):
            layers[index] = output[0] if isinstance(output, tuple) else output
        return hook

    hooks = [adapter.projector.register_forward_pre_hook(lambda module, args: captured.append(args[0]))]
    hooks += [adapter.vision_layers[index - 1].register_forward_hook(keep(index)) for index in extra_layers]
    config = adapter.model.config
    try:
        with torch.no_grad():
            adapter.model.get_image_features(pixel_values=pixel_values,
                                             vision_feature_layer=config.vision_feature_layer,
                                             vision_feature_select_strategy=config.vision_feature_select_strategy)
    finally:
        for hook in hooks:
            hook.remove()
    return captured[0], layers


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
    num_objects: int  # shapes in the scene (what a curriculum orders by)


@dataclass
class CachedFeatures:
    scenes: list[SceneText]
    features: torch.Tensor  # [scenes, visual tokens, vision width] float16: the projector's inputs
    seconds: float  # how long extracting them took, when they were computed
    # hidden-states index -> [scenes, tower tokens, vision width] float16: the extra tower layers kept
    layers: dict[int, torch.Tensor] = field(default_factory=dict)


def feature_metadata(train_scenes: int, fingerprint: str, processor: Any,
                     extra_layers: Sequence[int] = ()) -> dict[str, str]:
    """The cache key: which scenes, which tower and layers, the image size the processor crops to, and the
    extra tower layers kept (only when there are any, so caches without them keep their key)."""
    crop = getattr(processor.image_processor, "crop_size", None)
    extra = {"extra_layers": str(sorted(extra_layers))} if extra_layers else {}
    return {"split": TRAIN_SPLIT, "first_seed": str(scene_seed(TRAIN_SPLIT, 0)), "scenes": str(train_scenes),
            "vision": fingerprint, "crop_size": str(dict(crop) if crop else None)} | extra


def layer_key(index: int) -> str:
    return f"layer_{index}"


def read_cached_features(run_dir: Path, metadata: dict[str, str]) -> CachedFeatures | None:
    features_path, scenes_path = run_dir / FEATURES_FILE, run_dir / SCENES_FILE
    if not (features_path.is_file() and scenes_path.is_file()):
        return None
    with safe_open(features_path, framework="pt") as cache:
        saved = dict(cache.metadata() or {})
        seconds = float(saved.pop(SECONDS_KEY, "nan"))
        if saved != metadata:
            return None
        features = cache.get_tensor("features")
        layers = {index: cache.get_tensor(layer_key(index))
                  for index in json.loads(metadata.get("extra_layers", "[]"))}
    records = [json.loads(line) for line in scenes_path.read_text().splitlines()]
    if any("num_objects" not in record for record in records):
        return None  # a cache from before scenes recorded their object count
    scenes = [SceneText(record["seed"], record["caption"], [QAPair(**pair) for pair in record["qa"]],
                        record["num_objects"]) for record in records]
    return CachedFeatures(scenes, features, seconds, layers)


def extract_features(adapter: ArchitectureAdapter, processor: Any, train_scenes: int, batch_size: int, run_dir: Path,
                     metadata: dict[str, str], device: torch.device, extra_layers: Sequence[int] = ()) -> None:
    """Render the run's scenes, run the vision tower once over them and cache its output (float16) with the texts."""
    started = time.perf_counter()
    scenes = iter_split(TRAIN_SPLIT, train_scenes)
    chunks: list[torch.Tensor] = []
    layer_chunks: dict[int, list[torch.Tensor]] = {index: [] for index in extra_layers}
    texts: list[str] = []
    with tqdm(total=train_scenes, desc="vision features", unit="scene") as progress:
        while len(texts) < train_scenes:
            batch = [next(scenes) for _ in range(min(batch_size, train_scenes - len(texts)))]
            pixel_values = processor.image_processor([scene.image for scene in batch], return_tensors="pt")
            features, layers = tower_outputs(adapter, pixel_values["pixel_values"].to(device), extra_layers)
            chunks.append(features.half().cpu())
            for index, output in layers.items():
                layer_chunks[index].append(output.half().cpu())
            texts += [json.dumps({"seed": scene.seed, "caption": scene.caption,
                                  "qa": [asdict(pair) for pair in scene.qa], "num_objects": len(scene.objects)})
                      for scene in batch]
            progress.update(len(batch))
    write_text_atomically(run_dir / SCENES_FILE, "\n".join(texts) + "\n")
    stamped = metadata | {SECONDS_KEY: f"{time.perf_counter() - started:.1f}"}
    tensors = {"features": torch.cat(chunks)} | {layer_key(index): torch.cat(outputs)
                                                 for index, outputs in layer_chunks.items()}
    write_atomically(run_dir / FEATURES_FILE, lambda target: save_file(tensors, str(target), metadata=stamped))


def prepare_features(adapter: ArchitectureAdapter, processor: Any, train_scenes: int, batch_size: int, run_dir: Path,
                     device: torch.device, extra_layers: Sequence[int] = ()) -> CachedFeatures:
    """The first `train_scenes` train scenes' texts and vision features (and the tower's `extra_layers`), from
    the cache in `run_dir` (computed first if it is missing or was made by another vision tower)."""
    metadata = feature_metadata(train_scenes, vision_fingerprint(adapter), processor, extra_layers)
    cached = read_cached_features(run_dir, metadata)
    if cached is None:
        extract_features(adapter, processor, train_scenes, batch_size, run_dir, metadata, device, extra_layers)
        cached = read_cached_features(run_dir, metadata)  # train on what the cache holds, resumed or not
    return cached


@dataclass
class FeatureScale:
    """Per-channel mean and standard deviation of cached projector inputs.

    Training the projector on standardised features gives every channel the same footing under Adam; that
    matters when several vision layers are concatenated, whose norms differ by 50x on DINOv2 (0.8 at layer
    3, 42 at layer 12), so that the quiet layers' columns would otherwise learn last. `fold_into` then
    rewrites the first linear to take the raw features, so the saved model needs no extra module.
    """

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureScale:
        flat = features.float().reshape(-1, features.shape[-1])
        return cls(flat.mean(0), flat.std(0).clamp_min(1e-4))  # the floor guards channels that never vary

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.float() - self.mean) / self.std).to(features.dtype)

    def fold_into(self, linear: nn.Linear) -> None:
        """Make `linear` compute on raw features what it computed on standardised ones: W x' + b with
        x' = (x - mean) / std is (W / std) x + (b - (W / std) mean)."""
        with torch.no_grad():
            weight = linear.weight / self.std.to(linear.weight)
            linear.weight.copy_(weight)
            linear.bias.sub_(weight @ self.mean.to(weight))


def embeddings_from_features(adapter: ArchitectureAdapter, input_ids: torch.Tensor,
                             features: torch.Tensor) -> torch.Tensor:
    """The LLM's input embeddings from cached projector inputs, equal to the model's own forward on pixels:
    the projected features replace the image tokens' embeddings in order, as `LlavaModel.forward` scatters them."""
    embeddings = adapter.embed_tokens(input_ids)
    visual = adapter.projector(features).to(embeddings.dtype)
    return embeddings.masked_scatter(adapter.visual_token_mask(input_ids)[..., None], visual)
