"""Token schedules: counts per layer, the concave pyramid, budgets, baselines, and the config they come from."""

from __future__ import annotations

import itertools

import pytest
from pydantic import ValidationError

from efficient_models.fastv import FastVConfig, fastv_schedule, matched_config
from efficient_models.hidrop.config import HiDropConfig
from efficient_models.hidrop.pyramid import hidrop_schedule, with_token_budget
from efficient_models.pdrop import PyramidDropConfig, pdrop_schedule, scaled_layers
from efficient_models.token_schedule.schedule import TokenSchedule
from workbench.errors import InputError

PROVENANCE = {"run": "r", "kind": "similarity", "model": "m", "data": "d", "exported": "t"}


def hidrop_config(**fields) -> HiDropConfig:
    defaults = {"model": "m", "num_llm_layers": 32, "provenance": PROVENANCE, "inject_layer": 9, "exit_layer": 25,
                "schedule_power": 2.0}
    return HiDropConfig(**(defaults | fields))


def test_reference_tok48_schedule_counts_tokens_layer_by_layer():
    """HiDrop's "Tok48" on a 32-layer model: E=9, X=25, stages [10, 14, 16, 18] keeping [87, 10, 5, 1] of 576."""
    stages = [{"start_layer": layer, "keep_tokens": keep} for layer, keep in zip([10, 14, 16, 18], [87, 10, 5, 1])]
    schedule = hidrop_schedule(hidrop_config(stages=stages), num_visual=576)
    counts = schedule.keep_counts(576)
    assert counts[:9] == [0] * 9 and counts[25:] == [0] * 7
    assert counts[9] == 576 and counts[10:14] == [87] * 4 and counts[14:16] == [10] * 2
    assert counts[16:18] == [5] * 2 and counts[18:25] == [1] * 7
    assert schedule.average_visual_tokens(576) == pytest.approx(sum(counts) / 32)


def test_concave_schedule_cuts_steeply_then_thins_out():
    schedule = hidrop_schedule(hidrop_config(schedule="concave", schedule_power=3.0), num_visual=576)
    counts = schedule.keep_counts(576)[9:25]
    assert counts == sorted(counts, reverse=True) and counts[0] == 576 and counts[-1] >= 1
    drops = [before - after for before, after in itertools.pairwise(counts)]
    assert drops[0] > drops[len(drops) // 2] > drops[-1] >= 0


@pytest.mark.parametrize("budget", [0.1, 0.25])
def test_token_budget_fits_the_concave_power(budget):
    fitted = with_token_budget(hidrop_config(stages=[{"start_layer": 12, "keep_fraction": 0.5}]), budget)
    assert fitted.schedule == "concave" and not fitted.stages
    assert hidrop_schedule(fitted).token_layer_fraction(576) == pytest.approx(budget, abs=0.005)
    with pytest.raises(InputError, match="visual-token-layers"):
        with_token_budget(hidrop_config(stages=[{"start_layer": 12, "keep_fraction": 0.5}]), 0.01)


def test_baselines_follow_their_published_settings():
    fastv = fastv_schedule(FastVConfig(num_llm_layers=32))
    assert fastv.keep_counts(576) == [576, 576] + [288] * 30 and fastv.ranking_layer == "previous"
    published = pdrop_schedule(PyramidDropConfig(num_llm_layers=40))
    assert published.cuts == {8: 0.5, 16: 0.25, 24: 0.125} and published.positions == "renumbered"
    with pytest.raises(InputError, match=r"published cut layers \[8, 16, 24\] .* this one has 24: .*\[6, 12, 18\]"):
        PyramidDropConfig(num_llm_layers=24)
    assert scaled_layers(30) == [8, 15, 22]
    assert pdrop_schedule(PyramidDropConfig(num_llm_layers=32, layers=[4, 9], ratio=0.4)).cuts == pytest.approx({4: 0.4, 9: 0.16})
    matched = fastv_schedule(matched_config(32, target_average=48.0, num_visual=576))
    assert matched.average_visual_tokens(576) == pytest.approx(48.0, abs=1.0)
    with pytest.raises(InputError, match="FastV cannot"):
        matched_config(32, target_average=20.0, num_visual=576)


def test_invalid_schedules_are_refused():
    with pytest.raises(InputError, match="must not increase"):
        TokenSchedule(8, cuts={2: 0.25, 4: 0.5})
    with pytest.raises(InputError, match="outside"):
        TokenSchedule(8, inject_layer=3, cuts={2: 0.5})
    with pytest.raises(InputError, match="inject"):
        TokenSchedule(8, inject_layer=5, exit_layer=4)


def test_config_schedule_kinds_are_validated():
    with pytest.raises(ValidationError, match="exactly one"):
        hidrop_config(stages=[{"start_layer": 12, "keep_fraction": 0.5, "keep_tokens": 10}])
    with pytest.raises(ValidationError, match="takes none"):
        hidrop_config(schedule="concave", stages=[{"start_layer": 12, "keep_fraction": 0.5}])
    with pytest.raises(ValidationError, match="all give"):
        hidrop_config(stages=[{"start_layer": 12, "keep_fraction": 0.5}, {"start_layer": 14, "keep_tokens": 3}])
    with pytest.raises(ValueError, match="token count is needed"):
        hidrop_schedule(hidrop_config(stages=[{"start_layer": 12, "keep_tokens": 10}]))
