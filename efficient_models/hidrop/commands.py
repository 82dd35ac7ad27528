"""`wb train hidrop`: the command line of HiDrop's training entry."""

from __future__ import annotations

from pathlib import Path

import typer

from workbench.console import console, status_console
from workbench.errors import InputError
from workbench.output_paths import output_folder


def train_command(
    config: Path = typer.Option(..., "--config", help="A hidrop config from `wb export-config --method hidrop`."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Fine-tuning recipe YAML (default: the shipped one)."),
    init: str = typer.Option("dense", "--init", help="dense: start from the trained default model."),
    out: Path = typer.Option(Path("runs/train-hidrop"), "--out", help="Run folder.", callback=output_folder),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint, or start over."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override the recipe's number of steps "
                                                                     "(with --smoke too)."),
    smoke: bool = typer.Option(False, "--smoke", help="4 steps (or --steps) on 8 scenes: checks the wiring, "
                                                      "times steps."),
) -> None:
    """Fine-tune the default model (projector + LoRA) with a HiDrop schedule active."""
    from efficient_models.hidrop.config import HiDropConfig
    from efficient_models.hidrop.training import DEFAULT_RECIPE, load_recipe, smoke_recipe, train_hidrop
    from efficient_models.registry import load_config

    schedule_config = load_config(config)
    if not isinstance(schedule_config, HiDropConfig):
        raise InputError(f"{config} is a {schedule_config.method!r} config; `wb train hidrop` needs a hidrop one")
    settings = load_recipe(recipe or DEFAULT_RECIPE)
    if init != settings.init:
        raise InputError(f"--init {init!r} is not available; the recipe starts from {settings.init!r}")
    settings = smoke_recipe(settings) if smoke else settings
    if steps is not None:  # after --smoke, so that `--smoke --steps N` runs N steps on the smoke scenes
        settings = settings.model_copy(update={"optimisation": settings.optimisation.model_copy(update={"steps": steps})})
    try:
        result = train_hidrop(schedule_config, settings, out, resume=resume)
    except KeyboardInterrupt:
        status_console.print(f"interrupted; `wb train hidrop --config {config} --out {out}` continues")
        raise typer.Exit(130) from None
    record, summary = result.stages["train"], result.metrics
    console.print(f"{summary['schedule']}: {record.step} steps, median {record.median_step_seconds:.2f} s/step, "
                  f"loss {record.losses[0]:.3f} -> {record.losses[-1]:.3f}; run folder {result.run_dir}")
