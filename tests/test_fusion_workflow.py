"""The fusion workflow end to end on the default model: export a config from a vision-layers run, fine-tune
with it (`wb train fusion --smoke`) at the input or inside the LLM, benchmark the trained run next to dense."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from efficient_models.registry import load_config
from workbench.configs import yaml_text
from workbench.store import RunStore

pytestmark = pytest.mark.slow  # export, fine-tune and bench on the real default model: about a minute


def vision_layers_run(folder) -> None:
    store = RunStore.open(folder, kind="vision-layers", model="default", data="probe:8", config={})
    store.write_json("summary", {"recommended_layers": [6, 12], "num_vision_layers": 12, "base_layer": 12})
    store.finish()


@pytest.mark.usefixtures("default_model")
@pytest.mark.parametrize("mode", ["input", "internal"])
def test_export_train_and_bench_fusion(tmp_path, run_wb, mode):
    vision_layers_run(tmp_path / "vision-layers")
    config_file = tmp_path / "fusion.yaml"
    code, _, err = run_wb("export-config", "--run", str(tmp_path / "vision-layers"), "--method", "fusion",
                          "--out", str(config_file))
    assert code in (None, 0), err
    config = load_config(config_file)
    assert (config.layers, config.mode) == ([6, 12], "input")
    if mode == "internal":
        config = config.model_copy(update={"mode": "internal"})
        config_file.write_text(yaml_text(config, "the exported layers, fused inside the LLM"))

    run_dir = tmp_path / "train"
    code, _, err = run_wb("train", "fusion", "--config", str(config_file), "--out", str(run_dir), "--smoke")
    assert code in (None, 0), err
    assert load_config(run_dir / "config.yaml") == config
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4

    bench_dir = tmp_path / "bench"
    code, _, err = run_wb("bench", "--variants", "dense,fusion", "--run", str(run_dir), "--n", "4",
                          "--batch-size", "2", "--repeats", "1", "--decode-steps", "2", "--out", str(bench_dir))
    assert code in (None, 0), err
    by_name = {variant["name"]: variant for variant in json.loads((bench_dir / "bench.json").read_text())["variants"]}
    assert list(by_name) == ["dense", "fusion"]
    assert f"{mode} fusion of vision layers [6, 12]" in by_name["fusion"]["description"]
    # E_D's widened projector, or I_D's second projector, reads layer 6 too: more projector FLOPs, the same LLM.
    assert by_name["fusion"]["prefill_flops"]["total"] > by_name["dense"]["prefill_flops"]["total"]
    if mode == "internal":  # its projector for layer 6 trained away from its zero start
        trained = load_file(run_dir / "internal_fusion.safetensors")
        assert any(bool(tensor.abs().amax() > 0) for name, tensor in trained.items() if name.endswith("linear_2.weight"))
