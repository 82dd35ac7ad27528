"""`wb train streaming`: its options; the work is in `training.py`, imported when the command runs."""

from __future__ import annotations

from pathlib import Path

import typer

from workbench.console import console, status_console
from workbench.errors import InputError
from workbench.output_paths import output_folder


def parse_mixed_wait_ks(text: str) -> list[int | str]:
    """`1,3,5,7,offline` as the config's `training_wait_ks` (which checks that each k is at least 1)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    wrong = [part for part in parts if part != "offline" and not part.lstrip("-").isdigit()]
    if not parts or wrong:
        raise InputError(f"--mixed-wait-k {text!r}: give comma-separated whole numbers and `offline`, "
                         "e.g. 1,3,5,7,offline")
    return [part if part == "offline" else int(part) for part in parts]


def train_command(
    wait_k: int | None = typer.Option(None, "--wait-k", min=1, help="The wait-k policy of the training mask "
                                                                    "(default: the config's, else 3)."),
    mixed_wait_k: str | None = typer.Option(None, "--mixed-wait-k",
                                            help="Train one model for several policies: comma-separated k and "
                                                 "`offline`, one drawn per training pair, e.g. 1,3,5,7,offline."),
    layout: str | None = typer.Option(None, "--layout", help="group (the method: group positions, streaming mask), "
                                                             "batch (plain chat sequences, baselines a and c) or "
                                                             "interleaved (wait-k arrival order, baseline b); "
                                                             "default: the config's, else group."),
    config: Path | None = typer.Option(None, "--config", help="A streaming config YAML (default: the defaults)."),
    model: str | None = typer.Option(None, "--model", help="`default` (SmolLM2-135M-Instruct from its packaged "
                                                           "GGUF) or a local Hugging Face causal chat LM folder."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Fine-tuning recipe YAML (default: the shipped one)."),
    out: Path = typer.Option(Path("runs/train-streaming"), "--out", help="Run folder.", callback=output_folder),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint, or start over."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override the recipe's number of steps."),
    smoke: bool = typer.Option(False, "--smoke", help="4 steps (or --steps) on 16 pairs: checks the wiring, "
                                                      "times steps."),
) -> None:
    """Fine-tune a causal chat LM (LoRA) to translate while reading: group positions, wait-k streaming mask."""
    from efficient_models.registry import load_config, parse_config
    from efficient_models.streaming.config import StreamingConfig
    from workbench.models.causal_lm import load_causal_lm
    from efficient_models.streaming.training import (
        DEFAULT_RECIPE, load_recipe, smoke_recipe, train_streaming,
    )

    method_config = load_config(config) if config else StreamingConfig()
    if not isinstance(method_config, StreamingConfig):
        raise InputError(f"{config} is a {method_config.method!r} config; `wb train streaming` needs a streaming one")
    updates = {"wait_k": wait_k, "model": model, "training_layout": layout,
               "training_wait_ks": parse_mixed_wait_ks(mixed_wait_k) if mixed_wait_k is not None else None}
    # Validated again, so that a wrong --layout is the config's one-line error.
    method_config = parse_config(method_config.model_dump() | {key: value for key, value in updates.items()
                                                               if value is not None}, "with the options given")
    settings = load_recipe(recipe or DEFAULT_RECIPE)
    if smoke:
        settings = smoke_recipe(settings, steps)
    elif steps is not None:
        optimisation = settings.optimisation.model_copy(update={"steps": steps})
        settings = settings.model_copy(update={"optimisation": optimisation})
    language_model, tokenizer = load_causal_lm(method_config.model)
    try:
        result = train_streaming(method_config, settings, out, language_model, tokenizer, resume=resume)
    except KeyboardInterrupt:
        status_console.print(f"interrupted; `wb train streaming --out {out}` with the same options continues")
        raise typer.Exit(130) from None
    record = result.stages["train"]
    console.print(f"{result.metrics['description']}: {record.step} steps, median {record.median_step_seconds:.2f} "
                  f"s/step, loss {record.losses[0]:.3f} -> {record.losses[-1]:.3f}; run folder {result.run_dir}")
