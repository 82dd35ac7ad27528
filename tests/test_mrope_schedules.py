"""The token-schedule engine on the Qwen2-VL family (multi-axis rotary, M-RoPE): parity with the HF model,
caching and batching as on LLaVA, every token keeping its (time, height, width) ids, and `wb bench` on a folder."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from efficient_models.fastv import FastVConfig, fastv_schedule
from efficient_models.hidrop.config import HiDropConfig
from efficient_models.hidrop.pyramid import hidrop_schedule
from efficient_models.injection import InjectionConfig, injection_schedule
from efficient_models.pdrop import PyramidDropConfig, pdrop_schedule
from efficient_models.token_schedule import schedule as schedules
from efficient_models.token_schedule.engine import ScheduledLLM
from efficient_models.token_schedule.schedule import TokenSchedule
from efficient_models.token_schedule.scheduled_model import visual_tokens_per_image
from tests.schedule_properties import assert_dense_reproduces_the_model, assert_padded_batch_equals_one_by_one
from tests.test_checkpoint_folders import qwen_folder, tiny_qwen2_5_vl
from tests.tiny_models import qwen_batch, tiny_qwen2_vl
from workbench.errors import InputError
from workbench.flops import ModelShapes
from workbench.models.adapter import adapter_for
from workbench.models.loading import load_model
from workbench.models.qwen2_vl import Qwen2VLAdapter

LAYERS = 6
# Two rows of 8 image tokens each, a 2x4 and a 4x2 grid after the 2x2 merge, and text of different lengths
# (so the first row is left-padded).
GRIDS = [(4, 8), (8, 4)]
TEXT = [[3, 4, 5], [6, 7, 8, 9, 10, 11]]
NUM_VISUAL = 8
SCHEDULES = [
    hidrop_schedule(HiDropConfig(num_llm_layers=LAYERS, inject_layer=1, exit_layer=5, schedule="concave",
                                 schedule_power=2.0), NUM_VISUAL),
    fastv_schedule(FastVConfig(num_llm_layers=LAYERS, layer=2, keep=0.5)),
    pdrop_schedule(PyramidDropConfig(num_llm_layers=LAYERS, layers=[2, 3, 4])),
    pdrop_schedule(PyramidDropConfig(num_llm_layers=LAYERS, layers=[2, 4], positions="persistent"),
                   name="pdrop-persistent"),
    injection_schedule(InjectionConfig(num_llm_layers=LAYERS, inject_layer=2)),
    TokenSchedule(LAYERS, exit_layer=0, name="no vision"),
]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_vl(num_layers=LAYERS)


@pytest.fixture(scope="module")
def batch():
    return qwen_batch(TEXT, GRIDS)


def single_rows(batch):
    """Each row of the left-padded batch on its own, without its padding, with its own image's patches."""
    first_patch = 0
    for row, patches in enumerate(batch["image_grid_thw"].prod(-1).tolist()):
        start = int((batch["attention_mask"][row] == 0).sum())
        yield {**{key: batch[key][row:row + 1, start:] for key in ("input_ids", "attention_mask", "mm_token_type_ids")},
               "pixel_values": batch["pixel_values"][first_patch:first_patch + patches],
               "image_grid_thw": batch["image_grid_thw"][row:row + 1]}
        first_patch += patches


def test_image_tokens_take_their_grid_row_and_column(model, batch):
    positions = adapter_for(model).position_ids(batch)  # [3, batch, seq]
    assert positions.shape == (3, *batch["input_ids"].shape)
    visual = batch["input_ids"][1] == adapter_for(model).image_token_id
    time, height, width = positions[:, 1, visual]  # the 4x2 grid after <|vision_start|> at position 0
    assert time.tolist() == [1] * 8
    assert height.tolist() == [1, 1, 2, 2, 3, 3, 4, 4] and width.tolist() == [1, 2] * 4
    # The text after the image continues after its largest id, not after its 8 tokens.
    assert positions[:, 1, -len(TEXT[1])].tolist() == [6, 6, 6]


@pytest.mark.parametrize("build", [lambda: tiny_qwen2_vl(num_layers=LAYERS), tiny_qwen2_5_vl],
                         ids=["qwen2-vl", "qwen2.5-vl"])
def test_dense_schedule_reproduces_the_model(build, batch):
    model = build()
    assert_dense_reproduces_the_model(model, batch, positions=adapter_for(model).position_ids(batch))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda schedule: schedule.name)
def test_cached_generation_equals_uncached(model, batch, schedule):
    engine = ScheduledLLM(adapter_for(model), schedule)
    assert torch.equal(engine.generate(batch, 6), engine.generate(batch, 6, use_cache=False))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda schedule: schedule.name)
def test_padded_batch_equals_one_by_one(model, batch, schedule):
    assert_padded_batch_equals_one_by_one(ScheduledLLM(adapter_for(model), schedule), batch, single_rows(batch))


def test_pruning_changes_answers(model, batch):
    adapter = adapter_for(model)
    dense = ScheduledLLM(adapter, schedules.dense(LAYERS)).generate(batch, 6)
    assert not torch.equal(ScheduledLLM(adapter, SCHEDULES[0]).generate(batch, 6), dense)


class IdsAsRotary(nn.Module):
    """Stands in for the rotary embedding: cos carries the (time, height, width) ids in its first channels, so
    each layer's `position_embeddings` say which ids it ran with."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x, position_ids):
        ids = position_ids if position_ids.dim() == 3 else position_ids[None].expand(3, -1, -1)
        cos = torch.ones(*ids.shape[1:], self.head_dim, dtype=x.dtype)
        cos[..., :3] = ids.permute(1, 2, 0).to(x.dtype)
        return cos, torch.zeros_like(cos)


@pytest.fixture
def recorded_ids(model, monkeypatch):
    """Per decoder layer, the [batch, n, 3] position ids of each call, the rotary replaced by `IdsAsRotary`."""
    adapter = adapter_for(model)
    # setitem on the module registry: monkeypatch.setattr would delete a submodule on undo, not restore it.
    monkeypatch.setitem(adapter.language_model._modules, "rotary_emb",
                        IdsAsRotary(adapter.llm_layers[0].self_attn.head_dim))
    used = [[] for _ in adapter.llm_layers]
    handles = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, record=record: record.append(kwargs["position_embeddings"][0][..., :3].long()),
        with_kwargs=True) for layer, record in zip(adapter.llm_layers, used)]
    yield used
    for handle in handles:
        handle.remove()


@torch.no_grad()
def test_kept_tokens_keep_their_3d_ids_and_decoding_continues_after_the_prompt(model, batch, recorded_ids):
    adapter = adapter_for(model)
    schedule = SCHEDULES[1]  # FastV: half the image's tokens from layer 2 on
    engine = ScheduledLLM(adapter, schedule)
    prompt_ids = adapter.position_ids(batch)
    output = engine.forward(adapter.input_embeddings(batch), batch["input_ids"], batch["attention_mask"],
                            use_cache=True, positions=prompt_ids)
    visual = adapter.visual_token_mask(batch["input_ids"])
    (cut,) = schedule.cuts
    for layer, (used,) in enumerate(recorded_ids):
        in_set = ~visual | output.kept[cut] if layer >= cut else torch.ones_like(visual)  # padding included
        assert (in_set & visual).sum(1).tolist() == [schedule.keep_counts(NUM_VISUAL)[layer]] * 2
        for row in range(2):
            assert torch.equal(used[row], prompt_ids[:, row, in_set[row]].T), f"layer {layer}, row {row}"

    # Decoding: every layer's next token sits after the prompt's largest id, as the model's rope_deltas say.
    _, rope_deltas = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                image_grid_thw=batch["image_grid_thw"],
                                                attention_mask=batch["attention_mask"])
    expected = rope_deltas[:, 0] + batch["attention_mask"].sum(1)
    for step in range(2):
        engine.decode(adapter.embed_tokens(torch.tensor([[3], [4]])), output.cache)
        for used in recorded_ids:
            assert torch.equal(used[-1][:, 0], (expected + step)[:, None].expand(-1, 3))


@torch.no_grad()
def test_renumbered_sets_count_from_zero_on_every_axis(model, batch, recorded_ids):
    adapter = adapter_for(model)
    engine = ScheduledLLM(adapter, SCHEDULES[2])  # PyramidDrop as published: renumbered after each cut
    single = next(single_rows(batch))  # no padding: every entry of the set is a real token
    engine.forward(adapter.input_embeddings(single), single["input_ids"], single["attention_mask"],
                   positions=adapter.position_ids(single))
    assert not torch.equal(recorded_ids[0][0][0, :, 1], recorded_ids[0][0][0, :, 0])  # layer 0: the grid's ids
    for layer in range(2, LAYERS):
        used = recorded_ids[layer][0][0]
        assert torch.equal(used, torch.arange(len(used))[:, None].expand(-1, 3)), f"layer {layer}"


def test_positions_come_from_the_grid_or_not_at_all(model, batch, monkeypatch):
    adapter = adapter_for(model)
    engine = ScheduledLLM(adapter, SCHEDULES[1])
    without_grid = {key: value for key, value in batch.items() if key != "image_grid_thw"}
    with pytest.raises(InputError, match="image_grid_thw"):
        engine.forward(adapter.input_embeddings(batch), batch["input_ids"], batch["attention_mask"])
    with pytest.raises(InputError, match="image_grid_thw"):
        adapter.position_ids(without_grid)
    monkeypatch.setattr(Qwen2VLAdapter, "token_schedules", False)
    with pytest.raises(InputError, match="Qwen2VLAdapter does not build its LLM's input embeddings"):
        ScheduledLLM(adapter, SCHEDULES[1])


def test_wb_bench_dense_fastv_runs_on_a_qwen2_vl_folder(tmp_path, run_wb, monkeypatch):
    monkeypatch.setattr("workbench.models.loading.default_device", lambda: "cpu")
    folder = qwen_folder(tmp_path, "qwen2-vl-hub")
    # The FLOPs count's tokens per image are the processor's.
    loaded = load_model(str(folder), device="cpu")
    assert ModelShapes.of_model(loaded).visual_tokens_per_image == visual_tokens_per_image(loaded)
    code, _, err = run_wb("bench", "--variants", "dense,fastv", "--model", str(folder), "--n", "2", "--batch-size",
                          "2", "--repeats", "1", "--decode-steps", "2", "--out", str(tmp_path / "bench"))
    assert code == 0, err
    variants = json.loads((tmp_path / "bench" / "bench.json").read_text())["variants"]
    assert [(v["name"], v["visual_tokens_per_layer"]) for v in variants] == [
        ("dense", [16, 16, 16]), ("fastv", [16, 16, 8])]
    assert variants[1]["prefill_flops"]["vision"] == variants[0]["prefill_flops"]["vision"] > 0
