"""The benchmark harness on the tiny LLaVA: ratios against dense, counted FLOPs, the report files, variant names.

Timings are benchmarks, not tests: nothing here asserts how fast anything ran.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import BatchFeature

from efficient_models.bench import harness, probe_inputs, timing
from efficient_models.bench import results as reports
from efficient_models.bench import variants as variant_builder
from efficient_models.fastv import FastVConfig, fastv_schedule
from efficient_models.pdrop import PyramidDropConfig, pdrop_schedule
from efficient_models.token_schedule import schedule as schedules
from efficient_models.token_schedule.scheduled_model import ScheduledModel, answer_queries
from tests.tiny_models import image_tokens_llava, llava_batch, tiny_llava
from workbench.errors import InputError
from workbench.evaluation.vqa import select_questions
from workbench.flops import ModelShapes
from workbench.models.loading import LoadedModel
from workbench.training.sequences import IGNORE_INDEX

LAYERS = 4
PROMPTS = [[1, 2] + image_tokens_llava() + [3, 4, 5], [1] + image_tokens_llava() + [3, 4, 5, 6, 7]]
ANSWER = [8, 9]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LoadedModel.from_model(tiny_llava(num_layers=LAYERS))


@pytest.fixture(scope="module")
def variants(loaded) -> list[ScheduledModel]:
    return [ScheduledModel(loaded, schedules.dense(LAYERS)),
            ScheduledModel(loaded, fastv_schedule(FastVConfig(num_llm_layers=LAYERS, layer=1, keep=0.5))),
            ScheduledModel(loaded, pdrop_schedule(PyramidDropConfig(num_llm_layers=LAYERS, layers=[1, 2, 3]))),
            ScheduledModel(loaded, schedules.TokenSchedule(LAYERS, 1, 3, {2: 0.25}), "hidrop-like")]


def supervised_batch(prompts: list[list[int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each prompt followed by ANSWER, left-padded, with labels on the answer tokens only."""
    training = llava_batch([row + ANSWER for row in prompts], [1] * len(prompts))
    labels = torch.full_like(training["input_ids"], IGNORE_INDEX)
    labels[:, -len(ANSWER):] = training["input_ids"][:, -len(ANSWER):]
    return training, labels


def tiny_batches() -> probe_inputs.BenchBatches:
    training, labels = supervised_batch(PROMPTS)
    return probe_inputs.BenchBatches(llava_batch(PROMPTS, [1, 1]), training, labels)


@pytest.fixture(scope="module")
def report(variants) -> reports.BenchReport:
    accuracy = {variant.name: reports.Accuracy(overall=0.5 - 0.1 * index, by_type={"colour": 0.5}, n=2)
                for index, variant in enumerate(variants)}
    return harness.benchmark(variants, tiny_batches(), text_tokens=[5, 5, 6], repeats=2, decode_steps=3,
                             accuracy=accuracy, no_vision=reports.Accuracy(overall=0.25, by_type={"colour": 0.25}, n=2))


def test_dense_is_exactly_its_own_reference(report):
    dense = report.variants[0]
    assert dense.name == "dense" and dense.memory_ratio == 1.0
    for figure in (dense.prefill, dense.decode, dense.training_step):
        assert figure.speedup == figure.predicted_speedup == figure.measured_over_predicted == 1.0
    assert dense.average_visual_tokens == 4 and dense.visual_tokens_per_layer == [4] * LAYERS


def test_pruning_variants_count_fewer_flops_and_visual_tokens(report):
    dense, *pruned = report.variants
    assert [variant.name for variant in pruned] == ["fastv", "pdrop", "hidrop-like"]
    for variant in pruned:
        assert variant.prefill_flops.total < dense.prefill_flops.total
        assert variant.average_visual_tokens < dense.average_visual_tokens
        assert variant.prefill.predicted_speedup > 1 and variant.training_step.predicted_speedup > 1
        assert variant.decode.predicted_speedup > 1
        assert variant.prefill_flops.vision == dense.prefill_flops.vision  # the image is encoded in full either way
        # On CPU the memory figure is the KV cache, which holds each layer's (smaller) token set.
        assert report.memory_measure == timing.KV_CACHE and variant.memory_bytes < dense.memory_bytes
    hidrop_like = pruned[-1]
    assert hidrop_like.visual_tokens_per_layer == [0, 4, 1, 0] and hidrop_like.prefill_flops.token_scoring > 0
    assert hidrop_like.prefill.measured_over_predicted == pytest.approx(
        hidrop_like.prefill.speedup / hidrop_like.prefill.predicted_speedup)


def test_flops_per_question_are_the_mean_over_prompt_lengths(loaded, report):
    from workbench.flops import ModelShapes, prefill_flops

    shapes = ModelShapes.of_model(loaded, image_size=(28, 28))
    expected = (2 * prefill_flops(shapes, 5, [4] * LAYERS).total + prefill_flops(shapes, 6, [4] * LAYERS).total) / 3
    assert report.variants[0].prefill_flops.total == pytest.approx(expected)


def test_visual_side_flops_are_what_the_image_adds_to_the_llm(loaded, report):
    from workbench.flops import ModelShapes, prefill_flops

    shapes = ModelShapes.of_model(loaded, image_size=(28, 28))
    dense, *pruned = report.variants
    with_image, without = prefill_flops(shapes, 6, [4] * LAYERS).llm, prefill_flops(shapes, 6, [0] * LAYERS).llm
    assert 0 < dense.visual_side_flops and report.visual_side_share(dense) == 1.0
    assert dense.visual_side_flops == pytest.approx((2 * (prefill_flops(shapes, 5, [4] * LAYERS).llm - prefill_flops(
        shapes, 5, [0] * LAYERS).llm) + with_image - without) / 3)
    assert all(0 < report.visual_side_share(variant) < 1 for variant in pruned)


def test_the_report_files_round_trip(report, tmp_path):
    json_path, plot_path = reports.write_report(report, tmp_path / "bench")
    data = json.loads(json_path.read_text())
    assert data == report.to_dict()
    assert [variant["name"] for variant in data["variants"]] == ["dense", "fastv", "pdrop", "hidrop-like"]
    assert data["variants"][1]["prefill"]["speedup"] > 0 and data["memory_measure"] == timing.KV_CACHE
    assert plot_path.parent == json_path.parent
    html = plot_path.read_text()
    assert all(name in html for name in ("fastv", "pdrop", "hidrop-like")) and "prefill GFLOPs" in html


def test_the_table_prints_every_variant(report):
    from rich.console import Console

    console = Console(record=True, width=200)
    reports.print_report(report, console)
    text = console.export_text()
    assert all(variant.name in text for variant in report.variants) and "accuracy per type" in text


def test_the_first_variant_must_be_dense(variants):
    with pytest.raises(InputError, match="first variant must be dense"):
        harness.benchmark(variants[1:], tiny_batches(), text_tokens=[5], repeats=1, decode_steps=1)


def test_the_training_step_is_the_models_own_answer_loss(loaded, variants):
    """Dense, unpadded: the loss equals cross entropy of the Hugging Face model's logits on the answer tokens."""
    prompt = [1, 2] + image_tokens_llava() + [3, 4, 5]
    training, labels = supervised_batch([prompt, prompt])
    with timing.trainable(loaded):
        loss = timing.training_step(variants[0], training, labels, precision="fp32")
    with torch.no_grad():
        logits = loaded.model(**training).logits
    supervised = labels[:, 1:] != IGNORE_INDEX
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits[:, :-1][supervised], labels[:, 1:][supervised])),
                                        rel=1e-5)
    assert all(parameter.grad is None for parameter in loaded.model.parameters())


@pytest.mark.parametrize("native_bf16, autocast", [(True, True), (False, False)])
def test_the_training_step_runs_in_bf16_autocast_only_where_the_device_has_native_bf16(
        loaded, variants, monkeypatch, native_bf16, autocast):
    monkeypatch.setattr("workbench.training.precision.computes_bf16_natively", lambda device: native_bf16)
    dense = variants[0]
    seen = []

    def training_loss(inputs, labels):
        seen.append(torch.is_autocast_enabled("cpu"))
        return type(dense).training_loss(dense, inputs, labels)

    monkeypatch.setattr(dense, "training_loss", training_loss)
    training, labels = supervised_batch([[1, 2] + image_tokens_llava() + [3, 4, 5]])
    with timing.trainable(loaded):
        timing.training_step(dense, training, labels)  # precision "auto"
    assert seen == [autocast]


def test_trainable_freezes_only_the_vision_tower_and_restores_the_flags(loaded):
    before = [parameter.requires_grad for parameter in loaded.model.parameters()]
    with timing.trainable(loaded):
        assert not any(parameter.requires_grad for parameter in loaded.adapter.vision_tower.parameters())
        assert all(parameter.requires_grad for parameter in loaded.adapter.projector.parameters())
        assert all(parameter.requires_grad for parameter in loaded.adapter.llm_layers.parameters())
    assert [parameter.requires_grad for parameter in loaded.model.parameters()] == before


def test_the_query_is_the_token_before_the_answer():
    _, labels = supervised_batch(PROMPTS)
    queries = answer_queries(labels)
    assert queries.sum(1).tolist() == [1, 1]
    assert queries[:, -len(ANSWER) - 1].all()


def test_probe_batches_supervise_the_answer_right_after_the_evaluation_prompt(default_model):
    questions = select_questions("test", 3)
    batches = probe_inputs.probe_batches(default_model, questions)
    queries = answer_queries(batches.labels)
    for row, (_, pair) in enumerate(questions):
        prompt = batches.prompts["input_ids"][row][batches.prompts["attention_mask"][row].bool()]
        training = batches.training["input_ids"][row][batches.training["attention_mask"][row].bool()]
        query = int(queries[row].nonzero()) - int((batches.training["attention_mask"][row] == 0).sum())
        assert torch.equal(training[:query + 1], prompt)  # the query is the prompt's last token
        answer = batches.labels[row][batches.labels[row] != IGNORE_INDEX]
        assert default_model.processor.tokenizer.decode(answer).startswith(pair.answer)
    assert torch.equal(batches.training["pixel_values"], batches.prompts["pixel_values"])


def test_bad_variant_names_and_missing_options_fail_before_loading(tmp_path):
    with pytest.raises(InputError, match="unknown variant 'fastvv'; choose from dense, fastv"):
        variant_builder.build_variants(["dense", "fastvv"])
    with pytest.raises(InputError, match="variant hidrop needs a finished `wb train hidrop` run: pass --run"):
        variant_builder.build_variants(["hidrop"])
    with pytest.raises(InputError, match="is not a training run"):
        variant_builder.build_variants(["hidrop"], runs=[tmp_path])
    with pytest.raises(InputError, match="variant fastv-matched needs a hidrop config: pass --config"):
        variant_builder.build_variants(["fastv-matched"])
    with pytest.raises(InputError, match="no variants given"):
        variant_builder.build_variants([])
    assert variant_builder.variant_names(["pdrop", "fastv", "dense", "pdrop"]) == ["dense", "pdrop", "fastv"]


def test_wb_bench_reports_a_bad_variant_in_one_line(run_wb):
    code, _, err = run_wb("bench", "--variants", "dense,nope")
    assert code == 2 and err.strip() == ("error: unknown variant 'nope'; choose from dense, fastv, fastv-matched, fusion, fusion-dropin, "
                                         "hidrop, hidrop-dropin, injection, pdrop, pdrop-persistent, vica, vica-dropin")


def test_published_pyramiddrop_refuses_a_shallow_model_and_pdrop_persistent_scales_to_it(loaded, monkeypatch):
    monkeypatch.setattr("workbench.models.loading.load_model", lambda name: loaded)
    with pytest.raises(InputError, match=r"cut layers \[8, 16, 24\] need an LLM of more than 24 layers; this one has 4"):
        variant_builder.build_variants(["dense", "pdrop"])
    _, persistent = variant_builder.build_variants(["dense", "pdrop-persistent"])
    assert persistent.schedule.cuts == {1: 0.5, 2: 0.25, 3: 0.125} and persistent.schedule.positions == "persistent"


def test_wb_bench_keeps_its_trace_subcommand(run_wb):
    code, out, _ = run_wb("bench", "--help")
    assert code == 0 and "trace" in out and "--variants" in out


# --- accuracy, with a stand-in processor (the tiny model has none) -------------------------------

class WordProcessor:
    """Turns each prompt into the image's tokens plus one token per word, and remembers the texts."""

    image_token = "<image>"
    chat_template = "stand-in"
    tokenizer = SimpleNamespace(padding_side="right")

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return self.image_token + " " + messages[0]["content"][1]["text"]

    def __call__(self, images, text, return_tensors, padding):
        self.texts = text
        rows = [image_tokens_llava() + [1] * (len(prompt.split()) - 1) for prompt in text]
        return BatchFeature(llava_batch(rows, [1] * len(rows)))


class ColourExpert(ScheduledModel):
    """Answers colour questions right and everything else wrong (`answers`: question -> (answer, type))."""

    def generate_text(self, inputs, max_new_tokens):
        questions = [text.removeprefix("<image> ") for text in self.loaded.processor.texts]
        return [answer if kind == "colour" else "no idea" for answer, kind in map(self.answers.get, questions)]


def test_accuracy_is_scored_per_question_type_and_prompts_are_counted():
    questions = select_questions("test", 12)
    model = ColourExpert(LoadedModel.from_model(tiny_llava(num_layers=LAYERS), WordProcessor()),
                         schedules.dense(LAYERS))
    model.answers = {pair.question: (pair.answer, pair.type) for _, pair in questions}
    progress = []
    accuracy, no_vision = harness.vqa_accuracy(model, "test", 12, batch_size=5, max_new_tokens=4,
                                               progress=lambda done, total: progress.append(done))
    assert progress == [5, 10, 12] and no_vision is None
    assert accuracy.by_type == {"colour": 1.0, "shape": 0.0, "count": 0.0, "position": 0.0, "text": 0.0,
                                "exists": 0.0}
    assert accuracy.overall == pytest.approx(2 / 12) and accuracy.n == 12
    lengths = probe_inputs.prompt_text_tokens(model.loaded, questions)
    assert lengths == [len(pair.question.split()) for _, pair in questions]


def test_fastv_matched_averages_the_hidrop_configs_visual_tokens_on_the_models_images(default_model, tmp_path,
                                                                                      monkeypatch):
    """The match is made at the visual tokens the processor gives (256 on the default model), not at the
    vision config's image size."""
    from efficient_models.hidrop.config import HiDropConfig
    from efficient_models.hidrop.pyramid import hidrop_schedule
    from workbench.configs import write_config

    config = HiDropConfig(num_llm_layers=30, inject_layer=4, exit_layer=29, schedule="concave", schedule_power=9.2)
    path = write_config(config, tmp_path / "hidrop.yaml")
    monkeypatch.setattr("workbench.models.loading.load_model", lambda name: default_model)
    _, matched = variant_builder.build_variants(["fastv-matched"], configs=[path])
    target = hidrop_schedule(config).average_visual_tokens(256)
    assert matched.schedule.average_visual_tokens(256) == pytest.approx(target, abs=1.0)
    assert matched.describe(ModelShapes.of_model(default_model)).startswith("fastv-matched [0-1:256 2-29:")


def test_the_report_names_the_precision_its_training_step_computed_in(report):
    from rich.console import Console

    from workbench.training.precision import resolve_precision

    assert report.training_precision == resolve_precision("auto", torch.device("cpu"))
    assert report.to_dict()["training_precision"] in ("bf16", "fp32")
    console = Console(record=True, width=200)
    reports.print_report(report, console)
    assert f"ms ({report.training_precision})" in console.export_text()


def test_each_variant_reports_the_share_of_denses_vision_gain_it_keeps(report):
    """Accuracies 50 / 40 / 30 / 20% over a 25% no-vision floor: dense gains 25 points, fastv keeps 15 of them."""
    from rich.console import Console

    kept = [report.vision_gain_kept(variant) for variant in report.variants]
    assert kept == pytest.approx([1.0, 0.6, 0.2, -0.2])
    assert [report.share_of_dense(variant) for variant in report.variants] == pytest.approx([1.0, 0.8, 0.6, 0.4])
    assert [row["vision_gain_kept"] for row in report.to_dict()["variants"]] == pytest.approx(kept)
    console = Console(record=True, width=250)
    reports.print_report(report, console)
    text = console.export_text()
    assert "vision gain kept" in text and "no vision (dense, image zeroed): 25.0%" in text


def test_vqa_scores_carry_the_vision_gain():
    from workbench.evaluation.vqa import Score

    assert Score(10, model=0.6, no_vision=0.2, majority=0.3).vision_gain == pytest.approx(0.4)
