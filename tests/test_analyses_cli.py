"""`wb analyze ...` and `wb export-config` end to end on the default model, on a few probe scenes."""

import json

import pandas as pd
import pytest

from efficient_models.registry import load_config

pytestmark = pytest.mark.slow  # every analysis end to end on the real default model


@pytest.fixture(scope="module")
def tokens_run(default_model, tmp_path_factory):
    from analyses.tokens import TokensConfig, analyze_tokens
    from workbench.data.image_sets import resolve_image_set

    folder = tmp_path_factory.mktemp("runs") / "tokens"
    analyze_tokens(default_model, resolve_image_set("probe:test:3"), str(folder), TokensConfig(batch_size=3))
    return folder


def test_similarity_run_and_hidrop_export(run_wb, default_model, tmp_path):
    code, out, err = run_wb("analyze", "similarity", "--images", "probe:test:2", "--out", str(tmp_path / "sim"),
                            "--json", model=default_model)
    assert code == 0, err
    summary = json.loads(out)
    layers = pd.read_parquet(tmp_path / "sim" / "layers.parquet")
    assert list(layers["layer"]) == list(range(30))
    assert layers["vision_effect"].between(0, 2).all() and layers["visual_self_cos"].between(-1, 1.0001).all()
    recommendation = summary["recommendation"]
    assert 0 <= recommendation["injection_layer"] < recommendation["exit_layer"] <= 30
    code, out, err = run_wb("export-config", "--run", str(tmp_path / "sim"), "--method", "hidrop",
                            "--out", str(tmp_path / "hidrop.yaml"))
    assert code == 0, err
    config = load_config(tmp_path / "hidrop.yaml")
    assert (config.inject_layer, config.exit_layer) == (recommendation["injection_layer"], recommendation["exit_layer"])
    assert config.num_llm_layers == 30 and config.provenance.model == default_model.name


def test_alignment_curves_cover_every_layer(run_wb, default_model, tokens_run, tmp_path):
    code, out, err = run_wb("analyze", "alignment", "--images", "probe:test:3", "--tokens-run", str(tokens_run),
                            "--out", str(tmp_path / "align"), "--json", model=default_model)
    assert code == 0, err
    summary = json.loads(out)
    layers = pd.read_parquet(tmp_path / "align" / "layers.parquet")
    assert list(layers["layer"]) == list(range(30))
    assert layers["separability"].between(0, 1).all()
    ranked = layers.assign(gap=layers["log10_norm_ratio"].abs()).sort_values(["separability", "gap", "layer"])
    assert summary["recommended_injection_layer"] == int(ranked["layer"].iat[0])
    code, _, err = run_wb("export-config", "--run", str(tmp_path / "align"), "--method", "injection",
                          "--out", str(tmp_path / "inject.yaml"))
    assert code == 0, err
    assert load_config(tmp_path / "inject.yaml").inject_layer == summary["recommended_injection_layer"]


def test_probe_table_has_every_layer_target_and_category(run_wb, default_model, tokens_run, tmp_path):
    code, _, err = run_wb("analyze", "probe", "--images", "probe:test:3", "--tokens-run", str(tokens_run),
                          "--questions", "0", "--layers", "0,29", "--out", str(tmp_path / "probe"), model=default_model)
    assert code == 0, err
    probes = pd.read_parquet(tmp_path / "probe" / "probes.parquet")
    assert set(probes["layer"]) == {"input", "layer0", "layer29"}
    assert set(probes["target"]) == {"shape", "colour", "char"}
    assert len(probes) == 3 * 3 * 4
    fitted = probes.dropna(subset=["accuracy"])
    assert fitted["accuracy"].between(0, 1).all() and (fitted["train_tokens"] >= 20).all()


def test_interventions_table_lists_every_condition(run_wb, default_model, tokens_run, tmp_path):
    code, out, err = run_wb("analyze", "interventions", "--images", "probe:test:3", "--tokens-run", str(tokens_run),
                            "--questions", "4", "--batch-size", "4", "--skip-layers", "20-29", "--exit-layers", "15",
                            "--inject-layers", "4", "--out", str(tmp_path / "iv"), "--json", model=default_model)
    assert code == 0, err
    summary = json.loads(out)
    accuracy = summary["accuracy"]
    controls = {"remove random (from alive), as many as sink", "remove random (from alive), as many as dead",
                "remove random (from all), as many as alive"}
    assert {"all tokens", "no visual tokens", "remove alive", *controls,
            "skip visual attention, layers 20-29", "exit at layer 15", "inject at layer 4"} <= set(accuracy)
    assert all(0 <= value <= 1 for value in accuracy.values())
    assert (summary["groups"], summary["control_from"]) == ("reference", "alive")
    assert set(summary["fractions"]) == set(summary["group_fractions"]) == {"sink", "dead", "alive"}
    assert set(summary["control_shortfall"]) == controls


def test_bad_sources_and_mismatched_runs_end_with_one_line(run_wb, default_model, tokens_run, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_wb("analyze", "tokens", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "r"),
                          model=default_model)
    assert code == 2 and "no image files" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_wb("analyze", "tokens", "--images", "probe:test:3", "--topk", "5", "--out", str(tokens_run),
                          model=default_model)
    assert code == 2 and "another config" in err
    code, _, err = run_wb("analyze", "probe", "--images", "samples", "--out", str(tmp_path / "p"), model=default_model)
    assert code == 2 and "needs probe scenes" in err
    code, _, err = run_wb("export-config", "--run", str(tokens_run), "--method", "hidrop", "--out",
                          str(tmp_path / "x.yaml"))
    assert code == 2 and "similarity run" in err
