"""The default model's training recipe: sequences and labels, the cached-feature forward, training and resuming.

Sequences and the forward parity use the real default model and processor; training runs use a tiny
random Llava that shares the real tokenizer (so the real chat template and label masks are exercised)
and takes milliseconds per step.
"""

from __future__ import annotations

import json
from collections import Counter
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from wb.cli import main
from workbench.data.probe_scenes import ProbeScene, QAPair, iter_split
from workbench.models.adapter import adapter_for
from workbench.models.default_model import NUM_IMAGE_TOKENS
from workbench.models.inputs import format_prompt
from workbench.default_recipe import install
from workbench.default_recipe.install import install_run
from workbench.default_recipe.recipe import FocusPhase, RecipeConfig, RecipeError, load_recipe, parse_recipe
from workbench.default_recipe.train import (
    STEP_SEED_STREAM,
    stage_conversations,
    supervised_logits,
    train_default_model,
)
from workbench.errors import InputError, WorkbenchError
from workbench.files import LOCK_FILE
from workbench.models.loading import default_device
from workbench.training import loop
from workbench.training.batches import collate
from workbench.training.features import FeatureScale, SceneText, projector_inputs
from workbench.training.precision import resolve_precision
from workbench.models.visual_input import VisualInput, visual_input_from_metadata
from workbench.training.sequences import (
    IGNORE_INDEX,
    Conversation,
    caption_conversation,
    chat_messages,
    qa_conversations,
    render,
    split_evenly,
    text_segments,
    tokenise_conversation,
)

TINY_IMAGE_TOKENS = 16  # 224 px images in 56 px patches


@pytest.fixture(scope="module")
def processor(default_model):
    return default_model.processor


@pytest.fixture(scope="module")
def scene() -> ProbeScene:
    return next(iter_split("train", 1))


def qa_turns(scene: ProbeScene, count: int) -> tuple[tuple[str, str], ...]:
    return tuple((pair.question, pair.answer) for pair in scene.qa[:count])


def supervised_runs(labels: torch.Tensor) -> list[list[int]]:
    """Maximal runs of consecutive supervised label tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels.tolist():
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


# --- sequences -------------------------------------------------------------------------


def test_first_turn_is_exactly_the_evaluation_prompt(processor, scene):
    tokenised = tokenise_conversation(processor, Conversation(0, qa_turns(scene, 3)), NUM_IMAGE_TOKENS)
    question = scene.qa[0].question
    prompt = processor(text=[format_prompt(processor, question)], images=[scene.image], return_tensors="pt")
    first_label = int((tokenised.labels != IGNORE_INDEX).nonzero()[0])
    assert tokenised.input_ids[:first_label].tolist() == prompt["input_ids"][0].tolist()


@pytest.mark.parametrize("kind", ["questions", "caption"])
def test_labels_cover_exactly_each_answer_and_its_end_of_turn(processor, scene, kind):
    conversation = (Conversation(0, qa_turns(scene, 4)) if kind == "questions"
                    else caption_conversation(0, scene.caption))
    tokenised = tokenise_conversation(processor, conversation, NUM_IMAGE_TOKENS)
    tokenizer = processor.tokenizer
    decoded = [tokenizer.decode(run) for run in supervised_runs(tokenised.labels)]
    assert decoded == [answer + tokenizer.eos_token for _, answer in conversation.turns]
    supervised = tokenised.labels != IGNORE_INDEX
    assert torch.equal(tokenised.labels[supervised], tokenised.input_ids[supervised])
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    assert int((tokenised.input_ids == image_token_id).sum()) == NUM_IMAGE_TOKENS


def test_conversation_tokenises_like_the_processor_on_the_whole_text(processor, scene):
    turns = qa_turns(scene, 5)
    tokenised = tokenise_conversation(processor, Conversation(0, turns), NUM_IMAGE_TOKENS)
    text = render(processor, chat_messages(turns), add_generation_prompt=False)
    reference = processor(text=[text], images=[scene.image], return_tensors="pt")["input_ids"][0]
    assert tokenised.input_ids.tolist() == reference.tolist()


def test_split_evenly_balances_chunks():
    assert [len(chunk) for chunk in split_evenly(list(range(10)), 4)] == [4, 3, 3]
    assert [len(chunk) for chunk in split_evenly(list(range(8)), 8)] == [8]
    assert split_evenly([], 3) == []


@pytest.mark.parametrize("single_question_fraction", [0.0, 1.0])
def test_qa_packing_uses_every_pair_once_within_the_turn_limit(single_question_fraction):
    pairs = [QAPair(f"question {index}?", f"answer {index}", "count") for index in range(23)]
    rng = np.random.default_rng(0)
    conversations = qa_conversations(7, pairs, rng, max_turns=10, single_question_fraction=single_question_fraction)
    turns = [turn for conversation in conversations for turn in conversation.turns]
    assert sorted(turns) == sorted((pair.question, pair.answer) for pair in pairs)
    assert all(conversation.scene == 7 and len(conversation.turns) <= 10 for conversation in conversations)
    assert (len(conversations[0].turns) == 1) == (single_question_fraction == 1.0)


# --- the cached-feature forward ---------------------------------------------------------


@pytest.mark.slow
def test_cached_feature_forward_equals_the_model_forward(default_model, processor, scene):
    tokenised = tokenise_conversation(processor, Conversation(0, qa_turns(scene, 2)), NUM_IMAGE_TOKENS)
    pixel_values = processor.image_processor([scene.image], return_tensors="pt")["pixel_values"]
    features = projector_inputs(default_model.adapter, pixel_values)
    batch = collate([tokenised], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits, targets = supervised_logits(default_model.adapter, batch["input_ids"], batch["labels"], features)
        reference = default_model.model(input_ids=batch["input_ids"], pixel_values=pixel_values).logits[0, :-1]
    supervised = tokenised.labels[1:] != IGNORE_INDEX
    assert torch.equal(targets, tokenised.labels[1:][supervised])
    torch.testing.assert_close(logits, reference[supervised], atol=2e-4, rtol=1e-4)


# --- training on a tiny model -------------------------------------------------------------


def tiny_llava(processor) -> LlavaForConditionalGeneration:
    """A random 2-layer Llava over the real tokenizer's vocabulary, so real conversations fit it."""
    torch.manual_seed(0)
    tokenizer = processor.tokenizer
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                       max_position_embeddings=1024, tie_word_embeddings=True)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=56)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_seq_length=TINY_IMAGE_TOKENS,
                         image_token_id=tokenizer.convert_tokens_to_ids(processor.image_token),
                         tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


def tiny_recipe() -> RecipeConfig:
    shipped = load_recipe()
    short = {"steps": 8, "conversations_per_step": 3, "micro_batch_size": 2, "warmup_steps": 1,
             "learning_rate": 1e-2}
    # Dropout on, so a resumed run must also reproduce each step's random dropout masks.
    lora = shipped.stage2.lora.model_copy(update={"rank": 4, "alpha": 8, "dropout": 0.1})
    return shipped.model_copy(update={
        "train_scenes": 5, "feature_batch_size": 2, "checkpoint_every": 3,
        "stage1": shipped.stage1.model_copy(update=short),
        "stage2": shipped.stage2.model_copy(update=short | {"max_turns": 4, "lora": lora}),
    })


@pytest.fixture(scope="module")
def tiny_loader(processor):
    return lambda: (tiny_llava(processor), processor)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_loader) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny-run")
    train_default_model(tiny_recipe(), run_dir, base_model_loader=tiny_loader)
    return run_dir


def run_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "projector.safetensors") | load_file(run_dir / "lora" / "adapter_model.safetensors")


def test_padded_batch_gives_the_same_logits_as_single_rows(processor, scene):
    adapter = adapter_for(tiny_llava(processor))
    short, long = (tokenise_conversation(processor, Conversation(row, qa_turns(scene, turns)), TINY_IMAGE_TOKENS)
                   for row, turns in ((0, 1), (1, 4)))
    features = torch.randn(2, TINY_IMAGE_TOKENS, 24)
    pad = processor.tokenizer.pad_token_id


    def logits(conversations):
        batch = collate(conversations, pad)
        return supervised_logits(adapter, batch["input_ids"], batch["labels"], features[batch["scenes"]],
                                 batch.get("attention_mask"))[0]

    with torch.no_grad():
        together = logits([short, long])
        apart = [logits([one]) for one in (short, long)]
    assert together.shape[0] > apart[0].shape[0]  # the padded batch really holds both rows
    torch.testing.assert_close(together, torch.cat(apart), atol=1e-5, rtol=1e-5)


def test_training_reduces_the_loss_in_both_stages(tmp_path, monkeypatch, tiny_loader):
    # As on a CPU without native bf16, where `auto` (the shipped recipe's precision) is fp32.
    monkeypatch.setattr("workbench.training.precision.computes_bf16_natively", lambda device: False)
    # One scene, one conversation per step: every step sees the same answers, so the loss must fall.
    config = tiny_recipe()
    config = config.model_copy(update={
        "train_scenes": 1,
        "stage1": config.stage1.model_copy(update={"conversations_per_step": 1}),
        "stage2": config.stage2.model_copy(update={"conversations_per_step": 1, "max_turns": 30}),
    })
    metrics = train_default_model(config, tmp_path, base_model_loader=tiny_loader).metrics
    for stage in ("stage1", "stage2"):
        assert metrics["stages"][stage]["steps"] == 8
        assert metrics["stages"][stage]["loss_last_tenth"] < metrics["stages"][stage]["loss_first_tenth"] - 0.02
    assert metrics["stages"]["stage2"]["answers"] > metrics["stages"]["stage2"]["conversations"]
    assert {"cpu", "cpu_cores", "gpu"} <= set(metrics["hardware"])
    assert metrics["precision"] == {"requested": "auto", "resolved": "fp32"}


def test_simple_scenes_first_orders_the_first_pass_by_object_count():
    scenes = [SceneText(scene.seed, scene.caption, scene.qa, len(scene.objects)) for scene in iter_split("train", 24)]
    config = tiny_recipe()
    one_pass = sum(len(qa_conversations(0, scene.qa, np.random.default_rng(0), config.stage2.max_turns, 0.0))
                   for scene in scenes)
    config = config.model_copy(update={"stage2": config.stage2.model_copy(update={
        "steps": one_pass, "conversations_per_step": 1, "single_question_fraction": 0.0})})

    def object_counts(simple_first: bool) -> list[int]:
        stage2 = config.stage2.model_copy(update={"simple_scenes_first": simple_first})
        conversations = stage_conversations(config.model_copy(update={"stage2": stage2}), "stage2", scenes)
        return [scenes[conversation.scene].num_objects for conversation in conversations]

    curriculum, shuffled = object_counts(True), object_counts(False)
    assert curriculum == sorted(curriculum) and sorted(shuffled) == curriculum  # the same answers, reordered
    assert shuffled != curriculum


def test_a_chat_template_that_does_not_extend_turn_by_turn_is_one_line():
    class LastMessageOnly:  # a template that renders only the newest message, as no training sequence can use
        tokenizer = SimpleNamespace(eos_token="</s>")

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return messages[-1]["content"][-1]["text"] + "</s>" + ("ASSISTANT:" if add_generation_prompt else "")

    with pytest.raises(InputError, match="chat template does not extend a conversation turn by turn"):
        text_segments(LastMessageOnly(), [("q1", "a1"), ("q2", "a2")])


def test_the_focus_phase_asks_only_its_types_about_simple_scenes_then_the_full_mix():
    scenes = [SceneText(scene.seed, scene.caption, scene.qa, len(scene.objects)) for scene in iter_split("train", 24)]
    config = tiny_recipe()
    focus = {"steps": 6, "question_types": ["colour", "shape"], "max_objects": 1}
    stage2 = config.stage2.model_copy(update={"steps": 20, "conversations_per_step": 1,
                                              "focus": [FocusPhase(**focus)]})
    conversations = stage_conversations(config.model_copy(update={"stage2": stage2}), "stage2", scenes)
    asked = {(pair.question, pair.answer): pair.type for scene in scenes for pair in scene.qa}
    first, rest = conversations[:6], conversations[6:]
    assert len(conversations) == 20
    assert {scenes[conversation.scene].num_objects for conversation in first} == {1}
    assert {asked[turn] for conversation in first for turn in conversation.turns} == {"colour", "shape"}
    assert {asked[turn] for conversation in rest for turn in conversation.turns} > {"colour", "shape", "count"}
    unfocused = stage_conversations(config.model_copy(update={"stage2": stage2.model_copy(update={"focus": []})}),
                                    "stage2", scenes)
    assert rest == unfocused[:14]  # the mix is the one an unfocused run starts with


def test_focus_phases_run_in_order_each_with_its_own_types_and_scenes():
    scenes = [SceneText(scene.seed, scene.caption, scene.qa, len(scene.objects)) for scene in iter_split("train", 24)]
    config = tiny_recipe()
    phases = [FocusPhase(steps=4, question_types=["colour"], max_objects=1),
              FocusPhase(steps=3, question_types=["position", "count"], max_objects=2)]
    stage2 = config.stage2.model_copy(update={"steps": 12, "conversations_per_step": 1, "focus": phases})
    conversations = stage_conversations(config.model_copy(update={"stage2": stage2}), "stage2", scenes)
    asked = {(pair.question, pair.answer): pair.type for scene in scenes for pair in scene.qa}

    def types(part):
        return {asked[turn] for conversation in part for turn in conversation.turns}

    first, second = conversations[:4], conversations[4:7]
    assert types(first) == {"colour"} and {scenes[c.scene].num_objects for c in first} == {1}
    assert types(second) == {"position", "count"} and max(scenes[c.scene].num_objects for c in second) == 2
    single = stage_conversations(config.model_copy(update={"stage2": stage2.model_copy(update={"focus": phases[:1]})}),
                                 "stage2", scenes)
    assert conversations[:4] == single[:4]  # a second phase leaves the first one as it was


def test_the_per_type_cap_keeps_at_most_that_many_questions_of_each_type_per_scene_and_pass():
    scenes = [SceneText(scene.seed, scene.caption, scene.qa, len(scene.objects)) for scene in iter_split("train", 24)]
    config = tiny_recipe()
    asked = {(pair.question, pair.answer): pair.type for scene in scenes for pair in scene.qa}

    def first_pass(cap):
        stage2 = config.stage2.model_copy(update={"steps": 400, "conversations_per_step": 1, "max_turns": 100,
                                                  "single_question_fraction": 0.0, "max_questions_per_type": cap})
        conversations = stage_conversations(config.model_copy(update={"stage2": stage2}), "stage2", scenes)
        return conversations[:len(scenes)]  # one conversation per scene and pass at max_turns 100

    capped, uncapped = first_pass(2), first_pass(None)
    for conversation in capped:
        counts = Counter(asked[turn] for turn in conversation.turns)
        available = Counter(pair.type for pair in scenes[conversation.scene].qa)
        assert counts == Counter({kind: min(2, n) for kind, n in available.items()})
    assert sum(len(c.turns) for c in uncapped) == sum(len(scene.qa) for scene in scenes)
    assert sum(len(c.turns) for c in capped) < sum(len(c.turns) for c in uncapped)


def test_a_focus_phase_as_long_as_the_stage_is_refused():
    data = tiny_recipe().model_dump()
    data["stage2"]["focus"] = {"steps": data["stage2"]["steps"], "question_types": ["colour"], "max_objects": 1}
    with pytest.raises(RecipeError, match="stage2: Value error, focus.steps"):
        parse_recipe(data, "test")
    data["stage2"]["focus"] = {"steps": 1, "question_types": ["hue"], "max_objects": 1}
    with pytest.raises(RecipeError, match=r"stage2.focus.0.question_types.0"):
        parse_recipe(data, "test")


def test_an_image_size_off_the_patch_grid_is_one_line(tmp_path, tiny_loader):
    config = tiny_recipe().model_copy(update={"image_size": 100})
    with pytest.raises(WorkbenchError, match="image size 100 is not a multiple of the vision tower's patch size"):
        train_default_model(config, tmp_path, base_model_loader=tiny_loader)


def test_a_folded_feature_scale_makes_the_projector_take_raw_features():
    torch.manual_seed(0)
    features = torch.randn(3, 16, 8) * torch.tensor([0.5, 1, 2, 4, 8, 16, 32, 64]) + 3  # layers of unequal norm
    scale = FeatureScale.of(features)
    standardised = scale.standardise(features).reshape(-1, 8)
    torch.testing.assert_close(standardised.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardised.std(0), torch.ones(8), atol=1e-5, rtol=0)
    linear = torch.nn.Linear(8, 4)
    with torch.no_grad():
        trained = linear(scale.standardise(features))
        scale.fold_into(linear)
        torch.testing.assert_close(linear(features), trained, atol=1e-4, rtol=1e-4)


def test_a_recipe_reading_several_vision_layers_trains_a_projector_that_records_them(tmp_path, tiny_loader):
    config = tiny_recipe().model_copy(update={"vision_feature_layer": [0, -1], "standardise_features": True})
    short = {"steps": 1, "warmup_steps": 0}
    config = config.model_copy(update={"stage1": config.stage1.model_copy(update=short),
                                       "stage2": config.stage2.model_copy(update=short)})
    train_default_model(config, tmp_path, base_model_loader=tiny_loader)
    with safe_open(tmp_path / "projector.safetensors", framework="pt") as projector:
        assert visual_input_from_metadata(projector.metadata()) == VisualInput([0, -1], 224)
        assert projector.get_slice("multi_modal_projector.linear_1.weight").get_shape()[1] == 2 * 24
    with safe_open(tmp_path / "features.safetensors", framework="pt") as cache:
        assert cache.get_slice("features").get_shape()[-1] == 2 * 24  # the cache holds both layers


def test_a_run_records_the_requested_and_the_resolved_precision(finished_run, tmp_path, tiny_loader):
    # `finished_run` trained with the shipped `auto`, resolved on this machine.
    resolved = resolve_precision("auto", torch.device(default_device()))
    assert json.loads((finished_run / "metrics.json").read_text())["precision"] == {"requested": "auto",
                                                                                  "resolved": resolved}
    forced = tiny_recipe().model_copy(update={"precision": "fp32"})
    forced = forced.model_copy(update={"stage1": forced.stage1.model_copy(update={"steps": 1}),
                                       "stage2": forced.stage2.model_copy(update={"steps": 1})})
    metrics = train_default_model(forced, tmp_path, base_model_loader=tiny_loader).metrics
    assert metrics["precision"] == {"requested": "fp32", "resolved": "fp32"}


def test_a_second_process_on_the_run_folder_is_refused(tmp_path, tiny_loader):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "then"}))
    with pytest.raises(WorkbenchError, match=f"in use by process {os.getppid()} .* since then"):
        train_default_model(tiny_recipe(), tmp_path, base_model_loader=tiny_loader)
    assert not (tmp_path / "recipe.yaml").exists()  # refused before touching the folder


@pytest.mark.slow
@pytest.mark.parametrize("stage, step", [("stage1", 4), ("stage2", 5)])
def test_resuming_after_an_interruption_gives_identical_weights(tmp_path, monkeypatch, tiny_loader, finished_run,
                                                                stage, step):
    uninterrupted_seed = loop.step_seed

    def interrupted_seed(entropy, at_step):  # called as each step starts; the entropy names the stage
        if tuple(entropy) == (STEP_SEED_STREAM, 0, int(stage[-1])) and at_step == step:
            raise KeyboardInterrupt
        return uninterrupted_seed(entropy, at_step)

    monkeypatch.setattr(loop, "step_seed", interrupted_seed)
    with pytest.raises(KeyboardInterrupt):
        train_default_model(tiny_recipe(), tmp_path, base_model_loader=tiny_loader)
    monkeypatch.setattr(loop, "step_seed", uninterrupted_seed)
    resumed = train_default_model(tiny_recipe(), tmp_path, base_model_loader=tiny_loader)

    expected, actual = run_weights(finished_run), run_weights(tmp_path)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    straight = json.loads((finished_run / "metrics.json").read_text())
    assert resumed.metrics["stages"][stage]["loss_curve"] == straight["stages"][stage]["loss_curve"]


def test_resuming_with_another_recipe_is_refused(finished_run, tiny_loader):
    other = tiny_recipe().model_copy(update={"seed": 1})
    with pytest.raises(WorkbenchError, match="different recipe"):
        train_default_model(other, finished_run, base_model_loader=tiny_loader)


def test_install_copies_the_run_outputs_with_the_lora_in_bf16(finished_run, tmp_path):
    from safetensors.torch import load_file

    installed = install_run(finished_run, tmp_path)
    assert sorted(path.relative_to(tmp_path).as_posix() for path in installed) == sorted(install.INSTALLED_FILES)
    assert load_recipe(tmp_path / "recipe.yaml") == tiny_recipe()
    trained = load_file(finished_run / "lora" / "adapter_model.safetensors")
    shipped = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert shipped.keys() == trained.keys() and all(value.dtype == torch.bfloat16 for value in shipped.values())
    for key, value in trained.items():
        torch.testing.assert_close(shipped[key].float(), value, rtol=1e-2, atol=1e-6)
    with pytest.raises(RecipeError, match="no finished run"):
        install_run(tmp_path / "nothing-here", tmp_path / "weights")


# --- the recipe file ----------------------------------------------------------------------


def test_shipped_recipe_is_valid_and_unknown_keys_are_rejected():
    shipped = load_recipe()
    data = shipped.model_dump()
    data["stage1"]["lerning_rate"] = 1e-3
    with pytest.raises(RecipeError) as error:
        parse_recipe(data, "bad.yaml")
    assert str(error.value) == "recipe bad.yaml: stage1.lerning_rate: Extra inputs are not permitted"


def test_wb_train_default_reports_a_bad_recipe_in_one_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\nbogus: 1\n")
    monkeypatch.setattr(sys, "argv", ["wb", "train", "default", "--config", str(bad), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith(f"error: recipe {bad}: ")
