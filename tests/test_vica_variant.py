"""ViCA through the registry: `wb bench` runs the `vica-dropin` variant end to end on a LLaVA folder, the bench
interface runs the fast form (generation, prefill, decode) and trains in the masks form, `wb train vica` is
listed, and what does not fit is refused in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from efficient_models import registry
from efficient_models.variant import VariantRequest
from efficient_models.vica import ViCAConfig
from efficient_models.vica.model import ViCAModel
from tests.test_checkpoint_folders import LLAVA_LAYERS, llava_folder
from tests.test_vica_model import IMAGES, LAYERS, ROWS
from tests.tiny_models import llava_batch, tiny_llava
from workbench.configs import write_config
from workbench.errors import InputError
from workbench.flops import DEFAULT_MODEL_SHAPES
from workbench.models.adapter import ArchitectureAdapter
from workbench.models.gemma3 import Gemma3Adapter
from workbench.models.llava import LlavaAdapter
from workbench.models.loading import LoadedModel
from workbench.training.sequences import IGNORE_INDEX


def test_vica_is_registered_with_a_model_training_and_variants():
    method = registry.method("vica")
    assert [variant.name for variant in method.variants] == ["vica", "vica-dropin"]
    assert method.train is not None and method.check_run is not None
    assert method.runs_on(LlavaAdapter) and not method.runs_on(Gemma3Adapter)
    assert all(method.runs_on(adapter) == adapter.token_schedules for adapter in (LlavaAdapter, ArchitectureAdapter))


def test_wb_bench_runs_vica_dropin_on_a_llava_folder(tmp_path, run_wb, monkeypatch):
    monkeypatch.setattr("workbench.models.loading.default_device", lambda: "cpu")
    folder = llava_folder(tmp_path, "llava-hf-no-generation-config")
    config = write_config(ViCAConfig(num_llm_layers=LLAVA_LAYERS, cross_attention_layers=[0, 2]),
                          tmp_path / "vica.yaml")
    code, _, err = run_wb("bench", "--variants", "dense,vica-dropin", "--config", str(config), "--model", str(folder),
                          "--n", "2", "--batch-size", "2", "--repeats", "1", "--decode-steps", "2",
                          "--out", str(tmp_path / "bench"))
    assert code == 0, err
    variants = json.loads((tmp_path / "bench" / "bench.json").read_text())["variants"]
    assert [v["name"] for v in variants] == ["dense", "vica-dropin"]
    assert variants[1]["visual_tokens_per_layer"] == [0] * LLAVA_LAYERS


def test_the_vica_variant_needs_a_trained_run(run_wb):
    code, _, err = run_wb("bench", "--variants", "dense,vica")
    assert code == 2 and "variant vica needs a finished `wb train vica` run" in err


def test_the_bench_interface_generates_fast_and_trains_in_the_masks_form():
    model = tiny_llava(num_layers=LAYERS)
    loaded = LoadedModel.from_model(model)
    config = ViCAConfig(num_llm_layers=LAYERS, cross_attention_layers=[1, 3], keep=0.5)
    variant = registry.variants()["vica-dropin"].build(VariantRequest("vica-dropin", loaded, lambda: loaded,
                                                                      {"vica": config}))
    assert isinstance(variant, ViCAModel) and variant.engine.form == "fast"
    batch = llava_batch(ROWS[:2], IMAGES[:2])
    prefilled = variant.prefill(batch)
    assert torch.equal(prefilled.token, variant.engine.generate(batch, 1)[:, 0])
    assert prefilled.cache_bytes > 0
    variant.decode(prefilled, 2)
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels[:, -2:] = batch["input_ids"][:, -2:]
    model.requires_grad_(True)
    try:
        loss = variant.training_loss(batch, labels)
        loss.backward()
        assert torch.isfinite(loss) and next(loaded.adapter.projector.parameters()).grad.abs().sum() > 0
    finally:
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    assert variant.training_engine.form == "masks"
    shapes = dataclasses.replace(DEFAULT_MODEL_SHAPES, num_llm_layers=LAYERS, visual_tokens_per_image=4)
    assert "text reads 2/4 visual tokens at layers [1, 3]; prefix frozen" in variant.describe(shapes)


def test_a_config_for_another_depth_is_refused_when_the_variant_is_made():
    loaded = LoadedModel.from_model(tiny_llava(num_layers=LAYERS))
    config = ViCAConfig(num_llm_layers=LAYERS + 2, cross_attention_layers=[7])
    with pytest.raises(InputError, match=f"for a {LAYERS + 2}-layer LLM; the model has {LAYERS} layers"):
        ViCAModel.of(loaded, config)


def test_config_values_are_checked(tmp_path):
    path = tmp_path / "vica.yaml"
    path.write_text("method: vica\nnum_llm_layers: 30\ncross_attention_layers: [0, 8]\nkeep: 0\n")
    with pytest.raises(InputError, match="keep"):
        registry.load_config(path)
    path.write_text("method: vica\nnum_llm_layers: 30\ncross_attention_layers: [0, 8]\n")
    config = registry.load_config(path)
    assert config.freeze_prefix and config.keep is None


def test_wb_train_vica_is_listed(run_wb):
    code, out, _ = run_wb("train", "--help")
    assert code in (None, 0) and "vica" in out
