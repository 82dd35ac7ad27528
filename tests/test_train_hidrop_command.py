"""`wb train hidrop`: the recipe the command runs, from --recipe, --smoke and --steps (training itself is stubbed)."""

from __future__ import annotations

import pytest

from efficient_models.hidrop import training
from efficient_models.hidrop.config import HiDropConfig
from efficient_models.token_schedule.finetune import load_recipe
from workbench.configs import write_config
from workbench.training.loop import TrainingRecord, TrainingResult


@pytest.fixture
def recipe_run(tmp_path, monkeypatch, run_wb):
    """Runs `wb train hidrop ARGS...` and returns the recipe it would have trained with."""
    config = write_config(HiDropConfig(num_llm_layers=30, inject_layer=4, exit_layer=29, schedule="concave",
                                       schedule_power=9.2), tmp_path / "hidrop.yaml")
    received = []

    def train(schedule_config, recipe, run_dir, resume=True):
        received.append(recipe)
        steps = recipe.optimisation.steps
        return TrainingResult(run_dir, {"train": TrainingRecord(step=steps, losses=[1.0] * steps,
                                                                seconds=[0.1] * steps)}, {"description": "stub"})

    monkeypatch.setattr(training, "train", train)

    def run(*args: str):
        code, _, err = run_wb("train", "hidrop", "--config", str(config), "--out", str(tmp_path / "run"), *args)
        assert code in (None, 0), err
        return received[-1]

    return run


def test_steps_are_honoured_with_smoke(recipe_run):
    smoke = recipe_run("--smoke")
    assert (smoke.optimisation.steps, smoke.train_scenes) == (4, 8)
    short = recipe_run("--smoke", "--steps", "7")
    assert (short.optimisation.steps, short.train_scenes, short.optimisation.checkpoint_every) == (7, 8, 2)


def test_steps_override_the_recipe(recipe_run):
    shipped = load_recipe(training.DEFAULT_RECIPE)
    recipe = recipe_run("--steps", "7")
    assert recipe.optimisation.steps == 7 and recipe.train_scenes == shipped.train_scenes
    assert recipe.optimisation.precision == shipped.optimisation.precision == "auto"
