"""`wb analyze vision-layers`: probes find a planted attribute at its layer, stages follow the similarity
profile, the recommendation keeps the base layer, and the command runs end to end on the default model."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.vision_layer_measures import (
    linear_cka,
    norm_profile,
    probe_accuracies,
    recommend_layers,
    split_stages,
)
from analyses.vision_layers import base_layers, check_supported, patch_grid, tower_hidden_states
from workbench.errors import InputError

COLOURS = ["red", "green", "blue", "yellow"]


def planted_patches(num_images: int = 30, per_image: int = 40, seed: int = 0):
    """Object patches with random colours; layer 1 carries the colour as a one-hot signal, layer 0 only noise."""
    rng = np.random.default_rng(seed)
    count = num_images * per_image
    colours = rng.choice(COLOURS, count, p=[0.4, 0.2, 0.2, 0.2])
    patches = pd.DataFrame({
        "image_id": np.repeat([f"img{i}" for i in range(num_images)], per_image), "kind": "object",
        "coverage": 1.0, "colour": colours, "shape": rng.choice(["circle", "square"], count), "char": "",
        "position": rng.choice(["top-left", "bottom-right"], count)})
    noise = torch.from_numpy(rng.normal(size=(2, count, 16))).float()
    signal = torch.zeros(count, 16)
    signal[torch.arange(count), torch.tensor([COLOURS.index(colour) for colour in colours])] = 4.0
    return patches, {0: noise[0], 1: noise[1] + signal}


def test_colour_probe_finds_the_planted_layer_only():
    patches, features = planted_patches()
    train = {f"img{i}" for i in range(21)}
    probes = probe_accuracies(patches, features, train).set_index(["layer", "target"])
    planted, unplanted = probes.loc[(1, "colour")], probes.loc[(0, "colour")]
    assert planted["accuracy"] > 0.95
    assert unplanted["accuracy"] < unplanted["majority"] + 0.1
    assert np.isnan(probes.loc[(1, "char"), "accuracy"])  # no text patches: nothing to probe


def test_stages_split_where_consecutive_similarity_drops():
    assert split_stages([0.7, 0.95, 0.9, 0.5, 0.99], threshold=0.85) == [[0, 0], [1, 3], [4, 5]]
    assert split_stages([0.9, 0.9], threshold=0.85) == [[0, 2]]


def test_recommendation_has_the_best_layer_per_stage_and_the_base_layer():
    accuracy = {0: 0.2, 1: 0.5, 2: 0.9, 3: 0.4, 4: 0.6, 5: 0.7}
    probes = pd.DataFrame([{"layer": layer, "target": target, "accuracy": value, "majority": 0.1}
                           for layer, value in accuracy.items() for target in ("colour", "shape")])
    stages = [[0, 0], [1, 3], [4, 5]]
    assert recommend_layers(probes, stages, base_layers=[3]) == [0, 2, 3, 5]


def test_cka_and_outlier_share():
    x = torch.randn(500, 8)
    assert linear_cka(x, 3 * x @ torch.linalg.qr(torch.randn(8, 8))[0]) == pytest.approx(1, abs=1e-6)
    assert linear_cka(x, torch.randn(500, 8)) < 0.2
    states = torch.ones(1000, 4) + 0.01 * torch.randn(1000, 4)
    states[:10] *= 20  # 1% high-norm tokens
    profile = norm_profile({0: states}, outlier_z=3.5)
    assert profile["outlier_share"].iat[0] == pytest.approx(0.01)


def test_tower_states_and_base_layer_on_a_tiny_llava(llava):
    states = tower_hidden_states(llava, torch.randn(2, 3, 28, 28))
    assert len(states) == llava.adapter.num_vision_layers + 1 == 3
    assert patch_grid(states[0].shape[1]) == (1, 2)  # CLS + a 2x2 grid
    assert base_layers(llava) == [2]  # vision_feature_layer=-1: the last of hidden_states


def test_qwen2_vl_is_refused_in_one_line(qwen):
    with pytest.raises(InputError, match="qwen2_vl") as error:
        check_supported(qwen)
    assert "\n" not in str(error.value)


def test_non_probe_images_are_refused_before_the_model_loads(run_wb, llava, tmp_path):
    code, out, err = run_wb("analyze", "vision-layers", "--images", "samples", "--out", str(tmp_path / "run"),
                            model=llava)
    assert code != 0
    assert "needs probe scenes" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_command_end_to_end_on_the_default_model(run_wb, default_model, tmp_path):
    out = tmp_path / "vision"
    code, stdout, err = run_wb("analyze", "vision-layers", "--images", "probe:test:6", "--out", str(out),
                               "--batch-size", "3", "--json", model=default_model)
    assert code == 0, err
    summary = json.loads(stdout)
    layers = pd.read_parquet(out / "layers.parquet")
    probes = pd.read_parquet(out / "probes.parquet")
    assert summary["num_vision_layers"] == 12 and list(layers["layer"]) == list(range(13))
    assert set(probes["target"]) == {"colour", "shape", "char", "position"}
    assert summary["base_layer"] in summary["recommended_layers"] == sorted(summary["recommended_layers"])
    assert len(summary["recommended_layers"]) <= len(summary["stages"]) + 1
    stages = summary["stages"]
    assert stages[0][0] == 0 and stages[-1][1] == 12 and all(b[0] == a[1] + 1 for a, b in zip(stages, stages[1:]))
    assert summary["best_layers"]["position"]["accuracy"] > summary["best_layers"]["position"]["majority"]


def test_layers_page_figures_shade_stages_and_mark_recommended_layers():
    from apps.layers_page import vision_norm_figure, vision_probe_figure

    summary = {"stages": [[0, 0], [1, 2]], "recommended_layers": [0, 2], "base_layer": 2}
    probes = pd.DataFrame({"layer": [0, 1, 2] * 2, "target": ["colour"] * 3 + ["shape"] * 3,
                           "accuracy": [0.9, 0.5, 0.4, 0.2, 0.6, 0.8], "majority": 0.3})
    layers = pd.DataFrame({"layer": [0, 1, 2], "mean_norm": [1.0, 2.0, 9.0], "outlier_share": [0, 0, 0.02]})
    for figure in (vision_probe_figure(probes, summary), vision_norm_figure(layers, summary)):
        assert len(figure.layout.shapes) == 2 + 2  # two stage bands, two recommended-layer lines
        assert [a.text for a in figure.layout.annotations] == ["0", "2 (base)"]
