"""Recommendations from the similarity curves, and the exported configs: schema checks, layer
conventions, provenance, and one-line errors for bad files."""

from dataclasses import asdict

import pandas as pd
import pytest
import yaml

from analyses.similarity import SimilarityConfig, recommend
from efficient_models.export import build_config
from efficient_models.hidrop.config import HiDropConfig
from efficient_models.registry import load_config
from workbench.configs import write_config
from workbench.errors import InputError
from workbench.store import RunStore

EFFECT = [0.0, 0.0, 0.01, 0.1, 0.3, 0.6, 0.9, 1.0, 0.98, 0.97]


def curves() -> pd.DataFrame:
    return pd.DataFrame({"layer": range(len(EFFECT)), "vision_effect": EFFECT,
                         "visual_self_cos": 0.9, "text_self_cos": 0.9})


def test_recommendation_follows_the_vision_effect_curve():
    recommendation = recommend(curves(), SimilarityConfig(onset=0.25, saturation=0.9, num_stages=2, power=2.0))
    assert recommendation["injection_layer"] == 4  # first layer at >= 25% of the peak
    assert recommendation["exit_layer"] == 6  # first layer at >= 90% of the peak
    assert recommendation["stages"] == [{"start_layer": 4, "keep_fraction": 1.0},
                                        {"start_layer": 5, "keep_fraction": 0.25}]
    assert recommendation["passive_layers"] == [0, 1, 2, 3]


def test_an_image_that_changes_nothing_gets_no_recommendation():
    flat = curves().assign(vision_effect=0.0)
    with pytest.raises(InputError, match="never changes"):
        recommend(flat, SimilarityConfig())


def export_config(run, method, out):
    return write_config(build_config(run, method), out)


def similarity_run(folder) -> RunStore:
    store = RunStore.open(folder, kind="similarity", model="default", data="probe:8",
                          config=asdict(SimilarityConfig()))
    store.write_table("layers", curves())
    store.write_json("summary", {"recommendation": recommend(curves(), SimilarityConfig())})
    store.finish(num_llm_layers=len(EFFECT))
    return store


def test_hidrop_and_vica_configs_export_with_provenance_and_validate(tmp_path):
    similarity_run(tmp_path / "run")
    path = export_config(tmp_path / "run", "hidrop", tmp_path / "hidrop.yaml")
    config = load_config(path)
    assert isinstance(config, HiDropConfig)
    assert (config.inject_layer, config.exit_layer) == (4, 6)
    assert config.provenance.kind == "similarity" and config.provenance.run.endswith("run")
    assert "0-indexed" in config.layer_convention
    vica = load_config(export_config(tmp_path / "run", "vica", tmp_path / "vica.yaml"))
    assert vica.cross_attention_layers == [4, 5, 6]  # the three largest steps of the curve
    with pytest.raises(InputError, match="needs a tokens run|no token categories"):
        build_config(tmp_path / "run", "prune")


def test_invalid_configs_fail_with_one_line_naming_the_problem(tmp_path):
    similarity_run(tmp_path / "run")
    good = yaml.safe_load(export_config(tmp_path / "run", "hidrop", tmp_path / "c.yaml").read_text())
    cases = {
        "exit_layer": (good | {"exit_layer": 2}, "must come after"),
        "stages": (good | {"stages": [{"start_layer": 5, "keep_fraction": 0.2}, {"start_layer": 4, "keep_fraction": 0.9}]},
                   "must increase"),
        "extra": (good | {"surprise": 1}, "surprise"),
        "version": (good | {"version": 2}, "version"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(InputError, match=message) as error:
            load_config(path)
        assert "\n" not in str(error.value)
    (tmp_path / "broken.yaml").write_text("method: [")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_unfinished_runs_and_unknown_methods_are_refused(tmp_path):
    RunStore.open(tmp_path / "run", kind="similarity", model="m", data="d", config={})
    with pytest.raises(InputError, match="did not finish"):
        build_config(tmp_path / "run", "hidrop")
    with pytest.raises(InputError, match="unknown method"):
        build_config(tmp_path / "run", "magic")
    with pytest.raises(InputError, match="not a run folder"):
        build_config(tmp_path, "hidrop")


def test_report_prints_the_curves_and_the_recommendation(tmp_path):
    from analyses.report import report

    similarity_run(tmp_path / "run")
    text = report(str(tmp_path / "run"))
    assert text.startswith("### similarity: default on probe:8")
    assert "| layer | vision_effect |" in text and "'injection_layer': 4" in text
    assert text.count("\n| ") == len(EFFECT) + 2  # header, rule row, one row per layer
