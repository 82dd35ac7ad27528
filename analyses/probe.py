"""`wb analyze probe`: the patch-compression benchmark on probe scenes.

1. Linear probes (scikit-learn logistic regression) from a visual token to the shape / colour of
   the object covering its patch, or the character of the text covering it. Per token category
   (alive / dead / sink / all) and per layer: the LLM input (projector output) and the state
   after some LLM layers. Probes train on the first `train_fraction` of the images and are
   scored on the rest, next to the majority-class accuracy of the same test tokens.
2. VQA accuracy on the probe scenes' questions keeping all visual tokens, only the alive ones,
   or a random subset of the same size per image drawn from all its tokens (the matched control),
   and with none. Categories here are the exclusive ones, as in the linear probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from analyses.runner import run_batches
from analyses.token_evidence import ANALYSIS_PROMPT, EvidenceLayers, evidence_from_capture
from analyses.tokens import CATEGORIES, TokenRule, token_rule
from analyses.vqa_conditions import TokenCategories, accuracy_under, removal
from workbench.data.image_sets import ImageItem, ImageSet
from workbench.errors import InputError
from workbench.evaluation.vqa import select_questions
from workbench.models.inputs import build_inputs
from workbench.models.loading import LoadedModel
from workbench.store import RunStore
from workbench.tracing import CaptureSpec, capture

TARGETS = {"shape": ("object", "patch_shape"), "colour": ("object", "patch_colour"), "char": ("text", "patch_char")}
MIN_COVERAGE = 0.6  # patches mostly covered by one thing; mixed patches have no single label
MIN_PROBE_TOKENS = 20


@dataclass(frozen=True)
class ProbeConfig:
    batch_size: int = 8
    layers: tuple[int, ...] | None = None  # LLM layers to probe after; None: five spread over the depth
    train_fraction: float = 0.7
    vqa_questions: int = 60
    vqa_split: str = "val"
    prompt: str = ANALYSIS_PROMPT

    def probe_layers(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            return sorted(set(self.layers))
        return sorted({0, num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers - 1})


def probe_batch(loaded: LoadedModel, rule: TokenRule, items: Sequence[ImageItem], images: Sequence[Image.Image],
                probe_layers: list[int], prompt: str) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Labelled tokens (object / text patches) with their category and their states at each probed layer."""
    layers = EvidenceLayers.for_depth(loaded.adapter.num_llm_layers)
    inputs = build_inputs(loaded.processor, images, [prompt] * len(images), device=loaded.device)
    spec = CaptureSpec(projector_input=True, embeddings=True, tokens="visual",
                       llm_layers=sorted(set(layers.norm_layers) | set(probe_layers)),
                       attention_layers=layers.attention_layers)
    traced = capture(loaded, inputs, spec)
    evidence, _ = evidence_from_capture(loaded, traced, items, rule.topk, layers)
    evidence["category"] = rule.classify(evidence)["category"]
    keep = (evidence["patch_kind"].isin(["object", "text"]) & (evidence["patch_coverage"] >= MIN_COVERAGE)).to_numpy()
    index = torch.tensor(keep)
    tensors = {"input": traced.embeddings[index].half()}
    tensors |= {f"layer{layer}": traced.hidden[layer][index].half() for layer in probe_layers}
    columns = ["image_id", "token", "category", "patch_kind", "patch_shape", "patch_colour", "patch_char"]
    return evidence.loc[keep, columns].reset_index(drop=True), tensors


def fit_probe(features: np.ndarray, labels: np.ndarray, train: np.ndarray) -> tuple[float, float] | None:
    """(probe accuracy, majority accuracy) on the test tokens, or None if there is too little to fit."""
    test = ~train
    if train.sum() < MIN_PROBE_TOKENS or test.sum() < 1 or len(set(labels[train])) < 2:
        return None
    scaler = StandardScaler().fit(features[train])
    probe = LogisticRegression(max_iter=1000).fit(scaler.transform(features[train]), labels[train])
    majority = pd.Series(labels[train]).mode()[0]
    return float(probe.score(scaler.transform(features[test]), labels[test])), float(np.mean(labels[test] == majority))


def probe_table(tokens: pd.DataFrame, tensors: dict[str, torch.Tensor], train_images: set[str]) -> pd.DataFrame:
    rows = []
    train_mask = tokens["image_id"].isin(train_images).to_numpy()
    jobs = [(layer, target, category) for layer in tensors for target in TARGETS
            for category in ("all", "alive", "dead", "sink")]
    for layer, target, category in tqdm(jobs, desc="linear probes", leave=False):
        kind, column = TARGETS[target]
        selected = (tokens["patch_kind"] == kind).to_numpy()
        if category != "all":
            selected = selected & (tokens["category"] == category).to_numpy()
        fitted = fit_probe(tensors[layer][torch.tensor(selected)].float().numpy(), tokens.loc[selected, column].to_numpy(),
                           train_mask[selected])
        rows.append({"layer": layer, "target": target, "category": category,
                     "train_tokens": int((selected & train_mask).sum()), "test_tokens": int((selected & ~train_mask).sum()),
                     "accuracy": np.nan if fitted is None else fitted[0],
                     "majority_accuracy": np.nan if fitted is None else fitted[1]})
    return pd.DataFrame(rows)


def compression_vqa(loaded: LoadedModel, rule: TokenRule, config: ProbeConfig) -> dict:
    """VQA accuracy with all, only alive, a matched random subset of, and no visual tokens."""
    questions = select_questions(config.vqa_split, config.vqa_questions)
    categories = TokenCategories.of_questions(loaded, rule, questions, config.batch_size, groups="exclusive")
    not_alive = ("sink", "dead")
    conditions = {
        "all tokens": None,
        "alive only": removal(loaded, categories, not_alive),
        "random subset, same size": removal(loaded, categories, not_alive, random_from="all"),
        "no visual tokens": removal(loaded, categories, CATEGORIES),
    }
    results = {name: accuracy_under(loaded, questions, condition, config.batch_size)
               for name, condition in tqdm(conditions.items(), desc="VQA conditions", leave=False)}
    return {"questions": len(questions), "split": config.vqa_split, "alive_fraction": categories.fraction("alive"),
            "accuracy": results}


def analyze_probe(loaded: LoadedModel, images: ImageSet, out: str, config: ProbeConfig = ProbeConfig(),
                  tokens_run: str | None = None) -> dict:
    if not images.has_ground_truth:
        raise InputError(f"the probe benchmark needs probe scenes (probe:N), not {images.source!r}")
    store = RunStore.open(out, kind="probe", model=loaded.name, data=images.source,
                          config=asdict(config) | {"tokens_run": tokens_run})
    rule = token_rule(loaded, images, out, tokens_run)
    probe_layers = config.probe_layers(loaded.adapter.num_llm_layers)
    tokens, tensors = run_batches(store, images, config.batch_size, "probe",
                                  lambda items, pil: probe_batch(loaded, rule, items, pil, probe_layers, config.prompt),
                                  "probe features")
    image_ids = list(dict.fromkeys(tokens["image_id"]))
    train_images = set(image_ids[:int(len(image_ids) * config.train_fraction)])
    probes = probe_table(tokens, tensors, train_images)
    store.write_table("probes", probes)
    vqa = compression_vqa(loaded, rule, config) if config.vqa_questions else None
    summary = {"num_images": len(image_ids), "train_images": len(train_images), "vqa": vqa,
               "skipped_images": store.manifest["skipped_images"]}
    store.write_json("summary", summary)
    store.finish(num_llm_layers=loaded.adapter.num_llm_layers)
    return summary
