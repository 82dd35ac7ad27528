"""VQA evaluation: answer matching, question selection, references, batched generation, `wb eval vqa`."""

import json
import math
from collections import Counter

import pytest
import torch

from workbench.data.probe_scenes import QUESTION_TYPES, QAPair
from workbench.errors import InputError
from workbench.evaluation.vqa import (
    evaluate_vqa,
    generate_answers,
    is_correct,
    majority_answers,
    normalise_answer,
    projector_zeroed,
    scene_id,
    select_questions,
    type_quotas,
)
from workbench.models.inputs import build_inputs
from workbench.tracing import CaptureSpec, capture

MATCHING_CASES = [
    ("red", "red", True),
    ("Red.", "red", True),
    ("  RED!  ", "red", True),
    ("red\nThe circle is red because ...", "red", True),  # only the first line counts
    ("The circle is red", "red", False),  # exact match means exact
    ("Top left.", "top left", True),
    ("top  left", "top left", True),
    ("top-left", "top left", True),
    ("left", "top left", False),
    ("top left", "left", False),
    ("Two.", "2", True),
    ("2", "2", True),
    ("zero", "0", True),
    ("ten", "10", True),
    ("three", "2", False),
    ("Yes.", "yes", True),
    ("Yes, there is.", "yes", False),
    ("no", "yes", False),
    ("ab3k", "AB3K", True),  # reading text is case-insensitive
    ('"AB3K"', "AB3K", True),
    ("AB3", "AB3K", False),
    ("", "red", False),
]


@pytest.mark.parametrize("prediction, answer, expected", MATCHING_CASES)
def test_exact_match_after_normalisation(prediction, answer, expected):
    assert is_correct(prediction, answer) is expected


def test_normalised_form():
    assert normalise_answer("  The  Circle is RED.\nmore") == "the circle is red"
    assert normalise_answer("One, two, three!") == "1 2 3"


def test_questions_are_deterministic_balanced_and_distinct():
    questions = select_questions("test", 120)
    assert [(scene.seed, pair) for scene, pair in questions] == [
        (scene.seed, pair) for scene, pair in select_questions("test", 120)]
    assert Counter(pair.type for _, pair in questions) == {kind: 20 for kind in QUESTION_TYPES}
    assert len({(scene.seed, pair.question) for scene, pair in questions}) == 120
    # At most one question per type per scene, so many scenes are covered.
    assert len({(scene.seed, pair.type) for scene, pair in questions}) == 120
    assert all(scene.split == "test" and pair in scene.qa for scene, pair in questions)
    other_seed = select_questions("test", 120, seed=1)
    assert [pair for _, pair in other_seed] != [pair for _, pair in questions]


def test_quotas_spread_the_remainder_over_the_first_types():
    assert type_quotas(8) == {"colour": 2, "shape": 2, "count": 1, "position": 1, "text": 1, "exists": 1}
    assert sum(type_quotas(500).values()) == 500
    assert Counter(pair.type for _, pair in select_questions("val", 8)) == type_quotas(8)


def test_unknown_split_is_an_input_error():
    with pytest.raises(InputError, match="unknown split"):
        select_questions("dev", 6)


def test_majority_answer_per_type():
    pairs = [QAPair("q", answer, kind) for kind, answer in [
        ("colour", "red"), ("colour", "blue"), ("colour", "blue"),
        ("count", "2"), ("count", "1"),  # a tie goes to the alphabetically first answer
        ("exists", "no"), ("exists", "yes"), ("exists", "yes"), ("exists", "no"), ("exists", "no"),
    ]]
    assert majority_answers(pairs) == {"colour": "blue", "count": "1", "exists": "no"}


def test_no_vision_zeros_what_the_llm_receives_at_visual_positions(default_model):
    scene, pair = select_questions("test", 1)[0]
    inputs = build_inputs(default_model.processor, [scene.image], [pair.question])
    with projector_zeroed(default_model):
        blind = capture(default_model, inputs, CaptureSpec(embeddings=True))
    assert blind.visual("embeddings").shape[0] == 256
    assert torch.all(blind.visual("embeddings") == 0)
    assert torch.all(blind.embeddings[blind.text_mask].norm(dim=-1) > 0)  # text is untouched
    assert not default_model.adapter.projector._forward_hooks
    seeing = capture(default_model, inputs, CaptureSpec(embeddings=True))
    assert torch.all(seeing.visual("embeddings").norm(dim=-1) > 0)


def test_no_vision_hook_is_removed_on_error(default_model):
    with pytest.raises(RuntimeError), projector_zeroed(default_model):
        raise RuntimeError("generation failed")
    assert not default_model.adapter.projector._forward_hooks


@pytest.mark.slow
def test_batched_generation_equals_one_by_one(default_model):
    questions = select_questions("test", 4)  # colour, shape, count, position: prompts of different lengths
    images = [scene.image for scene, _ in questions]
    prompts = [pair.question for _, pair in questions]
    padding = build_inputs(default_model.processor, images, prompts)["attention_mask"]
    assert not padding.bool().all(), "the batch should need left padding for this test to mean anything"
    batched = generate_answers(default_model, images, prompts, max_new_tokens=4)
    one_by_one = [generate_answers(default_model, [image], [prompt], max_new_tokens=4)[0]
                  for image, prompt in zip(images, prompts)]
    assert batched == one_by_one


def test_a_generator_gives_the_answers_and_the_no_vision_run_can_be_skipped(default_model):
    calls, progress = [], []

    def always_yes(inputs, image_ids, max_new_tokens):
        calls.append((list(image_ids), max_new_tokens, inputs["input_ids"].shape[0]))
        return ["Yes."] * len(image_ids)

    report = evaluate_vqa(default_model, n=12, batch_size=5, max_new_tokens=3, generator=always_yes,
                          references=False, progress=lambda done, total: progress.append((done, total)))
    questions = select_questions("test", 12)
    assert [ids for ids, _, _ in calls] == [[scene_id(scene) for scene, _ in questions[start:start + 5]]
                                            for start in range(0, 12, 5)]
    assert all(tokens == 3 and rows == len(ids) for ids, tokens, rows in calls)
    assert progress[-1] == (12, 12)
    assert report.overall.model == sum(is_correct("Yes.", pair.answer) for _, pair in questions) / 12
    assert math.isnan(report.overall.no_vision) and all(math.isnan(row.no_vision) for row in report.by_type.values())
    assert all(example.no_vision_prediction is None for examples in report.examples.values() for example in examples)


@pytest.mark.slow
def test_wb_eval_vqa_json(default_model, run_wb):
    code, out, _ = run_wb("eval", "vqa", "--n", "6", "--json", model=default_model)
    assert code == 0
    report = json.loads(out)
    assert (report["model"], report["split"], report["n"]) == ("default", "test", 6)
    assert list(report["by_type"]) == list(QUESTION_TYPES)
    rows = [*report["by_type"].values(), report["overall"]]
    assert all(0 <= row[key] <= 1 for row in rows for key in ("model", "no_vision", "majority"))
    assert sum(row["n"] for row in report["by_type"].values()) == report["overall"]["n"] == 6
    assert all(len(examples) == 1 for examples in report["examples"].values())
    assert report["seconds"] > 0 and report["majority_train_scenes"] == 2000
    assert report["notes"] == default_model.notes
