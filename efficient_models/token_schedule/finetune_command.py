"""`wb train METHOD` for a method fine-tuned by `token_schedule.finetune`: the method names its config class
and its training module; the options (--config, --recipe, --out, --resume, --steps, --smoke) are the same
for all. The training module is imported when the command runs, so `wb --help` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import typer

from workbench.console import console, status_console
from workbench.errors import InputError
from workbench.output_paths import output_folder


def finetune_command(method: str, config_class: type, training_module: str, summary: str) -> Callable[..., None]:
    """The command; `training_module` (dotted) has `DEFAULT_RECIPE` and `train(config, recipe, run_dir, resume)`."""

    def command(
        config: Path = typer.Option(..., "--config", help=f"A {method} config from `wb export-config --method {method}`."),
        recipe: Path | None = typer.Option(None, "--recipe", help="Fine-tuning recipe YAML (default: the shipped one)."),
        out: Path = typer.Option(Path(f"runs/train-{method}"), "--out", help="Run folder.", callback=output_folder),
        resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint, or start over."),
        steps: int | None = typer.Option(None, "--steps", min=1, help="Override the recipe's number of steps "
                                                                         "(with --smoke too)."),
        smoke: bool = typer.Option(False, "--smoke", help="4 steps (or --steps) on 8 scenes: checks the wiring, "
                                                          "times steps."),
    ) -> None:
        from efficient_models.registry import load_config
        from efficient_models.token_schedule.finetune import load_recipe, smoke_recipe, with_steps

        training = importlib.import_module(training_module)
        method_config = load_config(config)
        if not isinstance(method_config, config_class):
            raise InputError(f"{config} is a {method_config.method!r} config; `wb train {method}` needs a {method} one")
        settings = load_recipe(recipe or training.DEFAULT_RECIPE)
        settings = smoke_recipe(settings) if smoke else settings
        if steps is not None:  # after --smoke, so that `--smoke --steps N` runs N steps on the smoke scenes
            settings = with_steps(settings, steps)
        try:
            result = training.train(method_config, settings, out, resume=resume)
        except KeyboardInterrupt:
            status_console.print(f"interrupted; `wb train {method} --config {config} --out {out}` continues")
            raise typer.Exit(130) from None
        record, metrics = result.stages["train"], result.metrics
        console.print(f"{metrics['description']}: {record.step} steps, median {record.median_step_seconds:.2f} s/step, "
                      f"loss {record.losses[0]:.3f} -> {record.losses[-1]:.3f}; run folder {result.run_dir}")

    command.__doc__ = summary
    return command
