"""The method registry: a method registered once is found by every place that lists methods, and each
registered method's FLOPs count says what its config does to every decoder layer."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import pandas as pd
import pytest
import typer
from pydantic import Field

from analyses.similarity import SimilarityConfig, recommend
from efficient_models import registry
from efficient_models.bench import variants as bench_variants
from efficient_models.hidrop.config import HiDropConfig
from efficient_models.injection import InjectionConfig
from efficient_models.prune import PruneConfig
from efficient_models.registry import Method, Variant, count_flops, load_config
from efficient_models.token_schedule.scheduled_model import ScheduledModel
from efficient_models.token_schedule.schedule import dense
from efficient_models.vica import ViCAConfig
from tests.tiny_models import tiny_llava
from workbench.configs import LayeredConfig, write_config
from workbench.errors import InputError
from workbench.flops import DEFAULT_MODEL_SHAPES, token_schedule_flops
from workbench.models.loading import LoadedModel
from workbench.store import RunStore

LAYERS, TEXT = 30, 32
SHAPES = DEFAULT_MODEL_SHAPES
APP_PAGE = Path(__file__).resolve().parents[1] / "apps" / "export_page.py"


# --- a dummy method, registered by the test ---------------------------------------------------------

class DummyConfig(LayeredConfig):
    """Keeps `share` of the visual tokens in every layer."""

    method: Literal["dummy"] = "dummy"
    share: float = Field(default=0.5, gt=0, le=1)
    marked_layers: list[int] = []


def dummy_flops(config, shapes, text_tokens, answer_tokens=1, decode_steps=1):
    kept = round(shapes.visual_tokens_per_image * config.share)
    return token_schedule_flops(shapes, text_tokens, [kept] * shapes.num_llm_layers, answer_tokens, decode_steps)


def dummy_from_run(store):
    return {"marked_layers": [store.read_json("summary")["recommendation"]["injection_layer"]]}


def train_dummy(out: Path = typer.Option(..., "--out", help="Where the dummy writes its run.")) -> None:
    """Train the dummy method (writes a marker file)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "trained.txt").write_text("dummy")


DUMMY = Method(name="dummy", summary="a method the registry test adds", config=DummyConfig, flops=dummy_flops,
               from_run=dummy_from_run, run_kinds=("similarity",), train=train_dummy,
               variants=(Variant("dummy", "the dummy's variant", lambda request: ScheduledModel(
                   request.loaded, dense(request.loaded.adapter.num_llm_layers), "dummy")),))


@pytest.fixture
def dummy():
    registry.register(DUMMY)
    yield DUMMY
    registry.unregister("dummy")


def similarity_run(root: Path) -> Path:
    effect = [min(1.0, max(0.0, (layer - 3) / 16)) for layer in range(LAYERS)]
    curves = pd.DataFrame({"layer": range(LAYERS), "vision_effect": effect, "visual_self_cos": 0.9,
                           "text_self_cos": 0.9})
    store = RunStore.open(root / "similarity", kind="similarity", model="default", data="probe:8",
                          config=asdict(SimilarityConfig()))
    store.write_table("layers", curves)
    store.write_json("summary", {"recommendation": recommend(curves, SimilarityConfig())})
    store.finish(num_llm_layers=LAYERS)
    return store.folder


def test_a_registered_method_is_found_by_every_place_that_lists_methods(dummy, run_wb, tmp_path, monkeypatch):
    run = similarity_run(tmp_path)
    # wb export-config -> the method's from_run, validated by its config class; load_config reads it back.
    code, out, err = run_wb("export-config", "--run", str(run), "--method", "dummy", "--out", str(tmp_path / "d.yaml"))
    assert code in (None, 0), err
    config = load_config(tmp_path / "d.yaml")
    injection = RunStore.load(run).read_json("summary")["recommendation"]["injection_layer"]
    assert isinstance(config, DummyConfig) and config.marked_layers == [injection]
    assert config.provenance.kind == "similarity"
    # Its FLOPs count, through the registry.
    assert count_flops(config, SHAPES, TEXT).visual_tokens_per_layer == [128.0] * LAYERS
    # wb train --help lists it, and wb train dummy runs its entry.
    code, out, _ = run_wb("train", "--help")
    assert code == 0 and "dummy" in out and "Train the dummy method" in out
    code, _, err = run_wb("train", "dummy", "--out", str(tmp_path / "trained"))
    assert code in (None, 0), err and (tmp_path / "trained" / "trained.txt").read_text() == "dummy"
    # wb bench --variants: listed in the help, accepted, and built on the model.
    code, out, _ = run_wb("bench", "--help")
    assert code == 0 and "dummy" in out
    assert bench_variants.variant_names(["dummy"]) == ["dense", "dummy"]
    tiny = LoadedModel.from_model(tiny_llava(num_layers=2))
    monkeypatch.setattr("workbench.models.loading.load_model", lambda name: tiny)
    built = bench_variants.build_variants(["dummy"])
    assert [variant.name for variant in built] == ["dense", "dummy"] and built[1].loaded is tiny
    # The app's export page: the method in its list, pre-filled from the run, its schema as widgets, its cost.
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WB_RUNS_DIR", str(tmp_path))
    at = AppTest.from_file(str(APP_PAGE), default_timeout=60).run()
    assert any(option.startswith("dummy: a method the registry test adds") for option in
               at.selectbox(key="export_method").options)
    at.selectbox(key="export_run").set_value(str(run))
    at.selectbox(key="export_method").set_value("dummy").run()
    assert not at.exception and not at.error
    assert "method: dummy" in at.code[0].value and f"marked_layers:\n- {injection}" in at.code[0].value
    share = next(widget for widget in at.number_input if widget.key and widget.key.endswith("_share"))
    assert share.value == 0.5
    assert at.metric[0].value == "128.0"  # visual tokens per layer, from the dummy's FLOPs count
    share.set_value(0.25).run()
    assert at.metric[0].value == "64.0" and "share: 0.25" in at.code[0].value


def test_a_config_may_be_written_by_hand_without_provenance(tmp_path):
    path = write_config(InjectionConfig(num_llm_layers=LAYERS, inject_layer=3), tmp_path / "hand.yaml")
    assert "written by hand" in path.read_text().splitlines()[0]
    config = load_config(path)
    assert config.provenance is None and config.inject_layer == 3


def test_unknown_methods_and_name_clashes_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("method: magic\nnum_llm_layers: 4\n")
    with pytest.raises(InputError, match="'magic' is not a registered method"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(dataclasses.replace(registry.method("hidrop"), summary="another hidrop"))
    with pytest.raises(ValueError, match="config's `method` defaults to 'dummy'"):
        registry.register(dataclasses.replace(DUMMY, name="other"))


# --- each method's FLOPs count -----------------------------------------------------------------------

def common() -> dict:
    return {"model": "default", "num_llm_layers": LAYERS}


def dense_layer(text: int = TEXT, visual: int = 256) -> float:
    """One decoder layer over `text` + `visual` tokens with causal attention."""
    tokens = text + visual
    return SHAPES.decoder.layer_flops(tokens, tokens * (tokens + 1) // 2)


def test_schedule_methods_count_their_visual_tokens_per_layer():
    dense_count = token_schedule_flops(SHAPES, TEXT, [256] * LAYERS)
    keep_all = count_flops(InjectionConfig(**common(), inject_layer=0), SHAPES, TEXT)
    assert keep_all.visual_tokens_per_layer == [256.0] * LAYERS and keep_all.prefill == dense_count.prefill

    late = count_flops(InjectionConfig(**common(), inject_layer=10), SHAPES, TEXT)
    assert late.average_visual_tokens == pytest.approx(256 * 20 / 30)
    assert late.prefill.llm_layers[:10] == [dense_layer(visual=0)] * 10
    assert late.prefill.llm_layers[10:] == [dense_layer()] * 20
    assert late.prefill.vision == dense_count.prefill.vision  # the image is encoded in full either way

    hidrop = HiDropConfig(**common(), inject_layer=4, exit_layer=14, schedule_power=2.0,
                          stages=[{"start_layer": 4, "keep_fraction": 1.0}, {"start_layer": 9, "keep_fraction": 0.25}])
    per_layer = count_flops(hidrop, SHAPES, TEXT).visual_tokens_per_layer
    assert per_layer == [0.0] * 4 + [256.0] * 5 + [64.0] * 5 + [0.0] * 16

    prune = PruneConfig(**common(), rule={}, keep_categories=["alive"],
                        measured_fractions={"sink": 0.05, "dead": 0.45, "alive": 0.5})
    assert count_flops(prune, SHAPES, TEXT).visual_tokens_per_layer == [128.0] * LAYERS


def test_vica_counts_cross_attention_only_at_its_layers():
    vica = count_flops(ViCAConfig(**common(), cross_attention_layers=[1, 5]), SHAPES, TEXT, decode_steps=2)
    decoder = SHAPES.decoder
    cross = decoder.kv_projection_flops(256) + decoder.attention_flops(TEXT, 256)
    text_only = dense_layer(visual=0)
    assert vica.visual_tokens_per_layer == [0.0] * LAYERS
    assert vica.prefill.llm_layers[0] == text_only and vica.prefill.llm_layers[1] == pytest.approx(text_only + cross)
    assert vica.prefill.projector > 0  # the projector still runs over every visual token
    text_decode = token_schedule_flops(SHAPES, TEXT, [0] * LAYERS, decode_steps=2).decode
    assert vica.decode.total == pytest.approx(text_decode.total + 2 * decoder.attention_flops(2, 256))
    dense_llm = sum(token_schedule_flops(SHAPES, TEXT, [256] * LAYERS).prefill.llm_layers)
    assert 0.8 < 1 - sum(vica.prefill.llm_layers) / dense_llm < 1


def test_a_text_only_method_registers_without_a_flops_count_and_says_so(run_wb, tmp_path):
    text_only = Method(name="dummy", summary="a text-only method", config=DummyConfig, train=train_dummy)
    registry.register(text_only)
    try:
        code, out, _ = run_wb("train", "--help")
        assert code in (None, 0) and "dummy" in out
        with pytest.raises(InputError, match="'dummy' is text-only: it has no per-image FLOPs count"):
            count_flops(DummyConfig(num_llm_layers=LAYERS, marked_layers=[1]), SHAPES, TEXT)
    finally:
        registry.unregister("dummy")
