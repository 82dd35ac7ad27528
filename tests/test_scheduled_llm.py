"""The token-schedule engine on a tiny LLaVA: parity with the HF model, caching, batching, gradients."""

from __future__ import annotations

import pytest
import torch

from efficient_models.token_schedule import schedule as schedules
from efficient_models.token_schedule import scoring as token_scoring
from efficient_models.fastv import FastVConfig, fastv_schedule
from efficient_models.pdrop import PyramidDropConfig, pdrop_schedule
from efficient_models.token_schedule.schedule import TokenSchedule
from efficient_models.token_schedule.engine import ScheduledLLM
from tests.schedule_properties import assert_dense_reproduces_the_model, assert_padded_batch_equals_one_by_one
from tests.tiny_models import image_tokens_llava, llava_batch, tiny_llava
from workbench.errors import InputError
from workbench.models.adapter import adapter_for

LAYERS = 6
ROWS = [[1, 5] + image_tokens_llava() + [7, 8, 9], [1] + image_tokens_llava() + [7, 9, 10, 11, 12, 13]]
SCHEDULES = [
    TokenSchedule(LAYERS, inject_layer=2, exit_layer=5, cuts={3: 0.5, 4: 0.25}, name="hidrop-like"),
    TokenSchedule(LAYERS, inject_layer=1, cuts={1: 0.5}, name="cut at entry"),
    fastv_schedule(FastVConfig(num_llm_layers=LAYERS, layer=2, keep=0.5)),
    pdrop_schedule(PyramidDropConfig(num_llm_layers=LAYERS, layers=[2, 3, 4])),
    pdrop_schedule(PyramidDropConfig(num_llm_layers=LAYERS, layers=[2, 4], positions="persistent"), name="pdrop-persistent"),
    TokenSchedule(LAYERS, exit_layer=0, name="no vision"),
]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(num_layers=LAYERS)


@pytest.fixture(scope="module")
def batch():
    return llava_batch(ROWS, [1, 1])


def single_rows(batch):
    """Each row of the left-padded batch on its own, without its padding."""
    for row in range(batch["input_ids"].shape[0]):
        start = int((batch["attention_mask"][row] == 0).sum())
        yield {"input_ids": batch["input_ids"][row:row + 1, start:],
               "attention_mask": batch["attention_mask"][row:row + 1, start:],
               "pixel_values": batch["pixel_values"][row:row + 1]}


def test_dense_schedule_reproduces_the_model(model, batch):
    assert_dense_reproduces_the_model(model, batch)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda schedule: schedule.name)
def test_cached_generation_equals_uncached(model, batch, schedule):
    engine = ScheduledLLM(adapter_for(model), schedule)
    assert torch.equal(engine.generate(batch, 6), engine.generate(batch, 6, use_cache=False))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda schedule: schedule.name)
def test_padded_batch_equals_one_by_one(model, batch, schedule):
    assert_padded_batch_equals_one_by_one(ScheduledLLM(adapter_for(model), schedule), batch, single_rows(batch))


def test_pruning_changes_answers_and_keeps_the_counted_tokens(model, batch):
    adapter = adapter_for(model)
    schedule = SCHEDULES[0]
    engine = ScheduledLLM(adapter, schedule)
    with torch.no_grad():
        output = engine.forward(adapter.input_embeddings(batch), batch["input_ids"], batch["attention_mask"])
    counts = schedule.keep_counts(4)
    assert sorted(output.kept) == [3, 4]
    for layer, kept in output.kept.items():
        assert kept.sum(1).tolist() == [counts[layer]] * 2
    assert not output.present[adapter.visual_token_mask(batch["input_ids"])].any()  # all gone after the exit
    dense = ScheduledLLM(adapter, schedules.dense(LAYERS)).generate(batch, 6)
    assert not torch.equal(engine.generate(batch, 6), dense)


def test_eager_attention_gives_the_same_answers(batch):
    sdpa, eager = tiny_llava(num_layers=LAYERS), tiny_llava(num_layers=LAYERS, attn_implementation="eager")
    for schedule in SCHEDULES[:3]:
        assert torch.equal(ScheduledLLM(adapter_for(sdpa), schedule).generate(batch, 5),
                           ScheduledLLM(adapter_for(eager), schedule).generate(batch, 5))


def test_removed_tokens_differ_per_row_and_match_one_by_one(model, batch):
    """Category pruning removes different numbers of tokens per row; rows still answer as they do alone."""
    removed = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    visual = adapter_for(model).visual_token_mask(batch["input_ids"])
    removed[0, visual[0].nonzero()[:1, 0]] = True
    removed[1, visual[1].nonzero()[:3, 0]] = True
    engine = ScheduledLLM(adapter_for(model), SCHEDULES[2])
    together = engine.generate(batch, 5, removed=removed)
    assert not torch.equal(together, engine.generate(batch, 5))
    for row, single in enumerate(single_rows(batch)):
        alone = engine.generate(single, 5, removed=removed[row:row + 1, -single["input_ids"].shape[1]:])
        assert torch.equal(together[row, :alone.shape[1]], alone[0])


def test_soft_top_k_is_hard_forward_and_passes_gradient_backward():
    scores = torch.randn(2, 10, requires_grad=True)
    candidates = torch.ones(2, 10, dtype=torch.bool)
    candidates[0, :3] = False
    keep, multiplier = token_scoring.differentiable_keep(scores, candidates, k=4)
    assert keep.sum(1).tolist() == [4, 4]
    assert torch.equal(keep, token_scoring.top_k_keep(scores.detach(), candidates, 4))
    assert torch.allclose(multiplier, torch.ones_like(multiplier))
    (multiplier * torch.randn(2, 10)).sum().backward()
    assert scores.grad.abs().sum() > 0


def test_token_selection_passes_gradient_into_the_scoring_layer(model, batch, monkeypatch):
    """The cut layer's key projection gets a different gradient when the selection is differentiable."""
    adapter = adapter_for(model)
    engine = ScheduledLLM(adapter, TokenSchedule(LAYERS, cuts={2: 0.5}), sharpness=0.05)
    weight = adapter.llm_layers[2].self_attn.k_proj.weight

    def key_gradient() -> torch.Tensor:
        weight.grad = None
        with torch.enable_grad():
            weight.requires_grad_(True)
            embeddings = adapter.input_embeddings(batch).detach().requires_grad_(True)
            output = engine.forward(embeddings, batch["input_ids"], batch["attention_mask"])
            output.hidden.pow(2).sum().backward()
        return weight.grad.clone()

    with_selection = key_gradient()
    monkeypatch.setattr("efficient_models.token_schedule.engine.differentiable_keep",
                        lambda scores, candidates, k, sharpness: (None, torch.ones_like(scores)))
    without_selection = key_gradient()
    assert (with_selection - without_selection).abs().max() > 1e-6


def test_schedules_need_the_same_image_tokens_in_every_row(model):
    uneven = llava_batch([[1] + image_tokens_llava() * 2 + [7], [1] + image_tokens_llava() + [7, 8]], [2, 1])
    engine = ScheduledLLM(adapter_for(model), SCHEDULES[0])
    with pytest.raises(InputError, match="different numbers of visual tokens"):
        engine.generate(uneven, 2)


def test_schedule_for_another_depth_is_refused(model):
    with pytest.raises(InputError, match="layers"):
        ScheduledLLM(adapter_for(model), schedules.dense(LAYERS + 1))
    # A bench variant is refused when it is made, before any question is asked.
    from efficient_models.token_schedule.scheduled_model import ScheduledModel
    from workbench.models.loading import LoadedModel

    with pytest.raises(InputError, match=f"schedule is for a {LAYERS + 1}-layer LLM; .* has {LAYERS} layers"):
        ScheduledModel(LoadedModel.from_model(model), schedules.dense(LAYERS + 1))
