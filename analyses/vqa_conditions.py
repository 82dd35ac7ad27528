"""Probe-scene VQA accuracy when the model runs differently, e.g. without some categories of visual tokens.

Each condition is a `Generator` (`workbench.evaluation.vqa`): `scheduled` runs the model under a
`TokenSchedule` (late entry, early exit: `efficient_models.token_schedule.engine`), `hooked` under a hook
`Intervention` (skipped sublayers, cut attention edges). `TokenCategories` categorises the visual
tokens of the questions' images once (with a tokens run's rule), keeping both each token's exclusive
category and its reference-group membership (`analyses.tokens`); which of the two the conditions count
by is its `groups`. `removal` generates with the tokens of some categories never entering the LLM, or,
as the matched control, as many tokens of each image drawn at random from a pool: the alive tokens (as
the reference does) or all visual tokens. `accuracy_under` scores the answers of any generator.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from transformers import BatchFeature

from analyses.token_evidence import EvidenceLayers, token_evidence
from analyses.tokens import CATEGORIES, TokenRule
from efficient_models.token_schedule import schedule as schedules
from efficient_models.token_schedule.scheduled_model import ScheduledModel
from efficient_models.token_schedule.schedule import TokenSchedule
from workbench.data.image_sets import ImageItem
from workbench.evaluation.vqa import Generator, Question, answer_questions, is_correct, scene_id
from workbench.hook_interventions import Intervention, intervene
from workbench.models.loading import LoadedModel

GroupSemantics = Literal["reference", "exclusive"]  # count a category by its reference group or exclusively
ControlPool = Literal["alive", "all"]  # where a matched random control draws its tokens from


class TokenCategories:
    """Every visual token (row-major) of each question image: its exclusive `category` and its `in_<group>`
    reference-group membership, by image id. `groups` says which of the two the conditions count by."""

    def __init__(self, by_image: dict[str, pd.DataFrame], groups: GroupSemantics = "reference"):
        self.by_image = by_image
        self.groups = groups

    @classmethod
    def of_questions(cls, loaded: LoadedModel, rule: TokenRule, questions: Sequence[Question], batch_size: int,
                     groups: GroupSemantics = "reference") -> TokenCategories:
        scenes = {scene_id(scene): scene for scene, _ in questions}
        layers = EvidenceLayers.for_depth(loaded.adapter.num_llm_layers)
        by_image: dict[str, pd.DataFrame] = {}
        ids = list(scenes)
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size]
            items = [ImageItem(image_id, lambda s=scenes[image_id]: s.image, lambda s=scenes[image_id]: s)
                     for image_id in batch]
            evidence, _ = token_evidence(loaded, items, [scenes[i].image for i in batch], rule.topk, layers)
            decided = pd.concat([evidence["image_id"], rule.decide(evidence)], axis=1)
            for image_id in batch:
                by_image[image_id] = decided[decided["image_id"] == image_id].reset_index(drop=True)
        return cls(by_image, groups)

    def members(self, image_id: str, category: str, groups: GroupSemantics | None = None) -> np.ndarray:
        """Which tokens of `image_id` count as `category`: its reference group, or the exclusive category
        (`groups`, default this object's)."""
        tokens = self.by_image[image_id]
        if (groups or self.groups) == "reference":
            return tokens[f"in_{category}"].to_numpy(dtype=bool)
        return (tokens["category"] == category).to_numpy()

    def fraction(self, category: str, groups: GroupSemantics | None = None) -> float:
        """Share of all question-image tokens counted as `category` (as the conditions count, by default)."""
        return float(np.mean(np.concatenate([self.members(image_id, category, groups) for image_id in self.by_image])))

    def fractions(self, groups: GroupSemantics | None = None) -> dict[str, float]:
        return {category: self.fraction(category, groups) for category in CATEGORIES}

    def pool(self, image_id: str, draw_from: ControlPool) -> np.ndarray:
        """The tokens of `image_id` a random control drawing from `draw_from` may take."""
        if draw_from == "alive":
            return self.members(image_id, "alive")
        return np.ones(len(self.by_image[image_id]), dtype=bool)

    def removed(self, image_id: str, categories: Collection[str], random_from: ControlPool | None = None
                ) -> np.ndarray:
        """The tokens of `image_id` in any of `categories`, or with `random_from` as many drawn at random from
        that pool (`random_tokens`)."""
        hit = np.any([self.members(image_id, category) for category in categories], axis=0)
        if random_from is None:
            return hit
        return random_tokens(image_id, int(hit.sum()), self.pool(image_id, random_from))

    def control_shortfall(self, categories: Collection[str], random_from: ControlPool) -> dict[str, int]:
        """Images whose pool was smaller than the control's draw, and the tokens taken from outside it."""
        short = [max(0, int(self.removed(image_id, categories).sum()) - int(self.pool(image_id, random_from).sum()))
                 for image_id in self.by_image]
        return {"images": sum(missing > 0 for missing in short), "tokens": sum(short)}


def random_tokens(image_id: str, count: int, pool: np.ndarray) -> np.ndarray:
    """`count` tokens drawn at random from `pool` (a mask), seeded by the image id so every condition and
    rerun draws the same; when the pool is smaller, all of it and random others."""
    rng = np.random.default_rng(zlib.crc32(image_id.encode()))
    chosen = rng.permutation(np.flatnonzero(pool))[:count]
    if len(chosen) < count:
        chosen = np.concatenate([chosen, rng.permutation(np.flatnonzero(~pool))[:count - len(chosen)]])
    drawn = np.zeros(len(pool), dtype=bool)
    drawn[chosen] = True
    return drawn


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
            random_from: ControlPool | None = None) -> Generator:
    """Generate with the tokens of the `removed` categories (or, with `random_from`, as many tokens of each
    image drawn at random from that pool) never entering the LLM; every other token keeps its position."""
    model = scheduled_model(loaded, schedules.dense(loaded.adapter.num_llm_layers))

    def generate(inputs: BatchFeature, image_ids: Sequence[str], max_new_tokens: int) -> list[str]:
        mask = removal_mask(loaded, categories, removed, random_from, inputs, image_ids)
        return model.generate_text(inputs, max_new_tokens, removed=mask)
    return generate


def removal_mask(loaded: LoadedModel, categories: TokenCategories, removed: Collection[str],
                 random_from: ControlPool | None, inputs: BatchFeature, image_ids: Sequence[str]) -> torch.Tensor:
    """[batch, seq] bool: the visual tokens `removal` takes out of this batch."""
    mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    layouts = loaded.adapter.image_layouts(inputs)
    for image, image_id in enumerate(image_ids):
        grids = [layout for layout in layouts if layout.image == image]
        cells = torch.cat([layout.positions for layout in grids])  # the image's tokens in its categories' order
        hit = categories.removed(image_id, removed, random_from)
        mask[grids[0].sample, cells[torch.from_numpy(hit).to(cells.device)]] = True
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
