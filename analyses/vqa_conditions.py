"""Probe-scene VQA accuracy when the model runs differently, e.g. without some categories of visual tokens.

Each condition is a `Generator` (`workbench.evaluation.vqa`): `scheduled` runs the model under a
`TokenSchedule` (late entry, early exit: `efficient_models.token_schedule.engine`), `hooked` under a hook
`Intervention` (skipped sublayers, cut attention edges). `TokenCategories` categorises the visual
tokens of the questions' images once (with a tokens run's rule); `removal` generates with a set of
categories never entering the LLM, or, as the matched control, the same number of randomly chosen
visual tokens of each image; `accuracy_under` scores the answers of any generator.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Sequence

import numpy as np
import torch
from transformers import BatchFeature

from analyses.token_evidence import EvidenceLayers, token_evidence
from analyses.tokens import TokenRule
from efficient_models.token_schedule import schedule as schedules
from efficient_models.token_schedule.scheduled_model import ScheduledModel
from efficient_models.token_schedule.schedule import TokenSchedule
from workbench.data.image_sets import ImageItem
from workbench.evaluation.vqa import Generator, Question, answer_questions, is_correct, scene_id
from workbench.hook_interventions import Intervention, intervene
from workbench.models.loading import LoadedModel


class TokenCategories:
    """Category of every visual token (row-major) of each question image, by image id."""

    def __init__(self, loaded: LoadedModel, rule: TokenRule, questions: Sequence[Question], batch_size: int):
        scenes = {scene_id(scene): scene for scene, _ in questions}
        layers = EvidenceLayers.for_depth(loaded.adapter.num_llm_layers)
        self.by_image: dict[str, np.ndarray] = {}
        ids = list(scenes)
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size]
            items = [ImageItem(image_id, lambda s=scenes[image_id]: s.image, lambda s=scenes[image_id]: s)
                     for image_id in batch]
            evidence, _ = token_evidence(loaded, items, [scenes[i].image for i in batch], rule.topk, layers)
            categories = rule.classify(evidence)["category"].to_numpy()
            for image_id in batch:
                self.by_image[image_id] = categories[(evidence["image_id"] == image_id).to_numpy()]

    def fraction(self, category: str) -> float:
        return float(np.mean(np.concatenate([c == category for c in self.by_image.values()])))


def scheduled_model(loaded: LoadedModel, schedule: TokenSchedule) -> ScheduledModel:
    model = ScheduledModel(loaded, schedule)
    _ = model.engine  # built now, so a model the engine cannot run fails before any question is asked
    return model


def scheduled(loaded: LoadedModel, schedule: TokenSchedule) -> Generator:
    """Generate with the LLM under `schedule`."""
    model = scheduled_model(loaded, schedule)
    return lambda inputs, image_ids, max_new_tokens: model.generate_text(inputs, max_new_tokens)


def hooked(loaded: LoadedModel, intervention: Intervention) -> Generator:
    """Generate with `intervention` applied to the plain model."""
    intervention.check(loaded.adapter.num_llm_layers)

    def generate(inputs: BatchFeature, image_ids: Sequence[str], max_new_tokens: int) -> list[str]:
        with intervene(loaded, inputs, intervention):
            return loaded.generate_text(inputs, max_new_tokens)
    return generate


def removal(loaded: LoadedModel, categories: TokenCategories, removed: Collection[str],
            random_control: bool = False) -> Generator:
    """Generate with the tokens of the `removed` categories (or as many random visual tokens per image)
    never entering the LLM; every other token keeps its position."""
    model = scheduled_model(loaded, schedules.dense(loaded.adapter.num_llm_layers))

    def generate(inputs: BatchFeature, image_ids: Sequence[str], max_new_tokens: int) -> list[str]:
        mask = removal_mask(loaded, categories, removed, random_control, inputs, image_ids)
        return model.generate_text(inputs, max_new_tokens, removed=mask)
    return generate


def removal_mask(loaded: LoadedModel, categories: TokenCategories, removed: Collection[str], random_control: bool,
                 inputs: BatchFeature, image_ids: Sequence[str]) -> torch.Tensor:
    """[batch, seq] bool: the visual tokens `removal` takes out of this batch."""
    mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for layout, image_id in zip(loaded.adapter.image_layouts(inputs), image_ids):
        hit = np.isin(categories.by_image[image_id], list(removed))
        if random_control:
            chosen = np.random.default_rng(zlib.crc32(image_id.encode())).permutation(len(hit))[:int(hit.sum())]
            hit = np.zeros_like(hit)
            hit[chosen] = True
        mask[layout.sample, layout.positions[torch.from_numpy(hit)]] = True
    return mask


def accuracy_under(loaded: LoadedModel, questions: Sequence[Question], generator: Generator | None,
                   batch_size: int, max_new_tokens: int = 8) -> dict[str, float]:
    """Exact-match accuracy per question type and overall with `generator`'s answers (None: the plain model)."""
    answers = answer_questions(loaded, questions, batch_size, max_new_tokens, generator=generator)
    correct = [is_correct(answer, pair.answer) for answer, (_, pair) in zip(answers, questions)]
    result = {"overall": float(np.mean(correct))}
    for kind in dict.fromkeys(pair.type for _, pair in questions):
        result[kind] = float(np.mean([ok for ok, (_, pair) in zip(correct, questions) if pair.type == kind]))
    return result
