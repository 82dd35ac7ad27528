"""The HiDrop workflow end to end on the default model: export a config, fine-tune with it, benchmark it."""

from __future__ import annotations

import json
from dataclasses import asdict

import pandas as pd
import pytest

from analyses.similarity import SimilarityConfig, recommend
from efficient_models.hidrop.pyramid import hidrop_schedule
from efficient_models.registry import load_config
from workbench.store import RunStore

pytestmark = pytest.mark.slow  # export, fine-tune and bench on the real default model: minutes

LAYERS = 30  # the default model's LLM


def similarity_run(folder) -> None:
    """A finished similarity run whose vision-effect curve rises from layer 4 and saturates by layer 20."""
    effect = [min(1.0, max(0.0, (layer - 3) / 16)) for layer in range(LAYERS)]
    curves = pd.DataFrame({"layer": range(LAYERS), "vision_effect": effect, "visual_self_cos": 0.9,
                           "text_self_cos": 0.9})
    store = RunStore.open(folder, kind="similarity", model="default", data="probe:8",
                          config=asdict(SimilarityConfig()))
    store.write_table("layers", curves)
    store.write_json("summary", {"recommendation": recommend(curves, SimilarityConfig())})
    store.finish(num_llm_layers=LAYERS)


@pytest.mark.usefixtures("default_model")
def test_export_train_and_bench_hidrop(tmp_path, run_wb):
    similarity_run(tmp_path / "similarity")
    config_file = tmp_path / "hidrop.yaml"
    code, _, err = run_wb("export-config", "--run", str(tmp_path / "similarity"), "--method", "hidrop",
                            "--out", str(config_file), "--token-budget", "0.1")
    assert code is None or code == 0, err
    config = load_config(config_file)
    assert config.schedule == "concave"
    assert hidrop_schedule(config).token_layer_fraction(256) == pytest.approx(0.1, abs=0.01)

    run_dir = tmp_path / "train"
    code, _, err = run_wb("train", "hidrop", "--config", str(config_file), "--out", str(run_dir), "--smoke")
    assert code is None or code == 0, err
    assert load_config(run_dir / "config.yaml") == config  # the schedule is saved beside the weights
    assert (run_dir / "projector.safetensors").is_file() and (run_dir / "lora" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4

    bench_dir = tmp_path / "bench"
    code, _, err = run_wb("bench", "--variants", "dense,hidrop,pdrop", "--run", str(run_dir),
                            "--n", "6", "--batch-size", "2", "--repeats", "1", "--decode-steps", "2",
                            "--out", str(bench_dir))
    assert code is None or code == 0, err
    report = json.loads((bench_dir / "bench.json").read_text())
    by_name = {variant["name"]: variant for variant in report["variants"]}
    assert list(by_name) == ["dense", "hidrop", "pdrop"]
    assert by_name["hidrop"]["average_visual_tokens"] < by_name["pdrop"]["average_visual_tokens"] < 256
    assert by_name["hidrop"]["prefill_flops"]["total"] < by_name["dense"]["prefill_flops"]["total"]
