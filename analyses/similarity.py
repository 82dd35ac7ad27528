"""`wb analyze similarity`: how much each LLM layer changes visual and text tokens, and where the
image starts and stops changing the text (HiDrop's inter-layer similarity, EmbedLens's passive layers).

Per layer l (0-indexed, state after decoder layer l), averaged over images:
- `visual_self_cos`, `text_self_cos`: cosine between a token's state before and after layer l
  (1 = the layer left it alone), for visual tokens and for the text after the image;
- `vision_effect`: 1 - cosine between the post-image text states with and without access to
  the image (the "without" run is a token schedule whose visual tokens exit before layer 0:
  the text alone, at its positions in the full prompt).

Recommendations (fractions are config values, written with the result):
- injection layer E: the first layer where `vision_effect` reaches `onset` of its maximum;
  layers before it are passive for the text, so visual tokens can enter at E;
- exit layer X: the first layer where `vision_effect` reaches `saturation` of its maximum;
  the text has taken most of what it ever takes from the image by then;
- pruning stages: `num_stages` equal stages between E and X with the concave schedule
  keep(l) = (1 - (l - E) / (X - E)) ** power.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from analyses.runner import run_batches
from analyses.token_evidence import ANALYSIS_PROMPT
from efficient_models.token_schedule.schedule import TokenSchedule
from efficient_models.token_schedule.engine import ScheduledLLM
from workbench.data.image_sets import ImageItem, ImageSet
from workbench.errors import InputError
from workbench.models.inputs import build_inputs
from workbench.models.loading import LoadedModel
from workbench.store import RunStore
from workbench.tracing import CaptureSpec, capture


@dataclass(frozen=True)
class SimilarityConfig:
    batch_size: int = 8
    prompt: str = ANALYSIS_PROMPT
    onset: float = 0.25
    saturation: float = 0.9
    num_stages: int = 3
    power: float = 2.0

    def __post_init__(self):
        if not 0 < self.onset < self.saturation <= 1:
            raise InputError(f"need 0 < onset < saturation <= 1 (got {self.onset}, {self.saturation})")


def _self_cos(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(before.float(), after.float(), dim=-1)


@torch.no_grad()
def text_only_layers(loaded: LoadedModel, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's output [batch, seq, d] on the CPU (as `capture` gives them) when no layer sees the image;
    zeros at the visual tokens."""
    adapter = loaded.adapter
    engine = ScheduledLLM(adapter, TokenSchedule(adapter.num_llm_layers, exit_layer=0))
    output = engine.forward(adapter.input_embeddings(inputs), inputs["input_ids"], inputs["attention_mask"],
                            layer_outputs=True, positions=adapter.position_ids(inputs))
    return [states.cpu() for states in output.layer_outputs]


def layer_similarity(loaded: LoadedModel, items: Sequence[ImageItem], images: Sequence[Image.Image],
                     prompt: str) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """One row per (image, layer) with the three measures of the module docstring."""
    inputs = build_inputs(loaded.processor, images, [prompt] * len(images), device=loaded.device)
    spec = CaptureSpec(embeddings=True, llm_layers="all")
    with_image = capture(loaded, inputs, spec)
    without_image = text_only_layers(loaded, inputs)
    text = with_image.after_image_mask
    rows = []
    for sample, item in enumerate(items):
        visual, words = with_image.visual_mask[sample], text[sample]
        previous = with_image.embeddings[sample]
        for layer in sorted(with_image.hidden):
            states = with_image.hidden[layer][sample]
            blind = without_image[layer][sample]
            rows.append({
                "image_id": item.id, "layer": layer,
                "visual_self_cos": float(_self_cos(previous[visual], states[visual]).mean()),
                "text_self_cos": float(_self_cos(previous[words], states[words]).mean()),
                "vision_effect": float(1 - _self_cos(states[words], blind[words]).mean()),
            })
            previous = states
    return pd.DataFrame(rows), {}


def recommend(curves: pd.DataFrame, config: SimilarityConfig) -> dict:
    """Injection layer, exit layer and pruning stages from the mean curves (see module docstring)."""
    effect = curves["vision_effect"].to_numpy()
    peak = float(effect.max())
    if peak <= 0:
        raise InputError("the image never changes the text's hidden states: nothing to recommend")
    inject = int((effect >= config.onset * peak).argmax())
    exit_layer = max(int((effect >= config.saturation * peak).argmax()), inject + 1)
    span = exit_layer - inject
    starts = sorted({inject + round(span * stage / config.num_stages) for stage in range(config.num_stages)})
    stages = [{"start_layer": start, "keep_fraction": round((1 - (start - inject) / span) ** config.power, 4)}
              for start in starts]
    return {"injection_layer": inject, "exit_layer": exit_layer, "stages": stages,
            "passive_layers": [int(layer) for layer in curves["layer"] if layer < inject],
            "peak_vision_effect": peak}


def analyze_similarity(loaded: LoadedModel, images: ImageSet, out: str,
                       config: SimilarityConfig = SimilarityConfig()) -> dict:
    store = RunStore.open(out, kind="similarity", model=loaded.name, data=images.source, config=asdict(config))
    per_image, _ = run_batches(store, images, config.batch_size, "layers",
                               lambda items, pil: layer_similarity(loaded, items, pil, config.prompt),
                               "layer similarity")
    curves = per_image.drop(columns="image_id").groupby("layer", as_index=False).mean()
    store.write_table("per_image", per_image)
    store.write_table("layers", curves)
    summary = {"num_images": int(per_image["image_id"].nunique()), "recommendation": recommend(curves, config),
               "skipped_images": store.manifest["skipped_images"]}
    store.write_json("summary", summary)
    store.finish(num_llm_layers=loaded.adapter.num_llm_layers)
    return summary
