"""The Layers page's SkipGPT-routing and ViCA-layer curves, from synthetic run tables."""

import pandas as pd
import pytest

from apps.method_layers import routing_figure, vica_layers_figure


def routing_table() -> pd.DataFrame:
    """2 layers x 2 modules x 4 positions, 10 real tokens each; attention runs less in layer 1 and at late positions."""
    rows = []
    for layer in range(2):
        for module in ("attention", "mlp"):
            for position in range(4):
                ran = 10 if module == "mlp" else 10 - 4 * layer - position
                rows.append({"layer": layer, "module": module, "position": position, "tokens": 10, "ran": ran})
    return pd.DataFrame(rows)


def test_routing_shares_per_layer_and_per_position_bin():
    attention, mlp = routing_figure(routing_table(), "layer").data
    assert attention.name == "attention" and list(attention.x) == [0, 1]
    # layer 0 skips 0+1+2+3 of 40, layer 1 4+5+6+7 of 40
    assert list(attention.y) == pytest.approx([6 / 40, 22 / 40]) and list(mlp.y) == [0, 0]
    attention, _ = routing_figure(routing_table(), "position", bins=2).data
    # bin 0 = positions 0, 1 (skips 0, 1, 4, 5 of 40), bin 1 = positions 2, 3 (2, 3, 6, 7 of 40)
    assert list(attention.x) == [0, 1] and list(attention.y) == pytest.approx([10 / 40, 18 / 40])


def test_vica_layers_marks_the_chosen_layers():
    layers = pd.DataFrame({"layer": [0, 1, 2], "loss_increase": [0.1, 0.5, 0.2], "attention_mass": [0.3, 0.2, 0.1]})
    bars, mass = vica_layers_figure(layers, chosen=[1]).data
    colours = list(bars.marker.color)
    assert colours[1] != colours[0] == colours[2] and list(bars.y) == [0.1, 0.5, 0.2]
    assert mass.yaxis == "y2" and list(mass.y) == [0.3, 0.2, 0.1]
