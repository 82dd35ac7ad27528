"""Exact-match VQA accuracy on probe scenes: the benchmark every efficient model is judged on.

`evaluate_vqa` asks a model questions about probe scenes of one split and scores its greedy
answers by exact match after a light normalisation (`normalise_answer`). The answers come from a
`Generator` (default: the loaded model's own `generate_text`), so any way of running the model
(an efficient model, a hooked one) is scored the same way. Two references are measured on the
same questions in the same run, so a score can be read against them:

- majority: per question type, the most common answer of that type over the first
  `MAJORITY_TRAIN_SCENES` train scenes (what a model that ignores both image and question
  wording can reach);
- no vision: the same model with its projector output replaced by zeros, so the LLM sees
  the prompt and the visual-token positions but no visual content (what language priors
  alone reach). It runs the loaded model itself, whatever the generator; `references=False`
  skips it (its accuracy is then NaN).

The prompt is the question exactly as the probe scenes phrase it, inside the model's chat
template with one image (`build_inputs`).
"""

from __future__ import annotations

import functools
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from workbench.data.probe_scenes import (
    QUESTION_TYPES,
    SPLITS,
    ProbeScene,
    QAPair,
    generate_scene,
    iter_split,
    scene_seed,
)
from workbench.errors import InputError
from workbench.models.inputs import build_inputs
from workbench.models.loading import LoadedModel

MAJORITY_TRAIN_SCENES = 2000
EXAMPLES_PER_TYPE = 3
NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}

Question = tuple[ProbeScene, QAPair]
Progress = Callable[[int, int], None]  # (questions answered, total), over all model runs
# (inputs of one batch, the ids of its images, max new tokens) -> one answer per row
Generator = Callable[[BatchFeature, Sequence[str], int], list[str]]


def scene_id(scene: ProbeScene) -> str:
    """The id `workbench.data.image_sets` gives the same scene, e.g. "probe:test:3"."""
    return f"probe:{scene.split}:{scene.seed - scene_seed(scene.split, 0)}"


# --- answer matching ------------------------------------------------------------

def normalise_answer(text: str) -> str:
    """The canonical form answers are compared in.

    First non-empty line only (models often add an explanation below), lowercased (which also
    makes text-reading answers case-insensitive), punctuation replaced by spaces ("top-left"
    reads as "top left", "Red." as "red"), number words zero..ten as digits, runs of
    whitespace collapsed to one space.
    """
    first_line = text.strip().split("\n", 1)[0]
    words = re.sub(r"[^\w\s]|_", " ", first_line.lower()).split()
    return " ".join(NUMBER_WORDS.get(word, word) for word in words)


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after `normalise_answer`: "Red." matches "red", "The circle is red" does not."""
    return normalise_answer(prediction) == normalise_answer(answer)


# --- questions and the majority baseline ------------------------------------------

def type_quotas(n: int) -> dict[str, int]:
    """n split evenly over QUESTION_TYPES; the remainder goes to the first types in that order."""
    share, remainder = divmod(n, len(QUESTION_TYPES))
    return {kind: share + (index < remainder) for index, kind in enumerate(QUESTION_TYPES)}


def select_questions(split: str, n: int, seed: int = 0) -> list[Question]:
    """`n` questions from `split`, deterministic and balanced over question types.

    Rule: each type gets a quota (`type_quotas`: n // 6, plus one for the first n % 6 types).
    Scenes of the split are walked in order from index 0; each scene contributes at most one
    question per type whose quota is not yet full, in QUESTION_TYPES order. Where a scene has
    several questions of a type, one is drawn with a generator seeded by (seed, scene seed), so
    `seed` changes the questions but not the scenes walked. Every type occurs in most scenes
    (text in about half), so every quota fills and n questions are always returned, one per
    (scene, type) at most: no duplicates, and many scenes covered.
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    remaining = type_quotas(n)
    selected: list[Question] = []
    index = 0
    while len(selected) < n:
        scene = generate_scene(scene_seed(split, index))
        rng = np.random.default_rng([seed, scene.seed])
        for kind in QUESTION_TYPES:
            candidates = [pair for pair in scene.qa if pair.type == kind]
            if remaining[kind] and candidates:
                selected.append((scene, candidates[int(rng.integers(len(candidates)))]))
                remaining[kind] -= 1
        index += 1
    return selected


def majority_answers(pairs: Iterable[QAPair]) -> dict[str, str]:
    """The most common answer of each question type; ties go to the alphabetically first answer."""
    counts: dict[str, Counter[str]] = {}
    for pair in pairs:
        counts.setdefault(pair.type, Counter())[pair.answer] += 1
    return {kind: min(answers, key=lambda answer: (-answers[answer], answer)) for kind, answers in counts.items()}


@functools.lru_cache(maxsize=1)
def train_majority_answers(num_scenes: int = MAJORITY_TRAIN_SCENES) -> dict[str, str]:
    """`majority_answers` over the first `num_scenes` train scenes (cached: rendering them takes seconds)."""
    return majority_answers(pair for scene in iter_split("train", num_scenes) for pair in scene.qa)


# --- generation -------------------------------------------------------------------

def generate_answers(loaded: LoadedModel, images: Sequence[Image.Image], prompts: Sequence[str],
                     max_new_tokens: int, generator: Generator | None = None,
                     image_ids: Sequence[str] = ()) -> list[str]:
    """Greedy answers for one left-padded batch from `generator` (None: `loaded.generate_text`)."""
    inputs = build_inputs(loaded.processor, images, prompts, device=loaded.device)
    if generator is None:
        return loaded.generate_text(inputs, max_new_tokens)
    return generator(inputs, image_ids, max_new_tokens)


@contextmanager
def projector_zeroed(loaded: LoadedModel) -> Iterator[None]:
    """While inside, the projector outputs zeros: the LLM gets no visual content at visual positions."""
    handle = loaded.adapter.projector.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    try:
        yield
    finally:
        handle.remove()


def answer_questions(loaded: LoadedModel, questions: Sequence[Question], batch_size: int, max_new_tokens: int,
                     on_batch: Callable[[int], None] = lambda answered: None,
                     generator: Generator | None = None) -> list[str]:
    """The model's answer to each question, in order, `batch_size` questions per generate call."""
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        answers += generate_answers(loaded, [scene.image for scene, _ in batch], [pair.question for _, pair in batch],
                                    max_new_tokens, generator, [scene_id(scene) for scene, _ in batch])
        on_batch(len(batch))
    return answers


# --- the report -------------------------------------------------------------------

@dataclass
class Score:
    """Accuracies (fractions in [0, 1]) over `n` questions, and what the image adds (`vision_gain`)."""

    n: int
    model: float
    no_vision: float
    majority: float
    vision_gain: float = field(init=False)  # model minus no-vision: what seeing the image is worth (NaN: not run)

    def __post_init__(self):
        self.vision_gain = self.model - self.no_vision


@dataclass
class Example:
    question: str
    answer: str
    prediction: str
    no_vision_prediction: str | None  # None: the no-vision reference was not run
    majority_answer: str
    correct: bool


@dataclass
class VQAReport:
    model: str
    split: str
    n: int
    seconds: float
    by_type: dict[str, Score]  # only the types that have questions, in QUESTION_TYPES order
    overall: Score  # over all questions (each question counts once)
    examples: dict[str, list[Example]]  # the first EXAMPLES_PER_TYPE questions of each type
    majority_train_scenes: int = MAJORITY_TRAIN_SCENES
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def score(questions: Sequence[Question], predictions: Sequence[str], blind: Sequence[str | None],
          majority: dict[str, str]) -> Score:
    """Accuracies of the model, its no-vision run (NaN where it was not run) and the majority answers."""
    def accuracy(guesses: Iterable[str]) -> float:
        return sum(is_correct(guess, pair.answer) for guess, (_, pair) in zip(guesses, questions)) / len(questions)

    no_vision = float("nan") if None in blind else accuracy(blind)
    return Score(len(questions), accuracy(predictions), no_vision,
                 accuracy(majority.get(pair.type, "") for _, pair in questions))


def build_report(loaded: LoadedModel, split: str, questions: Sequence[Question], predictions: Sequence[str],
                 blind: Sequence[str | None], majority: dict[str, str], seconds: float) -> VQAReport:
    rows = list(zip(questions, predictions, blind))
    by_type: dict[str, Score] = {}
    examples: dict[str, list[Example]] = {}
    for kind in QUESTION_TYPES:
        of_type = [row for row in rows if row[0][1].type == kind]
        if not of_type:
            continue
        kind_questions, kind_predictions, kind_blind = zip(*of_type)
        by_type[kind] = score(kind_questions, kind_predictions, kind_blind, majority)
        examples[kind] = [
            Example(pair.question, pair.answer, prediction, no_vision, majority.get(kind, ""),
                    is_correct(prediction, pair.answer))
            for (_, pair), prediction, no_vision in of_type[:EXAMPLES_PER_TYPE]
        ]
    return VQAReport(model=loaded.name, split=split, n=len(questions), seconds=seconds, by_type=by_type,
                     overall=score(questions, predictions, blind, majority), examples=examples,
                     notes=list(loaded.notes))


def evaluate_vqa(loaded: LoadedModel, split: str = "test", n: int = 500, batch_size: int = 8,
                 max_new_tokens: int = 8, progress: Progress | None = None, generator: Generator | None = None,
                 references: bool = True) -> VQAReport:
    """Score `generator`'s answers (None: `loaded` as it is) on `n` questions of `split` (`select_questions`).

    With `references`, the no-vision run of `loaded` too; the majority answers are always scored.
    """
    if n < 1 or batch_size < 1:
        raise InputError(f"n and batch size must be at least 1 (got n={n}, batch size={batch_size})")
    started = time.perf_counter()
    questions = select_questions(split, n)
    majority = train_majority_answers()
    answered = 0

    def count(batch: int) -> None:
        nonlocal answered
        answered += batch
        if progress is not None:
            progress(answered, (2 if references else 1) * len(questions))

    predictions = answer_questions(loaded, questions, batch_size, max_new_tokens, count, generator)
    blind: list[str | None] = [None] * len(questions)
    if references:
        with projector_zeroed(loaded):
            blind = answer_questions(loaded, questions, batch_size, max_new_tokens, count)
    return build_report(loaded, split, questions, predictions, blind, majority, time.perf_counter() - started)
