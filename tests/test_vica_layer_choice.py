"""ViCA's layer choice: the comparison sets, the choice from a per-layer table, rank agreement, and the
measurement of `wb analyze vica-layers` on a tiny LLaVA (against the plain model, and on a model where
only one planted layer lets the text read the image)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from analyses import vica_layers
from analyses.vica_layers import VicaLayersConfig, analyze_vica_layers, answer_scores, layer_table, measure_cuts
from efficient_models.bench.probe_inputs import BenchBatches
from efficient_models.vica.layer_choice import (
    REFERENCE_7B,
    choose_layers,
    comparison_sets,
    evenly_spaced,
    first_layers,
    layers_from_run,
    proxy_agreement,
    scaled_reference,
    spearman,
)
from tests.tiny_models import LLAVA_IMAGE_ID, image_tokens_llava, llava_batch, qwen_batch, tiny_llava, tiny_qwen2_vl
from workbench.errors import InputError
from workbench.hook_interventions import Intervention, intervene
from workbench.models.loading import LoadedModel
from workbench.store import RunStore
from workbench.tracing import CaptureSpec, capture
from workbench.training.sequences import IGNORE_INDEX

LAYERS = 4
PLANTED = 2
# Prompts of different lengths: left padding puts the images at different columns.
PROMPTS = [[1, 2, *image_tokens_llava(), 3, 4, 5], [1, *image_tokens_llava(), 3, 4, 5, 6, 7],
           [1, 2, 3, *image_tokens_llava(), 6]]
ANSWER_LENGTH = 2


# --- comparison sets ---------------------------------------------------------------

def test_scaled_reference_is_the_pattern_itself_on_32_layers():
    assert scaled_reference(32) == list(REFERENCE_7B)


def test_scaled_reference_on_30_layers_keeps_eight_layers_moving_collisions_up():
    # 0, 1, 7, 8 stay; 9 -> 8.44 and 10 -> 9.38 and 11 -> 10.31 land on taken layers and move up; 14 -> 13.13.
    assert scaled_reference(30) == [0, 1, 7, 8, 9, 10, 11, 13]
    assert scaled_reference(8) == list(range(8))
    with pytest.raises(InputError):
        scaled_reference(7)


def test_evenly_spaced_and_first_layers():
    assert evenly_spaced(30, 4) == [0, 10, 19, 29]
    assert evenly_spaced(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    twelve = evenly_spaced(30, 12)
    assert len(set(twelve)) == 12 and twelve == sorted(twelve) and (twelve[0], twelve[-1]) == (0, 29)
    assert evenly_spaced(4, 4) == first_layers(4, 4) == [0, 1, 2, 3]
    assert first_layers(30, 8) == list(range(8))
    for bad in (0, 31):
        with pytest.raises(InputError):
            evenly_spaced(30, bad)


def test_comparison_sets_name_every_set_for_k_4_8_12():
    loss = [0.0] * 30
    loss[5] = loss[17] = loss[23] = loss[2] = 1.0
    sets = comparison_sets(30, per_layer_loss=loss)
    assert sets["chosen-4"] == [2, 5, 17, 23]
    assert sets["even-8"] == evenly_spaced(30, 8) and sets["first-12"] == list(range(12))
    assert sets["reference-7b-scaled"] == [0, 1, 7, 8, 9, 10, 11, 13]
    assert len(sets) == 10


# --- the choice and the agreement -----------------------------------------------------

def test_choose_layers_takes_the_largest_losses_ties_to_the_earlier_layer():
    assert choose_layers([0.1, 0.5, 0.2, 0.9, 0.2], 2) == [1, 3]
    assert choose_layers([0.1, 0.5, 0.2, 0.9, 0.2], 3) == [1, 2, 3]  # 2 and 4 tie: the earlier wins
    assert choose_layers({7: 1.0, 3: 2.0, 5: 0.0}, 1) == [3]
    with pytest.raises(InputError):
        choose_layers([0.1, float("nan")], 1)
    with pytest.raises(InputError):
        choose_layers([0.1, 0.2], 3)


def test_spearman_on_a_known_pair():
    # Ranks of the second list with its tie averaged: 1, 2, 3.5, 5, 3.5; r = 8 / sqrt(10 * 9.5).
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))
    with pytest.raises(InputError):
        spearman([1, 2], [1, 2, 3])


def test_proxy_agreement_table():
    table = pd.DataFrame({"layer": range(6), "loss_increase": [0.0, 0.9, 0.1, 0.8, 0.3, 0.2],
                          "same": [0.0, 9.0, 1.0, 8.0, 3.0, 2.0], "reversed": [6.0, 1.0, 5.0, 2.0, 3.0, 4.0]})
    agreement = proxy_agreement(table, proxies=("same", "reversed"), ks=(2, 4, 8)).set_index("proxy")
    assert list(agreement.columns) == ["spearman", "top2_overlap", "top4_overlap"]  # 8 > 6 layers: left out
    assert agreement.loc["same"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert agreement.loc["reversed"].tolist() == pytest.approx([-1.0, 0.0, 0.5])
    with pytest.raises(InputError):
        proxy_agreement(table, proxies=("missing",))


def fake_store(kind: str, layers: pd.DataFrame) -> SimpleNamespace:
    return SimpleNamespace(manifest={"kind": kind}, folder="runs/x", read_table=lambda name: layers)


def test_layers_from_run_reads_vica_layers_and_similarity_runs():
    direct = pd.DataFrame({"layer": [2, 0, 1, 3], "loss_increase": [0.5, 0.1, 0.7, 0.2],
                           "loss_change": [0.5, 0.9, 0.7, 0.2]})
    assert layers_from_run(fake_store("vica-layers", direct), 2) == [1, 2]
    assert layers_from_run(fake_store("vica-layers", direct), 2, measure="loss_change") == [0, 1]
    with pytest.raises(InputError):
        layers_from_run(fake_store("vica-layers", direct), 2, measure="attention_mass")
    # Similarity: the largest steps of the cumulative curve 0.1, 0.15, 0.6, 0.62 (steps 0.1, 0.05, 0.45, 0.02).
    curve = pd.DataFrame({"layer": range(4), "vision_effect": [0.1, 0.15, 0.6, 0.62]})
    assert layers_from_run(fake_store("similarity", curve), 2) == [0, 2]
    with pytest.raises(InputError):
        layers_from_run(fake_store("tokens", direct), 2)


# --- the measurement on a tiny model ----------------------------------------------------

def supervised(loaded: LoadedModel, prompts=PROMPTS) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each prompt followed by the model's own greedy answer, left-padded, labels on the answer only: the
    intact model answers every row correctly, so what a cut loses is measured from a clean start."""
    prompt_batch = llava_batch(prompts, [1] * len(prompts))
    with torch.no_grad():
        answers = loaded.model.generate(**prompt_batch, max_new_tokens=ANSWER_LENGTH, do_sample=False,
                                        min_new_tokens=ANSWER_LENGTH)[:, -ANSWER_LENGTH:]
    training = llava_batch([row + answer.tolist() for row, answer in zip(prompts, answers)], [1] * len(prompts))
    labels = torch.full_like(training["input_ids"], IGNORE_INDEX)
    labels[:, -ANSWER_LENGTH:] = training["input_ids"][:, -ANSWER_LENGTH:]
    return training, labels


def planted_model() -> LoadedModel:
    """Attention writes nothing except at layer PLANTED: the text reads the image there and nowhere else."""
    model = tiny_llava(seed=3, num_layers=LAYERS)
    with torch.no_grad():
        for layer, block in enumerate(model.model.language_model.layers):
            if layer != PLANTED:
                block.self_attn.o_proj.weight.zero_()
    return LoadedModel.from_model(model)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LoadedModel.from_model(tiny_llava(num_layers=LAYERS))


@pytest.fixture(scope="module")
def planted() -> LoadedModel:
    return planted_model()


def plain_scores(loaded, inputs, labels, intervention=Intervention()) -> dict[str, torch.Tensor]:
    with torch.no_grad(), intervene(loaded, inputs, intervention):
        logits = loaded.model(**inputs).logits.float()
    return answer_scores(logits[:, :-1], labels[:, 1:])


def test_reused_prefix_gives_the_plain_models_scores_under_every_cut(loaded):
    inputs, labels = supervised(loaded)
    table = measure_cuts(loaded, inputs, labels)
    assert len(table) == LAYERS * len(PROMPTS)
    intact = plain_scores(loaded, inputs, labels)
    blind = plain_scores(loaded, inputs, labels, Intervention(block_text_to_visual=frozenset(range(LAYERS))))
    assert intact["correct"].tolist() == [1.0] * len(PROMPTS)
    for layer in range(LAYERS):
        rows = table[table["layer"] == layer].sort_values("row")
        cut = plain_scores(loaded, inputs, labels, Intervention(block_text_to_visual=frozenset({layer})))
        for name in ("loss", "logprob"):
            torch.testing.assert_close(torch.tensor(rows[name].tolist()), cut[name], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(torch.tensor(rows[f"intact_{name}"].tolist()), intact[name], atol=1e-5,
                                       rtol=1e-4)
            torch.testing.assert_close(torch.tensor(rows[f"blind_{name}"].tolist()), blind[name], atol=1e-5,
                                       rtol=1e-4)
    # The cut matters on this random model: else the comparison above would pass trivially.
    assert (table["loss"] - table["intact_loss"]).abs().max() > 1e-3


def test_reused_prefix_keeps_qwen2_vl_multi_axis_positions():
    qwen = LoadedModel.from_model(tiny_qwen2_vl(num_layers=3))
    inputs = qwen_batch([[5, 6, 7, 8, 9], [5, 6, 7]], [(4, 4), (4, 4)])
    labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
    labels[:, -2:] = inputs["input_ids"][:, -2:]
    table = measure_cuts(qwen, inputs, labels)
    for layer in range(3):
        cut = plain_scores(qwen, inputs, labels, Intervention(block_text_to_visual=frozenset({layer})))
        measured = torch.tensor(table[table["layer"] == layer].sort_values("row")["loss"].tolist())
        torch.testing.assert_close(measured, cut["loss"], atol=1e-5, rtol=1e-4)


def test_attention_mass_is_what_eager_attention_puts_on_visual_keys(loaded):
    inputs, labels = supervised(loaded)
    table = measure_cuts(loaded, inputs, labels)
    traced = capture(loaded, inputs, CaptureSpec(attention_layers="all"))
    visual = inputs["input_ids"] == LLAVA_IMAGE_ID
    for row in range(len(PROMPTS)):
        last_visual = int(visual[row].nonzero().max())
        for layer in range(LAYERS):
            weights = traced.attentions[layer][row, :, last_visual + 1:]  # text queries after the image
            expected = float(weights[..., visual[row]].sum(-1).mean())
            measured = table[(table["row"] == row) & (table["layer"] == layer)]["attention_mass"].item()
            assert measured == pytest.approx(expected, abs=1e-5)
            assert 0 < measured < 1


def test_the_planted_layer_is_ranked_first_and_the_proxies_see_it(planted):
    inputs, labels = supervised(planted)
    layers = layer_table(measure_cuts(planted, inputs, labels)).set_index("layer")
    assert choose_layers(layers["loss_increase"].to_dict(), 1) == [PLANTED]
    assert layers.loc[PLANTED, "loss_increase"] > 1e-3
    others = [layer for layer in range(LAYERS) if layer != PLANTED]
    assert layers.loc[others, ["loss_increase", "loss_change"]].abs().max().max() < 1e-5  # attention writes nothing
    assert layers.loc[PLANTED, "loss_change"] >= layers.loc[PLANTED, "loss_increase"]
    # The text's states equal the text-alone run's until the planted layer, and differ from it on.
    assert layers.loc[:PLANTED - 1, "vision_effect"].abs().max() < 1e-5
    assert layers.loc[PLANTED, "vision_effect"] > 1e-4
    assert layers["vision_effect_step"].idxmax() == PLANTED


def test_analysis_run_resumes_and_exports_the_planted_layer(planted, tmp_path, monkeypatch):
    inputs, labels = supervised(planted)
    questions = [(None, SimpleNamespace(type=kind)) for kind in ("colour", "shape", "count")]
    batches = []

    def fake_batches(loaded, chunk):  # the tiny model has no processor: its batch stands in for the questions
        rows = slice(len(batches) * 2, len(batches) * 2 + len(chunk))
        batches.append(chunk)
        return BenchBatches({}, {key: value[rows] for key, value in inputs.items()}, labels[rows])

    monkeypatch.setattr(vica_layers, "select_questions", lambda split, n: questions[:n])
    monkeypatch.setattr(vica_layers, "probe_batches", fake_batches)
    config = VicaLayersConfig(questions=3, batch_size=2)
    summary = analyze_vica_layers(planted, str(tmp_path), config)
    assert summary["ranking"][0] == PLANTED and summary["chosen"][4] == list(range(LAYERS))
    assert summary["intact"]["accuracy"] == 1.0
    store = RunStore.load(tmp_path)
    assert layers_from_run(store, 1) == [PLANTED]
    per_question = store.read_table("per_question")
    assert sorted(set(per_question["question"])) == [0, 1, 2]
    assert per_question.drop_duplicates("question")["type"].tolist() == ["colour", "shape", "count"]
    # A second run over the finished folder measures nothing again.
    batches.clear()
    store.close()
    analyze_vica_layers(planted, str(tmp_path), config)
    assert batches == []


def test_rows_without_an_image_or_answer_are_one_line_errors(loaded):
    inputs, labels = supervised(loaded)
    with pytest.raises(InputError):
        measure_cuts(loaded, inputs, torch.full_like(labels, IGNORE_INDEX))
    text_only = inputs | {"input_ids": inputs["input_ids"].masked_fill(inputs["input_ids"] == LLAVA_IMAGE_ID, 3)}
    with pytest.raises(InputError):
        measure_cuts(loaded, text_only, labels)


def test_the_command_prints_the_layers_and_the_agreement(planted, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from analyses import vica_layers_command

    inputs, labels = supervised(planted)
    monkeypatch.setattr(vica_layers, "select_questions", lambda split, n: [(None, SimpleNamespace(type="colour"))] * n)
    monkeypatch.setattr(vica_layers, "probe_batches",
                        lambda loaded, chunk: BenchBatches({}, inputs, labels))
    monkeypatch.setattr(vica_layers_command, "load_with_notes", lambda name: planted)
    app = typer.Typer()
    app.command()(vica_layers_command.vica_layers)
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "run"), "--questions", "3"])
    assert result.exit_code == 0, result.output
    assert "how well each proxy ranks the layers" in result.output
    assert "attention_mass" in result.output and "vision_effect_step" in result.output
